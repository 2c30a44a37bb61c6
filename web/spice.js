// A SPICE console: spice-html5's SpiceMainConn behind the part of noVNC's
// RFB interface the page uses (its connect, securityfailure and disconnect
// events, sendKey, sendCtrlAltDel, focus, disconnect and the view
// settings), so the page, its keys menu and "Type text" drive either.
//
// spice-html5 opens one WebSocket per SPICE channel, each to the URL given
// here; the broker's proxy links each to the VM and answers the SPICE
// server's ticket with the stored password itself, so the page gives an
// empty one and never knows the real one. The proxy's refusals and ends are
// close codes on those sockets, which spice-html5 does not look at: every
// socket it opens is watched here, and the console ends with the code and
// reason of the first of its main, display or inputs channels to close.
import { SpiceMainConn } from '/spice-html5/0.3.0/main.js';
import { SpiceMiniData, SpiceMsgcKeyDown, SpiceMsgcKeyUp } from '/spice-html5/0.3.0/spicemsg.js';
import { Constants } from '/spice-html5/0.3.0/enums.js';
import { keycode_to_end_scan } from '/spice-html5/0.3.0/utils.js';

// The console whose channels are opening; one lives at a time.
let current = null;
const NativeWebSocket = window.WebSocket;
// spice-html5 opens its channels' sockets with `new WebSocket`, on the
// page's global, as the main channel asks for them.
window.WebSocket = class extends NativeWebSocket {
  constructor(url, protocols) {
    super(url, protocols);
    if (current) current.watch(this);
  }
};

// PC scancodes (set 1, as SPICE sends them) of a US keyboard: the
// characters of each row from its first key's code, unshifted and shifted.
const ROWS = [
  [0x02, '1234567890-=', '!@#$%^&*()_+'],
  [0x10, 'qwertyuiop[]', 'QWERTYUIOP{}'],
  [0x1e, "asdfghjkl;'`", 'ASDFGHJKL:"~'],
  [0x2b, '\\zxcvbnm,./', '|ZXCVBNM<>?'],
];
const SHIFT = 0x2a;
// Extended keys are 0xe0 then their code, as spice-html5 writes them.
const ext = (code) => 0xe0 | (code << 8);
// X keysym -> [scancode, with Shift].
const SCANCODES = new Map([
  [0x20, [0x39, false]],
  [0xff0d, [0x1c, false]], // Return
  [0xff09, [0x0f, false]], // Tab
  [0xff08, [0x0e, false]], // BackSpace
  [0xff1b, [0x01, false]], // Escape
  [0xffe1, [SHIFT, false]],
  [0xffe3, [0x1d, false]], // Control
  [0xffe9, [0x38, false]], // Alt
  [0xffeb, [ext(0x5b), false]], // Super
  [0xff61, [ext(0x37), false]], // Print
  [0xffff, [ext(0x53), false]], // Delete
  [0xffc8, [0x57, false]], // F11
  [0xffc9, [0x58, false]], // F12
]);
for (let n = 0; n < 10; n++) SCANCODES.set(0xffbe + n, [0x3b + n, false]); // F1-F10
for (const [first, plain, shifted] of ROWS) {
  for (let i = 0; i < plain.length; i++) {
    SCANCODES.set(plain.codePointAt(i), [first + i, false]);
    SCANCODES.set(shifted.codePointAt(i), [first + i, true]);
  }
}

const CTRL_ALT_DEL = [0xffe3, 0xffe9, 0xffff];

const INPUT_EVENTS = ['keydown', 'keyup', 'keypress', 'mousedown', 'mouseup', 'mousemove',
                      'wheel', 'contextmenu'];

