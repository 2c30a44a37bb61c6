// Opens a console page in headless Chromium, waits until it is connected and
// painted, lets the screen settle, and saves the canvas at its own size (the
// framebuffer, not the scaled view) as a PNG.
// Usage: node tests/browser/console_canvas.mjs URL SCREENSHOT.png CANVAS.png [settle-ms] [timeout-ms]
// Prints one JSON line: {"state", "status", "canvas": {w, h}, "nonBlank", "saved"}
import { writeFileSync } from 'node:fs';
import { launch, openPage, screenPainted, consoleSummary } from './common.mjs';

const [url, shot, canvasPng, settleArg = '2000', timeoutArg = '20000'] = process.argv.slice(2);
if (!url || !shot || !canvasPng) {
  console.error('usage: console_canvas.mjs URL SCREENSHOT CANVAS [settle-ms] [timeout-ms]');
  process.exit(2);
}
const timeout = Number(timeoutArg);
const browser = await launch();
let result = {};
try {
  const { page, logs } = await openPage(browser);
  await page.goto(url);
  try {
    await page.waitForFunction(() => document.body.dataset.state === 'connected', null, { timeout });
  } catch (_) { /* reported below */ }
  const canvasPainted = screenPainted;
  result.saved = false;
  if (await page.evaluate(() => document.body.dataset.state) === 'connected') {
    try {
      await page.waitForFunction(canvasPainted, null, { timeout, polling: 100 });
    } catch (_) { /* reported as nonBlank: false */ }
    await page.waitForTimeout(Number(settleArg));
    const dataUrl = await page.evaluate(() => {
      const c = document.querySelector('#screen canvas');
      return c ? c.toDataURL('image/png') : null;
    });
    if (dataUrl && dataUrl.startsWith('data:image/png;base64,')) {
      writeFileSync(canvasPng, Buffer.from(dataUrl.slice('data:image/png;base64,'.length), 'base64'));
      result.saved = true;
    }
  }
  result.nonBlank = await page.evaluate(canvasPainted);
  Object.assign(result, await page.evaluate(consoleSummary));
  await page.screenshot({ path: shot });
  result.logs = logs.slice(-20);
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
