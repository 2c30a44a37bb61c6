// The replay page: plays a recorded console session (see src/recording.rs
// for the format) with noVNC's RFB module, fed by a channel that replays
// what the browser received instead of a WebSocket.
import RFB from '/novnc/1.7.0/core/rfb.js';

const MAGIC = 'VNCBREC1';
const MAX_HEADER = 64 * 1024;
const MAX_RECORD = 1024 * 1024;
// setTimeout's longest wait; a longer gap is waited for in steps.
const MAX_WAIT = 0x7fffffff;
const UI_EVERY = 200;

const statusEl = document.getElementById('status');
const screen = document.getElementById('screen');
const playButton = document.getElementById('play');
const speedButtons = [...document.querySelectorAll('#speeds button')];
const seekInput = document.getElementById('seek');
const timeEl = document.getElementById('time');

class ReplayError extends Error {}

// Splits the decompressed stream into its header and records; a stream
// cut short keeps its whole records and reads as incomplete.
function parseRecording(buffer) {
  const bytes = new Uint8Array(buffer);
  const view = new DataView(buffer);
  const damaged = new ReplayError('The recording is damaged.');
  if (bytes.length < 12 || String.fromCharCode(...bytes.subarray(0, 8)) !== MAGIC) {
    throw new ReplayError('This is not a session recording.');
  }
  const headerLength = view.getUint32(8);
  if (headerLength > MAX_HEADER || 12 + headerLength > bytes.length) throw damaged;
  let header;
  try {
    const text = new TextDecoder('utf-8', { fatal: true }).decode(bytes.subarray(12, 12 + headerLength));
    header = JSON.parse(text);
  } catch (e) {
    throw damaged;
  }
  if (!header || typeof header !== 'object') throw damaged;
  if (header.version !== 1) {
    throw new ReplayError('This recording has format version ' + header.version + ', which this page cannot play.');
  }

  const records = [];
  let offset = 12 + headerLength;
  let complete = false;
  let endAt = 0;
  while (offset + 8 <= bytes.length) {
    const at = view.getUint32(offset);
    const length = view.getUint32(offset + 4);
    offset += 8;
    if (length === 0) {
      // The end record; without its status byte it was cut short.
      complete = offset < bytes.length && bytes[offset] === 0;
      endAt = at;
      break;
    }
    if (length > MAX_RECORD) throw damaged;
    if (offset + length > bytes.length) break;
    records.push({ at, start: offset, end: offset + length });
    offset += length;
  }
  const lastAt = records.length ? records[records.length - 1].at : 0;
  return { header, records, complete, duration: Math.max(endAt, lastAt), buffer };
}

// What noVNC's Websock.attach asks of a channel. What noVNC sends is
// dropped: the recorded server does not listen.
class ReplayChannel {
  constructor() {
    this.binaryType = 'arraybuffer';
    this.protocol = '';
    this.readyState = 'connecting';
    this.onopen = null;
    this.onmessage = null;
    this.onclose = null;
    this.onerror = null;
  }

  send(data) {}

  close() {
    if (this.readyState === 'closed') return;
    this.readyState = 'closed';
    // A WebSocket reports its close later, never from inside close().
    setTimeout(() => {
      if (this.onclose) this.onclose({ code: 1000, reason: '', wasClean: true });
    }, 0);
  }

  open() {
    this.readyState = 'open';
    if (this.onopen) this.onopen();
  }

  deliver(data) {
    if (this.readyState === 'open' && this.onmessage) this.onmessage({ data });
  }
}

let recording = null;
let rfb = null;
let channel = null;
let next = 0;           // Index of the next record to deliver.
let position = 0;       // Milliseconds into the recording, while paused.
let speed = 1;
let playing = false;
let wantPlaying = true; // What to do once a rebuild is done.
let rebuilding = false;
let generation = 0;
let baseWall = 0;       // When playing: the clock and position it started at.
let basePosition = 0;
let timer = null;
let dragging = false;

function setState(state, text) {
  document.body.dataset.state = state;
  if (text !== undefined) statusEl.textContent = text;
}

function state() {
  return document.body.dataset.state;
}

