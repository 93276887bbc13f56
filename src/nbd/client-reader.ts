/**
 * Exact-length reads from a socket during the NBD handshake (not the hot path): buffers
 * 'data' chunks and hands out `read(n)` results in order, one read outstanding at a time.
 * `detach()` returns the unread bytes and leaves the socket paused with no listeners of
 * ours, for STARTTLS or the transmission phase to take over.
 */
import type { Socket } from 'node:net';
import { DmError } from '../core/errors.ts';

export class HandshakeReader {
  readonly #sock: Socket;
  readonly #where: string;
  #chunks: Buffer[] = [];
  #have = 0;
  #want = 0;
  #waiter: { resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  #failure: Error | null = null;
  readonly #onData = (c: Buffer): void => {
    this.#chunks.push(c);
    this.#have += c.length;
    if (this.#waiter && this.#have >= this.#want) {
      const w = this.#waiter;
      this.#waiter = null;
      w.resolve(this.#take(this.#want));
    }
  };
  readonly #onGone = (err?: Error): void => {
    if (this.#failure) return;
    const detail = err instanceof Error ? `: ${err.message}` : '';
    this.#failure = new DmError((err as NodeJS.ErrnoException | undefined)?.code ?? 'ECONNRESET', `${this.#where}: connection closed during NBD handshake${detail}`, { cause: err });
    const w = this.#waiter;
    this.#waiter = null;
    w?.reject(this.#failure);
  };

  constructor(sock: Socket, where: string) {
    this.#sock = sock;
    this.#where = where;
    sock.on('data', this.#onData);
    sock.on('end', this.#onGone);
    sock.on('close', this.#onGone);
    sock.on('error', this.#onGone);
    sock.resume();
  }

  read(n: number): Promise<Buffer> {
    if (this.#have >= n) return Promise.resolve(this.#take(n));
    if (this.#failure) return Promise.reject(this.#failure);
    return new Promise((resolve, reject) => {
      this.#want = n;
      this.#waiter = { resolve, reject };
    });
  }

  /** stop listening and return unread bytes; the socket is left paused */
  detach(): Buffer {
    this.#sock.pause();
    this.#sock.off('data', this.#onData);
    this.#sock.off('end', this.#onGone);
    this.#sock.off('close', this.#onGone);
    this.#sock.off('error', this.#onGone);
    const rest = Buffer.concat(this.#chunks, this.#have);
    this.#chunks = [];
    this.#have = 0;
    return rest;
  }

  #take(n: number): Buffer {
    const all = this.#chunks.length === 1 ? this.#chunks[0]! : Buffer.concat(this.#chunks, this.#have);
    const out = all.subarray(0, n);
    this.#chunks = all.length > n ? [all.subarray(n)] : [];
    this.#have -= n;
    return out;
  }
}
