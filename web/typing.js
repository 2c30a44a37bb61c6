// "Type text": types a text into the VM as keystrokes, for VMs without a
// clipboard agent (QEMU's VNC server has no guest clipboard).
//
// Characters become X keysyms (Latin-1 as they are, the rest of Unicode as
// 0x01000000 + code point); newline is Return and tab is Tab. Keys are
// sent down and up, one character at a time, at a paced rate, so a long
// text cannot flood the VM; a text longer than the limit is refused.
// The page's `<meta name="vncbroker-type-delay-ms">` and
// `<meta name="vncbroker-type-max-chars">` set the pace and the limit.
// A console that types by scancodes (SPICE) says which characters it cannot
// type (`untypable`), and a text with one is refused before any key goes.

const RETURN = 0xff0d;
const TAB = 0xff09;

function metaNumber(name, fallback) {
  const el = document.querySelector(`meta[name="${name}"]`);
  const n = el ? Number(el.content) : NaN;
  return Number.isFinite(n) && n >= 0 ? n : fallback;
}

export const typeDelayMs = () => metaNumber('vncbroker-type-delay-ms', 15);
export const typeMaxChars = () => metaNumber('vncbroker-type-max-chars', 10000);

// The keysym of one character (a string of one code point), or null.
export function keysymOf(ch) {
  if (ch === '\n') return RETURN;
  if (ch === '\t') return TAB;
  const cp = ch.codePointAt(0);
  if (cp === undefined || cp < 0x20 || (cp >= 0x7f && cp < 0xa0)) return null;
  if (cp <= 0xff) return cp;
  return 0x01000000 + cp;
}

// Types `text` through `rfb`; `onProgress(done, total)` after each
// character. Returns a handle whose `cancel()` stops it and whose `done`
// settles when it ends ('done' or 'cancelled').
// The characters `text` types: Windows line ends type one Return.
const charsOf = (text) => Array.from(text.replace(/\r\n?/g, '\n'));

export function typeText(rfb, text, onProgress) {
  // Other control characters are skipped.
  const chars = charsOf(text);
  let cancelled = false;
  const delay = typeDelayMs();
  const done = (async () => {
    for (let i = 0; i < chars.length; i++) {
      if (cancelled) return 'cancelled';
      const sym = keysymOf(chars[i]);
      if (sym !== null) {
        rfb.sendKey(sym, null, true);
        rfb.sendKey(sym, null, false);
      }
      onProgress(i + 1, chars.length);
      if (delay > 0) await new Promise((r) => setTimeout(r, delay));
    }
    return 'done';
  })();
  return { cancel: () => { cancelled = true; }, done };
}

// Wires the panel: a text box, Type, Cancel and a progress line.
export function setupTypePanel(getRfb) {
  const toggle = document.getElementById('type-toggle');
  const panel = document.getElementById('type-panel');
  const box = document.getElementById('type-text');
  const go = document.getElementById('type-go');
  const cancel = document.getElementById('type-cancel');
  const progress = document.getElementById('type-progress');
  let job = null;

  toggle.addEventListener('click', () => {
    panel.hidden = !panel.hidden;
    if (!panel.hidden) box.focus();
  });
  const finish = (how) => {
    job = null;
    go.disabled = false;
    cancel.disabled = true;
    progress.dataset.state = how;
    if (how === 'cancelled') progress.textContent += ' (cancelled)';
  };
  go.addEventListener('click', () => {
    const rfb = getRfb();
    const text = box.value;
    if (!rfb || job || !text) return;
    const max = typeMaxChars();
    const length = Array.from(text).length;
    if (length > max) {
      progress.dataset.state = 'refused';
      progress.textContent = `Too long to type: ${length} characters, at most ${max}.`;
      return;
    }
    const bad = rfb.untypable ? rfb.untypable(charsOf(text)) : null;
    if (bad !== null) {
      progress.dataset.state = 'refused';
      progress.textContent = `Cannot type “${bad}”: this console types only the characters ` +
        'of a US keyboard.';
      return;
    }
    go.disabled = true;
    cancel.disabled = false;
    progress.dataset.state = 'typing';
    job = typeText(rfb, text, (done, total) => {
      progress.textContent = `Typed ${done} of ${total} characters`;
    });
    job.done.then(finish);
    // Keys go to the screen, not to the text box.
    rfb.focus();
  });
  cancel.addEventListener('click', () => { if (job) job.cancel(); });
  return {
    // Offered only while connected and in control.
    enable(on) {
      toggle.disabled = !on;
      if (!on) {
        if (job) job.cancel();
        panel.hidden = true;
      }
    },
    hide() { toggle.hidden = true; panel.hidden = true; },
  };
}
