/**
 * A fault-injecting byte proxy on loopback (TCP or a Unix socket) in front of a real server.
 * It forwards both directions unchanged and can, on demand:
 *
 * - `dropAll()`: reset every open connection (both sides);
 * - `setMode('stall')`: stop forwarding on open connections and accept new ones without
 *   connecting them upstream (the peer sees silence, not an error);
 * - `setMode('reset')`: accept new connections and close them at once;
 * - `setMode('refuse')`: stop listening, so connects fail with ECONNREFUSED (TCP) or
 *   ENOENT (Unix);
 * - `setMode('pass')`: back to normal (stalled connections resume, the listener returns).
 *
 * It also keeps the last bytes each connection sent upstream (`clientTail`), so a test can
 * check what a client said last (e.g. an NBD DISC) without decoding the protocol.
 */
import net, { type Server, type Socket } from 'node:net';
import fs from 'node:fs';

export type ProxyTarget = { path: string } | { host: string; port: number };
export type ProxyListen = { path: string } | { host: string; port: number };
export type ProxyMode = 'pass' | 'stall' | 'reset' | 'refuse';

const TAIL = 256;

interface Pair {
  client: Socket;
  upstream: Socket | null;
  tail: Buffer;
}

export class FaultProxy {
  readonly #target: ProxyTarget;
  #listen: ProxyListen;
  #server: Server;
  #mode: ProxyMode = 'pass';
  readonly #pairs = new Set<Pair>();
  #accepted = 0;
  #lastTail: Buffer = Buffer.alloc(0);

  private constructor(target: ProxyTarget, listen: ProxyListen) {
    this.#target = target;
    this.#listen = listen;
    this.#server = this.#makeServer();
  }

  /** listen (default: 127.0.0.1 on a free port) and forward to `target` */
  static async start(target: ProxyTarget, listen: ProxyListen = { host: '127.0.0.1', port: 0 }): Promise<FaultProxy> {
    const p = new FaultProxy(target, listen);
    await p.#startListening();
    return p;
  }

  /** the TCP port (throws for a Unix-socket proxy) */
  get port(): number {
    if ('path' in this.#listen) throw new Error('proxy listens on a Unix socket');
    return this.#listen.port;
  }

  /** an NBD URI for the proxied export */
  uri(exportName = ''): string {
    const e = encodeURIComponent(exportName);
    if ('path' in this.#listen) return `nbd+unix:///${e}?socket=${encodeURIComponent(this.#listen.path)}`;
    return `nbd://127.0.0.1:${this.#listen.port}/${e}`;
  }

  get mode(): ProxyMode {
    return this.#mode;
  }
  /** connections currently open */
  get connections(): number {
    return this.#pairs.size;
  }
  /** connections accepted since start */
  get accepted(): number {
    return this.#accepted;
  }

  /** the last bytes sent upstream by the most recently closed connection */
  clientTail(): Buffer {
    return this.#lastTail;
  }

  async setMode(mode: ProxyMode): Promise<void> {
    const old = this.#mode;
    if (old === mode) return;
    this.#mode = mode;
    if (old === 'refuse') await this.#startListening();
    // the listening socket closes at once; open connections are left alone
    if (mode === 'refuse') this.#server.close();
    if (mode === 'stall') {
      for (const p of this.#pairs) this.#pause(p);
    } else if (old === 'stall') {
      for (const p of this.#pairs) {
        if (p.upstream) this.#pipe(p);
        else if (mode === 'pass') this.#connectUpstream(p);
        else this.#drop(p);
      }
    }
  }

  /** reset every open connection */
  dropAll(): void {
    for (const p of [...this.#pairs]) this.#drop(p);
  }

  async close(): Promise<void> {
    const server = this.#server;
    const closed = new Promise<void>((resolve) => server.close(() => resolve()));
    this.dropAll();
    if (this.#mode !== 'refuse') await closed;
    this.#mode = 'refuse';
  }

  #makeServer(): Server {
    const server = net.createServer((c) => this.#onConnection(c));
    server.on('error', () => {});
    return server;
  }

  async #startListening(): Promise<void> {
    this.#server = this.#makeServer();
    const l = this.#listen;
    if ('path' in l) fs.rmSync(l.path, { force: true });
    await new Promise<void>((resolve, reject) => {
      this.#server.once('error', reject);
      if ('path' in l) this.#server.listen(l.path, () => resolve());
      else this.#server.listen(l.port, l.host, () => resolve());
    });
    const addr = this.#server.address();
    if (addr && typeof addr === 'object' && !('path' in l)) this.#listen = { host: l.host, port: addr.port };
  }

  #onConnection(c: Socket): void {
    this.#accepted++;
    c.on('error', () => {});
    if (this.#mode === 'reset' || this.#mode === 'refuse') {
      c.destroy();
      return;
    }
    const p: Pair = { client: c, upstream: null, tail: Buffer.alloc(0) };
    this.#pairs.add(p);
    c.on('data', (d: Buffer) => {
      p.tail = Buffer.concat([p.tail, d]);
      if (p.tail.length > TAIL) p.tail = p.tail.subarray(p.tail.length - TAIL);
    });
    c.on('close', () => this.#drop(p));
    if (this.#mode === 'stall') c.pause();
    else this.#connectUpstream(p);
  }

  #connectUpstream(p: Pair): void {
    const t = this.#target;
    const u = 'path' in t ? net.connect(t.path) : net.connect(t.port, t.host);
    u.on('error', () => {});
    u.on('close', () => this.#drop(p));
    p.upstream = u;
    this.#pipe(p);
  }

  #pipe(p: Pair): void {
    p.client.pipe(p.upstream!);
    p.upstream!.pipe(p.client);
    p.client.resume();
    p.upstream!.resume();
  }

  #pause(p: Pair): void {
    p.client.unpipe();
    p.upstream?.unpipe();
    p.client.pause();
    p.upstream?.pause();
  }

  #drop(p: Pair): void {
    if (!this.#pairs.delete(p)) return;
    this.#lastTail = p.tail;
    p.client.destroy();
    p.upstream?.destroy();
  }
}
