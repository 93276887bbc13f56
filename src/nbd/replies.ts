/**
 * Transmission-phase replies (NBD.md A.5): encoders, and the ReplyWriter that queues them on
 * the socket. Each reply is one small freshly allocated header (Node's slab makes these
 * cheap) followed by the payload, if any; payloads are never copied. Cookies are carried as
 * two u32 halves so no bigint or buffer is needed per request.
 */
import type { Socket } from 'node:net';
import type { Extent } from '../core/types.ts';
import type { BufferPool } from './buffer-pool.ts';
import { writeU64BE as writeU64 } from '../core/u64.ts';
import * as C from './constants.ts';
import type { Req } from './requests.ts';


/** 16-byte simple reply; READ data (if any) follows it on the wire */
export function simpleReply(cookieHi: number, cookieLo: number, errno: number): Buffer {
  const b = Buffer.allocUnsafe(C.SIMPLE_REPLY_SIZE);
  b.writeUInt32BE(C.SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(errno, 4);
  b.writeUInt32BE(cookieHi, 8);
  b.writeUInt32BE(cookieLo, 12);
  return b;
}

function chunkHeader(b: Buffer, flags: number, type: number, cookieHi: number, cookieLo: number, length: number): void {
  b.writeUInt32BE(C.STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeUInt32BE(cookieHi, 8);
  b.writeUInt32BE(cookieLo, 12);
  b.writeUInt32BE(length, 16);
}

/** OFFSET_DATA chunk header + offset (28 bytes); `dataLength` bytes of data follow */
export function offsetDataHeader(cookieHi: number, cookieLo: number, done: boolean, offset: number, dataLength: number): Buffer {
  const b = Buffer.allocUnsafe(C.CHUNK_HEADER_SIZE + 8);
  chunkHeader(b, done ? C.REPLY_FLAG_DONE : 0, C.CHUNK_OFFSET_DATA, cookieHi, cookieLo, 8 + dataLength);
  writeU64(b, offset, C.CHUNK_HEADER_SIZE);
  return b;
}

/** NONE chunk with DONE: ends a structured reply that carried no final data chunk */
export function noneChunk(cookieHi: number, cookieLo: number): Buffer {
  const b = Buffer.allocUnsafe(C.CHUNK_HEADER_SIZE);
  chunkHeader(b, C.REPLY_FLAG_DONE, C.CHUNK_NONE, cookieHi, cookieLo, 0);
  return b;
}

const MAX_MESSAGE = 256;

/** ERROR chunk with DONE, with a short human-readable message */
export function errorChunk(cookieHi: number, cookieLo: number, errno: number, message: string): Buffer {
  let msg = Buffer.from(message, 'utf8');
  if (msg.length > MAX_MESSAGE) msg = msg.subarray(0, MAX_MESSAGE);
  const b = Buffer.allocUnsafe(C.CHUNK_HEADER_SIZE + 6 + msg.length);
  chunkHeader(b, C.REPLY_FLAG_DONE, C.CHUNK_ERROR, cookieHi, cookieLo, 6 + msg.length);
  b.writeUInt32BE(errno, C.CHUNK_HEADER_SIZE);
  b.writeUInt16BE(msg.length, C.CHUNK_HEADER_SIZE + 4);
  msg.copy(b, C.CHUNK_HEADER_SIZE + 6);
  return b;
}

export function allocFlags(state: Extent['state']): number {
  switch (state) {
    case 'hole': return C.STATE_HOLE | C.STATE_ZERO;
    case 'zero': return C.STATE_ZERO;
    default: return 0;
  }
}

/** most extents in one reply; the client asks again for the rest */
const MAX_EXTENTS = 1 << 16;

/**
 * BLOCK_STATUS chunk (with DONE) for `base:allocation` over [0, length) of the request, from
 * sector-based extents starting at the request offset. Adjacent extents with equal flags are
 * merged; the list is clipped to `length` (so no extent overshoots); REQ_ONE keeps the first.
 * An empty or zero-length answer becomes one data extent over the whole length.
 */
export function blockStatusChunk(
  cookieHi: number, cookieLo: number, extents: readonly Extent[], length: number, reqOne: boolean,
): Buffer {
  const lens: number[] = [];
  const flags: number[] = [];
  let covered = 0;
  for (const e of extents) {
    if (covered >= length) break;
    const bytes = Math.min(e.sectors * 512, length - covered);
    if (!(bytes > 0)) continue;
    const f = allocFlags(e.state);
    const last = lens.length - 1;
    if (last >= 0 && flags[last] === f) lens[last]! += bytes;
    else {
      if (lens.length === MAX_EXTENTS || (reqOne && lens.length === 1)) break;
      lens.push(bytes);
      flags.push(f);
    }
    covered += bytes;
  }
  if (lens.length === 0) {
    lens.push(length);
    flags.push(0);
  }
  const n = reqOne ? 1 : lens.length;
  const b = Buffer.allocUnsafe(C.CHUNK_HEADER_SIZE + 4 + 8 * n);
  chunkHeader(b, C.REPLY_FLAG_DONE, C.CHUNK_BLOCK_STATUS, cookieHi, cookieLo, 4 + 8 * n);
  b.writeUInt32BE(C.META_BASE_ALLOCATION_ID, C.CHUNK_HEADER_SIZE);
  for (let i = 0; i < n; i++) {
    b.writeUInt32BE(lens[i]!, C.CHUNK_HEADER_SIZE + 4 + 8 * i);
    b.writeUInt32BE(flags[i]!, C.CHUNK_HEADER_SIZE + 8 + 8 * i);
  }
  return b;
}

type WriteDone = (err?: Error | null) => void;

function noop(): void {}

/**
 * Queues replies on one connection's socket. A header and its data are queued back to back
 * in the same tick, so replies never interleave; replies completing in the same tick are
 * corked into one writev. READ buffers return to the pool from the callback of the last
 * write that carries them. Replies to a closed socket are dropped.
 */
export class ReplyWriter {
  readonly #socket: Socket;
  readonly #structured: boolean;
  readonly #pool: BufferPool;
  /** called when the socket has taken a READ's last data write */
  readonly #onDataSent: () => void;
  #corked = false;
  #closed = false;

  constructor(socket: Socket, structured: boolean, pool: BufferPool, onDataSent: () => void = noop) {
    this.#socket = socket;
    this.#structured = structured;
    this.#pool = pool;
    this.#onDataSent = onDataSent;
  }

  /** the socket closed: nothing more is written */
  close(): void {
    this.#closed = true;
  }

  /** success without data (everything but READ and BLOCK_STATUS) */
  ok(r: Req): void {
    this.#send(simpleReply(r.cookieHi, r.cookieLo, 0), null);
  }

  /** a whole successful READ: one OFFSET_DATA chunk with DONE, or a simple reply + data */
  readData(r: Req): void {
    const header = this.#structured
      ? offsetDataHeader(r.cookieHi, r.cookieLo, true, r.offset, r.length)
      : simpleReply(r.cookieHi, r.cookieLo, 0);
    this.#send(header, r.buf, this.#releaser(r));
  }

  /** BLOCK_STATUS chunk for [offset, offset+length) of the request */
  extents(r: Req, extents: readonly Extent[], length: number): void {
    const reqOne = (r.flags & C.CMD_FLAG_REQ_ONE) !== 0;
    this.#send(blockStatusChunk(r.cookieHi, r.cookieLo, extents, length, reqOne), null);
  }

  /**
   * Error reply: an ERROR chunk for READ/BLOCK_STATUS under structured replies, else simple.
   * The request's pooled buffer is not recycled here: a handle that fans I/O out may reject
   * on the first failure while other parts still use the buffer.
   */
  error(r: Req, errno: number, message: string): void {
    const chunked = this.#structured && (r.type === C.CMD_READ || r.type === C.CMD_BLOCK_STATUS);
    this.#send(chunked ? errorChunk(r.cookieHi, r.cookieLo, errno, message) : simpleReply(r.cookieHi, r.cookieLo, errno), null);
  }

  /** the callback of a READ's last data write: the buffer goes back to the pool (unless the
   *  write failed) and the transmission loop hears that bytes left the queue */
  #releaser(r: Req): WriteDone {
    const b = r.pooled;
    r.pooled = null;
    return (err) => {
      if (b && !err) this.#pool.put(b);
      this.#onDataSent();
    };
  }

  #send(header: Buffer, data: Buffer | null, done?: WriteDone): void {
    const s = this.#socket;
    if (this.#closed || !s.writable) return;
    if (!this.#corked) {
      this.#corked = true;
      s.cork();
      process.nextTick(this.#uncork);
    }
    if (!data) {
      s.write(header, done);
      return;
    }
    s.write(header);
    s.write(data, done);
  }

  readonly #uncork = (): void => {
    this.#corked = false;
    this.#socket.uncork();
  };
}
