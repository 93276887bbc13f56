/**
 * The NBD client's reconnect behaviour, through the engine, with nbdkit behind the
 * fault-injecting proxy (test/helpers/proxy.ts): a dropped connection with requests in
 * flight, a server that refuses or resets connections, a stalled connection. I/O during an
 * outage fails with EIO after the bounded retry; afterwards I/O works again and everything
 * written (and flushed) before is intact. The steps share one engine and run in order.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeEach, describe, expect, it } from 'vitest';
import { DeviceMapper } from '../../src/index.ts';
import { nbdResolver } from '../../src/nbd/resolver.ts';
import { FaultProxy } from '../helpers/proxy.ts';

const MiB = 1 << 20;
const SIZE = 64 * MiB;
const REQUEST_MAGIC = 0x25609513;
const CMD_DISC = 2;

let dir = '';
let server: ChildProcess | null = null;
let proxy: FaultProxy;
let dm: DeviceMapper;
const model = Buffer.alloc(SIZE);
let seed = 1;
/** how nbdkit ended, if it did before the end of the file (with its stderr) */
let nbdkitGone: string | null = null;

async function startNbdkit(sock: string, args: string[]): Promise<ChildProcess> {
  const probe = spawnSync('nbdkit', ['--version'], { stdio: 'ignore' });
  if (probe.error || probe.status !== 0) {
    throw new Error(`nbdkit is required (apt-get install -y nbdkit libnbd-bin python3-libnbd qemu-utils): ${probe.error?.message ?? `exit ${probe.status}`}`);
  }
  const pid = `${sock}.pid`;
  const proc = spawn('nbdkit', ['-f', '--exit-with-parent', '-U', sock, '-P', pid, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  proc.once('exit', (code, signal) => {
    nbdkitGone = `nbdkit exited (${signal ?? `status ${code}`}) during the tests: ${stderr.trim() || 'no stderr'}`;
  });
  const deadline = Date.now() + 10_000;
  while (!fs.existsSync(pid) || fs.statSync(pid).size === 0) {
    if (proc.exitCode !== null || Date.now() > deadline) throw new Error(`nbdkit did not start: ${stderr}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return proc;
}

function randomBuffer(bytes: number): Buffer {
  let x = (seed++ * 2654435761) >>> 0 || 1;
  const buf = Buffer.allocUnsafe(bytes);
  for (let i = 0; i < bytes; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    buf.writeUInt32LE(x >>> 0, i);
  }
  return buf;
}

async function write(off: number, data: Buffer): Promise<void> {
  await dm.write('r', off, data);
  data.copy(model, off);
}

async function expectModel(off: number, bytes: number, what: string): Promise<void> {
  const got = await dm.read('r', off, bytes);
  const want = model.subarray(off, off + bytes);
  if (got.equals(want)) return;
  let i = 0;
  while (got[i] === want[i]) i++;
  throw new Error(`${what}: first difference at byte ${off + i}`);
}

/** I/O issued during an outage: each must fail with EIO (never hang, never succeed) */
async function expectOutage(): Promise<void> {
  const results = await Promise.allSettled([
    dm.read('r', 0, 4096),
    dm.write('r', 40 * MiB, Buffer.alloc(4096, 0xee)),
    dm.flush('r'),
  ]);
  for (const r of results) {
    expect(r.status).toBe('rejected');
    const err = (r as PromiseRejectedResult).reason as { code?: string; message?: string };
    expect(err.code).toBe('EIO');
    expect(err.message).toMatch(/not re-established|request failed/);
  }
}

let setup: Promise<void> | null = null;

/**
 * nbdkit, the proxy in front of it and an engine with `r` = linear over the proxy. Every
 * test awaits it first, so a missing nbdkit fails each test rather than skipping them.
 */
function ready(): Promise<void> {
  setup ??= (async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmkit-nbdr-'));
    const sock = path.join(dir, 'mem.sock');
    server = await startNbdkit(sock, ['memory', '64M']);
    proxy = await FaultProxy.start({ path: sock });
    dm = new DeviceMapper();
    dm.addResolver(nbdResolver({ reconnectTimeoutMs: 1500, ioTimeoutMs: 800 }));
    await dm.create('r', { table: `0 ${SIZE / 512} linear ${proxy.uri()} 0` });
  })();
  return setup;
}

beforeEach(ready);

/** the server behind the proxy must live through every step: a failure names it, not a symptom */
afterEach(() => {
  if (nbdkitGone) throw new Error(nbdkitGone);
});

afterAll(async () => {
  await dm?.close();
  await proxy?.close();
  if (server && server.exitCode === null && server.signalCode === null) {
    const s = server;
    const exited = new Promise((r) => s.once('exit', r));
    s.kill('SIGTERM');
    // an nbdkit that ignores SIGTERM is wedged: say so (the suite fails) instead of hanging here
    let wedged = false;
    const t = setTimeout(() => {
      wedged = true;
      s.kill('SIGKILL');
    }, 5000);
    await exited;
    clearTimeout(t);
    if (wedged) throw new Error('nbdkit did not exit within 5 s of SIGTERM (wedged): killed');
  }
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe('NBD client reconnect (nbdkit behind a fault-injecting proxy)', () => {
  it('re-sends the requests in flight when the connection drops', async () => {
    await write(0, randomBuffer(4 * MiB));
    await dm.flush('r');
    const before = proxy.accepted;
    // hold the connection so every request below is certainly in flight, then cut it
    await proxy.setMode('stall');
    const ops: Promise<unknown>[] = [];
    for (let i = 0; i < 64; i++) {
      const off = 8 * MiB + i * 128 * 1024;
      const data = randomBuffer(64 * 1024 + (i % 8) * 512);
      data.copy(model, off);
      ops.push(dm.write('r', off, data, { fua: i % 5 === 0 }));
    }
    const reads = [0, MiB, 3 * MiB].map((off) => dm.read('r', off, MiB));
    await new Promise((r) => setTimeout(r, 50));
    proxy.dropAll();
    await proxy.setMode('pass');
    await Promise.all(ops);
    const got = await Promise.all(reads);
    got.forEach((b, i) => expect(b.equals(model.subarray([0, MiB, 3 * MiB][i]!, [0, MiB, 3 * MiB][i]! + MiB))).toBe(true));
    expect(proxy.accepted).toBeGreaterThan(before);
    await dm.flush('r');
    await expectModel(0, 24 * MiB, 'after the drop');
  });

  it('fails I/O with EIO while connections are refused, then works again', async () => {
    await proxy.setMode('refuse');
    proxy.dropAll();
    await expectOutage();
    // still down: a new request makes a new (failing) attempt rather than hanging
    await expect(dm.read('r', 0, 512)).rejects.toMatchObject({ code: 'EIO' });
    await proxy.setMode('pass');
    await expectModel(0, 24 * MiB, 'after refusal');
    await write(20 * MiB, randomBuffer(MiB));
    await dm.flush('r');
  });

  it('fails I/O with EIO while connections are reset at once, then works again', async () => {
    await proxy.setMode('reset');
    proxy.dropAll();
    await expectOutage();
    await proxy.setMode('pass');
    await expectModel(0, 24 * MiB, 'after resets');
  });

  it('gives up on a stalled connection (I/O timeout), fails with EIO, then recovers', async () => {
    await proxy.setMode('stall');
    await expectOutage();
    await proxy.setMode('pass');
    await expectModel(0, 24 * MiB, 'after the stall');
    await write(30 * MiB, randomBuffer(2 * MiB));
    await dm.flush('r');
    await expectModel(30 * MiB, 2 * MiB, 'new writes');
  });

  it('sends DISC on close and leaves no connection behind', async () => {
    await dm.remove('r');
    await dm.close();
    for (let i = 0; i < 100 && proxy.connections > 0; i++) await new Promise((r) => setTimeout(r, 10));
    expect(proxy.connections).toBe(0);
    const tail = proxy.clientTail();
    expect(tail.length).toBeGreaterThanOrEqual(28);
    const last = tail.subarray(tail.length - 28);
    expect(last.readUInt32BE(0)).toBe(REQUEST_MAGIC);
    expect(last.readUInt16BE(6)).toBe(CMD_DISC);
  });
});
