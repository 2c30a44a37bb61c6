// The console page: opens the VM console for the token in the URL through
// the broker's WebSocket proxy, with noVNC's RFB module or, for a SPICE
// console, with spice-html5 (web/spice.js), and brings it back after a
// dropped connection.
import RFB from '/novnc/1.7.0/core/rfb.js';
import { setupTypePanel, typeText, typeMaxChars } from '/static/typing.js';
import { setupKeysMenu } from '/static/keys.js';
import { setupClipboardPanel } from '/static/clipboard.js';
import { setupView } from '/static/view.js';
import {
  describeClose, reconnectsAfter, retryableAfter, backoffSecs, timeLeft,
} from '/static/closing.js';

const statusEl = document.getElementById('status');
const cadButton = document.getElementById('cad');
const fullscreenButton = document.getElementById('fullscreen');
const reconnectButton = document.getElementById('reconnect');
const remainingEl = document.getElementById('remaining');
const screen = document.getElementById('screen');
const modeEl = document.getElementById('mode');
let liveRfb = null;
const typePanel = setupTypePanel(() => liveRfb);
const keysMenu = setupKeysMenu(() => liveRfb);
const view = setupView();

// The portal that frames this page, if one does. Only the origins the
// broker allows can frame it (its CSP frame-ancestors), so this is one of
// them; events go to it alone and commands come from it alone.
const parentOrigin = (window.parent !== window && window.location.ancestorOrigins &&
                      window.location.ancestorOrigins.length)
  ? window.location.ancestorOrigins[0] : null;

function notifyParent(msg) {
  if (parentOrigin) window.parent.postMessage(msg, parentOrigin);
}

const clipboardPanel = setupClipboardPanel(() => liveRfb, {
  onFromVm: (text) => notifyParent({ type: 'vncbroker:clipboard', text }),
});

// `state` is the page's own (CSS, tests); the portal is told one of
// connecting, connected, disconnected or failed.
function setState(state, text, code = null, extra = {}) {
  document.body.dataset.state = state;
  statusEl.textContent = text;
  const told = state === 'reconnecting' ? 'disconnected' : state;
  notifyParent({ type: 'vncbroker:state', state: told, code, reason: text, ...extra });
}

function fromUrl(name) {
  const hash = new URLSearchParams(window.location.hash.slice(1));
  return hash.get(name) ?? new URLSearchParams(window.location.search).get(name);
}

const token = fromUrl('token');
// Whether the link is view-only (its URL says so, and so does the broker's
// answer). The broker enforces it whatever the page does; the page only
// stops offering input and says so.
let viewOnly = fromUrl('view_only') === '1';

// What the broker told the page about its token before the first
// connection (POST /console/session): which client opens the console.
let told = null;
// What the broker told the page about its session once it was up.
let session = null;
let everConnected = false;
let userClosed = false;
let attempts = 0;
let droppedAt = null;
let retryTimer = null;
let countdown = null;

const now = () => Date.now() / 1000;

// Whether the token may still open the console: a reusable one while it
// lives, a single-use one with its reconnect ticket within the grace.
function tokenMayReopen() {
  if (!session) return false;
  if (now() >= session.expires_at) return false;
  if (!session.single_use) return true;
  return session.reconnect_ticket && droppedAt !== null &&
         now() < droppedAt + session.reconnect_grace_secs;
}

const postSession = () => fetch('/console/session', {
  method: 'POST',
  headers: { 'Content-Type': 'application/json' },
  body: JSON.stringify({ token }),
  credentials: 'same-origin',
  cache: 'no-store',
});

// Learns the console's protocol; null, or the close code that says why the
// broker could not tell (an invalid token is not tried on the proxy too).
async function learnConsole() {
  try {
    const r = await postSession();
    if (r.ok) {
      told = await r.json();
      return null;
    }
    if (r.status === 401) return 4401;
    return r.status === 429 ? 4429 : 4503;
  } catch (_) {
    return 1006;
  }
}

async function askSession() {
  try {
    const r = await postSession();
    if (!r.ok) return;
    session = await r.json();
    window.vncbrokerSession = session;
    clipboardPanel.setPolicy(session.clipboard);
    document.dispatchEvent(new CustomEvent('vncbroker:session', { detail: session }));
    showRemaining();
  } catch (_) {
    // The console works without it; it only cannot reconnect a single-use link.
  }
}

