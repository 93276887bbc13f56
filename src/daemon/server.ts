/**
 * The control socket server: accepts connections on `<runtime>/control.sock` (mode 0600,
 * created under a 0o177 umask so it is never reachable by others), reads newline-delimited
 * JSON requests, runs them concurrently and replies by id (protocol.ts). Nothing a client
 * sends can crash the daemon: every failure becomes an error reply.
 */
import fs from 'node:fs';
import net from 'node:net';
import type { Logger } from '../core/log.ts';
import { handlers, runOp, type OpContext } from './ops.ts';
import {
  encode, LineDecoder, parseRequest, ProtocolError, toWireError, type Reply, type Request, type RequestId,
} from './protocol.ts';

/** ops whose final reply carries `done: true` (they may stream before it) */
const LONG: ReadonlySet<string> = new Set(['wait', 'watch', 'progress', 'events']);

export type ServerContext = Omit<OpContext, 'signal' | 'emit'>;

export class ControlServer {
  readonly socketPath: string;
  readonly #ctx: ServerContext;
  readonly #log: Logger;
  readonly #server: net.Server;
  readonly #conns = new Set<net.Socket>();
  readonly #running = new Set<AbortController>();

  constructor(socketPath: string, ctx: ServerContext, log: Logger) {
    this.socketPath = socketPath;
    this.#ctx = ctx;
    this.#log = log;
    this.#server = net.createServer((sock) => this.#onConnection(sock));
    this.#server.on('error', (err) => log.error(`control socket: ${err.message}`));
  }

  /** Listen with a umask that leaves the socket 0600 from the moment it exists. */
  listen(): Promise<void> {
    return new Promise((resolve, reject) => {
      const old = process.umask(0o177);
      const onError = (err: Error): void => {
        process.umask(old);
        reject(err);
      };
      this.#server.once('error', onError);
      this.#server.listen(this.socketPath, () => {
        process.umask(old);
        this.#server.off('error', onError);
        try {
          fs.chmodSync(this.socketPath, 0o600);
        } catch (err) {
          reject(err);
          return;
        }
        resolve();
      });
    });
  }

  /** Stop accepting, cancel running requests, drop connections, remove the socket file. */
  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.#server.close(() => resolve()));
    for (const ac of this.#running) ac.abort();
    for (const s of this.#conns) s.destroy();
    await closed;
    fs.rmSync(this.socketPath, { force: true });
  }

  #onConnection(sock: net.Socket): void {
    this.#conns.add(sock);
    const running = new Map<RequestId, AbortController>();
    const decoder = new LineDecoder();
    const send = (msg: Reply): void => {
      if (!sock.destroyed && sock.writable) sock.write(encode(msg));
    };
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => {
      let lines: string[];
      try {
        lines = decoder.push(chunk);
      } catch (err) {
        send({ id: null, ok: false, error: toWireError(err) });
        return;
      }
      for (const line of lines) {
        if (line.trim() !== '') void this.#handle(line, running, send);
      }
    });
    sock.on('error', (err) => this.#log.debug(`control connection: ${err.message}`));
    sock.on('close', () => {
      this.#conns.delete(sock);
      for (const ac of running.values()) ac.abort();
    });
  }

  async #handle(line: string, running: Map<RequestId, AbortController>, send: (msg: Reply) => void): Promise<void> {
    let req: Request;
    try {
      req = parseRequest(line);
    } catch (err) {
      send({ id: err instanceof ProtocolError ? err.id : null, ok: false, error: toWireError(err) });
      return;
    }
    const { id, op } = req;
    if (op === 'cancel') {
      const target = req.args?.id;
      const ac = typeof target === 'number' || typeof target === 'string' ? running.get(target) : undefined;
      ac?.abort();
      send({ id, ok: true, result: { cancelled: !!ac } });
      return;
    }
    if (!Object.hasOwn(handlers, op)) {
      send({ id, ok: false, error: { code: 'ENOSYS', message: `unknown operation '${op}'` } });
      return;
    }
    if (running.has(id)) {
      send({ id, ok: false, error: { code: 'EBADMSG', message: `request id ${JSON.stringify(id)} is already in use on this connection` } });
      return;
    }
    const ac = new AbortController();
    running.set(id, ac);
    this.#running.add(ac);
    const ctx: OpContext = {
      ...this.#ctx,
      signal: ac.signal,
      emit: (item) => send({ id, ok: true, stream: item }),
    };
    try {
      const result = await runOp(op, req.args ?? {}, ctx, this.#log);
      send(LONG.has(op) ? { id, ok: true, done: true, result: result ?? null } : { id, ok: true, result: result ?? null });
    } catch (err) {
      send({ id, ok: false, error: toWireError(err) });
    } finally {
      running.delete(id);
      this.#running.delete(ac);
    }
  }
}
