// What every browser script shares: headless Chromium as the tests run it,
// a page whose console and errors are kept for the report, and the check
// that the console page's canvas shows something.
import { chromium } from 'playwright-core';

export async function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
}

// A new page of `height` pixels (1024 wide), and the log lines it writes.
export async function openPage(browser, height = 700) {
  const page = await browser.newPage({ viewport: { width: 1024, height } });
  const logs = [];
  page.on('console', (m) => logs.push(m.type() + ': ' + m.text()));
  page.on('pageerror', (e) => logs.push('pageerror: ' + e.message));
  return { page, logs };
}

// Runs in the page: whether the console page's canvas has a non-black
// pixel; the whole canvas is scanned.
export function screenPainted() {
  const c = document.querySelector('#screen canvas');
  if (!c || !c.width || !c.height) return false;
  try {
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    for (let i = 0; i < d.length; i += 4) {
      if (d[i] || d[i + 1] || d[i + 2]) return true;
    }
  } catch (_) { /* unreadable canvas counts as blank */ }
  return false;
}

// Runs in the page: the console page's state, status line and canvas size.
export function consoleSummary() {
  const c = document.querySelector('#screen canvas');
  return {
    state: document.body.dataset.state,
    status: document.getElementById('status').textContent,
    canvas: { w: c ? c.width : 0, h: c ? c.height : 0 },
  };
}
