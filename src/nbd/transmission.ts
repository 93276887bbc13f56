/**
 * The transmission phase (NBD.md A.4–A.6): parse 28-byte requests from the socket stream,
 * check them, run them on the ExportHandle concurrently and reply out of order.
 *
 * Hot path: on plain sockets reads are direct (direct-socket.ts): requests arrive in one
 * reused staging buffer, a WRITE payload is copied out of it into a pooled buffer, and the
 * rest of a payload spanning reads is read by the kernel straight into that buffer; after a
 * large WRITE the next read takes a header alone, so the next large payload is not copied.
 * On other sockets (TLS) each read is a fresh chunk: a header is parsed in place (only a
 * header split across chunks is copied, into one reused 28-byte buffer), a WRITE payload is a
 * slice of the chunk when contiguous and copied only when it spans chunks. Request records
 * are pooled with their completion callbacks pre-bound, so a request costs one `then` on the
 * handle's promise plus its reply header. Replies completing in one tick are corked into a
 * single writev, and a header and its data are always queued back to back, so replies never
 * interleave.
 * READ buffers and copied WRITE payloads come from the server's BufferPool and go back only
 * after the handle call succeeded (and, for READs, the socket write finished): a handle must
 * not touch a buffer once its promise has resolved, as a dm target may not touch a bio's
 * pages after completing it.
 *
 * Memory is bounded: before taking each request the loop checks the bytes of payloads, read
 * buffers and unsent replies against `maxInFlightBytes` (and the request count against
 * `maxInFlightRequests`); over budget, the rest of the chunk is kept aside, the socket is
 * paused, and parsing resumes as completions bring the total back under.
 */
import type { Socket } from 'node:net';
import { performance } from 'node:perf_hooks';
import type { Logger } from '../core/log.ts';
import type { Extent } from '../core/types.ts';
import type { ExportHandle } from './export.ts';
import type { BufferPool } from './buffer-pool.ts';
import * as C from './constants.ts';
import { ReplyWriter } from './replies.ts';
import { Req, checkRequest, execute, type CheckContext } from './requests.ts';
import { rewrapForDirectReads } from './direct-socket.ts';

export interface TransmissionSession {
  socket: Socket;
  leftover: Buffer;
  handle: ExportHandle;
  structured: boolean;
  baseAllocation: boolean;
  /** the connection now runs on a different Socket object (direct reads) */
  onSocket?: (socket: Socket) => void;
}

export interface TransmissionOptions {
  /** pause reading above this many bytes of payloads/read buffers/unsent replies */
  maxInFlightBytes: number;
  /** pause reading with this many requests in flight */
  maxInFlightRequests: number;
  /** a READ waits to start while the bytes of READs running plus replies the socket has not
   *  taken reach this (a low-water mark: the READ that starts may take it past) */
  readWindowBytes: number;
  /** after the export goes or the server closes, how long in-flight requests may run on */
  graceMs: number;
  /** READ buffers, shared by the server's connections */
  pool: BufferPool;
  /** try direct reads (direct-socket.ts) on plain sockets */
  directReads: boolean;
  log: Logger;
}

const TWO32 = 4294967296;
/** the reused buffer requests are read into on a direct-read socket */
const STAGING_SIZE = 64 * 1024;
const FREE_REQS_MAX = 256;
/**
 * What a socket is assumed to send per millisecond (4 GB/s): the read window grows by what it
 * sends while one READ runs, so slower devices keep enough READs running to keep it busy.
 */
const SOCKET_BYTES_PER_MS = 4e6;
/** WRITEs from this size on start after the turn's socket reads (#startWrites) */
const DEFER_WRITE_MIN = 64 * 1024;
/** after a WRITE payload of this size read directly, the next read takes a header alone (#headerOnly) */
const HEADER_ALONE_AFTER = 64 * 1024;
/** how many recent READ times the device's READ time is taken from */
const READ_SAMPLES = 8;
const SHUTDOWN_MESSAGE = 'export is shutting down';
/** what a rejection with no reason (undefined/null) is reported as */
const NO_REASON = { code: 'EIO', message: 'I/O error' };

function errorMessage(err: unknown): string {
  const m = (err as { message?: unknown } | null)?.message;
  return typeof m === 'string' ? m : String(err);
}

export class Transmission {
  readonly #socket: Socket;
  readonly #handle: ExportHandle;
  readonly #ctx: CheckContext;
  readonly #out: ReplyWriter;
  readonly #opts: TransmissionOptions;

