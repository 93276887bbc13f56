/**
 * The NBD client against real servers (nbdkit, qemu-nbd), through the real engine: a
 * `linear` table over an NBD URI, seeded random I/O checked against a reference model and,
 * where there is one, against the backing image read with fs. Missing tools fail the suite.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { DeviceMapper } from '../../src/index.ts';
import { NbdClient } from '../../src/nbd/client.ts';
import { nbdResolver } from '../../src/nbd/resolver.ts';
import { prng } from '../helpers/nbd-tools.ts';

const MiB = 1 << 20;
const SIZE = 64 * MiB;
let dir = '';
const servers: ChildProcess[] = [];
let counter = 0;

const checked = new Set<string>();

/** a missing tool fails the test that needs it (never a skip) */
function requireTool(cmd: string): void {
  if (checked.has(cmd)) return;
  const r = spawnSync(cmd, ['--version'], { stdio: 'ignore' });
  if (r.error || r.status !== 0) {
    throw new Error(`${cmd} is required (apt-get install -y nbdkit libnbd-bin python3-libnbd qemu-utils): ${r.error?.message ?? `exit ${r.status}`}`);
  }
  checked.add(cmd);
}

/** start a server that writes `pidFile` once it listens; resolves when it does */
async function serve(cmd: string, args: string[], pidFile: string): Promise<ChildProcess> {
  requireTool(cmd);
  const proc = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  servers.push(proc);
  let stderr = '';
  proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const deadline = Date.now() + 10_000;
  while (!fs.existsSync(pidFile) || fs.statSync(pidFile).size === 0) {
    if (proc.exitCode !== null) throw new Error(`${cmd} ${args.join(' ')} exited ${proc.exitCode}: ${stderr}`);
    if (Date.now() > deadline) throw new Error(`${cmd} did not start: ${stderr}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return proc;
}

/** nbdkit on a fresh Unix socket; returns the socket path */
async function nbdkit(args: string[]): Promise<string> {
  const n = ++counter;
  const sock = path.join(dir, `k${n}.sock`);
  await serve('nbdkit', ['-f', '--exit-with-parent', '-U', sock, '-P', path.join(dir, `k${n}.pid`), ...args], path.join(dir, `k${n}.pid`));
  return sock;
}

function unixUri(sock: string, exportName = ''): string {
  return `nbd+unix:///${exportName}?socket=${sock}`;
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

function sparseImage(name: string, size: number): string {
  const p = path.join(dir, name);
  fs.writeFileSync(p, '');
  fs.truncateSync(p, size);
  return p;
}


function fillRandom(buf: Buffer, rnd: () => number): Buffer {
  // xorshift32 seeded from rnd: fast enough for tens of MiB
  let x = ((rnd() * 4294967296) >>> 0) || 1;
  const words = buf.byteOffset % 4 === 0 ? new Uint32Array(buf.buffer, buf.byteOffset, buf.length >>> 2) : null;
  for (let i = 0; i < buf.length >>> 2; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    if (words) words[i] = x >>> 0;
    else buf.writeUInt32LE(x >>> 0, i * 4);
  }
  return buf;
}

/** compare without dumping megabytes: name the first differing sector */
function expectSame(actual: Buffer, expected: Buffer, what: string): void {
  if (actual.equals(expected)) return;
  let i = 0;
  while (i < actual.length && actual[i] === expected[i]) i++;
  throw new Error(`${what}: first difference at byte ${i} (sector ${Math.floor(i / 512)}), got ${actual[i]} expected ${expected[i]}`);
}

function engine(opts: Parameters<typeof nbdResolver>[0] = {}): DeviceMapper {
  const dm = new DeviceMapper();
  dm.addResolver(nbdResolver(opts));
  return dm;
}

async function linearOver(dm: DeviceMapper, name: string, uri: string, sectors = SIZE / 512): Promise<void> {
  await dm.create(name, { table: `0 ${sectors} linear ${uri} 0` });
}

/**
 * Seeded random I/O on `name`, mirrored into `model`: batches of concurrent, non-overlapping
 * reads (checked), writes (some FUA), write-zeroes, discards and flushes, of sizes from one
 * sector to several MiB.
 */
async function randomIo(dm: DeviceMapper, name: string, model: Buffer, seed: number, batches: number): Promise<void> {
  const rnd = prng(seed);
  const sectors = model.length / 512;
  const pickLen = (): number => {
    const r = rnd();
    if (r < 0.4) return 1 + Math.floor(rnd() * 8);
    if (r < 0.8) return 1 + Math.floor(rnd() * 256);
    if (r < 0.97) return 1 + Math.floor(rnd() * 2048);
    return 4096 + Math.floor(rnd() * 8192);
  };
  for (let b = 0; b < batches; b++) {
    const used: Array<[number, number]> = [];
    const ops: Promise<void>[] = [];
    for (let k = 0; k < 12; k++) {
      const len = pickLen();
      const start = Math.floor(rnd() * (sectors - len));
      if (used.some(([s, e]) => start < e && start + len > s)) continue;
      used.push([start, start + len]);
      const off = start * 512;
      const bytes = len * 512;
      const r = rnd();
      if (r < 0.45) {
        const data = fillRandom(Buffer.allocUnsafe(bytes), rnd);
        data.copy(model, off);
        ops.push(dm.write(name, off, data, { fua: rnd() < 0.2 }));
      } else if (r < 0.75) {
        const expected = Buffer.from(model.subarray(off, off + bytes));
        ops.push(dm.read(name, off, bytes).then((got) => expectSame(got, expected, `read ${off}+${bytes}`)));
      } else if (r < 0.87) {
        model.fill(0, off, off + bytes);
        ops.push(dm.writeZeroes(name, off, bytes, { noUnmap: rnd() < 0.5, fua: rnd() < 0.2 }));
      } else if (r < 0.97) {
        model.fill(0, off, off + bytes);
        ops.push(dm.discard(name, off, bytes));
      } else {
        ops.push(dm.flush(name));
      }
    }
    await Promise.all(ops);
  }
}

/** one big I/O across the 32 MiB split point, then the whole device against the model */
async function bigAndFull(dm: DeviceMapper, name: string, model: Buffer, seed: number): Promise<void> {
  const rnd = prng(seed);
  const off = 3 * MiB + 512;
  const big = fillRandom(Buffer.allocUnsafe(40 * MiB), rnd);
  await dm.write(name, off, big);
  big.copy(model, off);
  expectSame(await dm.read(name, off, big.length), big, 'big read');
  await dm.flush(name);
  expectSame(await dm.read(name, 0, model.length), model, 'whole device');
}

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmkit-nbdc-'));
});

afterAll(async () => {
  for (const p of servers) if (p.exitCode === null) p.kill('SIGTERM');
  await Promise.all(servers.map((p) => (p.exitCode === null ? new Promise((r) => p.once('exit', r)) : null)));
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe('NBD client: random I/O through a linear table', () => {
  it('nbdkit memory over a Unix socket (structured replies, FUA, zeroes, trim)', async () => {
    const sock = await nbdkit(['memory', '64M']);
    const dm = engine();
    await linearOver(dm, 'mem', unixUri(sock));
    const model = Buffer.alloc(SIZE);
    await randomIo(dm, 'mem', model, 1, 40);
    await bigAndFull(dm, 'mem', model, 2);
    await dm.close();
  });

  it('nbdkit file: device and backing image match the model', async () => {
    const img = sparseImage('file.img', SIZE);
    const sock = await nbdkit(['file', img]);
    const dm = engine();
    await linearOver(dm, 'file', unixUri(sock));
    const model = Buffer.alloc(SIZE);
    await randomIo(dm, 'file', model, 3, 40);
    await bigAndFull(dm, 'file', model, 4);
    await dm.close();
    expectSame(fs.readFileSync(img), model, 'file.img');
  });

  it('qemu-nbd raw (OFFSET_HOLE chunks): device and backing image match the model', async () => {
    const img = sparseImage('qemu.img', SIZE);
    const sock = path.join(dir, 'qemu.sock');
    const pid = path.join(dir, 'qemu.pid');
    await serve('qemu-nbd', ['-f', 'raw', '-k', sock, '-t', '--discard=unmap', '--pid-file', pid, img], pid);
    const dm = engine();
    await linearOver(dm, 'qemu', unixUri(sock));
    const model = Buffer.alloc(SIZE);
    await randomIo(dm, 'qemu', model, 5, 40);
    await bigAndFull(dm, 'qemu', model, 6);
    await dm.close();
    expectSame(fs.readFileSync(img), model, 'qemu.img');
  });

  it('nbdkit memory over TCP on 127.0.0.1', async () => {
    let port = 0;
    for (let attempt = 0; ; attempt++) {
      port = await freePort();
      const pid = path.join(dir, `tcp${attempt}.pid`);
      try {
        await serve('nbdkit', ['-f', '--exit-with-parent', '-i', '127.0.0.1', '-p', String(port), '-P', pid, 'memory', '64M'], pid);
        break;
      } catch (err) {
        if (attempt >= 3) throw err;
      }
    }
    const dm = engine();
    await linearOver(dm, 'tcp', `nbd://127.0.0.1:${port}/`);
    const model = Buffer.alloc(SIZE);
    await randomIo(dm, 'tcp', model, 7, 30);
    await bigAndFull(dm, 'tcp', model, 8);
    await dm.close();
  });

  it('a server without SR, FUA, WRITE_ZEROES or block status and a 64 KiB maximum payload', async () => {
    const sock = await nbdkit([
      '--no-sr', '--filter=fua', '--filter=nozero', '--filter=blocksize-policy', '--filter=noextents',
      'memory', '64M', 'zeromode=none', 'blocksize-maximum=64K', 'blocksize-error-policy=error',
    ]);
    const client = await NbdClient.connect(unixUri(sock));
    expect(client.info).toMatchObject({
      structuredReplies: false, canFua: false, canWriteZeroes: false, blockStatus: false, canFlush: true, maxPayload: 65536,
    });
    await client.close();
    const dm = engine();
    await linearOver(dm, 'plain', unixUri(sock));
    const model = Buffer.alloc(SIZE);
    await randomIo(dm, 'plain', model, 9, 30);
    await bigAndFull(dm, 'plain', model, 10);
    expect(await dm.get('plain').allocation(0, 4096)).toEqual([{ sectors: 4096, state: 'data' }]);
    await dm.close();
  });

  it('the EXPORT_NAME path of a server that is not fixed-newstyle', async () => {
    const sock = await nbdkit(['--mask-handshake=0', 'memory', '8M']);
    const client = await NbdClient.connect(unixUri(sock));
    expect(client.info).toMatchObject({ size: 8 * MiB, structuredReplies: false, blockStatus: false });
    const data = fillRandom(Buffer.allocUnsafe(MiB), prng(11));
    await client.write(data, 4096);
    const back = Buffer.alloc(MiB);
    await client.read(back, 4096);
    expectSame(back, data, 'EXPORT_NAME read');
    await client.close();
  });
});

describe('NBD client: semantics', () => {
  it('reports allocation from BLOCK_STATUS base:allocation', async () => {
    const sock = await nbdkit(['memory', '8M']);
    const dm = engine();
    await linearOver(dm, 'alloc', unixUri(sock), 16384);
    await dm.write('alloc', MiB, Buffer.alloc(64 * 1024, 0xaa));
    expect(await dm.get('alloc').allocation(0, 16384)).toEqual([
      { sectors: 2048, state: 'hole' }, { sectors: 128, state: 'data' }, { sectors: 16384 - 2176, state: 'hole' },
    ]);
    await dm.close();
  });

  it('maps server errno values to BlockError codes and recovers when they stop', async () => {
    const wflag = path.join(dir, 'err-write');
    const rflag = path.join(dir, 'err-read');
    const sock = await nbdkit([
      '--filter=error', 'memory', '8M',
      'error-pwrite=ENOSPC', 'error-pwrite-rate=100%', `error-pwrite-file=${wflag}`,
      'error-pread=EPERM', 'error-pread-rate=100%', `error-pread-file=${rflag}`,
    ]);
    const dm = engine();
    await linearOver(dm, 'err', unixUri(sock), 16384);
    const data = Buffer.alloc(8192, 0x5a);
    await dm.write('err', 0, data);
    fs.writeFileSync(wflag, '');
    fs.writeFileSync(rflag, '');
    await expect(dm.write('err', 0, Buffer.alloc(4096, 1))).rejects.toMatchObject({ code: 'ENOSPC' });
    await expect(dm.read('err', 0, 8192)).rejects.toMatchObject({ code: 'EPERM' });
    fs.rmSync(wflag);
    fs.rmSync(rflag);
    expectSame(await dm.read('err', 0, 8192), data, 'after errors');
    await dm.close();
  });

  it('treats ESHUTDOWN as a lost connection: re-sends, gives EIO if it persists, recovers', async () => {
    const flag = path.join(dir, 'err-shutdown');
    const sock = await nbdkit(['--filter=error', 'memory', '8M', 'error-pread=ESHUTDOWN', 'error-pread-rate=100%', `error-pread-file=${flag}`]);
    const dm = engine({ reconnectTimeoutMs: 2000 });
    await linearOver(dm, 'shut', unixUri(sock), 16384);
    const data = Buffer.alloc(4096, 0x33);
    await dm.write('shut', 0, data);
    fs.writeFileSync(flag, '');
    await expect(dm.read('shut', 0, 4096)).rejects.toMatchObject({ code: 'EIO', message: expect.stringMatching(/ESHUTDOWN/) });
    fs.rmSync(flag);
    expectSame(await dm.read('shut', 0, 4096), data, 'after ESHUTDOWN');
    await dm.close();
  });

  it('fails writes to a read-only export with EROFS and still reads', async () => {
    const sock = await nbdkit(['-r', 'memory', '8M']);
    const dm = engine();
    await linearOver(dm, 'ro', unixUri(sock), 16384);
    await expect(dm.write('ro', 0, Buffer.alloc(512))).rejects.toMatchObject({ code: 'EROFS' });
    await expect(dm.writeZeroes('ro', 0, 4096)).rejects.toMatchObject({ code: 'EROFS' });
    await expect(dm.discard('ro', 0, 4096)).rejects.toMatchObject({ code: 'EROFS' });
    expectSame(await dm.read('ro', 0, 4096), Buffer.alloc(4096), 'read-only read');
    await dm.flush('ro');
    await dm.close();
  });

  it('names the export and the failure when the export does not exist', async () => {
    const sock = await nbdkit(['--filter=exportname', 'memory', '1M', 'exportname=good', 'exportname-strict=true']);
    await expect(NbdClient.connect(unixUri(sock, 'bad'))).rejects.toMatchObject({ code: 'ENOENT', message: expect.stringMatching(/export 'bad'/) });
    const c = await NbdClient.connect(unixUri(sock, 'good'));
    expect(c.info.size).toBe(MiB);
    await c.close();
    const dm = engine();
    await expect(linearOver(dm, 'missing', unixUri(sock, 'bad'), 2048)).rejects.toThrow(/missing: line 1: linear: .*export 'bad'/);
    await expect(linearOver(dm, 'nosock', unixUri(path.join(dir, 'nope.sock')), 2048)).rejects.toThrow(/cannot connect to NBD server/);
    await dm.close();
  });
});

describe('NBD client: TLS-PSK', () => {
  let sock = '';
  let pskFile = '';
  let started: Promise<string> | null = null;
  // started by the first test that needs it: a missing nbdkit fails the tests, not skips them
  beforeEach(async () => {
    pskFile = path.join(dir, 'keys.psk');
    started ??= (async () => {
      fs.writeFileSync(pskFile, `alice:${'0123456789abcdef'.repeat(4)}\n`, { mode: 0o600 });
      return nbdkit(['--tls=require', `--tls-psk=${pskFile}`, 'memory', '64M']);
    })();
    sock = await started;
  });

  it('does I/O over nbds+unix with the key of the URI user', async () => {
    const dm = engine();
    await linearOver(dm, 'tls', `nbds+unix://alice@/?socket=${sock}&tls-psk-file=${pskFile}`);
    const model = Buffer.alloc(SIZE);
    await randomIo(dm, 'tls', model, 12, 15);
    await dm.flush('tls');
    expectSame(await dm.read('tls', 0, SIZE), model, 'TLS device');
    await dm.close();
  });

  it('refuses a plain client, an unknown identity and a missing key file clearly', async () => {
    await expect(NbdClient.connect(unixUri(sock))).rejects.toMatchObject({ code: 'EACCES', message: expect.stringMatching(/requires TLS/) });
    await expect(NbdClient.connect(`nbds+unix://bob@/?socket=${sock}&tls-psk-file=${pskFile}`))
      .rejects.toMatchObject({ code: 'EACCES', message: expect.stringMatching(/no key for identity 'bob'/) });
    const wrong = path.join(dir, 'wrong.psk');
    fs.writeFileSync(wrong, `alice:${'ff'.repeat(32)}\n`);
    await expect(NbdClient.connect(`nbds+unix://alice@/?socket=${sock}&tls-psk-file=${wrong}`))
      .rejects.toMatchObject({ code: 'EACCES', message: expect.stringMatching(/TLS handshake failed/) });
    await expect(NbdClient.connect(`nbds+unix://alice@/?socket=${sock}`)).rejects.toThrow(/tls-psk-file/);
  });
});
