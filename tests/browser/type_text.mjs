// Opens a console page, waits until it is connected, then types with the
// keyboard onto the screen and, separately, through the page's "Type text"
// panel; also tries a text over the panel's limit.
// Usage: node tests/browser/type_text.mjs URL SCREENSHOT.png KEYBOARD_TEXT PANEL_TEXT [timeout-ms]
// Prints one JSON line: {"state", "typeToggle", "progress", "progressState", "tooLong", "tooLongState"}
import { launch, openPage } from './common.mjs';

const [url, shot, keyboardText, panelText, timeoutArg = '20000'] = process.argv.slice(2);
if (!url || !shot || keyboardText === undefined || panelText === undefined) {
  console.error('usage: type_text.mjs URL SCREENSHOT KEYBOARD_TEXT PANEL_TEXT [timeout-ms]');
  process.exit(2);
}
const timeout = Number(timeoutArg);
const browser = await launch();
let result = {};
try {
  const { page, logs } = await openPage(browser);
  await page.goto(url);
  await page.waitForFunction(() => document.body.dataset.state === 'connected', null, { timeout });
  result.typeToggle = await page.evaluate(() => {
    const b = document.getElementById('type-toggle');
    return { hidden: b.hidden, disabled: b.disabled };
  });
  // The keyboard: the pointer over the screen, a click for focus, keys.
  const canvas = page.locator('#screen canvas');
  const box = await canvas.boundingBox();
  await page.mouse.move(box.x + box.width / 3, box.y + box.height / 3);
  await canvas.click({ position: { x: box.width / 3, y: box.height / 3 } });
  await page.keyboard.type(keyboardText, { delay: 20 });
  await page.keyboard.press('Enter');
  // The panel.
  await page.click('#type-toggle');
  await page.fill('#type-text', panelText);
  await page.click('#type-go');
  await page.waitForFunction(
    () => document.getElementById('type-progress').dataset.state === 'done', null, { timeout });
  result.progress = await page.textContent('#type-progress');
  result.progressState = await page.evaluate(() => document.getElementById('type-progress').dataset.state);
  // Over the limit (the page's meta says 10,000): refused, nothing typed.
  await page.fill('#type-text', 'x'.repeat(10001));
  await page.click('#type-go');
  result.tooLong = await page.textContent('#type-progress');
  result.tooLongState = await page.evaluate(() => document.getElementById('type-progress').dataset.state);
  result.state = await page.evaluate(() => document.body.dataset.state);
  await page.screenshot({ path: shot });
  result.logs = logs.slice(-20);
} catch (e) {
  result.error = String(e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
