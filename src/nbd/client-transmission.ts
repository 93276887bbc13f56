/**
 * One negotiated NBD connection in the transmission phase, client side: pipelined requests
 * tagged with cookies, and a reply parser for simple replies and structured chunks
 * (OFFSET_DATA, OFFSET_HOLE, NONE, ERROR, ERROR_OFFSET, BLOCK_STATUS) that copies READ
 * payloads straight from the socket's chunks into the caller's buffer.
 *
 * A connection never retries anything itself. When it dies (socket error or close, protocol
 * violation, I/O timeout, ESHUTDOWN from the server) it calls `onLost` once with every
 * request still in flight, in the order they were sent, so the owner can re-issue them on a
 * new connection or fail them.
 */
import type { Socket } from 'node:net';
import { BlockError, type ErrnoCode } from '../core/errors.ts';
import {
  CHUNK_BLOCK_STATUS, CHUNK_ERROR, CHUNK_ERROR_OFFSET, CHUNK_NONE, CHUNK_OFFSET_DATA,
  CHUNK_OFFSET_HOLE, CMD_BLOCK_STATUS, CMD_DISC, CMD_READ, CMD_WRITE, REPLY_FLAG_DONE,
  REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
} from './constants.ts';
import type { ExportParams } from './client-handshake.ts';

/** one NBD request, owned by the client; re-sent as is after a reconnect */
export interface Request {
  readonly type: number;
  readonly flags: number;
  readonly offset: number;
  readonly length: number;
  /** WRITE payload, or READ target (length bytes); null otherwise */
  readonly data: Buffer | null;
  readonly resolve: () => void;
  readonly reject: (err: BlockError) => void;
  /** times sent so far */
  attempts: number;
  // ---- per attempt, reset by send()
  cookie: number;
  error: BlockError | null;
  /** READ bytes covered by data and hole chunks */
  received: number;
  /** BLOCK_STATUS result: length, flags, length, flags, … */
  extents: number[] | null;
}

export interface ConnectionOptions {
  /** for messages: the URI or endpoint */
  readonly label: string;
  /** drop the connection when requests wait this long without a byte from the server (0 = never) */
  readonly ioTimeoutMs: number;
  readonly onLost: (conn: Connection, reason: Error, inflight: Request[]) => void;
}

const WIRE_ERRNO: Readonly<Record<number, ErrnoCode>> = {
  1: 'EPERM', 5: 'EIO', 12: 'ENOMEM', 22: 'EINVAL', 28: 'ENOSPC', 75: 'EOVERFLOW', 95: 'ENOTSUP', 108: 'ESHUTDOWN',
};
const CMD_NAMES = ['READ', 'WRITE', 'DISC', 'FLUSH', 'TRIM', 'CACHE', 'WRITE_ZEROES', 'BLOCK_STATUS'];

/** NBD wire errno → BlockError code; anything unknown is EIO */
export function codeFromWire(errno: number): ErrnoCode {
  return WIRE_ERRNO[errno] ?? 'EIO';
}

export class ProtocolError extends Error {
  readonly code = 'EPROTO';
}

const PHASE_HEADER = 0;
const PHASE_EXTRA = 1;
const PHASE_DATA = 2;
const PHASE_BLOB = 3;
/** largest non-data chunk payload accepted (2^20 extents × 8 bytes + context id, with room) */
const MAX_BLOB = 16 * 1024 * 1024;
const TWO32 = 0x100000000;

export class Connection {
  readonly params: ExportParams;
  readonly #sock: Socket;
  readonly #opts: ConnectionOptions;
  readonly #inflight = new Map<number, Request>();
  #cookie = 0;
  #dead = false;
  #corked = false;
  #closedWaiters: Array<() => void> = [];
  #drainWaiters: Array<() => void> = [];
  // ---- parser state
  #phase = PHASE_HEADER;
  readonly #hdr = Buffer.alloc(32);
  #hdrHave = 0;
  #hdrNeed = 4;
  #req: Request | null = null;
  #chunkType = 0;
  #chunkLen = 0;
  #done = false;
  #target: Buffer | null = null;
  #tpos = 0;
  #left = 0;
  #blob = Buffer.alloc(4096);
  #blobHave = 0;
  #blobNeed = 0;
  // ---- I/O timeout
  #rx = 0;
  #timer: NodeJS.Timeout | null = null;

