// For portals that embed the console: puts it in an iframe and passes its
// events and the portal's commands, with the console's origin checked both
// ways. Load it from the broker: <script src="https://BROKER/static/embed.js">.
//
//   const c = VncbrokerConsole.open(element, consoleUrl, {
//     onState: (e) => ...,      // {state, code, reason}
//     onMessage: (e) => ...,    // every vncbroker:* event
//   });
//   c.send({ type: 'vncbroker:type', text: 'hello\n' });
//   c.close();
//
// The broker lets only the origins in its proxy.allowed_origins frame the
// console (a CSP frame-ancestors), and the console takes commands only
// from the page that frames it.
(function () {
  'use strict';
  function open(element, url, options) {
    const opts = options || {};
    const origin = new URL(url, window.location.href).origin;
    const frame = document.createElement('iframe');
    frame.src = url;
    frame.title = opts.title || 'VM console';
    frame.allow = 'clipboard-read; clipboard-write; fullscreen; keyboard-map';
    frame.style.border = '0';
    frame.style.width = '100%';
    frame.style.height = '100%';
    const onMessage = (ev) => {
      if (ev.origin !== origin || ev.source !== frame.contentWindow) return;
      const data = ev.data || {};
      if (typeof data.type !== 'string' || !data.type.startsWith('vncbroker:')) return;
      if (data.type === 'vncbroker:state' && opts.onState) opts.onState(data);
      if (opts.onMessage) opts.onMessage(data);
    };
    window.addEventListener('message', onMessage);
    element.appendChild(frame);
    return {
      frame,
      send(msg) {
        if (frame.contentWindow) frame.contentWindow.postMessage(msg, origin);
      },
      close() {
        window.removeEventListener('message', onMessage);
        frame.remove();
      },
    };
  }
  window.VncbrokerConsole = { open };
})();
