// Opens a SPICE console page in headless Chromium, waits until it is
// connected and spice-html5's canvas shows something, and looks everywhere
// the page could hold the VM's SPICE password: its HTML, its scripts'
// state, its storage and cookies, the URLs it loaded, and every WebSocket
// frame it sent or received on any channel. Then, mode "control": types
// "aB" with Type text, sends Ctrl-Alt-Del and reads the clipboard panel;
// mode "view": presses keys and clicks on the screen as a person would, and
// forces the console's view-only off and sends a key as a modified page
// would.
// Usage: node tests/browser/spice_console.mjs URL SCREENSHOT PASSWORD control|view [timeout-ms]
// Prints one JSON line: {"state", "status", "canvas": {w, h}, "nonBlank",
//   "passwordSeenIn": [...], "sockets", "framesSent", "framesReceived",
//   "ui": {...}, "typed", "clipNote", "clipSendDisabled", "inputsState",
//   "stillConnected", "logs"}
import { launch, openPage, screenPainted, consoleSummary } from './common.mjs';

const [url, shot, password, mode, timeoutArg = '30000'] = process.argv.slice(2);
if (!url || !shot || !password || !['control', 'view'].includes(mode)) {
  console.error('usage: spice_console.mjs URL SCREENSHOT PASSWORD control|view [timeout-ms]');
  process.exit(2);
}
const timeout = Number(timeoutArg);
const browser = await launch();
let result = {};
try {
  const { page, logs } = await openPage(browser);
  const seen = new Set();
  const needle = Buffer.from(password);
  const holds = (data) => (typeof data === 'string' ? data.includes(password)
    : Buffer.from(data).includes(needle));
  result.sockets = 0;
  result.framesSent = 0;
  result.framesReceived = 0;
  page.on('websocket', (ws) => {
    result.sockets++;
    ws.on('framesent', ({ payload }) => {
      result.framesSent++;
      if (holds(payload)) seen.add('a frame the page sent');
    });
    ws.on('framereceived', ({ payload }) => {
      result.framesReceived++;
      if (holds(payload)) seen.add('a frame the page received');
    });
  });
  page.on('response', async (r) => {
    try {
      if (holds(await r.body())) seen.add('the response of ' + r.url());
    } catch (_) { /* no body (a redirect, a WebSocket) */ }
  });
  await page.goto(url);
  await page.waitForFunction(() => document.body.dataset.state === 'connected', null, { timeout });
  await page.waitForFunction(screenPainted, null, { timeout, polling: 100 });
  Object.assign(result, await page.evaluate(consoleSummary));
  result.nonBlank = await page.evaluate(screenPainted);

  const state = await page.evaluate(() => {
    const spice = window.vncbrokerSpice;
    return {
      html: document.documentElement.outerHTML,
      session: JSON.stringify(window.vncbrokerSession || null),
      given: spice && spice.sc ? String(spice.sc.password) : null,
      storage: JSON.stringify({ ...localStorage }) + JSON.stringify({ ...sessionStorage }),
      cookies: document.cookie,
      urls: performance.getEntries().map((e) => e.name).join(' '),
      location: window.location.href,
    };
  });
  result.passwordGiven = state.given;
  for (const [where, text] of Object.entries(state)) {
    if (text && text.includes(password)) seen.add('the page\'s ' + where);
  }
  for (const c of await page.context().cookies()) {
    if (c.value.includes(password)) seen.add('cookie ' + c.name);
  }

  result.ui = await page.evaluate(() => {
    const shown = (id) => {
      const el = document.getElementById(id);
      return !el.hidden && getComputedStyle(el).display !== 'none';
    };
    return {
      badgeVisible: shown('mode'),
      bodyViewOnly: document.body.dataset.viewOnly || null,
      cadVisible: shown('cad'),
      keysVisible: shown('keys-toggle'),
      typeVisible: shown('type-toggle'),
      clipVisible: shown('clip-toggle'),
    };
  });

  if (mode === 'control') {
    await page.waitForFunction(() => {
      const sc = window.vncbrokerSpice.sc;
      return sc.inputs && sc.inputs.state === 'ready';
    }, null, { timeout });
    await page.click('#type-toggle');
    await page.fill('#type-text', 'aB');
    await page.click('#type-go');
    await page.waitForFunction(() => document.getElementById('type-progress').dataset.state === 'done',
                               null, { timeout });
    result.typed = await page.textContent('#type-progress');
    await page.fill('#type-text', 'é');
    await page.click('#type-go');
    result.untypable = await page.textContent('#type-progress');
    await page.click('#cad');
    await page.click('#clip-toggle');
    result.clipNote = await page.textContent('#clip-note');
    result.clipSendDisabled = await page.isDisabled('#clip-send');
  } else {
    const canvas = page.locator('#screen canvas');
    await canvas.hover();
    await canvas.click();
    await page.keyboard.type('xyz');
    await page.keyboard.press('Enter');
    result.inputsState = await page.evaluate(() => {
      const sc = window.vncbrokerSpice.sc;
      return sc.inputs ? sc.inputs.state : null;
    });
    // A modified page: no view-only, and a key anyway.
    await page.evaluate(() => {
      const spice = window.vncbrokerSpice;
      spice.viewOnly = false;
      spice.sendKey(0x71, null, true);
      spice.sendKey(0x71, null, false);
    });
  }
  // The console stays up (a view-only link's refused inputs channel does
  // not end it).
  await page.waitForTimeout(2000);
  result.stillConnected = await page.evaluate(() => document.body.dataset.state === 'connected');
  result.passwordSeenIn = [...seen];
  await page.screenshot({ path: shot });
  result.logs = logs.slice(-20);
} catch (e) {
  result.error = String(e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
