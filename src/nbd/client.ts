/**
 * NbdClient: a remote NBD export as byte-addressed I/O, for the engine's NBD device
 * references (see resolver.ts) and the nbd slink.
 *
 * - One connection, requests pipelined (client-transmission.ts); READ and WRITE are split
 *   at the server's maximum payload (capped at 32 MiB); READ data lands in the caller's
 *   buffer.
 * - Commands the server did not advertise are never sent: flush without SEND_FLUSH is a
 *   no-op, FUA without SEND_FUA becomes the command followed by FLUSH, TRIM without
 *   SEND_TRIM is a no-op, WRITE_ZEROES without SEND_WRITE_ZEROES becomes writes of zeroes.
 *   Writes to a read-only export fail with EROFS without a round trip.
 * - A lost connection is re-established with exponential backoff for at most
 *   `reconnectTimeoutMs`; meanwhile in-flight and new requests wait, and are re-sent on the
 *   new connection. If it cannot reconnect in time they fail with EIO (so a mirror can mark
 *   the leg down), the client is `down`, and the next request starts a new attempt.
 * - Errors are BlockErrors: the server's errno mapped to its name (EIO when unknown).
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { BlockError, DmError } from '../core/errors.ts';
import { log } from '../core/log.ts';
import {
  CMD_BLOCK_STATUS, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLUSH, CMD_READ,
  CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
} from './constants.ts';
import { exportInfo, handshake, loadPsk, type NbdExportInfo, type Negotiated, type TlsPsk } from './client-handshake.ts';
import { Connection, type Request } from './client-transmission.ts';
import { describeEndpoint, parseNbdUri, type NbdUri } from './client-uri.ts';

export interface NbdClientOptions {
  /** how long to keep trying to reconnect after a connection is lost (ms; default 5000) */
  reconnectTimeoutMs?: number;
  /** bound on one connect + handshake (ms; default 10000, never beyond the reconnect budget) */
  connectTimeoutMs?: number;
  /** drop a connection whose requests get no byte back for this long (ms; default 60000; 0 = never) */
  ioTimeoutMs?: number;
  /** negotiate `base:allocation` for blockStatus() (default true) */
  blockStatus?: boolean;
}

/** one `base:allocation` extent: bytes, flags (bit 0 HOLE, bit 1 ZERO) */
export interface NbdExtent {
  length: number;
  flags: number;
}

export type NbdClientState = 'connected' | 'reconnecting' | 'down' | 'closed';

/** a request is sent at most this many times across reconnects */
const MAX_ATTEMPTS = 4;
/** TRIM / WRITE_ZEROES / BLOCK_STATUS are split at this many bytes (lengths are u32) */
const MAX_NO_PAYLOAD = 1 << 30;
/** writes of zeroes (no SEND_WRITE_ZEROES): piece size and pieces in flight */
const ZERO_PIECE = 1 << 20;
const ZERO_WINDOW = 8;
let zeroes: Buffer | null = null;

function noop(): void {}

export class NbdClient {
  readonly uri: NbdUri;
  #info: NbdExportInfo;
  #conn: Connection | null = null;
  #queue: Request[] = [];
  #state: NbdClientState = 'connected';
  #abort: AbortController | null = null;
  #closing: Promise<void> | null = null;
  readonly #psk: TlsPsk | undefined;
  readonly #opts: Required<NbdClientOptions>;
  readonly #label: string;
  readonly #log = log('nbd-client');

  private constructor(uri: NbdUri, psk: TlsPsk | undefined, opts: Required<NbdClientOptions>, n: Negotiated, info: NbdExportInfo) {
    this.uri = uri;
    this.#psk = psk;
    this.#opts = opts;
    this.#label = uri.uri;
    this.#info = info;
    this.#conn = this.#attach(n);
  }

