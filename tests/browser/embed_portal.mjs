// A portal page on PORTAL_ORIGIN (http://127.0.0.1:PORT, served here)
// frames the console URL with the broker's /static/embed.js, records the events the console posts to it, and
// once connected drives "type" and "clipboard" through postMessage.
// Usage: node tests/browser/embed_portal.mjs CONSOLE_URL PORTAL_ORIGIN TEXT SCREENSHOT.png [wait-ms]
// Prints one JSON line: {"states": [...], "events": [...], "frameLoaded": bool}
import { createServer } from 'node:http';
import { launch, openPage } from './common.mjs';

const [consoleUrl, portalOrigin, text, shot, waitArg = '15000'] = process.argv.slice(2);
if (!consoleUrl || !portalOrigin || text === undefined || !shot) {
  console.error('usage: embed_portal.mjs CONSOLE_URL PORTAL_ORIGIN TEXT SCREENSHOT [wait-ms]');
  process.exit(2);
}
const wait = Number(waitArg);
const brokerOrigin = new URL(consoleUrl).origin;
const portal = `<!DOCTYPE html><html><head><title>Portal</title>
<script src="${brokerOrigin}/static/embed.js"></script></head><body>
<h1>Customer portal</h1>
<div id="slot" style="width:900px;height:600px"></div>
<script>
  window.events = [];
  const c = VncbrokerConsole.open(document.getElementById('slot'), ${JSON.stringify(consoleUrl)}, {
    onMessage: (e) => window.events.push(e),
  });
  window.send = (msg) => c.send(msg);
</script></body></html>`;

const server = createServer((req, res) => {
  res.writeHead(200, { 'Content-Type': 'text/html' });
  res.end(portal);
});
await new Promise((ok) => server.listen(Number(new URL(portalOrigin).port), '127.0.0.1', ok));
const browser = await launch();
let result = {};
try {
  const { page, logs } = await openPage(browser, 760);
  await page.goto(portalOrigin + '/');
  const connected = () => window.events.some((e) => e.type === 'vncbroker:state' && e.state === 'connected');
  try {
    await page.waitForFunction(connected, null, { timeout: wait });
  } catch (_) { /* reported below */ }
  const frame = page.frames().find((f) => f.url().startsWith(brokerOrigin));
  result.frameLoaded = false;
  if (frame) {
    try {
      result.frameLoaded = await frame.evaluate(() => !!document.getElementById('screen'));
    } catch (_) { /* a blocked frame has no document to read */ }
  }
  if (await page.evaluate(connected)) {
    await page.evaluate((t) => window.send({ type: 'vncbroker:type', text: t }), text);
    await page.waitForTimeout(2000);
    // The clipboard both ways: a command into the VM's clipboard, then the
    // event for what the VM copies (the test copies on the desktop once
    // the command's text arrived there).
    await page.evaluate(() => window.send({ type: 'vncbroker:clipboard', text: 'portal clipboard 789' }));
    await page.waitForFunction(
      () => window.events.some((e) => e.type === 'vncbroker:clipboard' && e.text === 'copied in the VM'),
      null, { timeout: wait }).catch(() => {});
  } else {
    // A frame that did not load must not take commands either.
    await page.evaluate((t) => window.send({ type: 'vncbroker:type', text: t }), text).catch(() => {});
    await page.waitForTimeout(1000);
  }
  result.events = await page.evaluate(() => window.events);
  result.states = result.events.filter((e) => e.type === 'vncbroker:state').map((e) => e.state);
  await page.screenshot({ path: shot });
  result.logs = logs.slice(-20);
} catch (e) {
  result.error = String(e);
} finally {
  await browser.close();
  server.close();
}
console.log(JSON.stringify(result));
