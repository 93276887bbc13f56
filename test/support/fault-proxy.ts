/**
 * A fault-injecting TCP proxy on loopback, for end-to-end tests of anything that talks over a
 * socket (a replication sender and its receiver, an NBD client and nbdkit). It forwards each
 * connection byte for byte to `target` (TCP or a Unix socket) and can, per direction
 * ('up' = client→server, 'down' = server→client, 'both'):
 *
 * - `setDelay(ms)`: add latency to every chunk (order kept);
 * - `setBandwidth(bytesPerSecond)`: cap the rate with a token bucket (per connection);
 * - `partition(dir)` / `heal()`: hold the bytes of that direction (peers see silence, nothing
 *   is lost) on open and new connections, then release them in order;
 * - `corrupt(dir, { afterBytes, count })`: flip one bit in each of `count` chunks;
 *
 * and, for the connections themselves: `reset()` (RST every open one), `refuse(true)` (accept
 * and close new ones at once), `dropNew(true)` (accept new ones, never connect them upstream).
 *
 * Memory stays bounded: a connection's direction that holds more than 4 MiB pauses its source
 * socket until it drains, so a fast sender meets TCP backpressure, not an ever-growing queue.
 *
 * ```ts
 * const proxy = await FaultProxy.start({ target: { host: '127.0.0.1', port: server.port } });
 * const client = net.connect(proxy.port, proxy.host);      // or give `proxy.address` to a daemon
 * proxy.partition('up');                                    // the server hears nothing more
 * // ... assert the sender notices, keeps its data, etc.
 * proxy.heal();                                             // held bytes flow again, in order
 * proxy.corrupt('down', { afterBytes: 4096, count: 1 });   // one bad byte for the client
 * await proxy.close();
 * ```
 */
import net, { type Server, type Socket } from 'node:net';

export type Dir = 'up' | 'down' | 'both';
type Way = 'up' | 'down';

export interface FaultProxyOptions {
  listen?: { host: string; port: number };
  target: { host: string; port: number } | { path: string };
}

export interface FaultProxyStats {
  /** connections accepted since start */
  connections: number;
  /** connections open now (including those held by dropNew) */
  open: number;
  /** bytes forwarded to the server / to the client (held bytes count once they go out) */
  bytesUp: number;
  bytesDown: number;
  /** bits actually flipped by corrupt() */
  corrupted: number;
}

/** a direction's source socket is paused above this many held bytes, resumed below LOW_WATER */
const HIGH_WATER = 4 * 1024 * 1024;
const LOW_WATER = 1024 * 1024;

const ways = (dir: Dir): Way[] => (dir === 'both' ? ['up', 'down'] : [dir]);

/** RST-like close where the socket supports it (TCP), a plain destroy otherwise */
function hardClose(s: Socket): void {
  if (s.destroyed) return;
  try {
    s.resetAndDestroy();
  } catch {
    s.destroy();
  }
}

/** the faults of one direction, shared by every connection */
interface WayState {
  delayMs: number;
  rate: number | null;
  partitioned: boolean;
  /** bytes still to pass before the next flip, and flips left */
  corruptSkip: number;
  corruptLeft: number;
}

/** what a pipe tells its proxy: a chunk arrived (to corrupt in place), bytes went out */
interface PipeHooks {
  received(way: Way, buf: Buffer): void;
  forwarded(way: Way, n: number): void;
}

interface Chunk {
  buf: Buffer;
  readyAt: number;
}

/** one direction of one connection: src's bytes queued on their way to dst */
class Pipe {
  readonly queue: Chunk[] = [];
  held = 0;
  srcEnded = false;
  dstEnded = false;
  waitingDrain = false;
  timer: NodeJS.Timeout | null = null;
  tokens = 0;
  lastRefill = Date.now();

  constructor(
    readonly way: Way,
    readonly src: Socket,
    readonly dst: Socket,
    private readonly state: WayState,
    private readonly hooks: PipeHooks,
  ) {
    src.on('data', (d: Buffer) => this.#onData(d));
    src.on('end', () => {
      this.srcEnded = true;
      this.pump();
    });
    dst.on('drain', () => {
      this.waitingDrain = false;
      this.pump();
    });
  }

  #onData(buf: Buffer): void {
    this.hooks.received(this.way, buf);
    this.queue.push({ buf, readyAt: Date.now() + this.state.delayMs });
    this.held += buf.length;
    if (this.held > HIGH_WATER) this.src.pause();
    this.pump();
  }