  /** Parse, connect and negotiate. Rejects with a DmError naming the URI and the failure. */
  static async connect(uri: string | NbdUri, options: NbdClientOptions = {}): Promise<NbdClient> {
    const u = typeof uri === 'string' ? parseNbdUri(uri) : uri;
    const opts: Required<NbdClientOptions> = {
      reconnectTimeoutMs: options.reconnectTimeoutMs ?? 5000,
      connectTimeoutMs: options.connectTimeoutMs ?? 10000,
      ioTimeoutMs: options.ioTimeoutMs ?? 60000,
      blockStatus: options.blockStatus ?? true,
    };
    let psk: TlsPsk | undefined;
    if (u.tls) {
      if (!u.pskFile) throw new DmError('EINVAL', `${u.uri}: TLS needs a pre-shared key: add ?tls-psk-file=FILE (X.509 is not supported)`);
      psk = loadPsk(u.pskFile, u.user);
    }
    let n: Negotiated;
    try {
      n = await handshake(u.endpoint, { exportName: u.exportName, tls: psk, metaContext: opts.blockStatus, timeoutMs: opts.connectTimeoutMs });
    } catch (err) {
      throw new DmError((err as DmError).code ?? 'EIO', `${u.uri}: ${(err as Error).message}`, { cause: err });
    }
    let info: NbdExportInfo;
    try {
      info = exportInfo(n, u.uri);
    } catch (err) {
      n.socket.destroy();
      throw err;
    }
    return new NbdClient(u, psk, opts, n, info);
  }

  get info(): NbdExportInfo {
    return this.#info;
  }

  get state(): NbdClientState {
    return this.#state;
  }

  /** fill `buf` from `offset` */
  read(buf: Buffer, offset: number): Promise<void> {
    const max = this.#info.maxPayload;
    if (buf.length <= max) return this.#request(CMD_READ, 0, offset, buf.length, buf);
    const parts: Promise<void>[] = [];
    for (let o = 0; o < buf.length; o += max) {
      const n = Math.min(max, buf.length - o);
      parts.push(this.#request(CMD_READ, 0, offset + o, n, buf.subarray(o, o + n)));
    }
    return Promise.all(parts).then(noop);
  }

  /** write `buf` at `offset`; with `fua` it is durable when this resolves */
  write(buf: Buffer, offset: number, fua = false): Promise<void> {
    const ro = this.#readOnly('write');
    if (ro) return ro;
    const info = this.#info;
    const flags = fua && info.canFua ? CMD_FLAG_FUA : 0;
    const max = info.maxPayload;
    let p: Promise<void>;
    if (buf.length <= max) p = this.#request(CMD_WRITE, flags, offset, buf.length, buf);
    else {
      const parts: Promise<void>[] = [];
      for (let o = 0; o < buf.length; o += max) {
        const n = Math.min(max, buf.length - o);
        parts.push(this.#request(CMD_WRITE, flags, offset + o, n, buf.subarray(o, o + n)));
      }
      p = Promise.all(parts).then(noop);
    }
    return fua && !info.canFua ? p.then(() => this.flush()) : p;
  }

  /** everything completed before this call is durable once it resolves */
  flush(): Promise<void> {
    if (!this.#info.canFlush) return this.#closedCheck();
    return this.#request(CMD_FLUSH, 0, 0, 0, null);
  }

  /** advisory discard (no-op if the server has no TRIM) */
  trim(offset: number, length: number, fua = false): Promise<void> {
    const ro = this.#readOnly('trim');
    if (ro) return ro;
    const info = this.#info;
    if (!info.canTrim) return fua ? this.flush() : this.#closedCheck();
    const p = this.#split(CMD_TRIM, fua && info.canFua ? CMD_FLAG_FUA : 0, offset, length);
    return fua && !info.canFua ? p.then(() => this.flush()) : p;
  }

  /** make [offset, offset+length) read as zeroes; `noHole` keeps it allocated */
  writeZeroes(offset: number, length: number, opts: { fua?: boolean; noHole?: boolean; fastZero?: boolean } = {}): Promise<void> {
    const ro = this.#readOnly('write-zeroes');
    if (ro) return ro;
    const info = this.#info;
    const fua = !!opts.fua;
    if (opts.fastZero && !info.canFastZero) {
      return Promise.reject(new BlockError('ENOTSUP', `${this.#label}: server has no fast zero`));
    }
    let p: Promise<void>;
    if (info.canWriteZeroes) {
      const flags = (fua && info.canFua ? CMD_FLAG_FUA : 0) | (opts.noHole ? CMD_FLAG_NO_HOLE : 0) | (opts.fastZero ? CMD_FLAG_FAST_ZERO : 0);
      p = this.#split(CMD_WRITE_ZEROES, flags, offset, length);
    } else {
      p = this.#writeZeroBuffers(offset, length, fua && info.canFua ? CMD_FLAG_FUA : 0);
    }
    return fua && !info.canFua ? p.then(() => this.flush()) : p;
  }

  /**
   * `base:allocation` extents starting at `offset` (length is a hint: the answer may stop
   * short or run past it). ENOTSUP if block status was not negotiated.
   */
  async blockStatus(offset: number, length: number): Promise<NbdExtent[]> {
    if (!this.#info.blockStatus) throw new BlockError('ENOTSUP', `${this.#label}: server has no base:allocation`);
    const req = this.#newRequest(CMD_BLOCK_STATUS, 0, offset, Math.min(length, MAX_NO_PAYLOAD), null);
    await req.promise;
    const raw = req.req.extents ?? [];
    const out: NbdExtent[] = [];
    for (let i = 0; i + 1 < raw.length; i += 2) out.push({ length: raw[i]!, flags: raw[i + 1]! });
    return out;
  }

  /** Fail queued I/O, let in-flight requests finish (bounded), send DISC and close. */
  close(): Promise<void> {
    if (this.#closing) return this.#closing;
    this.#state = 'closed';
    this.#abort?.abort();
    this.#failQueue(new BlockError('EIO', `${this.#label}: NBD client closed`));
    const conn = this.#conn;
    this.#closing = conn ? conn.disconnect(5000) : Promise.resolve();
    return this.#closing;
  }

  // ---------------------------------------------------------------- requests

  #readOnly(what: string): Promise<void> | null {
    if (!this.#info.readOnly) return null;
    return Promise.reject(new BlockError('EROFS', `${this.#label}: ${what} to a read-only NBD export`));
  }

  #closedCheck(): Promise<void> {
    return this.#state === 'closed' ? Promise.reject(new BlockError('EIO', `${this.#label}: NBD client closed`)) : Promise.resolve();
  }

  #request(type: number, flags: number, offset: number, length: number, data: Buffer | null): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.#issue({ type, flags, offset, length, data, resolve, reject, attempts: 0, cookie: 0, error: null, received: 0, extents: null });
    });
  }

  #newRequest(type: number, flags: number, offset: number, length: number, data: Buffer | null): { req: Request; promise: Promise<void> } {
    let req!: Request;
    const promise = new Promise<void>((resolve, reject) => {
      req = { type, flags, offset, length, data, resolve, reject, attempts: 0, cookie: 0, error: null, received: 0, extents: null };
    });
    this.#issue(req);
    return { req, promise };
  }