export class SpiceConsole extends EventTarget {
  // `screen`: the element the console fills; `url`: the proxy's
  // WebSocket URL with the token.
  constructor(screen, url, { viewOnly = false } = {}) {
    super();
    this.screen = screen;
    this.viewOnly = viewOnly;
    this.ended = false;
    this.agent = false;
    this._scale = false;
    this._resize = false;
    this._resizeTimer = null;
    // spice-html5 puts its canvas in the element it is given by id, and
    // sets that element's height: an element of its own, inside the screen.
    this.area = document.createElement('div');
    this.area.id = 'spice-area';
    screen.appendChild(this.area);
    for (const name of INPUT_EVENTS) {
      this.area.addEventListener(name, (ev) => this.filterInput(ev), true);
    }
    // The screen element's size, and the surface spice-html5 draws on
    // (a new canvas each time the VM's screen changes size).
    this.resizeObserver = new ResizeObserver(() => this.layout());
    this.resizeObserver.observe(screen);
    this.canvasObserver = new MutationObserver(() => this.layout());
    this.canvasObserver.observe(this.area, { childList: true });
    this._asked = '';
    this._lost = null;

    current = this;
    try {
      this.sc = new SpiceMainConn({
        uri: url,
        screen_id: this.area.id,
        password: '',
        onerror: (e) => this.failed(e),
        onsuccess: () => this.dispatchEvent(new Event('connect')),
        onagent: () => { this.agent = true; this.requestResize(); },
      });
    } catch (e) {
      setTimeout(() => this.finish(1006, String(e && e.message)), 0);
    }
  }

  watch(ws) {
    ws.addEventListener('close', (ev) => {
      const channel = ws.parent && ws.parent.type;
      if (channel === Constants.SPICE_CHANNEL_MAIN) {
        this.finish(ev.code, ev.reason);
        return;
      }
      // A view-only link has no inputs channel: the proxy refuses it.
      const ends = channel === Constants.SPICE_CHANNEL_DISPLAY ||
                   (channel === Constants.SPICE_CHANNEL_INPUTS && !this.viewOnly);
      // The main channel's close says best why the console ended (another
      // may close first, refused once its token was revoked): it is given
      // a moment to come.
      if (ends && !this.ended && this._lost === null) {
        this._lost = setTimeout(() => this.finish(ev.code, ev.reason), 1000);
      }
    });
  }

  // spice-html5's own errors (its main channel's). A refusal by the proxy
  // also closes the socket with a code that says more, so that is awaited
  // for a moment.
  failed(e) {
    const why = (e && e.message) || String(e);
    setTimeout(() => {
      if (this.ended) return;
      if (why === 'Permission denied.') {
        this.dispatchEvent(new CustomEvent('securityfailure', {
          detail: { reason: 'the SPICE server refused the password' },
        }));
        this.finish(null, '');
      } else if (why === 'Connection timed out.') {
        this.finish(4504, why);
      } else {
        this.finish(4500, why);
      }
    }, 500);
  }

  // Ends the console once: `code` null when no socket said why.
  finish(code, reason) {
    if (this.ended) return;
    this.ended = true;
    if (current === this) current = null;
    this.resizeObserver.disconnect();
    this.canvasObserver.disconnect();
    clearTimeout(this._resizeTimer);
    clearTimeout(this._lost);
    try {
      if (this.sc) this.sc.stop();
    } catch (_) { /* channels that never opened */ }
    this.area.remove();
    delete this.screen.dataset.spiceView;
    if (code !== null) this.dispatchEvent(new CustomEvent('close', { detail: { code, reason } }));
    this.dispatchEvent(new CustomEvent('disconnect', { detail: { clean: code === 1000 } }));
  }

  // Input to the console's screen: none on a view-only link; keys
  // spice-html5 has no scancode for are dropped, as it would otherwise stop
  // the page with an alert.
  filterInput(ev) {
    const unmapped = (ev.type === 'keydown' || ev.type === 'keyup') &&
                     keycode_to_end_scan(ev.keyCode) === 0;
    if (this.viewOnly || unmapped) {
      ev.stopPropagation();
      if (ev.type !== 'mousemove') ev.preventDefault();
    }
  }

  inputs() {
    const inputs = this.sc && this.sc.inputs;
    return !this.ended && !this.viewOnly && inputs && inputs.state === 'ready' ? inputs : null;
  }