  /** write what the faults allow now; come back by timer or 'drain' for the rest */
  pump(): void {
    if (this.timer || this.waitingDrain || this.state.partitioned) return;
    if (this.dst.destroyed) return this.#drop();
    while (this.queue.length > 0) {
      const head = this.queue[0]!;
      const now = Date.now();
      if (head.readyAt > now) return this.#wait(head.readyAt - now);
      let n = head.buf.length;
      const rate = this.state.rate;
      if (rate !== null) {
        const burst = Math.max(1, rate / 20);
        this.tokens = Math.min(burst, this.tokens + ((now - this.lastRefill) * rate) / 1000);
        this.lastRefill = now;
        const need = Math.min(n, burst);
        if (this.tokens < need) return this.#wait(((need - this.tokens) * 1000) / rate);
        n = Math.min(n, Math.floor(this.tokens));
        this.tokens -= n;
      }
      const out = n === head.buf.length ? head.buf : head.buf.subarray(0, n);
      if (n === head.buf.length) this.queue.shift();
      else head.buf = head.buf.subarray(n);
      this.held -= n;
      this.hooks.forwarded(this.way, n);
      if (this.held < LOW_WATER && this.src.isPaused() && !this.src.destroyed) this.src.resume();
      if (!this.dst.write(out)) {
        this.waitingDrain = true;
        return;
      }
    }
    if (this.srcEnded && !this.dstEnded) {
      this.dstEnded = true;
      this.dst.end();
    }
  }

  /** re-run pump() now (after a fault changed), dropping a pending timer */
  kick(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.pump();
  }

  #wait(ms: number): void {
    this.timer = setTimeout(() => {
      this.timer = null;
      this.pump();
    }, Math.max(1, Math.ceil(ms)));
  }

  #drop(): void {
    this.queue.length = 0;
    this.held = 0;
    this.stop();
  }

  stop(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }
}

/** a client connection and, unless dropNew held it, its upstream connection */
interface Conn {
  client: Socket;
  upstream: Socket | null;
  pipes: Pipe[];
}

