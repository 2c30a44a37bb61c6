// What a closed console means to a person, and whether to try again.
//
// The proxy ends every refusal and every session with a close code (the
// README lists them); 1006 is the browser's own code for a connection that
// went away without one.

// Words for each code, for someone who does not know what a WebSocket is.
const MESSAGES = {
  1000: 'The console was closed.',
  1001: 'The console service restarted.',
  1002: 'The console stopped: the browser sent something it could not understand.',
  1003: 'The console stopped: the browser sent something it could not understand.',
  1006: 'The connection to the console was lost.',
  4400: 'This link has no console in it. Ask for a new one.',
  4401: 'This console link is invalid or has expired. Ask for a new one.',
  4403: 'You no longer have access to this console.',
  4404: 'This VM was removed or is not running.',
  4406: 'The console could not open one of its channels.',
  4408: 'The console was closed because nothing happened for a while.',
  4409: 'The VM moved since this link was made. Ask for a new one.',
  4410: 'Console access was revoked.',
  4411: 'The console reached its time limit.',
  4412: 'This console link has expired. Ask for a new one.',
  4423: 'Someone else has control of this console. A view-only link can still watch.',
  4425: 'Reconnecting: the previous connection is still closing.',
  4429: 'Too many consoles are open right now. Try again later.',
  4500: 'The VM console refused the connection.',
  4502: 'The VM console is not reachable right now.',
  4503: 'The console service is temporarily unavailable.',
  4504: 'The VM console did not answer in time.',
  4507: 'This console must be recorded, and the recording could not be written.',
};

// Drops the page comes back from by itself: the network, a node going
// away, a VM console that may be back in a moment.
const TRANSIENT = new Set([1001, 1006, 4425, 4502, 4503, 4504]);

// Ends after which a person may sensibly try again (with a reusable link):
// the transient ones, their own close, an idle timeout, a busy console.
const RETRYABLE = new Set([...TRANSIENT, 1000, 4408, 4423, 4429]);

export function describeClose(code, reason) {
  if (MESSAGES[code]) return MESSAGES[code];
  if (reason) return 'The console closed: ' + reason;
  return 'The console closed (code ' + code + ').';
}

// Whether the page reconnects by itself after `code`.
export const reconnectsAfter = (code) => TRANSIENT.has(code);

// Whether a "Reconnect" button makes sense after `code`.
export const retryableAfter = (code) => RETRYABLE.has(code);

// Seconds before reconnect attempt `n` (0 first): 1, 2, 4, then 8.
export const backoffSecs = (n) => Math.min(8, 2 ** Math.min(n, 3));

// "14 min" / "45 s": a time left, rounded for a person.
export function timeLeft(secs) {
  if (secs >= 5400) return Math.round(secs / 3600) + ' h';
  if (secs >= 90) return Math.round(secs / 60) + ' min';
  return Math.max(0, Math.round(secs)) + ' s';
}
