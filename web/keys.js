// The keys menu: keys a browser or its OS keeps for itself (Ctrl-Alt-Fn,
// Esc in full screen, the Windows key, Tab, PrintScreen), sent to the VM,
// and sticky Ctrl, Alt and Super that stay down for the next key.

const KEY = {
  Control: [0xffe3, 'ControlLeft'],
  Alt: [0xffe9, 'AltLeft'],
  Super: [0xffeb, 'MetaLeft'],
  Escape: [0xff1b, 'Escape'],
  Tab: [0xff09, 'Tab'],
  Print: [0xff61, 'PrintScreen'],
  Delete: [0xffff, 'Delete'],
};
const F = (n) => [0xffbe + n - 1, 'F' + n];

export function setupKeysMenu(getRfb) {
  const toggle = document.getElementById('keys-toggle');
  const menu = document.getElementById('keys-menu');
  const sticky = new Map(); // name -> button, for the modifiers held down

  const press = (rfb, [sym, code], down) => rfb.sendKey(sym, code, down);
  const releaseSticky = (rfb) => {
    for (const [name, button] of sticky) {
      press(rfb, KEY[name], false);
      button.setAttribute('aria-pressed', 'false');
    }
    sticky.clear();
  };
  // A key, with Ctrl and Alt around it when asked, then the sticky ones up.
  const send = (key, withCtrlAlt = false) => {
    const rfb = getRfb();
    if (!rfb) return;
    if (withCtrlAlt) { press(rfb, KEY.Control, true); press(rfb, KEY.Alt, true); }
    press(rfb, key, true);
    press(rfb, key, false);
    if (withCtrlAlt) { press(rfb, KEY.Alt, false); press(rfb, KEY.Control, false); }
    releaseSticky(rfb);
    rfb.focus();
  };

  toggle.addEventListener('click', () => {
    menu.hidden = !menu.hidden;
  });
  for (const button of menu.querySelectorAll('button[data-key]')) {
    const name = button.dataset.key;
    button.addEventListener('click', () => {
      const rfb = getRfb();
      if (!rfb) return;
      if (button.dataset.sticky !== undefined) {
        // Down now, up after the next key (from the menu or the keyboard).
        if (sticky.has(name)) {
          press(rfb, KEY[name], false);
          sticky.delete(name);
          button.setAttribute('aria-pressed', 'false');
        } else {
          press(rfb, KEY[name], true);
          sticky.set(name, button);
          button.setAttribute('aria-pressed', 'true');
        }
        rfb.focus();
        return;
      }
      if (name === 'CtrlAltDel') { send(KEY.Delete, true); return; }
      const f = /^CtrlAltF(\d+)$/.exec(name);
      if (f) { send(F(Number(f[1])), true); return; }
      if (KEY[name]) send(KEY[name]);
    });
  }
  // A key typed on the keyboard ends the sticky modifiers too.
  document.addEventListener('keyup', (ev) => {
    const rfb = getRfb();
    if (rfb && sticky.size && !['Control', 'Alt', 'Meta'].includes(ev.key)) releaseSticky(rfb);
  }, true);

  return {
    enable(on) {
      toggle.disabled = !on;
      if (!on) { menu.hidden = true; sticky.clear(); }
    },
    hide() { toggle.hidden = true; menu.hidden = true; },
  };
}