function formatTime(ms) {
  const total = Math.floor(ms / 1000);
  const s = total % 60;
  const m = Math.floor(total / 60) % 60;
  const h = Math.floor(total / 3600);
  const pad = (n) => String(n).padStart(2, '0');
  return h > 0 ? h + ':' + pad(m) + ':' + pad(s) : m + ':' + pad(s);
}

function duration() {
  return recording ? recording.duration : 0;
}

function currentPosition() {
  if (!playing) return position;
  return Math.min(duration(), basePosition + (performance.now() - baseWall) * speed);
}

function fail(text) {
  stopClock();
  generation++;
  rebuilding = false;
  setState('failed', text);
  playButton.disabled = true;
  seekInput.disabled = true;
  for (const b of speedButtons) b.disabled = true;
}

// Hands noVNC every record up to `until`, in order, at once.
function deliverUpTo(until) {
  const records = recording.records;
  try {
    while (next < records.length && records[next].at <= until) {
      const { start, end } = records[next];
      next++;
      channel.deliver(recording.buffer.slice(start, end));
    }
  } catch (e) {
    fail('The recording could not be played: ' + (e && e.message ? e.message : e));
    return false;
  }
  return true;
}

function stopClock() {
  if (playing) position = currentPosition();
  playing = false;
  clearTimeout(timer);
  timer = null;
}

function startClock() {
  playing = true;
  baseWall = performance.now();
  basePosition = position;
  setState('playing', 'Playing');
  playButton.textContent = 'Pause';
  schedule();
}

function schedule() {
  clearTimeout(timer);
  const records = recording.records;
  const due = next < records.length ? records[next].at : duration();
  const wait = Math.min(MAX_WAIT, Math.max(0, (due - currentPosition()) / speed));
  timer = setTimeout(tick, wait);
}

function tick() {
  timer = null;
  if (!playing) return;
  const now = currentPosition();
  if (!deliverUpTo(now)) return;
  if (next >= recording.records.length && now >= duration()) {
    ended();
    return;
  }
  schedule();
}

function ended() {
  stopClock();
  position = duration();
  wantPlaying = false;
  const text = recording.complete ? 'End of recording' : 'End of recording: recording incomplete';
  setState('ended', text);
  playButton.textContent = 'Play';
  updateUi();
}

function paused() {
  stopClock();
  setState('paused', 'Paused');
  playButton.textContent = 'Play';
}

// A new RFB on a new channel, with every record up to `target` delivered;
// then playing or paused as asked. Resolves when done.
function rebuild(target) {
  stopClock();
  const gen = ++generation;
  rebuilding = true;
  if (rfb) {
    const old = rfb;
    rfb = null;
    try { old.disconnect(); } catch (e) { /* it was already gone */ }
  }
  channel = new ReplayChannel();
  const ch = channel;
  let view;
  try {
    view = new RFB(screen, ch, {});
  } catch (e) {
    fail('The recording could not be played: ' + e.message);
    return Promise.resolve();
  }
  view.viewOnly = true;
  view.scaleViewport = true;
  view.focusOnClick = false;
  view.addEventListener('disconnect', () => {
    if (view === rfb) fail('The recording could not be played: its stream is damaged.');
  });
  view.addEventListener('securityfailure', () => {
    if (view === rfb) fail('The recording could not be played: its handshake failed.');
  });
  view.addEventListener('desktopname', (ev) => {
    if (view === rfb) document.title = ev.detail.name + ' - Session replay';
  });
  rfb = view;
  next = 0;
  position = target;
  updateUi();
  return new Promise((resolve) => {
    setTimeout(() => {
      if (gen !== generation) {
        resolve();
        return;
      }
      rebuilding = false;
      ch.open();
      if (!deliverUpTo(target)) {
        resolve();
        return;
      }
      position = target;
      if (next >= recording.records.length && target >= duration()) {
        ended();
      } else if (wantPlaying) {
        startClock();
      } else {
        paused();
      }
      updateUi();
      resolve();
    }, 0);
  });
}

