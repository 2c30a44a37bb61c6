// The clipboard panel against a VNC desktop whose clipboard the test reads
// and writes (xclip). Mode "both": text sent from the panel, then the
// VM's text shown in it. Mode "none": the panel says the clipboard is off,
// a send forced past the page, and the VM's text never shown.
// Coordination with the test: the script writes DIR/sent once it sent.
// Modes "to-vm" and "from-vm": one way goes, the other does not.
// Usage: node tests/browser/clipboard.mjs URL DIR both|to-vm|from-vm|none [timeout-ms]
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { launch, openPage } from './common.mjs';

const [url, dir, mode, timeoutArg = '30000'] = process.argv.slice(2);
if (!url || !dir || !mode) {
  console.error('usage: clipboard.mjs URL DIR both|none [timeout-ms]');
  process.exit(2);
}
const timeout = Number(timeoutArg);
const browser = await launch();
let result = {};
try {
  const { page, logs } = await openPage(browser);
  await page.goto(url);
  await page.waitForFunction(() => document.body.dataset.state === 'connected', null, { timeout });
  await page.waitForFunction(() => window.vncbrokerSession, null, { timeout });
  result.policy = await page.evaluate(() => window.vncbrokerSession.clipboard);
  await page.evaluate(() => {
    window.__fromVm = [];
    window.vncbrokerRfb.addEventListener('clipboard', (e) => window.__fromVm.push(e.detail.text));
  });
  await page.click('#clip-toggle');
  result.note = await page.textContent('#clip-note');
  result.sendDisabled = await page.isDisabled('#clip-send');
  if (mode === 'both') {
    await page.fill('#clip-text', 'to the VM 123');
    await page.click('#clip-send');
    writeFileSync(join(dir, 'sent'), '');
    await page.waitForFunction(
      () => document.getElementById('clip-text').value === 'from the VM 456', null, { timeout });
    result.shown = await page.inputValue('#clip-text');
  } else if (mode === 'to-vm') {
    // Text to the VM goes; what the VM copies must never show.
    await page.fill('#clip-text', 'to the VM 123');
    await page.click('#clip-send');
    writeFileSync(join(dir, 'sent'), '');
    await page.waitForTimeout(5000);
    result.shown = await page.inputValue('#clip-text');
  } else {
    // Past the page, straight into the RFB stream: the broker must drop it.
    await page.evaluate(() => window.vncbrokerRfb.clipboardPasteFrom('forced to the VM'));
    writeFileSync(join(dir, 'sent'), '');
    if (mode === 'from-vm') {
      await page.waitForFunction(
        () => document.getElementById('clip-text').value === 'from the VM 456', null, { timeout });
    } else {
      await page.waitForTimeout(5000);
    }
    result.shown = await page.inputValue('#clip-text');
  }
  result.fromVm = await page.evaluate(() => window.__fromVm);
  result.state = await page.evaluate(() => document.body.dataset.state);
  result.logs = logs.slice(-20);
} catch (e) {
  result.error = String(e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
