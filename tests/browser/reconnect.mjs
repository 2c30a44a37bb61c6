// Opens a console page through a relay whose connections the test can cut,
// then cuts them (mode "cut") or revokes the VM's console access (mode
// "revoke", with the broker's API and credentials), and watches the page.
// Usage: node tests/browser/reconnect.mjs URL CONTROL_URL MODE [REVOKE_URL USER:PW] [timeout-ms]
// Prints one JSON line: {"states", "statusWhileDown", "back", "final",
// "ticketCookie", "reconnectButton", "remaining"}
import { launch, openPage, screenPainted } from './common.mjs';

const [url, control, mode, revokeUrl = '', cred = '', timeoutArg = '30000'] = process.argv.slice(2);
if (!url || !control || !mode) {
  console.error('usage: reconnect.mjs URL CONTROL_URL cut|revoke [REVOKE_URL USER:PW] [timeout-ms]');
  process.exit(2);
}
const timeout = Number(timeoutArg);
const browser = await launch();
let result = {};
let logs = [];
try {
  const opened = await openPage(browser);
  const page = opened.page;
  logs = opened.logs;
  // Every state the page passes through, in order.
  await page.addInitScript(() => {
    window.__states = [];
    new MutationObserver(() => {
      const s = document.body && document.body.dataset.state;
      if (s && window.__states[window.__states.length - 1] !== s) window.__states.push(s);
    }).observe(document, { subtree: true, attributes: true, attributeFilter: ['data-state'] });
  });
  await page.goto(url);
  await page.waitForFunction(() => document.body.dataset.state === 'connected', null, { timeout });
  // The page has asked for its session's rules (and, single-use, its ticket).
  await page.waitForFunction(() => window.vncbrokerSession, null, { timeout });
  result.session = await page.evaluate(() => window.vncbrokerSession);
  result.ticketCookie = (await page.context().cookies())
    .filter((c) => c.name.startsWith('vncbroker_reconnect_'))
    .map((c) => ({ httpOnly: c.httpOnly, secure: c.secure, sameSite: c.sameSite, path: c.path }));
  result.scriptSeesTicket = await page.evaluate(() => document.cookie.includes('vncbroker_reconnect_'));
  result.remaining = await page.evaluate(() => {
    const el = document.getElementById('remaining');
    return el.hidden ? null : el.textContent;
  });

  if (mode === 'cut') {
    // A SPICE console is cut once its screen shows: QEMU 7.2's SPICE server
    // gets stuck when a main channel goes before answering its network
    // test, which spice-html5 does right after connecting.
    if (await page.evaluate(() => Boolean(window.vncbrokerSpice))) {
      await page.waitForFunction(screenPainted, null, { timeout, polling: 100 });
      await page.waitForTimeout(1000);
    }
    const r = await fetch(control + '/cut', { method: 'POST' });
    result.cut = Number(await r.text());
    await page.waitForFunction(() => document.body.dataset.state !== 'connected', null, { timeout });
    result.statusWhileDown = await page.textContent('#status');
    await page.waitForFunction(() => document.body.dataset.state === 'connected', null, { timeout });
    result.back = true;
  } else {
    const r = await fetch(revokeUrl, {
      method: 'DELETE',
      headers: { Authorization: 'Basic ' + Buffer.from(cred).toString('base64') },
    });
    result.revokeStatus = r.status;
    await page.waitForFunction(() => document.body.dataset.state === 'failed', null, { timeout });
    // Long enough for a reconnect with backoff to show.
    await page.waitForTimeout(5000);
  }
  result.states = await page.evaluate(() => window.__states);
  result.final = await page.evaluate(() => ({
    state: document.body.dataset.state,
    status: document.getElementById('status').textContent,
  }));
  result.reconnectButton = await page.evaluate(() => {
    const b = document.getElementById('reconnect');
    return b.hidden ? null : b.textContent;
  });
} catch (e) {
  result.error = String(e);
} finally {
  result.logs = logs.slice(-30);
  await browser.close();
}
console.log(JSON.stringify(result));
