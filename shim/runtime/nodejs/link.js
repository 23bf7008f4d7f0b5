'use strict';
// The link to the instance host (`sprout-shim host nodejs`): a socket on descriptor 3
// carrying frames. A frame is a 12-byte prefix (u32 header length, u32 payload length,
// u32 descriptor count = 0; little-endian), a JSON header with an `op`, then the
// payload bytes. No descriptors: Node cannot receive them.

const net = require('net');

const PREFIX = 12;
const MAX_HEADER = 128 << 10;
const MAX_PAYLOAD = 1 << 30;
const EMPTY = Buffer.alloc(0);

function die(message) {
  process._rawDebug(`sprout nodejs runtime: ${message}`);
  process.exit(70);
}

class Link {
  constructor(fd) {
    this.handlers = new Map(); // op -> function (header, payload)
    this.chunks = [];
    this.buffered = 0;
    this.need = PREFIX; // bytes the next part needs
    this.part = 'prefix';
    this.headerLen = 0;
    this.payloadLen = 0;
    this.header = null;
    this.socket = new net.Socket({ fd, readable: true, writable: true });
    this.socket.on('data', (chunk) => this.feed(chunk));
    this.socket.on('end', () => process.exit(0)); // the host is gone
    this.socket.on('error', (e) => die(`the link to the host broke: ${e.message}`));
  }

  on(op, handler) {
    this.handlers.set(op, handler);
  }

  send(header, payload = EMPTY) {
    const head = Buffer.from(JSON.stringify(header));
    if (head.length > MAX_HEADER) {
      throw new RangeError(`a header of ${head.length} bytes exceeds the limit of ${MAX_HEADER} bytes`);
    }
    if (payload.length > MAX_PAYLOAD) {
      throw new RangeError(`a payload of ${payload.length} bytes exceeds the limit of ${MAX_PAYLOAD} bytes`);
    }
    const prefix = Buffer.allocUnsafe(PREFIX);
    prefix.writeUInt32LE(head.length, 0);
    prefix.writeUInt32LE(payload.length, 4);
    prefix.writeUInt32LE(0, 8);
    if (payload.length <= 64 << 10) {
      this.socket.write(Buffer.concat([prefix, head, payload]));
    } else {
      this.socket.cork();
      this.socket.write(Buffer.concat([prefix, head]));
      this.socket.write(payload);
      this.socket.uncork();
    }
  }

  take(n) {
    const all = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks, this.buffered);
    const rest = all.subarray(n);
    this.chunks = rest.length ? [rest] : [];
    this.buffered = rest.length;
    return all.subarray(0, n);
  }

  feed(chunk) {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    while (this.buffered >= this.need) {
      const bytes = this.take(this.need);
      if (this.part === 'prefix') {
        this.headerLen = bytes.readUInt32LE(0);
        this.payloadLen = bytes.readUInt32LE(4);
        const fds = bytes.readUInt32LE(8);
        if (fds !== 0) die(`the host sent a frame with ${fds} descriptors (must be 0)`);
        if (this.headerLen > MAX_HEADER) die(`the host sent a header of ${this.headerLen} bytes (limit ${MAX_HEADER})`);
        if (this.payloadLen > MAX_PAYLOAD) die(`the host sent a payload of ${this.payloadLen} bytes (limit ${MAX_PAYLOAD})`);
        this.part = 'header';
        this.need = this.headerLen;
      } else if (this.part === 'header') {
        try {
          this.header = JSON.parse(bytes.toString('utf8'));
        } catch (e) {
          die(`the host sent a header that is not JSON: ${e.message}`);
        }
        this.part = 'payload';
        this.need = this.payloadLen;
      } else {
        const header = this.header;
        this.part = 'prefix';
        this.need = PREFIX;
        this.header = null;
        const handler = this.handlers.get(header && header.op);
        if (handler === undefined) die(`the host sent an unknown op ${JSON.stringify(header && header.op)}`);
        handler(header, bytes); // a view of the received bytes: nothing writes to them
      }
    }
  }
}

let link = null;

// The process's link (opened on first use).
module.exports = function theLink() {
  if (link === null) link = new Link(3);
  return link;
};
