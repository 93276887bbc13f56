/**
 * A control-protocol client: one Unix socket connection, concurrent requests matched by
 * id, streamed replies for long operations. Used by the CLI and by the e2e tests.
 */
import net from 'node:net';
import { DmError } from '../core/errors.ts';
import { encode, LineDecoder, type Reply, type RequestId } from './protocol.ts';

interface Pending {
  resolve: (result: unknown) => void;
  reject: (err: Error) => void;
  onItem?: (item: unknown) => void;
}

export interface Stream<R> {
  /** the final result (rejects with the daemon's error) */
  done: Promise<R>;
  /** ask the daemon to end the stream (the final reply is then an ECANCELED error) */
  cancel(): void;
}

export class ControlClient {
  readonly #sock: net.Socket;
  readonly #pending = new Map<RequestId, Pending>();
  #nextId = 1;
  #closed: Error | null = null;

  private constructor(sock: net.Socket) {
    this.#sock = sock;
    const decoder = new LineDecoder(Number.MAX_SAFE_INTEGER);
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => {
      for (const line of decoder.push(chunk)) this.#onLine(line);
    });
    sock.on('error', (err) => this.#fail(err));
    sock.on('close', () => this.#fail(new DmError('ECONNRESET', 'the daemon closed the control connection')));
  }

  /** Connect to a control socket; rejects with the socket error (ENOENT, ECONNREFUSED, …). */
  static connect(socketPath: string): Promise<ControlClient> {
    return new Promise((resolve, reject) => {
      const sock = net.createConnection(socketPath);
      const onError = (err: Error): void => {
        sock.destroy();
        reject(err);
      };
      sock.once('error', onError);
      sock.once('connect', () => {
        sock.off('error', onError);
        resolve(new ControlClient(sock));
      });
    });
  }

  request<T = unknown>(op: string, args: Record<string, unknown> = {}): Promise<T> {
    return this.stream<unknown, T>(op, args).done;
  }

  stream<I, R>(op: string, args: Record<string, unknown> = {}, onItem?: (item: I) => void): Stream<R> {
    const id = this.#nextId++;
    const done = new Promise<R>((resolve, reject) => {
      if (this.#closed) {
        reject(this.#closed);
        return;
      }
      this.#pending.set(id, { resolve: resolve as (r: unknown) => void, reject, onItem: onItem as ((i: unknown) => void) | undefined });
      this.#sock.write(encode({ id, op, args }));
    });
    return {
      done,
      cancel: () => {
        if (this.#pending.has(id) && !this.#closed) this.#sock.write(encode({ id: this.#nextId++, op: 'cancel', args: { id } }));
      },
    };
  }

  close(): void {
    this.#sock.end();
    this.#sock.destroy();
  }

  #onLine(line: string): void {
    let msg: Reply;
    try {
      msg = JSON.parse(line) as Reply;
    } catch {
      this.#fail(new DmError('EBADMSG', `unreadable reply from the daemon: ${line.slice(0, 200)}`));
      return;
    }
    if (msg.id === null) return; // a complaint about a line we never sent
    const p = this.#pending.get(msg.id);
    if (!p) return;
    if ('stream' in msg) {
      p.onItem?.(msg.stream);
      return;
    }
    this.#pending.delete(msg.id);
    if (msg.ok) p.resolve(msg.result);
    else p.reject(new DmError(msg.error.code, msg.error.message));
  }

  #fail(err: Error): void {
    if (this.#closed) return;
    this.#closed = err;
    for (const p of this.#pending.values()) p.reject(err);
    this.#pending.clear();
  }
}