  readonly #hdr = Buffer.alloc(C.REQUEST_HEADER_SIZE);
  #hdrFill = 0;
  /** a WRITE whose payload spans chunks, being copied into its own buffer */
  #wreq: Req | null = null;
  #wfill = 0;

  readonly #inflight = new Set<Req>();
  #inflightBytes = 0;
  /** large WRITEs parsed in this turn of the event loop, started after it (#startWrites) */
  readonly #writes: Req[] = [];
  /** READs checked and waiting for the read window, in arrival order */
  readonly #deferred: Req[] = [];
  #deferredHead = 0;
  /** bytes of READs running on the handle */
  #readBytes = 0;
  /** how long the last READ_SAMPLES READs took (ms), a ring; and the shortest of them */
  readonly #readTimes = new Float64Array(READ_SAMPLES);
  #readTimeAt = 0;
  #readMs = 0;
  readonly #freeReqs: Req[] = [];
  #paused = false;
  /** unparsed bytes held back while over budget */
  #backlog: Buffer | null = null;
  #parsing = false;
  /** direct reads: requests land here, and a spanning WRITE payload in its own buffer */
  #staging: Buffer | null = null;
  /**
   * direct reads: the next read takes one request header only. After a large WRITE's payload
   * the next request is likely another: read alone, its header leaves the payload in the
   * socket for the kernel to read straight into the payload's buffer, where a full staging
   * read would take up to 64 KiB of it that must then be copied out (docs/benchmarks.md #43)
   */
  #headerOnly = false;
  /** the first REQUEST_HEADER_SIZE bytes of staging */
  #stagingHead: Buffer | null = null;

  /** no more requests are parsed (DISC seen, connection finishing, or protocol error) */
  #stopped = false;
  #finishing = false;
  #closed = false;
  #handleClosed = false;
  #timer: NodeJS.Timeout | null = null;
  readonly done: Promise<void>;
  #resolveDone!: () => void;

