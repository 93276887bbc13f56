/**
 * A connection speaking replication frames (protocol.ts), for both ends. It cuts the byte
 * stream into frames (payloads are slices of what arrived when they fit in one chunk),
 * checks headers and payload CRCs, and hands frames either to `next()` (the handshake,
 * one at a time, with a timeout) or to the handler set with `handle()` (transmission).
 *
 * Memory is bounded: at most one frame (≤ `maxPayload`) plus one socket chunk is held, and
 * the owner pauses reading with `pause()` while it has too much in flight.
 *
 *   const fs = new FrameSocket(socket, { maxPayload: MAX_CONTROL });
 *   fs.send(FrameType.HELLO, 0, [encodeJson({ min: 1, max: 1 })]);
 *   const reply = await fs.next(10_000, 'HELLO_REPLY');
 */
import type { Duplex } from 'node:stream';
import { takeBytes } from '../core/chunks.ts';
import { DmError } from '../core/errors.ts';
import {
  FrameType, HEADER_SIZE, MAX_PAYLOAD, ProtocolError, checkSeeded, decodeHeader, encodeError, encodeHeader, payloadOk, type FrameHeader,
} from './protocol.ts';

export interface Frame {
  readonly h: FrameHeader;
  readonly payload: Buffer;
}

export interface FrameHandler {
  /** a whole frame with a good CRC */
  frame(f: Frame): void;
  /** a frame whose payload CRC is wrong (its header is good): ask for it again */
  corrupt(h: FrameHeader): void;
  /** the connection ended or broke (once); `err` says why */
  closed(err: Error): void;
}

/** bytes of frames (headers and payloads) sent and received; a connection's owner may share one across reconnects */
export interface FrameCounters {
  sent: number;
  received: number;
}

export class FrameSocket {
  readonly socket: Duplex;
  /** what this connection carried, in frames (not TLS or TCP overhead) */
  counters: FrameCounters = { sent: 0, received: 0 };
  /**
   * the peer may send seeded IO frames (the feature 'entry-crc' was negotiated; set by the
   * receiver's handshake): without it a frame with FLAG_SEEDED breaks the protocol
   */
  acceptSeeded = false;
  /** the name the peer's HELLO gave (`repl slink 1`; set by the receiver's handshake), null before */
  peerName: string | null = null;
  #maxPayload: number;
  #chunks: Buffer[] = [];
  #have = 0;
  #header: FrameHeader | null = null;
  #handler: FrameHandler | null = null;
  #queue: Frame[] = [];
  #waiter: { resolve: (f: Frame) => void; reject: (e: Error) => void } | null = null;
  #failure: Error | null = null;
  #closedNotified = false;
  readonly #onData = (chunk: Buffer): void => this.#data(chunk);
  readonly #onEnd = (): void => this.#fail(new DmError('ECONNRESET', 'connection closed by peer'));
  readonly #onError = (err: Error): void => this.#fail(new DmError((err as { code?: string }).code ?? 'ECONNRESET', `connection error: ${err.message}`));