// "Ends in 14 min" while the broker will end the session.
let remainingTimer = null;
function showRemaining() {
  clearInterval(remainingTimer);
  const endsAt = session && session.ends_at;
  remainingEl.hidden = !endsAt || document.body.dataset.state !== 'connected';
  if (remainingEl.hidden) return;
  const tick = () => {
    const left = endsAt - now();
    remainingEl.textContent = 'Ends in ' + timeLeft(left);
    remainingEl.dataset.soon = left < 120 ? 'true' : 'false';
  };
  tick();
  remainingTimer = setInterval(tick, 1000);
}

function clearRetry() {
  clearTimeout(retryTimer);
  clearInterval(countdown);
  retryTimer = countdown = null;
}

function offerReconnect(label) {
  reconnectButton.textContent = label;
  reconnectButton.hidden = false;
}

// Waits out the backoff, saying so, then connects again.
function scheduleReconnect(code, reason) {
  const wait = backoffSecs(attempts++);
  const due = now() + wait;
  const say = () => {
    const left = Math.max(0, Math.ceil(due - now()));
    setState('reconnecting', describeClose(code, reason) + ' Reconnecting in ' + left + ' s…',
             code, { reconnecting: true });
  };
  say();
  countdown = setInterval(say, 1000);
  retryTimer = setTimeout(connect, wait * 1000);
  offerReconnect('Reconnect now');
}

function ended(code, reason) {
  liveRfb = null;
  cadButton.disabled = true;
  typePanel.enable(false);
  keysMenu.enable(false);
  clipboardPanel.enable(false);
  remainingEl.hidden = true;
  if (userClosed) {
    setState('disconnected', 'Disconnected.', code);
    if (everConnected && (tokenMayReopen() || (session && !session.single_use))) offerReconnect('Reconnect');
    return;
  }
  // The grace of a single-use link's ticket runs from the drop, as the
  // broker sees it: while it still holds the old session (4425), the grace
  // has not begun.
  if (everConnected && (droppedAt === null || code === 4425)) droppedAt = now();
  if (everConnected && reconnectsAfter(code) && tokenMayReopen()) {
    scheduleReconnect(code, reason);
    return;
  }
  let text = describeClose(code, reason);
  if (code === 4401 && everConnected && session && session.single_use) {
    text = 'This link was for one session and it could not be reopened. Ask for a new one.';
  }
  setState(code === 1000 ? 'disconnected' : 'failed', text, code);
  // Trying again by hand: a reusable link that still lives, or any link
  // before it ever connected (the VM may be starting).
  const mayTry = everConnected ? tokenMayReopen() : true;
  if (retryableAfter(code) && mayTry) offerReconnect('Reconnect');
}

const NO_SPICE_CLIPBOARD = 'Clipboard not available for SPICE consoles: spice-html5 has no ' +
  'clipboard support. Type text types into the VM instead.';

// The SPICE client, loaded only for a SPICE console.
let spiceModule = null;

// noVNC on our own socket, so the page sees the proxy's close code and
// reason; `onClose` gets them.
function openVnc(url, onClose) {
  const ws = new WebSocket(url, ['binary']);
  ws.binaryType = 'arraybuffer';
  ws.addEventListener('close', onClose);
  const rfb = new RFB(screen, ws);
  rfb.focusOnClick = true;
  rfb.viewOnly = viewOnly;
  window.vncbrokerRfb = rfb;
  return rfb;
}

// spice-html5, which opens its own sockets; the console passes on the
// close code and reason of the one that ended it.
async function openSpice(url, onClose) {
  spiceModule = spiceModule || await import('/static/spice.js');
  const spice = new spiceModule.SpiceConsole(screen, url, { viewOnly });
  spice.addEventListener('close', (ev) => onClose(ev.detail));
  clipboardPanel.unavailable(NO_SPICE_CLIPBOARD);
  window.vncbrokerSpice = spice;
  return spice;
}

function showViewOnly() {
  modeEl.hidden = false;
  document.body.dataset.viewOnly = 'true';
  cadButton.hidden = true;
  typePanel.hide();
  keysMenu.hide();
  clipboardPanel.hide();
}

