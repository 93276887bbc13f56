/**
 * The NBD server: listeners (Unix socket, TCP), one Connection per client running the
 * handshake and then the transmission loop over an ExportProvider. A bad connection
 * (malformed bytes, abrupt close, hostile lengths, failed TLS) ends only itself; nothing
 * a client sends can throw out of the server.
 */
import { chmod, lstat, unlink } from 'node:fs/promises';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { TLSSocket } from 'node:tls';
import { isMainThread } from 'node:worker_threads';
import { DmError } from '../core/errors.ts';
import { log, type Logger } from '../core/log.ts';
import { BufferPool } from './buffer-pool.ts';
import { envCount } from '../core/env.ts';
import { ConnThreads, defaultThreads, type HandedOff } from './conn-threads.ts';
import type { ExportProvider, NbdPeer } from './export.ts';
import { handshake, type Negotiated } from './handshake.ts';
import { loadTlsConfig, type TlsServerConfig } from './tls.ts';
import { Transmission, type TransmissionOptions } from './transmission.ts';

export interface NbdServerOptions {
  /** STARTTLS with PSK; `require` refuses every option but STARTTLS/ABORT before TLS */
  tls?: { pskFile: string; require: boolean };
  /** a client that has not finished the handshake by then is dropped (default 30 s) */
  handshakeTimeoutMs?: number;
  /** how long in-flight requests may finish when the server closes or an export goes (default 2 s) */
  graceMs?: number;
  /** per-connection cap on payload/read/reply bytes held before reading pauses (default 64 MiB) */
  maxInFlightBytes?: number;
  /** per-connection cap on requests in flight before reading pauses (default 1024) */
  maxInFlightRequests?: number;
  /**
   * per connection, READs wait while the bytes of READs running plus replies the socket has not
   * taken reach this plus what the socket sends during one READ (default 128 KiB, or
   * DMKIT_NBD_READ_WINDOW; docs/nbd.md)
   */
  readWindowBytes?: number;
  /** idle READ buffers kept for reuse across connections (default 32 MiB) */
  bufferPoolBytes?: number;
  /**
   * read requests into a reused buffer and large WRITE payloads straight into their own
   * buffer (default true; DMKIT_NBD_DIRECT_READS=0 turns it off); plain sockets only
   */
  directReads?: boolean;
  /**
   * worker threads that serve connections to exports mapping straight onto files (docs/nbd.md,
   * "Connection threads"); default DMKIT_NBD_THREADS, else one per CPU up to 4; 0 = none
   */
  threads?: number;
  /** the module a connection thread runs (default: dmkit's own; for custom builds and tests) */
  threadEntry?: URL;
}

/** counters since the server was created */
export interface NbdServerStats {
  accepted: number;
  /** handshakes that reached transmission, by GO or EXPORT_NAME */
  go: number;
  exportName: number;
  /** STARTTLS sessions established */
  tls: number;
  /** connections dropped for protocol violations, timeouts or failed TLS */
  dropped: number;
  /** transmission phases that run with direct reads (on the main thread) */
  direct: number;
  /** connections moved to a connection thread */
  threaded: number;
  /** requests connection threads passed back to the main thread */
  forwarded: number;
}

class Connection {
  readonly raw: Socket;
  /** who the client is, taken at accept (a closed socket no longer says) */
  readonly peer: NbdPeer;
  current: Socket;
  /** the transmission phase, here or on a connection thread */
  tx: HandedOff | null = null;
  finished: Promise<void> = Promise.resolve();

  constructor(raw: Socket, peer: NbdPeer) {
    this.raw = raw;
    this.peer = peer;
    this.current = raw;
  }

  destroy(): void {
    this.current.destroy();
    this.raw.destroy();
  }
}

export class NbdServer {
  readonly #provider: ExportProvider;
  readonly #tls: TlsServerConfig | undefined;
  readonly #handshakeTimeoutMs: number;
  readonly #txOpts: TransmissionOptions;
  readonly #log: Logger = log('nbd');
  readonly #servers: Server[] = [];
  readonly #conns = new Set<Connection>();
  readonly #stats: NbdServerStats = { accepted: 0, go: 0, exportName: 0, tls: 0, dropped: 0, direct: 0, threaded: 0, forwarded: 0 };
  readonly #threads: ConnThreads | null;
  #closing = false;