export class FaultProxy {
  readonly #target: FaultProxyOptions['target'];
  readonly #server: Server;
  readonly #conns = new Set<Conn>();
  readonly #ways: Record<Way, WayState> = {
    up: { delayMs: 0, rate: null, partitioned: false, corruptSkip: 0, corruptLeft: 0 },
    down: { delayMs: 0, rate: null, partitioned: false, corruptSkip: 0, corruptLeft: 0 },
  };
  #refuse = false;
  #dropNew = false;
  #connections = 0;
  #bytes: Record<Way, number> = { up: 0, down: 0 };
  #corrupted = 0;
  readonly host: string;
  readonly port: number;

  private constructor(target: FaultProxyOptions['target'], server: Server, host: string, port: number) {
    this.#target = target;
    this.#server = server;
    this.host = host;
    this.port = port;
    server.on('connection', (c) => this.#onConnection(c));
  }

  /** listen (default 127.0.0.1 on a free port) and forward every connection to `opts.target` */
  static async start(opts: FaultProxyOptions): Promise<FaultProxy> {
    const listen = opts.listen ?? { host: '127.0.0.1', port: 0 };
    const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(listen.port, listen.host, () => {
        server.off('error', reject);
        resolve();
      });
    });
    server.on('error', () => {});
    const addr = server.address() as net.AddressInfo;
    return new FaultProxy(opts.target, server, listen.host, addr.port);
  }

  /** "host:port", as a daemon's option wants it */
  get address(): string {
    return `${this.host}:${this.port}`;
  }

  get stats(): FaultProxyStats {
    return {
      connections: this.#connections,
      open: this.#conns.size,
      bytesUp: this.#bytes.up,
      bytesDown: this.#bytes.down,
      corrupted: this.#corrupted,
    };
  }

  /** bytes received and not yet forwarded, over all connections and directions */
  get held(): number {
    let n = 0;
    for (const c of this.#conns) for (const p of c.pipes) n += p.held;
    return n;
  }

  setDelay(ms: number, dir: Dir = 'both'): void {
    for (const w of ways(dir)) this.#ways[w].delayMs = Math.max(0, ms);
    this.#kick();
  }

  /** cap each connection's rate in `dir` (null: unlimited) */
  setBandwidth(bytesPerSecond: number | null, dir: Dir = 'both'): void {
    if (bytesPerSecond !== null && !(bytesPerSecond > 0)) throw new RangeError(`bandwidth must be > 0 or null, got ${bytesPerSecond}`);
    for (const w of ways(dir)) this.#ways[w].rate = bytesPerSecond;
    this.#kick();
  }

  /** hold `dir`'s bytes on open and new connections until heal() */
  partition(dir: Dir): void {
    for (const w of ways(dir)) this.#ways[w].partitioned = true;
  }

  /** end every partition: held bytes flow again, in order */
  heal(): void {
    for (const w of ways('both')) this.#ways[w].partitioned = false;
    this.#kick();
  }

  /** destroy every open connection, both sides, with an RST where TCP allows */
  reset(): void {
    for (const c of [...this.#conns]) this.#destroy(c);
  }

  /** on: new connections are accepted and closed at once */
  refuse(on: boolean): void {
    this.#refuse = on;
  }

  /** on: new connections are accepted but never connected upstream (silence) */
  dropNew(on: boolean): void {
    this.#dropNew = on;
  }

  /**
   * Flip one bit in each of the next `count` (default 1) chunks of `dir` that the proxy receives,
   * once `afterBytes` (default 0) bytes of that direction have passed from now: the first flip
   * hits exactly byte `afterBytes`, each later one the first byte of a later chunk.
   */
  corrupt(dir: Dir, opts: { afterBytes?: number; count?: number } = {}): void {
    for (const w of ways(dir)) {
      this.#ways[w].corruptSkip = opts.afterBytes ?? 0;
      this.#ways[w].corruptLeft = opts.count ?? 1;
    }
  }

  /** stop listening and destroy every connection */
  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.#server.close(() => resolve()));
    this.reset();
    await closed;
  }

  readonly #hooks: PipeHooks = {
    received: (way, buf) => this.#corruptChunk(way, buf),
    forwarded: (way, n) => void (this.#bytes[way] += n),
  };

  /** a chunk arrived in `way`: flip a bit in it if a corrupt() is due */
  #corruptChunk(way: Way, buf: Buffer): void {
    const s = this.#ways[way];
    if (s.corruptLeft === 0) return;
    if (s.corruptSkip >= buf.length) {
      s.corruptSkip -= buf.length;
      return;
    }
    buf[s.corruptSkip] = buf[s.corruptSkip]! ^ (1 << (this.#corrupted % 8));
    s.corruptSkip = 0;
    s.corruptLeft--;
    this.#corrupted++;
  }

  #kick(): void {
    for (const c of this.#conns) for (const p of c.pipes) p.kick();
  }

  #onConnection(client: Socket): void {
    this.#connections++;
    client.on('error', () => {});
    if (this.#refuse) {
      client.destroy();
      return;
    }
    const conn: Conn = { client, upstream: null, pipes: [] };
    this.#conns.add(conn);
    client.on('close', (hadError) => this.#onClose(conn, hadError));
    if (this.#dropNew) return; // left paused: it reads nothing and says nothing
    const t = this.#target;
    const upstream = 'path' in t ? net.connect({ path: t.path, allowHalfOpen: true }) : net.connect({ host: t.host, port: t.port, allowHalfOpen: true });
    upstream.on('error', () => {});
    upstream.on('close', (hadError) => this.#onClose(conn, hadError));
    conn.upstream = upstream;
    conn.pipes = [new Pipe('up', client, upstream, this.#ways.up, this.#hooks), new Pipe('down', upstream, client, this.#ways.down, this.#hooks)];
    client.resume();
  }

  /** an error on either side resets the other; a connection is gone once both sides closed */
  #onClose(conn: Conn, hadError: boolean): void {
    if (hadError) return this.#destroy(conn);
    if (conn.client.destroyed && (conn.upstream === null || conn.upstream.destroyed)) this.#forget(conn);
  }

  #destroy(conn: Conn): void {
    hardClose(conn.client);
    if (conn.upstream) hardClose(conn.upstream);
    this.#forget(conn);
  }

  #forget(conn: Conn): void {
    if (!this.#conns.delete(conn)) return;
    for (const p of conn.pipes) p.stop();
  }
}