async function connect() {
  clearRetry();
  reconnectButton.hidden = true;
  userClosed = false;
  setState('connecting', everConnected ? 'Reconnecting…' : 'Connecting…');

  if (!told) {
    const failure = await learnConsole();
    if (userClosed) return;
    if (failure !== null) {
      ended(failure, '');
      return;
    }
    if (told.view_only && !viewOnly) {
      viewOnly = true;
      showViewOnly();
    }
  }
  const scheme = window.location.protocol === 'https:' ? 'wss' : 'ws';
  const url = scheme + '://' + window.location.host + '/websockify?token=' +
              encodeURIComponent(token);
  let closeEvent = null;
  const onClose = (ev) => { closeEvent = ev; };
  let rfb;
  if (told.protocol === 'spice') {
    try {
      rfb = await openSpice(url, onClose);
    } catch (_) {
      setState('failed', 'The page could not load its SPICE console client.');
      offerReconnect('Reconnect');
      return;
    }
    if (userClosed) {
      rfb.disconnect();
      return;
    }
  } else {
    rfb = openVnc(url, onClose);
  }
  view.attach(rfb);
  clipboardPanel.attach(rfb);

  let desktopName = '';
  let refused = false;
  rfb.addEventListener('connect', () => {
    everConnected = true;
    attempts = 0;
    droppedAt = null;
    setState('connected', desktopName ? 'Connected: ' + desktopName : 'Connected');
    cadButton.disabled = false;
    liveRfb = rfb;
    typePanel.enable(!viewOnly);
    keysMenu.enable(!viewOnly);
    clipboardPanel.enable(!viewOnly);
    rfb.focus();
    askSession();
  });
  rfb.addEventListener('desktopname', (ev) => {
    desktopName = ev.detail.name;
    if (document.body.dataset.state === 'connected') {
      statusEl.textContent = 'Connected: ' + ev.detail.name;
    }
    document.title = ev.detail.name + ' - Console';
  });
  rfb.addEventListener('securityfailure', (ev) => {
    refused = true;
    setState('failed', 'The VM console refused the sign-in: ' +
             (ev.detail.reason || 'authentication failed'));
  });
  rfb.addEventListener('disconnect', () => {
    // The close event may land just after noVNC's own handling.
    setTimeout(() => {
      if (refused && !closeEvent) {
        liveRfb = null;
        return;
      }
      ended(closeEvent ? closeEvent.code : 1006, closeEvent ? closeEvent.reason : '');
    }, 50);
  });
}

function start() {
  if (!token) {
    setState('failed', describeClose(4400));
    return;
  }
  // Keep the token out of the address bar once read.
  history.replaceState(null, '', window.location.pathname);
  if (viewOnly) showViewOnly();
  cadButton.addEventListener('click', () => { if (liveRfb) liveRfb.sendCtrlAltDel(); });
  reconnectButton.addEventListener('click', () => {
    attempts = 0;
    connect();
  });

  // Commands from the framing portal. The broker enforces view-only
  // whatever the page does; the page also ignores input commands then.
  window.addEventListener('message', (ev) => {
    if (!parentOrigin || ev.origin !== parentOrigin || ev.source !== window.parent) return;
    const cmd = ev.data || {};
    const live = liveRfb;
    switch (cmd.type) {
      case 'vncbroker:ctrl-alt-del':
        if (live && !viewOnly) live.sendCtrlAltDel();
        break;
      case 'vncbroker:type': {
        const text = typeof cmd.text === 'string' ? cmd.text : '';
        if (live && !viewOnly && text && Array.from(text).length <= typeMaxChars()) {
          typeText(live, text, () => {});
        }
        break;
      }
      case 'vncbroker:disconnect':
        clearRetry();
        userClosed = true;
        if (live) live.disconnect();
        else ended(1000, '');
        break;
      case 'vncbroker:clipboard':
        if (live && !viewOnly && typeof cmd.text === 'string') clipboardPanel.send(cmd.text);
        break;
      case 'vncbroker:scale':
        view.choose(cmd.mode);
        break;
      default:
        break;
    }
  });
  connect();
}

fullscreenButton.addEventListener('click', () => {
  if (document.fullscreenElement) {
    document.exitFullscreen();
  } else {
    document.documentElement.requestFullscreen().catch(() => {});
  }
});

start();
