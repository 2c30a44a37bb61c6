// Opens a console page in headless Chromium and reports what a person sees.
// Usage: node tests/browser/open_console.mjs URL SCREENSHOT.png [wait-for-state] [timeout-ms]
// Prints one JSON line: {"state": ..., "status": ..., "canvas": {w, h}, "nonBlank": bool}
// When waiting for "connected", it also waits (same timeout) until the
// canvas shows a non-black pixel; the whole canvas is scanned.
import { launch, openPage, screenPainted } from './common.mjs';

const [url, shot, want = 'connected', timeoutArg = '20000'] = process.argv.slice(2);
if (!url || !shot) {
  console.error('usage: open_console.mjs URL SCREENSHOT [state] [timeout-ms]');
  process.exit(2);
}
const timeout = Number(timeoutArg);
const browser = await launch();
let result = {};
try {
  const { page, logs } = await openPage(browser);
  await page.goto(url);
  try {
    await page.waitForFunction((s) => document.body.dataset.state === s, want, { timeout });
  } catch (_) { /* report whatever state the page reached */ }
  const canvasPainted = screenPainted;
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
