// Opens a console page in headless Chromium, reports what it offers (the
// view-only badge, the Ctrl-Alt-Del button), then tries to act on the VM:
// first as a person would (a click and typing on the canvas), then as a
// modified page would (noVNC's viewOnly switched off, sendKey, a click and
// typing again). Everything the page puts on its WebSocket is tallied by
// RFB message type, so the caller can tell what the page sent from what the
// broker forwarded.
// Usage: node tests/browser/console_input.mjs URL SCREENSHOT.png [timeout-ms]
// Prints one JSON line:
//   {"state", "status", "canvas": {w, h}, "nonBlank",
//    "ui": {"badgeVisible", "badgeText", "cadVisible", "bodyViewOnly", "rfbViewOnly"},
//    "asPerson": WIRE, "forced": WIRE}
// where WIRE = {"version", "keys", "pointers", "cutTexts", "extendedCutTexts",
// "otherInput", "messages", "error"} counts what the page had sent in all by
// then (cutTexts includes the Extended Clipboard ones).
import { launch, openPage, screenPainted, consoleSummary } from './common.mjs';

const [url, shot, timeoutArg = '20000'] = process.argv.slice(2);
if (!url || !shot) {
  console.error('usage: console_input.mjs URL SCREENSHOT [timeout-ms]');
  process.exit(2);
}
const timeout = Number(timeoutArg);

// Runs in the page before its scripts: keeps a copy of every byte sent on a
// WebSocket (noVNC hands send() a view of a buffer it reuses), and parses
// the browser-to-VM RFB stream on demand.
function tallyWire() {
  const sent = [];
  const send = WebSocket.prototype.send;
  WebSocket.prototype.send = function (data) {
    if (data instanceof ArrayBuffer) {
      sent.push(new Uint8Array(data.slice(0)));
    } else if (ArrayBuffer.isView(data)) {
      sent.push(new Uint8Array(data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength)));
    } else {
      sent.push(null); // a string or a Blob: not RFB as noVNC sends it
    }
    return send.call(this, data);
  };
  window.__wire = () => {
    const c = { version: '', keys: 0, pointers: 0, cutTexts: 0, extendedCutTexts: 0, otherInput: 0,
                messages: 0, error: null };
    if (sent.includes(null)) {
      c.error = 'the page sent a non-binary WebSocket message';
      return c;
    }
    const total = sent.reduce((n, a) => n + a.length, 0);
    const b = new Uint8Array(total);
    let at = 0;
    for (const a of sent) { b.set(a, at); at += a.length; }
    c.version = String.fromCharCode(...b.subarray(0, 12));
    // ProtocolVersion (12 bytes), the security type (None, 1 byte), then
    // ClientInit (1 byte); the messages follow.
    let o = 14;
    const u16 = (i) => (b[i] << 8) | b[i + 1];
    const i32 = (i) => (b[i] << 24) | (b[i + 1] << 16) | (b[i + 2] << 8) | b[i + 3];
    while (o < b.length) {
      const t = b[o];
      let len;
      switch (t) {
        case 0: len = 20; break;                            // SetPixelFormat
        case 2: len = 4 + 4 * u16(o + 2); break;            // SetEncodings
        case 3: len = 10; break;                            // FramebufferUpdateRequest
        case 4: len = 8; c.keys++; break;                   // KeyEvent
        case 5: len = 6; c.pointers++; break;               // PointerEvent
        case 6:                                             // ClientCutText
          len = 8 + Math.abs(i32(o + 4));
          c.cutTexts++;
          if (i32(o + 4) < 0) c.extendedCutTexts++;         // Extended Clipboard
          break;
        case 150: len = 10; break;                          // EnableContinuousUpdates
        case 248: len = 9 + b[o + 8]; break;                // ClientFence
        case 250: len = 4; c.otherInput++; break;           // xvp
        case 251: len = 8 + 16 * b[o + 6]; c.otherInput++; break; // SetDesktopSize
        case 255:                                           // QEMU
          if (b[o + 1] === 0) { len = 12; c.keys++; break; } // extended key event
          if (b[o + 1] === 1) { len = u16(o + 2) === 2 ? 10 : 4; break; } // audio
          c.error = 'unknown QEMU message ' + b[o + 1] + ' at byte ' + o;
          return c;
        default:
          c.error = 'unknown message type ' + t + ' at byte ' + o;
          return c;
      }
      o += len;
      c.messages++;
    }
    if (o > b.length) c.error = 'the last message is cut short';
    return c;
  };
}

const browser = await launch();
let result = {};
try {
  const { page, logs } = await openPage(browser);
  await page.addInitScript(tallyWire);
  await page.goto(url);
  try {
    await page.waitForFunction(() => document.body.dataset.state === 'connected', null, { timeout });
  } catch (_) { /* reported below */ }
  const canvasPainted = screenPainted;
  const connected = await page.evaluate(() => document.body.dataset.state) === 'connected';
  if (connected) {
    try {
      await page.waitForFunction(canvasPainted, null, { timeout, polling: 100 });
    } catch (_) { /* reported as nonBlank: false */ }
  }
  result.nonBlank = await page.evaluate(canvasPainted);
  result.ui = await page.evaluate(() => {
    const visible = (el) => !!el && !el.hidden && getComputedStyle(el).display !== 'none' &&
      getComputedStyle(el).visibility !== 'hidden' && el.getClientRects().length > 0;
    const mode = document.getElementById('mode');
    return {
      badgeVisible: visible(mode),
      badgeText: mode ? mode.textContent.trim() : null,
      cadVisible: visible(document.getElementById('cad')),
      bodyViewOnly: document.body.dataset.viewOnly || null,
      rfbViewOnly: window.vncbrokerRfb ? window.vncbrokerRfb.viewOnly : null,
    };
  });
  // What a person does, on whatever the page offers.
  if (connected) {
    const canvas = page.locator('#screen canvas');
    await canvas.click({ position: { x: 50, y: 50 } });
    await page.keyboard.type('abc');
    await page.mouse.move(200, 200);
    await page.waitForTimeout(500);
  }
  result.asPerson = await page.evaluate(() => window.__wire());
  // What a modified page does: noVNC told it may send input after all.
  if (connected) {
    await page.evaluate(() => {
      const rfb = window.vncbrokerRfb;
      rfb.viewOnly = false;
      rfb.sendKey(0x61, 'KeyA');
      rfb.sendKey(0x62, 'KeyB');
    });
    const canvas = page.locator('#screen canvas');
    await canvas.click({ position: { x: 60, y: 60 } });
    await page.keyboard.type('xyz');
    await page.mouse.move(250, 250);
    await page.waitForTimeout(500);
  }
  result.forced = await page.evaluate(() => window.__wire());
  Object.assign(result, await page.evaluate(consoleSummary));
  await page.screenshot({ path: shot });
  result.logs = logs.slice(-20);
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