  constructor(provider: ExportProvider, opts: NbdServerOptions = {}) {
    this.#provider = provider;
    this.#tls = opts.tls ? loadTlsConfig(opts.tls) : undefined;
    this.#handshakeTimeoutMs = opts.handshakeTimeoutMs ?? 30_000;
    this.#txOpts = {
      maxInFlightBytes: opts.maxInFlightBytes ?? 64 * 1024 * 1024,
      maxInFlightRequests: opts.maxInFlightRequests ?? 1024,
      readWindowBytes: opts.readWindowBytes ?? envCount('DMKIT_NBD_READ_WINDOW', 128 * 1024),
      graceMs: opts.graceMs ?? 2000,
      pool: new BufferPool(opts.bufferPoolBytes ?? 32 * 1024 * 1024),
      directReads: (opts.directReads ?? true) && process.env.DMKIT_NBD_DIRECT_READS !== '0',
      log: this.#log,
    };
    const threads = opts.threads ?? envCount('DMKIT_NBD_THREADS', defaultThreads());
    this.#threads = threads > 0
      ? new ConnThreads(threads, {
        maxInFlightBytes: this.#txOpts.maxInFlightBytes,
        maxInFlightRequests: this.#txOpts.maxInFlightRequests,
        readWindowBytes: this.#txOpts.readWindowBytes,
        graceMs: this.#txOpts.graceMs,
        // the threads share the pool's budget
        bufferPoolBytes: Math.floor((opts.bufferPoolBytes ?? 32 * 1024 * 1024) / threads),
        directReads: this.#txOpts.directReads,
      }, this.#log, opts.threadEntry)
      : null;
  }

  /** start the connection threads now rather than at the first connection that moves */
  prestartThreads(): void {
    this.#threads?.prestart();
  }

  /** live client connections (handshaking or transmitting) */
  get connections(): number {
    return this.#conns.size;
  }