function seek(ms) {
  if (!recording || state() === 'failed') return Promise.resolve();
  const target = Math.max(0, Math.min(duration(), Number(ms) || 0));
  return rebuild(target);
}

function play() {
  if (!recording || state() === 'failed') return Promise.resolve();
  wantPlaying = true;
  if (state() === 'ended' || currentPosition() >= duration()) return rebuild(0);
  if (!rebuilding && !playing) startClock();
  return Promise.resolve();
}

function pause() {
  if (!recording || state() === 'failed') return;
  wantPlaying = false;
  if (!rebuilding && state() === 'playing') paused();
  updateUi();
}

function setSpeed(n) {
  const value = Number(n);
  if (!(value > 0)) return;
  if (playing) {
    position = currentPosition();
    baseWall = performance.now();
    basePosition = position;
  }
  speed = value;
  for (const b of speedButtons) {
    b.setAttribute('aria-pressed', String(Number(b.dataset.speed) === value));
  }
  if (playing) schedule();
}

function updateUi() {
  const now = Math.round(currentPosition());
  document.body.dataset.position = String(now);
  if (!dragging) seekInput.value = String(now);
  timeEl.textContent = formatTime(dragging ? Number(seekInput.value) : now) + ' / ' + formatTime(duration());
}

function showHeader(rec) {
  const h = rec.header;
  const startedMs = Number.isFinite(h.started_at_ms) ? h.started_at_ms : h.started_at * 1000;
  const started = new Date(startedMs);
  document.getElementById('info-session').textContent = String(h.session_id);
  document.getElementById('info-vm').textContent = String(h.vm_id);
  document.getElementById('info-user').textContent = String(h.user);
  document.getElementById('info-started').textContent =
    Number.isNaN(started.getTime()) ? 'unknown' : started.toLocaleString();
  document.getElementById('info-duration').textContent = formatTime(rec.duration);
  document.getElementById('info-complete').textContent = rec.complete ? 'complete' : 'incomplete';
  document.getElementById('info').hidden = false;
  document.title = 'Session ' + h.session_id + ' - Session replay';
}

async function load(token) {
  let response;
  try {
    response = await fetch('/api/v1/replay/data', {
      headers: { Authorization: 'Bearer ' + token },
      cache: 'no-store',
      referrerPolicy: 'no-referrer',
    });
  } catch (e) {
    throw new ReplayError('The recording could not be fetched: the broker is not reachable.');
  }
  if (!response.ok) {
    let message = '';
    try {
      const body = await response.json();
      if (body && typeof body.error === 'string') message = body.error;
      else if (body && body.error && typeof body.error.message === 'string') message = body.error.message;
    } catch (e) { /* no JSON body */ }
    if (!message) message = 'the broker answered ' + response.status + '.';
    throw new ReplayError('The recording could not be fetched: ' + message);
  }
  return parseRecording(await response.arrayBuffer());
}

async function start() {
  const token = new URLSearchParams(window.location.hash.slice(1)).get('token');
  // Keep the token out of the address bar once read.
  history.replaceState(null, '', window.location.pathname);
  if (!token) {
    fail('No replay token in this link.');
    return;
  }
  setState('loading', 'Loading the recording…');
  try {
    recording = await load(token);
  } catch (e) {
    fail(e instanceof ReplayError ? e.message : 'The recording could not be loaded.');
    return;
  }
  showHeader(recording);
  seekInput.max = String(recording.duration);
  seekInput.disabled = false;
  playButton.disabled = false;
  for (const b of speedButtons) b.disabled = false;
  setInterval(updateUi, UI_EVERY);
  await rebuild(0);
}

playButton.addEventListener('click', () => {
  if (state() === 'playing' || (rebuilding && wantPlaying)) pause();
  else play();
});
for (const b of speedButtons) {
  b.addEventListener('click', () => setSpeed(b.dataset.speed));
}
seekInput.addEventListener('input', () => {
  dragging = true;
  updateUi();
});
seekInput.addEventListener('change', () => {
  dragging = false;
  seek(Number(seekInput.value));
});

window.replay = {
  seek,
  play,
  pause,
  setSpeed,
  duration,
  position: () => Math.round(currentPosition()),
};

start();