  constructor(session: TransmissionSession, opts: TransmissionOptions) {
    this.#socket = session.socket;
    this.#staging = opts.directReads ? Buffer.allocUnsafeSlow(STAGING_SIZE) : null;
    const direct = this.#staging && rewrapForDirectReads(session.socket, { buffer: this.#nextBuffer, data: this.#onDirect });
    if (!direct) this.#staging = null;
    else {
      this.#stagingHead = this.#staging!.subarray(0, C.REQUEST_HEADER_SIZE);
      this.#socket = direct;
      session.onSocket?.(direct);
    }
    this.#handle = session.handle;
    const info = session.handle.info;
    this.#ctx = {
      size: info.size, readOnly: info.readOnly, structured: session.structured,
      baseAllocation: session.baseAllocation, ending: false,
    };
    this.#out = new ReplyWriter(this.#socket, session.structured, opts.pool, this.#startReads);
    this.#opts = opts;
    this.done = new Promise<void>((resolve) => { this.#resolveDone = resolve; });
    const s = this.#socket;
    s.on('data', this.#onData);
    s.on('drain', this.#onDrain);
    s.on('error', this.#onError);
    s.on('close', this.#onClose);
    this.#handle.onGone(() => this.end('export gone'));
    if (s.destroyed) {
      this.#onClose();
      return;
    }
    if (session.leftover.length > 0) this.#parse(session.leftover, false);
    if (!this.#paused) s.resume();
  }

  /** requests in flight on the export */
  get inFlight(): number {
    return this.#inflight.size;
  }

  /** export gone or server closing: ESHUTDOWN to new requests, let in-flight ones finish
   *  for up to graceMs (then answer them ESHUTDOWN too) and close the connection */
  end(reason: string): void {
    if (this.#ctx.ending || this.#closed) return;
    this.#ctx.ending = true;
    this.#opts.log.debug(`ending connection: ${reason}`);
    if (this.#inflight.size === 0) {
      this.#finish();
      return;
    }
    this.#timer = setTimeout(this.#expire, this.#opts.graceMs);
  }

  /** drop the connection now */
  destroy(): void {
    this.#socket.destroy();
  }

  // ------------------------------------------------------------ parsing

  readonly #onData = (chunk: Buffer): void => {
    if (this.#backlog) {
      // data delivered after pause(): keep it behind the backlog, in order
      this.#backlog = Buffer.concat([this.#backlog, chunk]);
      return;
    }
    this.#parse(chunk, false);
  };

  /** direct reads: where the next read goes (the rest of a spanning WRITE payload, or staging) */
  readonly #nextBuffer = (): Buffer => {
    const w = this.#wreq;
    if (w) return w.buf!.subarray(this.#wfill);
    return this.#headerOnly ? this.#stagingHead! : this.#staging!;
  };

  /** direct reads: `n` bytes arrived in `buf` (staging, or a payload's remainder) */
  readonly #onDirect = (n: number, buf: Buffer): boolean => {
    if (buf !== this.#staging && buf !== this.#stagingHead) {
      const w = this.#wreq!;
      this.#wfill += n;
      if (this.#wfill === w.length) {
        this.#wreq = null;
        this.#headerOnly = w.length >= HEADER_ALONE_AFTER;
        this.#dispatch(w);
        if (!this.#paused && !this.#stopped && this.#overBudget()) this.#pause();
      }
      return !this.#paused;
    }
    this.#headerOnly = false;
    if (this.#backlog) {
      this.#backlog = Buffer.concat([this.#backlog, buf.subarray(0, n)]);
    } else this.#parse(buf.subarray(0, n), true);
    return !this.#paused;
  };

  /**
   * Parse requests out of `chunk`; stops at a request boundary when over budget. A
   * `borrowed` chunk is reused after this call (direct reads): nothing may keep a view of it.
   */
  #parse(chunk: Buffer, borrowed: boolean): void {
    let pos = 0;
    const len = chunk.length;
    this.#parsing = true;
    while (pos < len && !this.#stopped) {
      const w = this.#wreq;
      if (w) {
        const n = Math.min(w.length - this.#wfill, len - pos);
        chunk.copy(w.buf!, this.#wfill, pos, pos + n);
        this.#wfill += n;
        pos += n;
        if (this.#wfill === w.length) {
          this.#wreq = null;
          this.#dispatch(w);
        }
        continue;
      }
      if (this.#hdrFill === 0 && this.#overBudget()) {
        // (direct reads stop while paused, so staging is not refilled before the backlog is
        // parsed; the copy keeps that from being a requirement)
        this.#backlog = borrowed ? Buffer.from(chunk.subarray(pos)) : chunk.subarray(pos);
        this.#pause();
        break;
      }
      let r: Req | null;
      if (this.#hdrFill > 0 || len - pos < C.REQUEST_HEADER_SIZE) {
        const n = Math.min(C.REQUEST_HEADER_SIZE - this.#hdrFill, len - pos);
        chunk.copy(this.#hdr, this.#hdrFill, pos, pos + n);
        this.#hdrFill += n;
        pos += n;
        if (this.#hdrFill < C.REQUEST_HEADER_SIZE) break;
        this.#hdrFill = 0;
        r = this.#parseHeader(this.#hdr, 0);
      } else {
        r = this.#parseHeader(chunk, pos);
        pos += C.REQUEST_HEADER_SIZE;
      }
      if (!r) break;
      if (r.type !== C.CMD_WRITE || r.length === 0) {
        this.#dispatch(r);
        continue;
      }
      // WRITE payload: slice when it is all here, else copy it in as it arrives
      r.weight = r.length;
      this.#inflightBytes += r.length;
      if (len - pos >= r.length && !borrowed) {
        r.buf = chunk.subarray(pos, pos + r.length);
        pos += r.length;
        this.#dispatch(r);
      } else {
        r.pooled = this.#opts.pool.get(r.length);
        r.buf = r.pooled.length === r.length ? r.pooled : r.pooled.subarray(0, r.length);
        this.#wreq = r;
        this.#wfill = 0;
      }
    }
    this.#parsing = false;
    if (!this.#paused && !this.#stopped && this.#overBudget()) this.#pause();
  }

  #parseHeader(b: Buffer, at: number): Req | null {
    if (b.readUInt32BE(at) !== C.REQUEST_MAGIC) {
      this.#fatal('bad request magic');
      return null;
    }
    const type = b.readUInt16BE(at + 6);
    const length = b.readUInt32BE(at + 24);
    if (type === C.CMD_WRITE && length > C.BLOCK_MAX) {
      this.#fatal(`WRITE of ${length} bytes exceeds the maximum payload`);
      return null;
    }
    const r = this.#freeReqs.pop() ?? this.#newReq();
    r.flags = b.readUInt16BE(at + 4);
    r.type = type;
    r.cookieHi = b.readUInt32BE(at + 8);
    r.cookieLo = b.readUInt32BE(at + 12);
    r.offsetLo = b.readUInt32BE(at + 20);
    r.offset = b.readUInt32BE(at + 16) * TWO32 + r.offsetLo;
    r.length = length;
    return r;
  }

  #newReq(): Req {
    const r = new Req();
    r.onOk = () => this.#complete(r, null);
    r.onErr = (e: unknown) => this.#complete(r, e ?? NO_REASON);
    r.onExtents = (x: Extent[]) => this.#completeExtents(r, x);
    return r;
  }

  #dispatch(r: Req): void {
    if (r.type === C.CMD_DISC) {
      this.#release(r);
      this.#stopped = true;
      if (this.#inflight.size === 0) this.#finish();
      return;
    }
    this.#inflight.add(r);
    const errno = checkRequest(r, this.#ctx);
    if (errno !== 0) {
      this.#out.error(r, errno, C.errnoMessage(errno));
      this.#drop(r);
      return;
    }
    if (r.type === C.CMD_WRITE && r.length >= DEFER_WRITE_MIN) {
      this.#writes.push(r);
      if (this.#writes.length === 1) setImmediate(this.#startWrites);
      return;
    }
    if (r.type !== C.CMD_READ) return this.#execute(r);
    r.weight = r.length;
    this.#inflightBytes += r.length;
    if (this.#readsWaiting() || !this.#readFits()) this.#deferred.push(r);
    else this.#startRead(r);
  }

  /**
   * Large WRITEs start after this turn's socket reads: a cached device writes synchronously,
   * and a 256 KiB write done inside one connection's read callback kept the other
   * connections' sockets full meanwhile, so their clients stopped sending (nbdcopy's four
   * connections took turns). Started from setImmediate, every socket is drained first.
   */
  readonly #startWrites = (): void => {
    const q = this.#writes.splice(0);
    for (const r of q) {
      if (r.replied) this.#drop(r); // answered ESHUTDOWN at the end of a grace period
      else this.#execute(r); // also after an abrupt close: the data arrived whole
    }
  };

  #execute(r: Req): void {
    execute(this.#handle, r, this.#opts.pool);
  }

  // ------------------------------------------------------------ the read window

  /*
   * Reading far ahead of the socket only parks filled buffers in its queue: under nbdcopy
   * (4 connections x 64 reads of 256 KiB) that was 64 MiB of buffers, filled long before the
   * socket copied them out, so both copies of every byte missed the CPU caches. A READ starts
   * while what is running plus what the socket has not taken stays within the window: the
   * base, plus what the socket sends while the device serves one READ, so that a slow device
   * (a remote export) keeps enough READs running to fill the socket.
   */
  #readsWaiting(): boolean {
    return this.#deferredHead < this.#deferred.length;
  }

  #readFits(): boolean {
    const pending = this.#readBytes + this.#socket.writableLength;
    return pending < this.#opts.readWindowBytes + this.#readMs * SOCKET_BYTES_PER_MS || pending === 0;
  }

  #startRead(r: Req): void {
    r.startedMs = performance.now();
    this.#readBytes += r.length;
    this.#execute(r);
  }

  /**
   * The device's READ time is the shortest of the last few: a READ that queued behind others,
   * or whose process was preempted, takes longer than the device needs, and one such sample
   * must not open the window; a slow device is slow every time. Until READ_SAMPLES READs have
   * been timed the shortest is 0 (the window starts at its base).
   */
  #timeRead(r: Req): void {
    const t = this.#readTimes;
    t[this.#readTimeAt] = performance.now() - r.startedMs;
    this.#readTimeAt = (this.#readTimeAt + 1) % READ_SAMPLES;
    let min = t[0]!;
    for (let i = 1; i < READ_SAMPLES; i++) if (t[i]! < min) min = t[i]!;
    this.#readMs = min;
  }

  /** the window may have opened (a READ finished, the socket took data): start what fits */
  readonly #startReads = (): void => {
    const q = this.#deferred;
    while (this.#deferredHead < q.length) {
      const r = q[this.#deferredHead]!;
      if (r.replied || this.#closed) {
        // answered at the end of a grace period, or nobody to answer
        q[this.#deferredHead++] = undefined!;
        this.#drop(r);
        continue;
      }
      if (!this.#readFits()) break;
      q[this.#deferredHead++] = undefined!;
      this.#startRead(r);
    }
    if (this.#deferredHead === q.length) {
      q.length = 0;
      this.#deferredHead = 0;
    }
  };

  readonly #onDrain = (): void => {
    this.#startReads();
    this.#maybeResume();
  };

  // ------------------------------------------------------------ replies

  #complete(r: Req, err: unknown): void {
    if (!r.replied) {
      if (err !== null) this.#out.error(r, C.errorToWire(err), errorMessage(err));
      else if (r.type === C.CMD_READ) this.#out.readData(r);
      else {
        this.#out.ok(r);
        this.#recycle(r);
      }
    }
    if (r.type === C.CMD_READ) this.#readDone(r);
    this.#retire(r);
  }

  #completeExtents(r: Req, extents: Extent[]): void {
    if (!r.replied) {
      try {
        this.#out.extents(r, extents, Math.min(r.length, this.#ctx.size - r.offset));
      } catch (err) {
        return this.#complete(r, err);
      }
    }
    this.#retire(r);
  }

  /** a READ the handle ran is over and its reply queued: the window moved */
  #readDone(r: Req): void {
    this.#readBytes -= r.length;
    this.#timeRead(r);
    if (this.#readsWaiting()) this.#startReads();
  }

  /** a request the handle never saw is done with: its buffer back to the pool, its record retired */
  #drop(r: Req): void {
    this.#recycle(r);
    this.#retire(r);
  }

  /** a pooled buffer nobody uses any more goes straight back (WRITE payload copies) */
  #recycle(r: Req): void {
    if (r.pooled) this.#opts.pool.put(r.pooled);
    r.pooled = null;
  }

  // ------------------------------------------------------------ bookkeeping

  #retire(r: Req): void {
    this.#inflight.delete(r);
    this.#inflightBytes -= r.weight;
    this.#release(r);
    if (this.#inflight.size === 0 && (this.#stopped || this.#ctx.ending || this.#closed)) this.#drained();
    else if (this.#paused) this.#maybeResume();
  }

  #release(r: Req): void {
    r.buf = null;
    r.pooled = null;
    r.weight = 0;
    r.replied = false;
    if (this.#freeReqs.length < FREE_REQS_MAX) this.#freeReqs.push(r);
  }

  /** too much held for this connection to take another request */
  #overBudget(): boolean {
    return this.#inflightBytes + this.#socket.writableLength > this.#opts.maxInFlightBytes ||
      this.#inflight.size >= this.#opts.maxInFlightRequests;
  }

  #pause(): void {
    if (this.#paused) return;
    this.#paused = true;
    this.#socket.pause();
  }

  /** after a completion or 'drain': take requests again once under budget */
  readonly #maybeResume = (): void => {
    if (!this.#paused || this.#parsing || this.#stopped || this.#overBudget()) return;
    this.#paused = false;
    const backlog = this.#backlog;
    this.#backlog = null;
    if (backlog) this.#parse(backlog, false);
    if (!this.#paused) this.#socket.resume();
  };

  /** nothing in flight any more and the connection is on its way out */
  #drained(): void {
    if (this.#closed) this.#closeHandle();
    else this.#finish();
  }

  /** grace period over: answer what is still running with ESHUTDOWN and close */
  readonly #expire = (): void => {
    this.#timer = null;
    for (const r of this.#inflight) {
      if (r.replied) continue;
      this.#out.error(r, C.NBD_ESHUTDOWN, SHUTDOWN_MESSAGE);
      r.replied = true;
    }
    this.#finish();
  };

  /** stop parsing, flush queued replies, close our side; destroy if the peer lingers */
  #finish(): void {
    if (this.#finishing || this.#closed) return;
    this.#finishing = true;
    this.#stopped = true;
    if (this.#timer) clearTimeout(this.#timer);
    this.#socket.end();
    this.#socket.resume();
    this.#timer = setTimeout(() => this.#socket.destroy(), this.#opts.graceMs);
    this.#timer.unref();
  }

  #fatal(message: string): void {
    this.#opts.log.limited('nbd-protocol', `dropping connection: ${message}`);
    this.#stopped = true;
    this.#socket.destroy();
  }

  readonly #onError = (err: Error): void => {
    this.#opts.log.debug(`socket error: ${err.message}`);
  };

  readonly #onClose = (): void => {
    if (this.#closed) return;
    this.#closed = true;
    this.#out.close();
    this.#stopped = true;
    if (this.#timer) clearTimeout(this.#timer);
    this.#timer = null;
    this.#startReads(); // READs still waiting for the window are dropped: nobody to answer
    if (this.#inflight.size === 0) this.#closeHandle();
    this.#resolveDone();
  };

  #closeHandle(): void {
    if (this.#handleClosed) return;
    this.#handleClosed = true;
    try {
      this.#handle.close();
    } catch (err) {
      this.#opts.log.warn(`closing export handle: ${(err as Error).message}`);
    }
  }
}
