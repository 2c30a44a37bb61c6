// The console page: opens the VM console for the token in the URL through
// the broker's WebSocket proxy, with noVNC's RFB module.
import RFB from '/novnc/1.7.0/core/rfb.js';
import { setupTypePanel, typeText, typeMaxChars } from '/static/typing.js';
import { setupKeysMenu } from '/static/keys.js';

const statusEl = document.getElementById('status');
const cadButton = document.getElementById('cad');
const fullscreenButton = document.getElementById('fullscreen');
const screen = document.getElementById('screen');
const modeEl = document.getElementById('mode');
let liveRfb = null;
const typePanel = setupTypePanel(() => liveRfb);
const keysMenu = setupKeysMenu(() => liveRfb);

// What each close code from the proxy means to a person.
const CLOSE_MESSAGES = {
  4400: 'No console token in this link.',
  4401: 'This console link is invalid or has expired. Ask for a new one.',
  4409: 'The VM moved since this link was made. Ask for a new one.',
  4423: 'Someone else has control of this console. A view-only link can still watch.',
  4507: 'This console must be recorded, and the recording could not be written.',
  4410: 'Console access was revoked.',
  4500: 'The VM console refused the connection.',
  4502: 'The VM console is not reachable right now.',
  4503: 'The console service is temporarily unavailable. Try again shortly.',
  4504: 'The VM console did not answer in time.',
  1003: 'The connection was closed: unsupported data.',
};

// The portal that frames this page, if one does. Only the origins the
// broker allows can frame it (its CSP frame-ancestors), so this is one of
// them; events go to it alone and commands come from it alone.
const parentOrigin = (window.parent !== window && window.location.ancestorOrigins &&
                      window.location.ancestorOrigins.length)
  ? window.location.ancestorOrigins[0] : null;

function notifyParent(msg) {
  if (parentOrigin) window.parent.postMessage(msg, parentOrigin);
}

function setState(state, text, code = null) {
  document.body.dataset.state = state;
  statusEl.textContent = text;
  notifyParent({ type: 'vncbroker:state', state, code, reason: text });
}

function tokenFromUrl() {
  const fromHash = new URLSearchParams(window.location.hash.slice(1)).get('token');
  if (fromHash) return fromHash;
  return new URLSearchParams(window.location.search).get('token');
}

// Whether the link is view-only. The broker enforces it whatever the page
// does; the page only stops offering input and says so.
function viewOnlyFromUrl() {
  const flag = (params) => params.get('view_only') === '1';
  return flag(new URLSearchParams(window.location.hash.slice(1))) ||
         flag(new URLSearchParams(window.location.search));
}

function describeClose(ev) {
  const known = CLOSE_MESSAGES[ev.code];
  if (known) return known;
  if (ev.reason) return 'Disconnected: ' + ev.reason;
  return ev.code === 1000 ? 'Disconnected.' : 'Disconnected (code ' + ev.code + ').';
}

function start() {
  const token = tokenFromUrl();
  const viewOnly = viewOnlyFromUrl();
  if (!token) {
    setState('failed', CLOSE_MESSAGES[4400]);
    return;
  }
  // Keep the token out of the address bar once read.
  history.replaceState(null, '', window.location.pathname);

  const scheme = window.location.protocol === 'https:' ? 'wss' : 'ws';
  const url = scheme + '://' + window.location.host + '/websockify?token=' +
              encodeURIComponent(token);
  // Our own socket, so the page sees the proxy's close code and reason.
  const ws = new WebSocket(url, ['binary']);
  ws.binaryType = 'arraybuffer';
  let closeEvent = null;
  ws.addEventListener('close', (ev) => { closeEvent = ev; });

  const rfb = new RFB(screen, ws);
  rfb.scaleViewport = true;
  rfb.resizeSession = false;
  rfb.focusOnClick = true;
  rfb.viewOnly = viewOnly;
  if (viewOnly) {
    modeEl.hidden = false;
    document.body.dataset.viewOnly = 'true';
    cadButton.hidden = true;
    typePanel.hide();
    keysMenu.hide();
  }
  window.vncbrokerRfb = rfb;

  let desktopName = '';
  rfb.addEventListener('connect', () => {
    setState('connected', desktopName ? 'Connected: ' + desktopName : 'Connected');
    cadButton.disabled = false;
    liveRfb = rfb;
    typePanel.enable(!viewOnly);
    keysMenu.enable(!viewOnly);
    rfb.focus();
  });
  rfb.addEventListener('desktopname', (ev) => {
    desktopName = ev.detail.name;
    if (document.body.dataset.state === 'connected') {
      statusEl.textContent = 'Connected: ' + ev.detail.name;
    }
    document.title = ev.detail.name + ' - Console';
  });
  rfb.addEventListener('securityfailure', (ev) => {
    setState('failed', 'Authentication failed: ' + (ev.detail.reason || 'refused by the VM console'));
  });
  rfb.addEventListener('disconnect', (ev) => {
    cadButton.disabled = true;
    liveRfb = null;
    typePanel.enable(false);
    keysMenu.enable(false);
    // The close event may land just after noVNC's own handling.
    setTimeout(() => {
      if (document.body.dataset.state === 'failed' && !closeEvent) return;
      const text = closeEvent ? describeClose(closeEvent)
                              : (ev.detail.clean ? 'Disconnected.' : 'Connection lost.');
      const failed = !closeEvent || closeEvent.code !== 1000;
      setState(failed ? 'failed' : 'disconnected', text, closeEvent ? closeEvent.code : null);
    }, 50);
  });

  cadButton.addEventListener('click', () => rfb.sendCtrlAltDel());

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
        if (live) live.disconnect();
        break;
      case 'vncbroker:scale':
        rfb.scaleViewport = cmd.mode !== 'actual';
        break;
      default:
        break;
    }
  });
}

fullscreenButton.addEventListener('click', () => {
  if (document.fullscreenElement) {
    document.exitFullscreen();
  } else {
    document.documentElement.requestFullscreen().catch(() => {});
  }
});

start();
