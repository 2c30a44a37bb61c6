// Opens a replay link in headless Chromium, lets the recording play to its
// end, and compares the replayed screen with a reference PNG (the live
// console's canvas): then seeks back to the start and to the end again, and
// compares once more. Saves the replayed canvas at its own size as a PNG.
// Usage: node tests/browser/replay_compare.mjs URL REFERENCE.png SCREENSHOT.png CANVAS.png [timeout-ms]
// Prints one JSON line:
//   {"states": [...], "state", "status", "duration", "complete",
//    "played": CMP, "afterSeekStart": {state, position}, "sought": CMP, "saved"}
// where CMP = {"w", "h", "refW", "refH", "differing", "total", "lit", "box"}
// counts the pixels whose colour differs from the reference (null when the
// sizes differ); "box" bounds them; "lit" counts the reference's non-black
// pixels. A comparison is retried for a few
// seconds while pixels still differ, as noVNC may still be drawing.
import { readFileSync, writeFileSync } from 'node:fs';
import { launch, openPage } from './common.mjs';

const [url, refPng, shot, canvasPng, timeoutArg = '20000'] = process.argv.slice(2);
if (!url || !refPng || !shot || !canvasPng) {
  console.error('usage: replay_compare.mjs URL REFERENCE SCREENSHOT CANVAS [timeout-ms]');
  process.exit(2);
}
const timeout = Number(timeoutArg);
const refUrl = 'data:image/png;base64,' + readFileSync(refPng).toString('base64');

// Runs in the page before its scripts: notes every data-state it takes.
function watchStates() {
  window.__states = [];
  const note = () => {
    const s = document.body && document.body.dataset.state;
    if (s && window.__states[window.__states.length - 1] !== s) window.__states.push(s);
  };
  document.addEventListener('DOMContentLoaded', () => {
    note();
    new MutationObserver(note).observe(document.body, { attributes: true, attributeFilter: ['data-state'] });
  });
}

// In the page: the current replay canvas against the reference image.
async function compare(ref) {
  const canvases = document.querySelectorAll('#screen canvas');
  const c = canvases[canvases.length - 1];
  const img = new Image();
  img.src = ref;
  await img.decode();
  const r = document.createElement('canvas');
  r.width = img.naturalWidth;
  r.height = img.naturalHeight;
  const rctx = r.getContext('2d');
  rctx.drawImage(img, 0, 0);
  const out = { w: c ? c.width : 0, h: c ? c.height : 0, refW: r.width, refH: r.height,
                canvases: canvases.length, differing: null, total: r.width * r.height, box: null };
  if (!c || c.width !== r.width || c.height !== r.height) return out;
  const a = rctx.getImageData(0, 0, r.width, r.height).data;
  const b = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let differing = 0;
  let lit = 0;
  let x0 = Infinity, y0 = Infinity, x1 = -1, y1 = -1;
  for (let i = 0; i < a.length; i += 4) {
    if (a[i] || a[i + 1] || a[i + 2]) lit++;
    if (a[i] !== b[i] || a[i + 1] !== b[i + 1] || a[i + 2] !== b[i + 2]) {
      differing++;
      const p = i / 4, x = p % r.width, y = Math.floor(p / r.width);
      x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x); y1 = Math.max(y1, y);
    }
  }
  out.differing = differing;
  out.lit = lit;
  if (differing) out.box = { x0, y0, x1, y1 };
  return out;
}

const browser = await launch();
let result = {};
try {
  const { page, logs } = await openPage(browser, 760);
  await page.addInitScript(watchStates);
  await page.goto(url);
  // Compares until nothing differs, for up to 5 s; the last comparison.
  const settledCompare = async () => {
    const until = Date.now() + 5000;
    for (;;) {
      const cmp = await page.evaluate(compare, refUrl);
      if (cmp.differing === 0 || Date.now() > until) return cmp;
      await page.waitForTimeout(250);
    }
  };
  try {
    await page.waitForFunction(() => ['ended', 'failed'].includes(document.body.dataset.state),
                               null, { timeout, polling: 100 });
  } catch (_) { /* reported below */ }
  result.saved = false;
  if (await page.evaluate(() => document.body.dataset.state) === 'ended') {
    result.played = await settledCompare();
    const dataUrl = await page.evaluate(() => {
      const cs = document.querySelectorAll('#screen canvas');
      return cs.length ? cs[cs.length - 1].toDataURL('image/png') : null;
    });
    if (dataUrl && dataUrl.startsWith('data:image/png;base64,')) {
      writeFileSync(canvasPng, Buffer.from(dataUrl.slice('data:image/png;base64,'.length), 'base64'));
      result.saved = true;
    }
    await page.screenshot({ path: shot });
    result.afterSeekStart = await page.evaluate(async () => {
      await window.replay.seek(0);
      return { state: document.body.dataset.state, position: window.replay.position() };
    });
    await page.evaluate(() => window.replay.pause());
    result.afterSeekEnd = await page.evaluate(async () => {
      await window.replay.seek(window.replay.duration());
      return { state: document.body.dataset.state, position: window.replay.position() };
    });
    result.sought = await settledCompare();
  } else {
    await page.screenshot({ path: shot });
  }
  Object.assign(result, await page.evaluate(() => ({
    states: window.__states,
    state: document.body.dataset.state,
    status: document.getElementById('status').textContent,
    duration: window.replay ? window.replay.duration() : null,
    complete: document.getElementById('info-complete').textContent,
    location: window.location.href,
  })));
  result.logs = logs.slice(-20);
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
