'use strict';
// The `sprout` module a function requires: calls to other functions.
//
//   call(name, event)      -> Promise of the result; runs in this sandbox when the
//                             agent can attach the callee here
//   callAsync(name, event) -> Promise of the result; runs in a sibling sandbox
//   map(name, events)      -> Promise of the results in input order (in parallel, in
//                             sibling sandboxes); rejects with the first failure after
//                             all have answered
//
// An event that is a Buffer or a Uint8Array travels as raw bytes (and a raw result
// comes back as a Buffer); anything else as JSON. Calls nest at most MAX_DEPTH deep.
// A failed call rejects with a CallError.

const theLink = require('./link.js');

const MAX_DEPTH = 16;
const MAX_PAYLOAD = 1 << 30;

class CallError extends Error {
  constructor(fn, type, message, remoteTraceback = '', failed = undefined, kind = null) {
    if (failed === undefined) failed = type === 'CallFailed';
    super(failed ? `call to ${fn} failed: ${message}` : `${fn} raised ${type}: ${message}`);
    this.name = 'CallError';
    this.function = fn;
    this.type = type;
    this.remoteTraceback = remoteTraceback;
    this.failed = failed;
    this.kind = kind;
    // `message` is the callee's (or why the call failed), as in the Python SDK.
    Object.defineProperty(this, 'message', { value: message, enumerable: false, writable: true });
  }

  toString() {
    return this.failed
      ? `CallError: call to ${this.function} failed: ${this.message}`
      : `CallError: ${this.function} raised ${this.type}: ${this.message}`;
  }
}

let nextId = 1;
const pending = new Map(); // call id -> {name, resolve, reject}
let listening = false;

function listen() {
  if (listening) return;
  listening = true;
  const link = theLink();
  for (const op of ['call_returned', 'call_raised', 'call_failed', 'call_refused']) {
    link.on(op, settle);
  }
}

function settle(header, payload) {
  const call = pending.get(header.id);
  if (call === undefined) return; // an answer nobody waits for any more
  pending.delete(header.id);
  const fn = typeof header.function === 'string' ? header.function : call.name;
  switch (header.op) {
    case 'call_returned':
      if (header.raw) return call.resolve(payload);
      try {
        return call.resolve(JSON.parse(payload.toString('utf8')));
      } catch (e) {
        return call.reject(new CallError(call.name, 'CallFailed', `the result is not valid JSON: ${e.message}`));
      }
    case 'call_raised': {
      const error = header.error && typeof header.error === 'object' ? header.error : {};
      return call.reject(
        new CallError(fn, String(error.type || 'Error'), String(error.message || ''), String(error.traceback || ''), false),
      );
    }
    case 'call_refused': {
      const kind = String(header.kind || 'call_refused');
      return call.reject(new CallError(fn, 'CallFailed', String(header.message || kind), '', true, kind));
    }
    default:
      return call.reject(new CallError(fn, 'CallFailed', String(header.message || ''), '', true));
  }
}

function encode(event) {
  if (Buffer.isBuffer(event)) return [true, event];
  if (event instanceof Uint8Array) return [true, Buffer.from(event.buffer, event.byteOffset, event.byteLength)];
  const text = JSON.stringify(event === undefined ? null : event);
  if (text === undefined) throw new TypeError(`an event of type ${typeof event} cannot be sent as JSON`);
  return [false, Buffer.from(text)];
}

function start(name, event, async) {
  return new Promise((resolve, reject) => {
    if (typeof name !== 'string') {
      throw new TypeError(`a function name must be a string, not ${typeof name}`);
    }
    if (!name.isWellFormed() || name.length > 1024) {
      throw new TypeError('a function name must be well-formed text of at most 1024 characters');
    }
    const [raw, payload] = encode(event);
    if (payload.length > MAX_PAYLOAD) {
      throw new RangeError(`event of ${payload.length} bytes exceeds the limit of ${MAX_PAYLOAD} bytes`);
    }
    listen();
    const id = nextId++;
    pending.set(id, { name, resolve, reject });
    const header = { op: 'call', id, function: name };
    if (raw) header.raw = true;
    if (async) header.async = true;
    theLink().send(header, payload);
  });
}

function call(name, event) {
  return start(name, event, false);
}

function callAsync(name, event) {
  return start(name, event, true);
}

async function map(name, events) {
  const calls = Array.from(events, (event) => start(name, event, true));
  const settled = await Promise.allSettled(calls);
  const failed = settled.find((s) => s.status === 'rejected');
  if (failed !== undefined) throw failed.reason;
  return settled.map((s) => s.value);
}

module.exports = { call, callAsync, map, CallError, MAX_DEPTH };
