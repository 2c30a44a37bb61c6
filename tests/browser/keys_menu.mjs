// Opens a console page, then uses its keys menu: sticky Ctrl with "c"
// typed on the keyboard, then Esc, Tab and Ctrl-Alt-F2 from the menu.
// Usage: node tests/browser/keys_menu.mjs URL SCREENSHOT.png [timeout-ms]
// Prints one JSON line: {"state", "ctrlPressedAfter", "menuButtons"}
import { launch, openPage } from './common.mjs';

const [url, shot, timeoutArg = '20000'] = process.argv.slice(2);
if (!url || !shot) {
  console.error('usage: keys_menu.mjs URL SCREENSHOT [timeout-ms]');
  process.exit(2);
}
const timeout = Number(timeoutArg);
const browser = await launch();
let result = {};
try {
  const { page, logs } = await openPage(browser);
  await page.goto(url);
  await page.waitForFunction(() => document.body.dataset.state === 'connected', null, { timeout });
  const canvas = page.locator('#screen canvas');
  const box = await canvas.boundingBox();
  await page.mouse.move(box.x + box.width / 3, box.y + box.height / 3);
  await page.click('#keys-toggle');
  result.menuButtons = await page.$$eval('#keys-menu button', (bs) => bs.map((b) => b.textContent));
  await page.click('#keys-menu button[data-key="Control"]');
  result.ctrlPressed = await page.getAttribute('#keys-menu button[data-key="Control"]', 'aria-pressed');
  await page.keyboard.press('c');
  await page.waitForTimeout(300);
  result.ctrlPressedAfter = await page.getAttribute('#keys-menu button[data-key="Control"]', 'aria-pressed');
  for (const key of ['Escape', 'Tab', 'CtrlAltF2']) {
    await page.click(`#keys-menu button[data-key="${key}"]`);
    await page.waitForTimeout(200);
  }
  result.state = await page.evaluate(() => document.body.dataset.state);
  await page.screenshot({ path: shot });
  result.logs = logs.slice(-20);
} catch (e) {
  result.error = String(e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