  #split(type: number, flags: number, offset: number, length: number): Promise<void> {
    if (length <= MAX_NO_PAYLOAD) return this.#request(type, flags, offset, length, null);
    const parts: Promise<void>[] = [];
    for (let o = 0; o < length; o += MAX_NO_PAYLOAD) parts.push(this.#request(type, flags, offset + o, Math.min(MAX_NO_PAYLOAD, length - o), null));
    return Promise.all(parts).then(noop);
  }

  async #writeZeroBuffers(offset: number, length: number, flags: number): Promise<void> {
    const piece = Math.min(ZERO_PIECE, this.#info.maxPayload);
    zeroes ??= Buffer.alloc(ZERO_PIECE);
    for (let o = 0; o < length; ) {
      const batch: Promise<void>[] = [];
      for (let k = 0; k < ZERO_WINDOW && o < length; k++) {
        const n = Math.min(piece, length - o);
        batch.push(this.#request(CMD_WRITE, flags, offset + o, n, zeroes.subarray(0, n)));
        o += n;
      }
      await Promise.all(batch);
    }
  }

  #issue(req: Request): void {
    switch (this.#state) {
      case 'connected':
        if (this.#conn!.send(req)) return;
        // unreachable in practice: a dying connection reports itself before it refuses
        this.#queue.push(req);
        this.#state = 'down';
        this.#startReconnect(new Error('connection is down'));
        return;
      case 'reconnecting':
        this.#queue.push(req);
        return;
      case 'down':
        this.#queue.push(req);
        this.#startReconnect(new Error('connection is down'));
        return;
      case 'closed':
        req.reject(new BlockError('EIO', `${this.#label}: NBD client closed`));
    }
  }

  #failQueue(err: BlockError): void {
    const q = this.#queue;
    this.#queue = [];
    for (const r of q) r.reject(err);
  }