  constructor(sock: Socket, params: ExportParams, leftover: Buffer, opts: ConnectionOptions) {
    this.#sock = sock;
    this.params = params;
    this.#opts = opts;
    sock.on('data', this.#onData);
    sock.on('error', (err: Error) => this.#lose(err));
    sock.on('end', () => this.#lose(new Error('connection closed by the server')));
    sock.on('close', () => {
      this.#lose(new Error('connection closed'));
      for (const w of this.#closedWaiters.splice(0)) w();
    });
    if (opts.ioTimeoutMs > 0) this.#startTimer(opts.ioTimeoutMs);
    if (leftover.length) this.#onData(leftover);
    sock.resume();
  }

  get dead(): boolean {
    return this.#dead;
  }

  get inflight(): number {
    return this.#inflight.size;
  }

  /** send a request; false if the connection is already dead (the caller keeps the request) */
  send(req: Request): boolean {
    if (this.#dead) return false;
    let cookie = this.#cookie;
    do cookie = (cookie + 1) >>> 0; while (cookie === 0 || this.#inflight.has(cookie));
    this.#cookie = cookie;
    req.cookie = cookie;
    req.error = null;
    req.received = 0;
    req.extents = null;
    req.attempts++;
    this.#inflight.set(cookie, req);
    const h = Buffer.allocUnsafe(28);
    h.writeUInt32BE(REQUEST_MAGIC, 0);
    h.writeUInt16BE(req.flags, 4);
    h.writeUInt16BE(req.type, 6);
    h.writeUInt32BE(0, 8);
    h.writeUInt32BE(cookie, 12);
    h.writeUInt32BE(Math.floor(req.offset / TWO32), 16);
    h.writeUInt32BE(req.offset % TWO32, 20);
    h.writeUInt32BE(req.length, 24);
    if (!this.#corked) {
      this.#corked = true;
      this.#sock.cork();
      process.nextTick(this.#uncork);
    }
    this.#sock.write(h);
    if (req.type === CMD_WRITE && req.length > 0) this.#sock.write(req.data!);
    return true;
  }

  readonly #uncork = (): void => {
    this.#corked = false;
    this.#sock.uncork();
  };

  /**
   * Orderly shutdown: wait (up to `graceMs`) for in-flight requests, send DISC, end the
   * socket and wait for it to close. Requests still in flight are handed to `onLost`.
   */
  async disconnect(graceMs: number): Promise<void> {
    if (!this.#dead && this.#inflight.size > 0) {
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, graceMs);
        this.#drainWaiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
    if (!this.#dead) {
      this.#sendDisc();
      this.#sock.end();
    }
    if (!this.#sock.destroyed) {
      await new Promise<void>((resolve) => {
        const t = setTimeout(() => {
          this.#sock.destroy();
          resolve();
        }, 1000);
        this.#closedWaiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
    this.#lose(new Error('disconnected'));
  }

  /** kill the connection now (timeouts, protocol errors); in-flight requests go to onLost */
  destroy(reason: Error): void {
    this.#lose(reason);
  }

  #sendDisc(): void {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(REQUEST_MAGIC, 0);
    h.writeUInt16BE(CMD_DISC, 6);
    this.#sock.write(h);
  }

  /** mark dead and hand back in-flight requests; `graceful` lets queued writes (DISC) go out first */
  #lose(reason: Error, graceful = false): void {
    if (this.#dead) return;
    this.#dead = true;
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = null;
    this.#sock.off('data', this.#onData);
    if (graceful) this.#sock.destroySoon();
    else this.#sock.destroy();
    const reqs = [...this.#inflight.values()];
    this.#inflight.clear();
    for (const w of this.#drainWaiters.splice(0)) w();
    this.#opts.onLost(this, reason, reqs);
  }

  #startTimer(timeoutMs: number): void {
    const tick = Math.max(50, Math.min(1000, Math.floor(timeoutMs / 4)));
    let lastRx = this.#rx;
    let idle = 0;
    this.#timer = setInterval(() => {
      if (this.#inflight.size === 0 || this.#rx !== lastRx) {
        idle = 0;
        lastRx = this.#rx;
        return;
      }
      idle += tick;
      if (idle >= timeoutMs) {
        const err = new Error(`no reply from the server for ${timeoutMs} ms with ${this.#inflight.size} request(s) in flight`);
        (err as NodeJS.ErrnoException).code = 'ETIMEDOUT';
        this.#lose(err);
      }
    }, tick);
    this.#timer.unref();
  }

  // ---------------------------------------------------------------- reply parser

  readonly #onData = (chunk: Buffer): void => {
    this.#rx++;
    const n = chunk.length;
    let i = 0;
    try {
      while (i < n && !this.#dead) {
        if (this.#phase === PHASE_DATA) {
          const k = Math.min(this.#left, n - i);
          chunk.copy(this.#target!, this.#tpos, i, i + k);
          i += k;
          this.#tpos += k;
          this.#left -= k;
          if (this.#left === 0) this.#endChunk();
        } else if (this.#phase === PHASE_BLOB) {
          const k = Math.min(this.#blobNeed - this.#blobHave, n - i);
          chunk.copy(this.#blob, this.#blobHave, i, i + k);
          i += k;
          this.#blobHave += k;
          if (this.#blobHave === this.#blobNeed) this.#onBlob();
        } else {
          const k = Math.min(this.#hdrNeed - this.#hdrHave, n - i);
          chunk.copy(this.#hdr, this.#hdrHave, i, i + k);
          i += k;
          this.#hdrHave += k;
          if (this.#hdrHave === this.#hdrNeed) {
            if (this.#phase === PHASE_EXTRA) this.#onExtra();
            else this.#onHeader();
          }
        }
      }
    } catch (err) {
      this.#lose(err instanceof Error ? err : new Error(String(err)));
    }
  };

  #onHeader(): void {
    const h = this.#hdr;
    if (this.#hdrNeed === 4) {
      const magic = h.readUInt32BE(0);
      if (magic === SIMPLE_REPLY_MAGIC) this.#hdrNeed = 16;
      else if (magic === STRUCTURED_REPLY_MAGIC) this.#hdrNeed = 20;
      else throw new ProtocolError(`bad reply magic 0x${magic.toString(16)}`);
      return;
    }
    const req = this.#lookup(h.readUInt32BE(8), h.readUInt32BE(12));
    this.#req = req;
    if (this.#hdrNeed === 16) {
      this.#done = true;
      const errno = h.readUInt32BE(4);
      if (errno !== 0) {
        this.#setError(req, errno, '');
        this.#endChunk();
      } else if (req.type === CMD_READ && req.length > 0) {
        req.received = req.length;
        this.#startData(req.data!, 0, req.length);
      } else {
        this.#endChunk();
      }
      return;
    }
    this.#done = (h.readUInt16BE(4) & REPLY_FLAG_DONE) !== 0;
    const type = h.readUInt16BE(6);
    const len = h.readUInt32BE(16);
    this.#chunkType = type;
    this.#chunkLen = len;
    if (type === CHUNK_NONE) {
      if (len !== 0) throw new ProtocolError(`NONE chunk with ${len} bytes of payload`);
      this.#endChunk();
    } else if (type === CHUNK_OFFSET_DATA || type === CHUNK_OFFSET_HOLE) {
      if (req.type !== CMD_READ) throw new ProtocolError(`data chunk in reply to ${CMD_NAMES[req.type] ?? req.type}`);
      if (type === CHUNK_OFFSET_DATA ? len < 8 : len !== 12) throw new ProtocolError(`bad length ${len} for chunk type ${type}`);
      this.#phase = PHASE_EXTRA;
      this.#hdrNeed = type === CHUNK_OFFSET_DATA ? 28 : 32;
    } else if (type === CHUNK_BLOCK_STATUS || type === CHUNK_ERROR || type === CHUNK_ERROR_OFFSET || (type & 0x8000) !== 0) {
      if (len > MAX_BLOB) throw new ProtocolError(`chunk of ${len} bytes`);
      if (len > this.#blob.length) this.#blob = Buffer.allocUnsafe(len);
      this.#blobHave = 0;
      this.#blobNeed = len;
      this.#phase = PHASE_BLOB;
      if (len === 0) this.#onBlob();
    } else {
      throw new ProtocolError(`unknown structured reply chunk type ${type}`);
    }
  }

  #onExtra(): void {
    const req = this.#req!;
    const h = this.#hdr;
    const rel = h.readUInt32BE(20) * TWO32 + h.readUInt32BE(24) - req.offset;
    const size = this.#chunkType === CHUNK_OFFSET_DATA ? this.#chunkLen - 8 : h.readUInt32BE(28);
    if (rel < 0 || rel + size > req.length) {
      throw new ProtocolError(`read chunk at ${rel + req.offset}+${size} outside the request ${req.offset}+${req.length}`);
    }
    req.received += size;
    if (this.#chunkType === CHUNK_OFFSET_HOLE) {
      req.data!.fill(0, rel, rel + size);
      this.#endChunk();
    } else if (size === 0) {
      this.#endChunk();
    } else {
      this.#startData(req.data!, rel, size);
    }
  }

  #onBlob(): void {
    const req = this.#req!;
    const b = this.#blob;
    const len = this.#blobNeed;
    const type = this.#chunkType;
    if (type === CHUNK_BLOCK_STATUS) {
      if (req.type !== CMD_BLOCK_STATUS) throw new ProtocolError('BLOCK_STATUS chunk for another command');
      if (len < 12 || (len - 4) % 8 !== 0) throw new ProtocolError(`bad BLOCK_STATUS chunk length ${len}`);
      if (b.readUInt32BE(0) === this.params.metaContextId) {
        const out = (req.extents ??= []);
        for (let p = 4; p < len; p += 8) out.push(b.readUInt32BE(p), b.readUInt32BE(p + 4));
      }
    } else if (type === CHUNK_ERROR || type === CHUNK_ERROR_OFFSET) {
      if (len < 6) throw new ProtocolError(`short error chunk (${len} bytes)`);
      const msgLen = b.readUInt16BE(4);
      if (6 + msgLen > len) throw new ProtocolError('error chunk message overruns the chunk');
      this.#setError(req, b.readUInt32BE(0), b.toString('utf8', 6, 6 + msgLen));
    } else {
      this.#setError(req, 5, `unknown error chunk type 0x${type.toString(16)}`);
    }
    this.#endChunk();
  }

  #startData(target: Buffer, pos: number, len: number): void {
    this.#target = target;
    this.#tpos = pos;
    this.#left = len;
    this.#phase = PHASE_DATA;
  }

  #lookup(hi: number, lo: number): Request {
    const req = hi === 0 ? this.#inflight.get(lo) : undefined;
    if (!req) throw new ProtocolError(`reply for unknown cookie ${hi * TWO32 + lo}`);
    return req;
  }

  #setError(req: Request, errno: number, msg: string): void {
    if (req.error) return;
    const code = errno === 0 ? 'EIO' : codeFromWire(errno);
    const what = `${CMD_NAMES[req.type] ?? `command ${req.type}`} ${req.offset}+${req.length}`;
    req.error = new BlockError(code, `${this.#opts.label}: NBD ${what} failed: ${code}${msg ? ` (${msg})` : ''}`);
  }

  #endChunk(): void {
    this.#phase = PHASE_HEADER;
    this.#hdrHave = 0;
    this.#hdrNeed = 4;
    this.#target = null;
    const req = this.#req!;
    this.#req = null;
    if (this.#done) this.#finish(req);
  }

  #finish(req: Request): void {
    const err = req.error;
    if (err?.code === 'ESHUTDOWN') {
      // the server is going away: disconnect cleanly; the request is re-issued elsewhere
      this.#sendDisc();
      this.#lose(new Error('server is shutting down (ESHUTDOWN)'), true);
      return;
    }
    this.#inflight.delete(req.cookie);
    if (this.#inflight.size === 0 && this.#drainWaiters.length) for (const w of this.#drainWaiters.splice(0)) w();
    if (err) req.reject(err);
    else if (req.type === CMD_READ && req.received !== req.length) {
      req.reject(new BlockError('EIO', `${this.#opts.label}: NBD READ ${req.offset}+${req.length}: server sent ${req.received} bytes`));
    } else req.resolve();
  }
}