  constructor(socket: Duplex, opts: { maxPayload?: number } = {}) {
    this.socket = socket;
    this.#maxPayload = opts.maxPayload ?? MAX_PAYLOAD;
    socket.on('data', this.#onData);
    socket.on('end', this.#onEnd);
    socket.on('close', this.#onEnd);
    socket.on('error', this.#onError);
  }

  /** the largest payload accepted from now on (small during the handshake) */
  set maxPayload(n: number) {
    this.#maxPayload = n;
  }

  /** why the connection failed, or null while it works */
  get failure(): Error | null {
    return this.#failure;
  }

  /**
   * Send one frame: the header, then the payload parts as they are (no copy). Once frames
   * go to a handler (transmission), the frames sent in one turn of the event loop go out
   * together (one writev: the shipper's run of entries, a batch of ACKs): the socket is
   * corked at the first and uncorked once the turn's callbacks and promise reactions have
   * run (process.nextTick). During the handshake each frame goes at once (a socket may be
   * handed to TLS right after one). `dataCrc`: a seeded IO frame (encodeHeader).
   */
  send(type: number, id: number, parts: readonly Buffer[] = [], noCrc = false, dataCrc?: number): boolean {
    if (this.#failure) return false;
    const s = this.socket;
    const header = encodeHeader(type, id, parts, noCrc, dataCrc);
    this.counters.sent += header.length;
    if (this.#handler) this.#cork();
    else s.cork();
    let ok = s.write(header);
    for (const p of parts) {
      if (p.length === 0) continue;
      this.counters.sent += p.length;
      ok = s.write(p);
    }
    if (!this.#handler) s.uncork();
    return ok;
  }

  #corked = false;
  readonly #uncork = (): void => {
    this.#corked = false;
    this.socket.uncork();
  };

  #cork(): void {
    if (this.#corked) return;
    this.socket.cork();
    this.#corked = true;
    process.nextTick(this.#uncork);
  }

  /** the next frame (handshake phase); rejects after `timeoutMs` or when the connection fails */
  next(timeoutMs: number, what: string): Promise<Frame> {
    const f = this.#queue.shift();
    if (f) return Promise.resolve(f);
    if (this.#failure) return Promise.reject(this.#failure);
    return new Promise<Frame>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiter = null;
        reject(new DmError('ETIMEDOUT', `no ${what} from the peer within ${timeoutMs / 1000} s`));
      }, timeoutMs);
      this.#waiter = {
        resolve: (fr) => { clearTimeout(timer); resolve(fr); },
        reject: (e) => { clearTimeout(timer); reject(e); },
      };
    });
  }

  /** from now on frames go to `h` (queued ones first) */
  handle(h: FrameHandler): void {
    this.#handler = h;
    const q = this.#queue;
    this.#queue = [];
    for (const f of q) h.frame(f);
    if (this.#failure) this.#notifyClosed(this.#failure);
  }

  pause(): void {
    this.socket.pause();
  }
  resume(): void {
    if (!this.#failure) this.socket.resume();
  }

  /**
   * Stop reading (to start TLS on the socket): no frame may be pending and no byte
   * unread, since the peer sends nothing until it has our reply.
   */
  detach(): void {
    if (this.#have > 0 || this.#queue.length > 0) throw new ProtocolError('unexpected bytes before the TLS handshake');
    this.socket.off('data', this.#onData);
    this.socket.off('end', this.#onEnd);
    this.socket.off('close', this.#onEnd);
    this.socket.off('error', this.#onError);
    this.socket.pause();
  }

  /** close after what was sent is written (an ERROR frame, say) */
  end(): void {
    this.socket.end();
    setTimeout(() => this.socket.destroy(), 2000).unref();
  }

  destroy(err?: Error): void {
    this.#fail(err ?? new DmError('ESHUTDOWN', 'connection closed'));
    this.socket.destroy();
  }

  #data(chunk: Buffer): void {
    this.counters.received += chunk.length;
    this.#chunks.push(chunk);
    this.#have += chunk.length;
    try {
      for (;;) {
        if (!this.#header) {
          if (this.#have < HEADER_SIZE) return;
          this.#header = decodeHeader(this.#take(HEADER_SIZE), this.#maxPayload);
          checkSeeded(this.#header, this.acceptSeeded);
        }
        const h = this.#header;
        if (this.#have < h.length) return;
        const payload = this.#take(h.length);
        this.#header = null;
        if (payloadOk(h, payload)) this.#deliver({ h, payload });
        else if (this.#handler) this.#handler.corrupt(h);
        else throw new ProtocolError(`frame ${h.id}: payload CRC mismatch during the handshake`); // told to the peer below
        if (this.#failure) return;
      }
    } catch (err) {
      // the stream cannot be framed any more: say why to the peer (best effort), then close
      if (err instanceof ProtocolError && !this.#failure) this.send(FrameType.ERROR, 0, [encodeError('EPROTO', err.message)]);
      this.#fail(err as Error);
      this.end();
    }
  }

  #deliver(f: Frame): void {
    if (this.#handler) return this.#handler.frame(f);
    const w = this.#waiter;
    if (w) {
      this.#waiter = null;
      w.resolve(f);
    } else if (this.#queue.length < 8) {
      this.#queue.push(f);
    } else {
      throw new ProtocolError('peer sent more than 8 frames ahead of the handshake');
    }
  }

  /** the next `n` buffered bytes: a slice when they sit in one chunk */
  #take(n: number): Buffer {
    this.#have -= n;
    return takeBytes(this.#chunks, n);
  }

  #fail(err: Error): void {
    if (!this.#failure) this.#failure = err;
    const w = this.#waiter;
    this.#waiter = null;
    w?.reject(this.#failure);
    this.#notifyClosed(this.#failure);
  }

  #notifyClosed(err: Error): void {
    if (this.#closedNotified || !this.#handler) return;
    this.#closedNotified = true;
    this.#handler.closed(err);
  }
}
