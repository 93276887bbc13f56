/**
 * The fault proxy (test/support/fault-proxy.ts) over real loopback sockets: byte-exact pass-through,
 * delay and bandwidth keeping order, one- and two-way partitions that hold bytes until heal(),
 * reset, corruption of exactly `count` bytes, refuse and dropNew, and bounded memory under a
 * partition. Every check is on bytes; the only time in it is "nothing arrives within 200 ms".
 */
import { createHash, randomBytes } from 'node:crypto';
import net, { type Server, type Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { FaultProxy } from '../support/fault-proxy.ts';

const MiB = 1024 * 1024;

/** a server whose accepted sockets are kept (in order) for the test to drive */
interface TestServer {
  port: number;
  sockets: Socket[];
  received: Buffer[][];
}

const servers: Server[] = [];
const sockets: Socket[] = [];
const proxies: FaultProxy[] = [];

afterEach(async () => {
  for (const s of sockets.splice(0)) s.destroy();
  await Promise.all(proxies.splice(0).map((p) => p.close()));
  await Promise.all(servers.splice(0).map((s) => new Promise((r) => s.close(r))));
});

/** start a server that ends when its input ends; `echo`: it sends back what it reads, else it keeps it */
async function startServer(echo: boolean): Promise<TestServer> {
  const ts: TestServer = { port: 0, sockets: [], received: [] };
  const server = net.createServer({ allowHalfOpen: true }, (s) => {
    const chunks: Buffer[] = [];
    ts.sockets.push(s);
    ts.received.push(chunks);
    sockets.push(s);
    s.on('error', () => {});
    if (echo) s.pipe(s);
    else s.on('data', (d: Buffer) => chunks.push(d)).on('end', () => s.end());
  });
  servers.push(server);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  ts.port = (server.address() as net.AddressInfo).port;
  return ts;
}

/** a server (see startServer) and a proxy in front of it */
async function rig(echo: boolean): Promise<{ server: TestServer; proxy: FaultProxy }> {
  const server = await startServer(echo);
  const proxy = await FaultProxy.start({ target: { host: '127.0.0.1', port: server.port } });
  proxies.push(proxy);
  return { server, proxy };
}

interface Client {
  sock: Socket;
  got: Buffer[];
  ended: Promise<void>;
  closed: Promise<boolean>;
}

/** a connected client that collects what it reads */
async function connect(proxy: FaultProxy): Promise<Client> {
  const sock = net.connect({ host: proxy.host, port: proxy.port, allowHalfOpen: true });
  sockets.push(sock);
  sock.on('error', () => {});
  const got: Buffer[] = [];
  sock.on('data', (d: Buffer) => got.push(d));
  const ended = new Promise<void>((r) => sock.once('end', r));
  const closed = new Promise<boolean>((r) => sock.once('close', r));
  await new Promise<void>((r, j) => sock.once('connect', r).once('error', j));
  return { sock, got, ended, closed };
}

/** a client through the proxy and the server's side of it: its socket and what it received */
async function pair(r: { server: TestServer; proxy: FaultProxy }): Promise<Client & { s: Socket; received: Buffer[] }> {
  const n = r.server.sockets.length;
  const c = await connect(r.proxy);
  await vi.waitFor(() => expect(r.server.sockets).toHaveLength(n + 1));
  return { ...c, s: r.server.sockets[n]!, received: r.server.received[n]! };
}

const total = (chunks: Buffer[]): number => chunks.reduce((n, c) => n + c.length, 0);
const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

describe('FaultProxy', () => {
  it('passes a few MiB both ways byte-exact, over several connections at once', async () => {
    const { server, proxy } = await rig(true);
    expect(proxy.address).toBe(`127.0.0.1:${proxy.port}`);
    const runs = [4 * MiB, 1 * MiB, 1 * MiB, 64 * 1024].map(async (size) => {
      const data = randomBytes(size);
      const c = await connect(proxy);
      c.sock.end(data);
      await c.ended;
      expect(sha(Buffer.concat(c.got))).toBe(sha(data));
    });
    await Promise.all(runs);
    expect(proxy.stats).toMatchObject({ connections: 4, bytesUp: 6 * MiB + 64 * 1024, bytesDown: 6 * MiB + 64 * 1024, corrupted: 0 });
    await vi.waitFor(() => expect(proxy.stats.open).toBe(0));
  });

  it('keeps bytes exact and ordered under delay and bandwidth caps', async () => {
    const { server, proxy } = await rig(true);
    proxy.setDelay(5, 'up');
    proxy.setDelay(2, 'down');
    proxy.setBandwidth(4 * MiB, 'up');
    proxy.setBandwidth(3 * MiB, 'down');
    const c = await connect(proxy);
    // many small numbered writes: any reordering or loss shows in the comparison
    const parts = Array.from({ length: 2000 }, (_, i) => Buffer.concat([Buffer.from(`#${i}:`), randomBytes(300)]));
    for (const p of parts) c.sock.write(p);
    c.sock.end();
    await c.ended;
    expect(Buffer.concat(c.got).equals(Buffer.concat(parts))).toBe(true);
  });

  it('partition up: the server hears nothing while the client still hears the server; heal delivers all in order', async () => {
    const r = await rig(false);
    const c = await pair(r);
    c.sock.write('before');
    await vi.waitFor(() => expect(Buffer.concat(c.received).toString()).toBe('before'));
    r.proxy.partition('up');
    const up = randomBytes(MiB);
    c.sock.write(up);
    const down = randomBytes(256 * 1024);
    c.s.write(down);
    await vi.waitFor(() => expect(total(c.got)).toBe(down.length));
    expect(Buffer.concat(c.got).equals(down)).toBe(true);
    await sleep(200);
    expect(total(c.received)).toBe('before'.length);
    r.proxy.heal();
    await vi.waitFor(() => expect(total(c.received)).toBe(6 + up.length));
    expect(Buffer.concat(c.received).equals(Buffer.concat([Buffer.from('before'), up]))).toBe(true);
  });

  it('partition both holds both ways on a new connection; reset closes both ends; after heal new connections work', async () => {
    const r = await rig(false);
    r.proxy.partition('both');
    const c = await pair(r);
    const serverClosed = new Promise<void>((resolve) => c.s.once('close', () => resolve()));
    c.sock.write('to server');
    c.s.write('to client');
    await sleep(200);
    expect(total(c.received)).toBe(0);
    expect(total(c.got)).toBe(0);
    expect(r.proxy.held).toBe('to server'.length + 'to client'.length);
    r.proxy.reset();
    await c.closed;
    await serverClosed;
    expect(total(c.got)).toBe(0);
    await vi.waitFor(() => expect(r.proxy.stats.open).toBe(0));
    r.proxy.heal();
    const d = await pair(r);
    d.s.write('hello');
    d.sock.end('again');
    await d.ended;
    expect(Buffer.concat(d.got).toString()).toBe('hello');
    expect(Buffer.concat(d.received).toString()).toBe('again');
  });

  it('a reset by the server reaches the client as a close, and the proxy forgets the connection', async () => {
    const r = await rig(false);
    const c = await pair(r);
    c.s.resetAndDestroy();
    await c.closed;
    await vi.waitFor(() => expect(r.proxy.stats.open).toBe(0));
  });

  it.each(['up', 'down'] as const)('corrupt %s: exactly `count` bytes differ, one bit each, from `afterBytes` on', async (dir) => {
    const r = await rig(dir === 'down');
    const c = await pair(r);
    r.proxy.corrupt(dir, { afterBytes: 100_000, count: 3 });
    const data = randomBytes(2 * MiB);
    c.sock.end(data);
    await c.ended; // the server ends once it has read all (and, echoing, sent it back)
    const out = Buffer.concat(dir === 'up' ? c.received : c.got);
    expect(out.length).toBe(data.length);
    const diffs: number[] = [];
    for (let i = 0; i < data.length; i++) if (out[i] !== data[i]) diffs.push(i);
    expect(diffs).toHaveLength(3);
    expect(diffs[0]).toBe(100_000);
    for (const i of diffs) expect([1, 2, 4, 8, 16, 32, 64, 128]).toContain(out[i]! ^ data[i]!);
    expect(r.proxy.stats.corrupted).toBe(3);
  });

  it('refuse: new connections are accepted and closed at once, without reaching the server', async () => {
    const { server, proxy } = await rig(true);
    proxy.refuse(true);
    const c = await connect(proxy);
    c.sock.write('hello');
    await Promise.race([c.ended, c.closed]); // EOF (half-open client) or a reset
    expect(total(c.got)).toBe(0);
    expect(server.sockets).toHaveLength(0);
    proxy.refuse(false);
    const d = await connect(proxy);
    d.sock.end('ok');
    await d.ended;
    expect(Buffer.concat(d.got).toString()).toBe('ok');
  });

  it('dropNew: new connections open but stay silent and never reach the server; reset closes them', async () => {
    const { server, proxy } = await rig(true);
    proxy.dropNew(true);
    const c = await connect(proxy);
    let closed = false;
    void c.closed.then(() => (closed = true));
    c.sock.write('anyone?');
    await sleep(200);
    expect(closed).toBe(false);
    expect(total(c.got)).toBe(0);
    expect(server.sockets).toHaveLength(0);
    expect(proxy.stats.open).toBe(1);
    proxy.dropNew(false);
    const d = await connect(proxy);
    d.sock.end('ok');
    await d.ended;
    expect(Buffer.concat(d.got).toString()).toBe('ok');
    expect(closed).toBe(false);
    proxy.reset();
    await c.closed;
  });

  it('backpressure: a client writing 64 MiB into a partition leaves the proxy holding a bounded amount; heal delivers all', async () => {
    const { server, proxy } = await rig(false);
    proxy.partition('up');
    const c = await pair({ server, proxy });
    // the server hashes as it reads, so the test itself holds no 64 MiB
    const hash = createHash('sha256');
    let got = 0;
    c.s.removeAllListeners('data').on('data', (d: Buffer) => {
      hash.update(d);
      got += d.length;
    });
    const block = randomBytes(MiB);
    const want = createHash('sha256');
    for (let i = 0; i < 64; i++) {
      block[0] = i;
      want.update(block);
      c.sock.write(Buffer.from(block));
    }
    await vi.waitFor(() => expect(proxy.held).toBeGreaterThan(4 * MiB), { timeout: 10_000 });
    await sleep(200);
    expect(proxy.held).toBeLessThan(5 * MiB);
    expect(got).toBe(0);
    proxy.heal();
    await vi.waitFor(() => expect(got).toBe(64 * MiB), { timeout: 30_000 });
    expect(hash.digest('hex')).toBe(want.digest('hex'));
  });
});
