// Opens a console page in headless Chromium and reports what a person sees.
// Usage: node tests/browser/open_console.mjs URL SCREENSHOT.png [wait-for-state] [timeout-ms]
// Prints one JSON line: {"state": ..., "status": ..., "canvas": {w, h}, "nonBlank": bool}
// When waiting for "connected", it also waits (same timeout) until the
// canvas shows a non-black pixel; the whole canvas is scanned.
import { chromium } from 'playwright-core';

const [url, shot, want = 'connected', timeoutArg = '20000'] = process.argv.slice(2);
if (!url || !shot) {
  console.error('usage: open_console.mjs URL SCREENSHOT [state] [timeout-ms]');
  process.exit(2);
}
const timeout = Number(timeoutArg);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
let result = {};
try {
  const page = await browser.newPage({ viewport: { width: 1024, height: 700 } });
  const logs = [];
  page.on('console', (m) => logs.push(m.type() + ': ' + m.text()));
  page.on('pageerror', (e) => logs.push('pageerror: ' + e.message));
  await page.goto(url);
  try {
    await page.waitForFunction((s) => document.body.dataset.state === s, want, { timeout });
  } catch (_) { /* report whatever state the page reached */ }
  const canvasPainted = () => {
    const c = document.querySelector('#screen canvas');
    if (!c || !c.width || !c.height) return false;
    try {
      const ctx = c.getContext('2d');
      const d = ctx.getImageData(0, 0, c.width, c.height).data;
      for (let i = 0; i < d.length; i += 4) {
        if (d[i] || d[i + 1] || d[i + 2]) return true;
      }
    } catch (_) { /* unreadable canvas counts as blank */ }
    return false;
  };
  if (want === 'connected' && await page.evaluate(() => document.body.dataset.state) === 'connected') {
    // Wait for the first framebuffer updates to paint something (the whole
    // canvas is scanned), within the same timeout.
    try {
      await page.waitForFunction(canvasPainted, null, { timeout, polling: 100 });
    } catch (_) { /* reported as nonBlank: false */ }
  }
  const nonBlank = await page.evaluate(canvasPainted);
  result = await page.evaluate(() => {
    const c = document.querySelector('#screen canvas');
    return {
      state: document.body.dataset.state,
      status: document.getElementById('status').textContent,
      canvas: { w: c ? c.width : 0, h: c ? c.height : 0 },
      location: window.location.href,
    };
  });
  result.nonBlank = nonBlank;
  result.logs = logs.slice(-20);
  await page.screenshot({ path: shot });
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
