// How the screen fits the window: fit (scaled to the window, the default),
// actual size (with scrollbars), or remote resize (the VM's screen follows
// the window, where the VNC server supports SetDesktopSize, or for SPICE
// where the VM runs the SPICE agent). The choice is
// remembered in this browser. Full screen locks the keyboard where the
// browser can, so Esc, Alt-Tab and the Windows key reach the VM.

const KEY = 'vncbroker.scale';
const MODES = ['fit', 'actual', 'remote'];

export function setupView() {
  const select = document.getElementById('scale');
  const note = document.getElementById('scale-note');
  let rfb = null;
  let mode = MODES.includes(localStorage.getItem(KEY)) ? localStorage.getItem(KEY) : 'fit';
  select.value = mode;

  const apply = () => {
    if (!rfb) return;
    rfb.clipViewport = false;
    rfb.scaleViewport = mode === 'fit';
    rfb.resizeSession = mode === 'remote';
    note.hidden = true;
    if (mode === 'remote') {
      // noVNC learns whether the server can resize from its first update;
      // a SPICE console, when the VM's agent connects.
      const r = rfb;
      setTimeout(() => {
        const can = 'canResize' in r ? r.canResize : r._supportsSetDesktopSize;
        if (r === rfb && mode === 'remote' && !can) {
          note.textContent = 'This VM\'s screen cannot be resized from here' +
            (r.resizeNeeds ? ': that needs ' + r.resizeNeeds + '.' : '.');
          note.hidden = false;
        }
      }, 1500);
    }
  };
  const choose = (m) => {
    if (!MODES.includes(m)) return;
    mode = m;
    select.value = m;
    try { localStorage.setItem(KEY, m); } catch (_) { /* private mode */ }
    apply();
  };
  select.addEventListener('change', () => choose(select.value));

  document.addEventListener('fullscreenchange', () => {
    const kb = navigator.keyboard;
    if (!kb || !kb.lock) return;
    if (document.fullscreenElement) kb.lock().catch(() => {});
    else kb.unlock();
  });

  return {
    attach(r) { rfb = r; apply(); },
    choose,
    mode: () => mode,
  };
}