  get stats(): Readonly<NbdServerStats> {
    return { ...this.#stats, forwarded: this.#threads?.forwarded ?? 0 };
  }

  /** listen on a Unix socket, created mode 0600; a stale socket file is replaced */
  async listenUnix(path: string): Promise<void> {
    this.#assertOpen();
    await removeStaleSocket(path);
    const peer: NbdPeer = { kind: 'unix', path };
    const srv = this.#createServer(() => peer);
    // create the socket 0600 from the start where the umask can be set (not in workers)
    const oldMask = isMainThread ? process.umask(0o177) : undefined;
    try {
      await listen(srv, (cb) => srv.listen(path, cb));
    } finally {
      if (oldMask !== undefined) process.umask(oldMask);
    }
    await chmod(path, 0o600);
    this.#servers.push(srv);
  }

  /** listen on TCP (default 127.0.0.1:10809); port 0 picks a free port */
  async listenTcp(host = '127.0.0.1', port = 10809): Promise<{ port: number }> {
    this.#assertOpen();
    const srv = this.#createServer((s) => ({ kind: 'tcp', host: s.remoteAddress ?? 'unknown', port: s.remotePort ?? 0 }));
    await listen(srv, (cb) => srv.listen(port, host, cb));
    this.#servers.push(srv);
    const addr = srv.address();
    return { port: typeof addr === 'object' && addr ? addr.port : port };
  }

  /**
   * Stop listening; new requests get ESHUTDOWN, in-flight ones get up to graceMs to finish
   * (then ESHUTDOWN), handshaking clients are dropped. Resolves when every connection is closed.
   */
  async close(): Promise<void> {
    this.#closing = true;
    const stopped = this.#servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve())));
    this.#servers.length = 0;
    for (const c of this.#conns) {
      if (c.tx) c.tx.end('server closing');
      else c.destroy();
    }
    await Promise.all([...this.#conns].map((c) => c.finished));
    await this.#threads?.close();
    await Promise.all(stopped);
  }

  #assertOpen(): void {
    if (this.#closing) throw new DmError('ESHUTDOWN', 'NBD server is closed');
  }

  /** a listener whose clients are `peerOf(socket)` */
  #createServer(peerOf: (socket: Socket) => NbdPeer): Server {
    const srv = createServer((socket) => this.#accept(socket, peerOf(socket)));
    srv.on('error', (err) => this.#log.error(`listener: ${err.message}`));
    return srv;
  }

  /** socket errors end the connection (close follows); they are only worth a debug line */
  #logErrors(socket: Socket, what = 'connection'): void {
    socket.on('error', (err) => this.#log.debug(`${what} error: ${err.message}`));
  }

  #accept(socket: Socket, peer: NbdPeer): void {
    this.#logErrors(socket);
    if (this.#closing) {
      socket.destroy();
      return;
    }
    socket.setNoDelay(true);
    this.#stats.accepted++;
    const conn = new Connection(socket, peer);
    this.#conns.add(conn);
    conn.finished = this.#run(conn).finally(() => {
      conn.destroy();
      this.#conns.delete(conn);
    });
  }

  async #run(conn: Connection): Promise<void> {
    const timer = setTimeout(() => {
      this.#log.limited('nbd-handshake-timeout', 'dropping a client that did not finish the handshake');
      this.#stats.dropped++;
      conn.destroy();
    }, this.#handshakeTimeoutMs);
    let session: Negotiated | null;
    try {
      session = await handshake(conn.raw, {
        provider: this.#provider,
        peer: conn.peer,
        tls: this.#tls,
        isClosing: () => this.#closing,
        onSocket: (s) => {
          conn.current = s;
          this.#logErrors(s, 'TLS connection');
          this.#stats.tls++;
          if (s instanceof TLSSocket) this.#log.debug(`STARTTLS: ${s.getProtocol()} ${s.getCipher()?.name}`);
        },
      });
    } catch (err) {
      if ((err as { code?: unknown } | null)?.code !== 'ECONNRESET') {
        this.#stats.dropped++;
        this.#log.limited('nbd-handshake', `handshake failed: ${(err as Error).message}`);
      }
      return;
    } finally {
      clearTimeout(timer);
    }
    if (!session) {
      // ABORT: the reply is flushed by end(); wait for the peer to go
      await closed(conn.current, this.#txOpts.graceMs);
      return;
    }
    if (session.via === 'go') this.#stats.go++;
    else this.#stats.exportName++;
    let tx: HandedOff;
    try {
      tx = this.#transmit(conn, session);
    } catch (err) {
      // nothing serves the connection: close its export here, or the device stays held
      this.#log.error(`connection not served: ${(err as Error).message}`);
      session.handle.close();
      return;
    }
    conn.tx = tx;
    if (this.#closing) tx.end('server closing');
    await tx.done;
  }

  /** start the transmission phase: on a connection thread, or here; it closes the export handle when done */
  #transmit(conn: Connection, session: Negotiated): HandedOff {
    const handed = this.#threads?.take(session) ?? null;
    if (handed) {
      this.#stats.threaded++;
      return handed;
    }
    return new Transmission({
      ...session,
      onSocket: (s) => {
        conn.current = s;
        this.#stats.direct++;
        this.#logErrors(s);
      },
    }, this.#txOpts);
  }
}

function listen(srv: Server, start: (cb: () => void) => void): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const onError = (err: Error): void => reject(err);
    srv.once('error', onError);
    start(() => {
      srv.off('error', onError);
      resolve();
    });
  });
}

/** resolves once `s` closes, destroying it if that takes longer than `ms` */
function closed(s: Socket, ms: number): Promise<void> {
  if (s.destroyed) return Promise.resolve();
  return new Promise<void>((resolve) => {
    const t = setTimeout(() => s.destroy(), ms);
    s.once('close', () => {
      clearTimeout(t);
      resolve();
    });
    s.resume();
  });
}

/** unlink `path` if it is a socket nobody listens on; refuse if it is live or not a socket */
async function removeStaleSocket(path: string): Promise<void> {
  let st;
  try {
    st = await lstat(path);
  } catch {
    return;
  }
  if (!st.isSocket()) throw new DmError('EEXIST', `${path} exists and is not a socket`);
  const live = await new Promise<boolean>((resolve) => {
    const s = connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
  if (live) throw new DmError('EBUSY', `${path}: another server is listening`);
  await unlink(path);
}
