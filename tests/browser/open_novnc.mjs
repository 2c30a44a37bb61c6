// Opens stock noVNC (vnc.html, e.g. Debian's /usr/share/novnc) in headless
// Chromium and reports whether it connected.
// Usage: node tests/browser/open_novnc.mjs URL SCREENSHOT.png [timeout-ms]
// Prints one JSON line:
//   {"connected": bool, "status": "...", "classes": "...", "canvas": {w, h}, "nonBlank": bool}
// "connected" means <html> has the noVNC_connected class or #noVNC_status
// says "Connected"; once connected it also waits (same timeout) for a
// non-black pixel on the canvas.
import { launch, openPage } from './common.mjs';

const [url, shot, timeoutArg = '20000'] = process.argv.slice(2);
if (!url || !shot) {
  console.error('usage: open_novnc.mjs URL SCREENSHOT [timeout-ms]');
  process.exit(2);
}
const timeout = Number(timeoutArg);
const browser = await launch();
let result = {};
try {
  const { page, logs } = await openPage(browser);
  await page.goto(url);
  const isConnected = () => {
    if (document.documentElement.classList.contains('noVNC_connected')) return true;
    const s = document.getElementById('noVNC_status');
    return !!s && /^Connected/.test(s.textContent.trim());
  };
  const canvasPainted = () => {
    const c = document.querySelector('#noVNC_container canvas') || document.querySelector('canvas');
    if (!c || !c.width || !c.height) return false;
    try {
      const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      for (let i = 0; i < d.length; i += 4) {
        if (d[i] || d[i + 1] || d[i + 2]) return true;
      }
    } catch (_) { /* unreadable canvas counts as blank */ }
    return false;
  };
  let connected = false;
  try {
    await page.waitForFunction(isConnected, null, { timeout, polling: 100 });
    connected = true;
  } catch (_) { /* reported below */ }
  if (connected) {
    try {
      await page.waitForFunction(canvasPainted, null, { timeout, polling: 100 });
    } catch (_) { /* reported as nonBlank: false */ }
  }
  const nonBlank = await page.evaluate(canvasPainted);
  result = await page.evaluate(() => {
    const c = document.querySelector('#noVNC_container canvas') || document.querySelector('canvas');
    const s = document.getElementById('noVNC_status');
    return {
      status: s ? s.textContent.trim() : null,
      classes: document.documentElement.className,
      canvas: { w: c ? c.width : 0, h: c ? c.height : 0 },
    };
  });
  result.connected = connected;
  result.nonBlank = nonBlank;
  result.logs = logs.slice(-20);
  await page.screenshot({ path: shot });
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
