/**
 * Exact-length reads from a socket for the handshake phase (not the hot path): buffers
 * 'data' chunks and hands out `read(n)` results in order. One read may be outstanding at a
 * time. The socket is paused while more than HIGH_WATER bytes wait unread, so a client that
 * floods the handshake cannot grow memory. `detach()` returns the unread bytes and leaves
 * the socket paused with no listeners of ours, for the next phase to take over.
 */
import type { Socket } from 'node:net';
import { takeBytes } from '../core/chunks.ts';

const HIGH_WATER = 256 * 1024;

/** the peer closed, or the connection failed, while a read was outstanding */
export class ConnectionClosed extends Error {
  readonly code = 'ECONNRESET';
  constructor(message = 'connection closed by peer') {
    super(message);
    this.name = 'ConnectionClosed';
  }
}

export class ByteReader {
  readonly #socket: Socket;
  #chunks: Buffer[] = [];
  #have = 0;
  #want = 0;
  #resolve: ((b: Buffer) => void) | null = null;
  #reject: ((e: Error) => void) | null = null;
  #failure: Error | null = null;
  #detached = false;

  readonly #onData = (chunk: Buffer): void => {
    this.#chunks.push(chunk);
    this.#have += chunk.length;
    if (this.#have > HIGH_WATER) this.#socket.pause();
    this.#settle();
  };
  readonly #onEnd = (): void => this.#fail(new ConnectionClosed());
  readonly #onClose = (): void => this.#fail(new ConnectionClosed());
  readonly #onError = (err: Error): void => this.#fail(new ConnectionClosed(`connection error: ${err.message}`));

  constructor(socket: Socket, initial?: Buffer) {
    this.#socket = socket;
    if (initial && initial.length > 0) {
      this.#chunks.push(initial);
      this.#have = initial.length;
    }
    socket.on('data', this.#onData);
    socket.on('end', this.#onEnd);
    socket.on('close', this.#onClose);
    socket.on('error', this.#onError);
    if (socket.destroyed) this.#failure = new ConnectionClosed();
    socket.resume();
  }

  /** bytes received and not yet consumed */
  get buffered(): number {
    return this.#have;
  }

  /** the next `n` bytes; rejects with ConnectionClosed if the peer goes away first */
  read(n: number): Promise<Buffer> {
    if (this.#resolve) return Promise.reject(new Error('ByteReader: read already outstanding'));
    if (this.#detached) return Promise.reject(new Error('ByteReader: detached'));
    if (this.#have >= n) return Promise.resolve(this.#take(n));
    if (this.#failure) return Promise.reject(this.#failure);
    return new Promise<Buffer>((resolve, reject) => {
      this.#want = n;
      this.#resolve = resolve;
      this.#reject = reject;
      this.#socket.resume();
    });
  }

  /** stop listening; returns the unread bytes. The socket is left paused. */
  detach(): Buffer {
    this.#detached = true;
    this.#socket.pause();
    this.#socket.off('data', this.#onData);
    this.#socket.off('end', this.#onEnd);
    this.#socket.off('close', this.#onClose);
    this.#socket.off('error', this.#onError);
    const rest = this.#chunks.length === 1 ? this.#chunks[0]! : Buffer.concat(this.#chunks, this.#have);
    this.#chunks = [];
    this.#have = 0;
    return rest ?? Buffer.alloc(0);
  }

  #settle(): void {
    if (!this.#resolve || this.#have < this.#want) return;
    const resolve = this.#resolve;
    this.#resolve = null;
    this.#reject = null;
    resolve(this.#take(this.#want));
  }

  #fail(err: Error): void {
    if (this.#failure) return;
    this.#failure = err;
    const reject = this.#reject;
    this.#resolve = null;
    this.#reject = null;
    if (reject) reject(err);
  }

  #take(n: number): Buffer {
    const out = takeBytes(this.#chunks, n);
    this.#have -= n;
    if (this.#have <= HIGH_WATER && this.#socket.isPaused() && !this.#detached) this.#socket.resume();
    return out;
  }
}
