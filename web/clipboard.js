// The clipboard panel: text to the VM (RFB ClientCutText) and from it
// (ServerCutText), as the VM's clipboard policy allows. The broker enforces
// the policy whatever the page does; the panel says which way is off.
//
// The browser's Clipboard API is used where the browser permits it
// ("Paste from my clipboard", "Copy"); the text area works everywhere.
// A console without a clipboard (spice-html5 has none) keeps the panel,
// which says so, with nothing to press.

const OFF = {
  'to-vm': 'Copying from the VM is turned off for this console.',
  'from-vm': 'Copying to the VM is turned off for this console.',
  none: 'The clipboard is turned off for this console.',
};

export function setupClipboardPanel(getRfb, { onFromVm } = {}) {
  const toggle = document.getElementById('clip-toggle');
  const panel = document.getElementById('clip-panel');
  const text = document.getElementById('clip-text');
  const send = document.getElementById('clip-send');
  const paste = document.getElementById('clip-paste');
  const copy = document.getElementById('clip-copy');
  const note = document.getElementById('clip-note');
  let policy = 'both';
  let live = false;
  let missing = null; // why this console has no clipboard

  const toVm = () => !missing && (policy === 'both' || policy === 'to-vm');
  const fromVm = () => !missing && (policy === 'both' || policy === 'from-vm');
  const say = (msg, kind = '') => {
    note.textContent = msg;
    note.dataset.kind = kind;
  };
  const refresh = () => {
    send.disabled = !live || !toVm();
    paste.disabled = !live || !toVm() || !(navigator.clipboard && navigator.clipboard.readText);
    copy.disabled = !fromVm() || !(navigator.clipboard && navigator.clipboard.writeText);
    text.readOnly = !toVm();
    if (missing) say(missing, 'off');
    else if (OFF[policy]) say(OFF[policy], 'off');
  };

  const sendText = (value) => {
    const rfb = getRfb();
    if (!rfb || !toVm() || !value) return false;
    rfb.clipboardPasteFrom(value);
    say('Sent to the VM\'s clipboard.');
    return true;
  };

  toggle.addEventListener('click', () => {
    panel.hidden = !panel.hidden;
    if (!panel.hidden) text.focus();
  });
  send.addEventListener('click', () => sendText(text.value));
  paste.addEventListener('click', async () => {
    try {
      const value = await navigator.clipboard.readText();
      text.value = value;
      sendText(value);
    } catch (_) {
      say('The browser did not let the page read your clipboard: paste into the box, then Send.');
    }
  });
  copy.addEventListener('click', async () => {
    try {
      await navigator.clipboard.writeText(text.value);
      say('Copied to your clipboard.');
    } catch (_) {
      text.select();
      say('The browser did not let the page write your clipboard: the text is selected, copy it with Ctrl-C.');
    }
  });

  // Text the VM put on its clipboard.
  const fromServer = (ev) => {
    if (!fromVm()) return;
    text.value = ev.detail.text;
    say('The VM\'s clipboard, as it last changed.');
    if (onFromVm) onFromVm(ev.detail.text);
  };

  return {
    // The broker's clipboard policy for this session: both, to-vm,
    // from-vm or none.
    setPolicy(p) {
      policy = ['both', 'to-vm', 'from-vm', 'none'].includes(p) ? p : 'none';
      if (!OFF[policy]) say('');
      refresh();
    },
    attach(rfb) { rfb.addEventListener('clipboard', fromServer); },
    // `why`: this console has no clipboard; null: it has one.
    unavailable(why) {
      missing = why;
      if (!missing) say('');
      refresh();
    },
    enable(on) {
      live = on;
      toggle.disabled = !on;
      refresh();
    },
    send: sendText,
    mayReceive: fromVm,
    hide() { toggle.hidden = true; panel.hidden = true; },
  };
}