  // ---------------------------------------------------------------- connections

  #attach(n: Negotiated): Connection {
    return new Connection(n.socket, n, n.leftover, {
      label: this.#label,
      ioTimeoutMs: this.#opts.ioTimeoutMs,
      onLost: this.#onLost,
    });
  }

  readonly #onLost = (conn: Connection, reason: Error, inflight: Request[]): void => {
    if (conn !== this.#conn) {
      for (const r of inflight) r.reject(new BlockError('EIO', `${this.#label}: connection lost: ${reason.message}`));
      return;
    }
    this.#conn = null;
    if (this.#state === 'closed') {
      for (const r of inflight) r.reject(new BlockError('EIO', `${this.#label}: NBD client closed`));
      return;
    }
    const retry: Request[] = [];
    for (const r of inflight) {
      if (r.attempts >= MAX_ATTEMPTS) {
        r.reject(new BlockError('EIO', `${this.#label}: request failed ${r.attempts} times across reconnects: ${reason.message}`));
      } else retry.push(r);
    }
    this.#queue = retry.concat(this.#queue);
    this.#log.limited(`lost:${this.#label}`, `${this.#label}: connection lost (${reason.message}); reconnecting`);
    this.#state = 'down';
    this.#startReconnect(reason);
  };

  #startReconnect(cause: Error): void {
    if (this.#state !== 'down') return;
    this.#state = 'reconnecting';
    const ac = new AbortController();
    this.#abort = ac;
    this.#reconnect(cause, ac.signal).then(
      (n) => {
        if (this.#state === 'closed') {
          n.socket.destroy();
          return;
        }
        this.#abort = null;
        this.#conn = this.#attach(n);
        this.#state = 'connected';
        this.#log.info(`${this.#label}: reconnected`);
        const q = this.#queue;
        this.#queue = [];
        for (const r of q) this.#issue(r);
      },
      (err: unknown) => {
        if (this.#state === 'closed') return;
        this.#abort = null;
        this.#state = 'down';
        const msg = `${this.#label}: NBD connection lost and not re-established within ${this.#opts.reconnectTimeoutMs} ms: ${(err as Error).message}`;
        this.#log.limited(`down:${this.#label}`, msg);
        this.#failQueue(new BlockError('EIO', msg, { cause: err }));
      },
    ).catch((err: unknown) => this.#log.error(`${this.#label}: reconnect bookkeeping failed: ${(err as Error).message}`));
  }

  async #reconnect(cause: Error, signal: AbortSignal): Promise<Negotiated> {
    const deadline = Date.now() + this.#opts.reconnectTimeoutMs;
    let delay = 50;
    let last: unknown = cause;
    for (;;) {
      const left = deadline - Date.now();
      if (left <= 0) throw last;
      try {
        const n = await handshake(this.uri.endpoint, {
          exportName: this.uri.exportName, tls: this.#psk, metaContext: this.#opts.blockStatus,
          timeoutMs: Math.min(this.#opts.connectTimeoutMs, left), signal,
        });
        try {
          const info = exportInfo(n, this.#label);
          if (info.size !== this.#info.size) {
            throw new DmError('EIO', `export size changed from ${this.#info.size} to ${info.size} bytes`);
          }
          this.#info = info;
          return n;
        } catch (err) {
          n.socket.destroy();
          throw err;
        }
      } catch (err) {
        if (signal.aborted) throw err;
        last = err;
      }
      const wait = Math.min(delay, deadline - Date.now());
      if (wait > 0) await sleep(wait, undefined, { signal });
      delay = Math.min(delay * 2, 1000);
    }
  }
}

export { describeEndpoint, parseNbdUri };
export type { NbdExportInfo, NbdUri };