  sendScancode(code, down) {
    const inputs = this.inputs();
    if (!inputs) return;
    const key = down ? new SpiceMsgcKeyDown() : new SpiceMsgcKeyUp();
    key.code = down ? code : code | (code > 0xff ? 0x8000 : 0x80);
    const msg = new SpiceMiniData();
    msg.build_msg(down ? Constants.SPICE_MSGC_INPUTS_KEY_DOWN : Constants.SPICE_MSGC_INPUTS_KEY_UP,
                  key);
    inputs.send_msg(msg);
  }

  // A key by its X keysym, as noVNC's sendKey takes it; a character that
  // needs Shift gets it around it.
  sendKey(keysym, _code, down) {
    const key = SCANCODES.get(keysym);
    if (!key) return;
    const [code, shift] = key;
    if (down) {
      if (shift) this.sendScancode(SHIFT, true);
      this.sendScancode(code, true);
    } else {
      this.sendScancode(code, false);
      if (shift) this.sendScancode(SHIFT, false);
    }
  }

  // The first character of `chars` (one code point each) this console
  // cannot type, or null: it types as a US keyboard does.
  untypable(chars) {
    const bad = chars.find((ch) => ch !== '\n' && ch !== '\t' && !SCANCODES.has(ch.codePointAt(0)));
    return bad === undefined ? null : bad;
  }

  // Not spice-html5's sendCtrlAltDel: it sends Delete's release as a second
  // press and leaves Ctrl and Alt down until a key is typed in the page.
  sendCtrlAltDel() {
    for (const keysym of CTRL_ALT_DEL) this.sendKey(keysym, null, true);
    for (const keysym of [...CTRL_ALT_DEL].reverse()) this.sendKey(keysym, null, false);
  }

  focus() {
    const canvas = this.area.querySelector('canvas');
    if (canvas) canvas.focus();
  }

  disconnect() {
    this.finish(1000, '');
  }

  // The view settings noVNC's RFB has: scaled to the screen element, or at
  // its own size with scrollbars; and the VM's screen resized to the
  // element, which SPICE does through the guest's agent.
  get scaleViewport() { return this._scale; }
  set scaleViewport(on) { this._scale = !!on; this.layout(); }
  get resizeSession() { return this._resize; }
  set resizeSession(on) { this._resize = !!on; this._asked = ''; this.requestResize(); }
  get clipViewport() { return false; }
  set clipViewport(_on) { /* the screen element clips or scrolls */ }
  get canResize() { return this.agent; }
  get resizeNeeds() { return 'the SPICE agent (spice-vdagent) running in the VM'; }

  layout() {
    if (this.ended) return;
    this.screen.dataset.spiceView = this._scale ? 'fit' : 'actual';
    const canvas = this.area.querySelector('canvas');
    if (!canvas || !canvas.width || !canvas.height) return;
    if (this._scale) {
      const w = this.screen.clientWidth;
      const h = this.screen.clientHeight;
      const s = Math.min(w / canvas.width, h / canvas.height);
      const x = Math.max(0, (w - canvas.width * s) / 2);
      // A transform, not a CSS size: spice-html5 reads the mouse from
      // offsetX and offsetY, which stay in the canvas's own pixels.
      this.area.style.transform = `translate(${x}px, 0) scale(${s})`;
    } else {
      this.area.style.transform = '';
    }
    this.requestResize();
  }

  // Asks the agent for a screen the element's size once it stops changing
  // (as spice-html5's resize helpers do, but for the element rather than
  // the whole window); X wants multiples of 8.
  requestResize() {
    clearTimeout(this._resizeTimer);
    if (!this._resize || !this.agent || this.ended) return;
    this._resizeTimer = setTimeout(() => {
      const w = this.screen.clientWidth - (this.screen.clientWidth % 8);
      const h = this.screen.clientHeight - (this.screen.clientHeight % 8);
      // Once per size: the new screen comes back as a new canvas.
      if (w <= 0 || h <= 0 || this.ended || this._asked === w + 'x' + h) return;
      this._asked = w + 'x' + h;
      this.sc.resize_window(0, w, h, 32, 0, 0);
    }, 200);
  }
}
