// The console page's screen size and layout: fit to window (scaled), actual
// size (scrollbars), the choice kept across a reload, remote resize (the
// VM's screen follows the window), and the page at phone width. Saves a
// screenshot of the page at 1280x800.
// Usage: node tests/browser/view.mjs URL SCREENSHOT.png [timeout-ms]
// Prints one JSON line.
import { launch } from './common.mjs';

const [url, shot, timeoutArg = '30000'] = process.argv.slice(2);
if (!url || !shot) {
  console.error('usage: view.mjs URL SCREENSHOT [timeout-ms]');
  process.exit(2);
}
const timeout = Number(timeoutArg);
const browser = await launch();
let result = {};

// Runs in the page: the framebuffer's size and the size it is shown at.
function screenSize() {
  const c = document.querySelector('#screen canvas');
  const r = c.getBoundingClientRect();
  const box = c.parentElement;
  return {
    fb: [c.width, c.height],
    shown: [Math.round(r.width), Math.round(r.height)],
    scrolls: box.scrollWidth > box.clientWidth || box.scrollHeight > box.clientHeight,
    mode: document.getElementById('scale').value,
  };
}

const connected = (page) =>
  page.waitForFunction(() => document.body.dataset.state === 'connected', null, { timeout });

try {
  // The README's picture.
  const wide = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const w = await wide.newPage();
  await w.goto(url);
  await connected(w);
  const box = await w.locator('#screen canvas').boundingBox();
  await w.mouse.click(box.x + box.width / 2, box.y + box.height / 2);
  await w.keyboard.type('Typed in the browser, read by the VM.\n');
  await w.click('#keys-toggle');
  await w.waitForTimeout(1500);
  await w.screenshot({ path: shot });
  await wide.close();

  const context = await browser.newContext({ viewport: { width: 640, height: 480 } });
  const page = await context.newPage();
  await page.goto(url);
  await connected(page);
  await page.waitForTimeout(500);
  result.fit = await page.evaluate(screenSize);
  await page.selectOption('#scale', 'actual');
  await page.waitForTimeout(500);
  result.actual = await page.evaluate(screenSize);
  // A reload keeps the choice.
  await page.goto('about:blank');
  await page.goto(url);
  await connected(page);
  await page.waitForTimeout(500);
  result.afterReload = await page.evaluate(screenSize);
  // Remote resize: the VM's screen takes the window's size.
  await page.selectOption('#scale', 'remote');
  await page.waitForFunction(() => document.querySelector('#screen canvas').width !== 800,
                             null, { timeout });
  result.remote = await page.evaluate(screenSize);
  result.remoteNote = await page.evaluate(() => {
    const n = document.getElementById('scale-note');
    return n.hidden ? null : n.textContent;
  });
  await page.selectOption('#scale', 'fit');
  await context.close();

  // Phone width: nothing runs off the side, every control is on screen.
  const phone = await browser.newContext({ viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
  const p = await phone.newPage();
  await p.goto(url);
  await connected(p);
  await p.click('#keys-toggle');
  result.phone = await p.evaluate(() => {
    const offscreen = [...document.querySelectorAll('#bar button:not([hidden]), #bar select, #keys-menu button')]
      .filter((el) => { const r = el.getBoundingClientRect(); return r.right > window.innerWidth + 1 || r.left < -1; })
      .map((el) => el.id || el.textContent);
    return {
      scrollWidth: document.documentElement.scrollWidth,
      innerWidth: window.innerWidth,
      offscreen,
      canvasWidth: Math.round(document.querySelector('#screen canvas').getBoundingClientRect().width),
    };
  });
  await phone.close();

} catch (e) {
  result.error = String(e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
