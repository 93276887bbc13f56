/**
 * Connection threads (src/nbd/conn-threads.ts, docs/nbd.md): a connection to a `linear`
 * over an image moves to a worker thread that does the file I/O itself. The engine's
 * semantics must not change with it: the same random I/O leaves the same bytes with and
 * without threads; suspend stops the thread's file I/O (a WRITE waits, the file is untouched)
 * and a table loaded meanwhile takes it; a reload to another file, to a table with no file
 * ranges (zero), back, and to a read-only table is followed at once (the thread never writes
 * a read-only device's file); the connection is an opener (EBUSY), and
 * `remove --force` ends it.
 */
import { mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { DeviceMapper } from '../../src/index.ts';
import { deviceExports } from '../../src/nbd/provider.ts';
import { NbdServer } from '../../src/nbd/server.ts';
import { prng, waitFor } from '../compliance/helpers.ts';
import { cleanup, daemonPid, image, ok as cli, sandbox } from '../helpers/daemon.ts';
import { devUri } from '../helpers/daemon-nbd.ts';
import { serveAndOpen } from '../helpers/nbd-file-provider.ts';
import { RawNbd, readData, replyErrno } from '../helpers/nbd-raw-client.ts';
import { ok, requireTools, sha256, writeRandomImage } from '../helpers/nbd-tools.ts';

const MiB = 1024 * 1024;
const SIZE = 4 * MiB;
const SECTORS = SIZE / 512;
const CMD = { READ: 0, WRITE: 1, FLUSH: 3 };
const FLAG_FUA = 1;
const NBD_ESHUTDOWN = 108;

let dir: string;
const dms: DeviceMapper[] = [];
const servers: NbdServer[] = [];
const clients: RawNbd[] = [];
let seq = 0;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'dmkit-nbd-threads-'));
});

afterAll(async () => {
  for (const c of clients) c.destroy();
  for (const s of servers) await s.close();
  for (const dm of dms) await dm.close();
  rmSync(dir, { recursive: true, force: true });
});

interface Setup { dm: DeviceMapper; server: NbdServer; c: RawNbd; a: string; b: string; modelA: Buffer; modelB: Buffer }

async function setup(threads: number, threadEntry?: URL): Promise<Setup> {
  const n = seq++;
  const a = join(dir, `a${n}.img`);
  const b = join(dir, `b${n}.img`);
  const modelA = Buffer.from(writeRandomImage(a, SIZE));
  const modelB = Buffer.from(writeRandomImage(b, SIZE));
  const dm = new DeviceMapper();
  dms.push(dm);
  await dm.create('vol', { table: `0 ${SECTORS} linear ${a} 0` });
  const server = new NbdServer(deviceExports(dm), { threads, threadEntry });
  servers.push(server);
  const c = await serveAndOpen(server, join(dir, `s${n}.sock`), 'vol');
  clients.push(c);
  return { dm, server, c, a, b, modelA, modelB };
}

/** this process's descriptors open on `path` */
function fdsOn(path: string): number {
  let n = 0;
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      if (readlinkSync(`/proc/self/fd/${fd}`) === path) n++;
    } catch {
      /* closed meanwhile */
    }
  }
  return n;
}

async function read(c: RawNbd, offset: number, length: number): Promise<Buffer> {
  return readData(await c.roundTrip(CMD.READ, { offset, length }), offset, length);
}

async function write(c: RawNbd, offset: number, payload: Buffer, flags = 0): Promise<number> {
  return replyErrno(await c.roundTrip(CMD.WRITE, { offset, payload, flags }));
}

describe('NBD connection threads', { timeout: 60_000 }, () => {
  test.each([
    ['on a connection thread', 1],
    ['on the main thread', 0],
  ])('random I/O leaves the model\'s bytes %s', async (_name, threads) => {
    const { server, c, a, modelA: model } = await setup(threads);
    const r = prng(4242);
    // pipelined rounds of non-overlapping writes (some FUA) and reads of other places
    for (let round = 0; round < 6; round++) {
      const cookies: bigint[] = [];
      const reads = new Map<bigint, { off: number; want: Buffer }>();
      const half = round % 2 === 0 ? 0 : SIZE / 2;
      let off = half + r.int(16) * 512;
      while (true) {
        const len = (1 + r.int(128)) * 512 * (r.int(4) === 0 ? 8 : 1);
        if (off + len > half + SIZE / 2) break;
        const payload = r.fill(Buffer.alloc(len));
        cookies.push(c.send(CMD.WRITE, { offset: off, payload, flags: r.int(5) === 0 ? FLAG_FUA : 0 }));
        payload.copy(model, off);
        off += len + r.int(8) * 512;
        const ro = (SIZE / 2 - half) + r.int((SIZE / 2 - 65536) / 512) * 512;
        const rl = (1 + r.int(128)) * 512;
        reads.set(c.send(CMD.READ, { offset: ro, length: rl }), { off: ro, want: Buffer.from(model.subarray(ro, ro + rl)) });
      }
      const got = await c.collect([...cookies, ...reads.keys()]);
      for (const k of cookies) expect(replyErrno(got.get(k)!)).toBe(0);
      for (const [k, { off: o, want }] of reads) expect(readData(got.get(k)!, o, want.length).equals(want)).toBe(true);
    }
    expect(replyErrno(await c.roundTrip(CMD.FLUSH))).toBe(0);
    expect(sha256(readFileSync(a))).toBe(sha256(model));
    expect((await read(c, 0, MiB)).equals(model.subarray(0, MiB))).toBe(true);
    expect(server.stats.threaded).toBe(threads > 0 ? 1 : 0);
    expect(server.stats.forwarded).toBe(threads > 0 ? 1 : 0); // the FLUSH (for the engine's part)
  });

  test('large READs on a thread: one OFFSET_DATA chunk each with DONE, the right bytes; a failed piece fails the READ alone', async () => {
    const { dm, server, c, a, modelA: model } = await setup(1);
    // pipelined 1 MiB + 3 sectors: five pieces read into one buffer, sent as one chunk
    const want = new Map<bigint, number>();
    for (let i = 0; i < 6; i++) {
      const off = (i % 3) * MiB + i * 512;
      want.set(c.send(CMD.READ, { offset: off, length: MiB + 3 * 512 }), off);
    }
    const got = await c.collect([...want.keys()]);
    for (const [k, off] of want) {
      const chunks = got.get(k)!;
      expect(chunks.map((r) => (r.kind === 'chunk' ? [r.type, r.flags & 1, r.data.length - 8] : r.kind))).toEqual([[1, 1, MiB + 3 * 512]]);
      expect(readData(chunks, off, MiB + 3 * 512).equals(model.subarray(off, off + MiB + 3 * 512))).toBe(true);
    }
    expect(server.stats.threaded).toBe(1);
    expect(server.stats.forwarded).toBe(0); // the thread read them itself

    // the last MiB errors: a READ whose last piece lands there gets one ERROR chunk (EIO) and
    // no data, while the thread reads its first pieces from the file; the connection serves on
    await dm.suspend('vol');
    await dm.load('vol', `0 ${SECTORS - 2048} linear ${a} 0\n${SECTORS - 2048} 2048 error`);
    await dm.resume('vol');
    const bad = await c.roundTrip(CMD.READ, { offset: SIZE - 2 * MiB + 512, length: MiB });
    expect(bad.map((r) => (r.kind === 'chunk' ? [r.type, r.flags & 1] : r.kind))).toEqual([[0x8001, 1]]);
    expect(replyErrno(bad)).toBe(5);
    expect((await read(c, SIZE - 2 * MiB - 4096, MiB)).equals(model.subarray(SIZE - 2 * MiB - 4096, SIZE - MiB - 4096))).toBe(true);
  });

  test('suspend stops the thread\'s file I/O; reloads to another file, to zero and back take effect', async () => {
    const { dm, server, c, a, b, modelA, modelB } = await setup(1);
    const x = Buffer.alloc(8192, 0x5a);
    expect(await write(c, 0, x)).toBe(0);
    expect(readFileSync(a).subarray(0, 8192).equals(x)).toBe(true);
    expect(server.stats.threaded).toBe(1);
    expect(server.stats.forwarded).toBe(0); // the thread wrote the file itself

    await dm.suspend('vol');
    const y = Buffer.alloc(4096, 0xa7);
    const pending = c.collect([c.send(CMD.WRITE, { offset: 65536, payload: y })]);
    let answered = false;
    void pending.then(() => { answered = true; });
    await new Promise((res) => setTimeout(res, 150));
    // suspended: no reply, and the write reached neither file
    expect(answered).toBe(false);
    expect(readFileSync(a).subarray(65536, 65536 + 4096).equals(modelA.subarray(65536, 65536 + 4096))).toBe(true);
    await dm.load('vol', `0 ${SECTORS} linear ${b} 0`);
    await dm.resume('vol');
    const [[, reply]] = [...(await pending).entries()];
    expect(replyErrno(reply!)).toBe(0);
    expect(readFileSync(b).subarray(65536, 65536 + 4096).equals(y)).toBe(true);
    expect(readFileSync(a).subarray(65536, 65536 + 4096).equals(modelA.subarray(65536, 65536 + 4096))).toBe(true);
    // the write waited on the main thread; the thread now reads B itself: B's bytes at 0,
    // not the X written to A
    const fwd = server.stats.forwarded;
    expect(fwd).toBe(1);
    expect((await read(c, 0, 8192)).equals(modelB.subarray(0, 8192))).toBe(true);
    expect(server.stats.forwarded).toBe(fwd);

    // a table without file ranges: everything goes through the engine
    await dm.load('vol', `0 ${SECTORS} zero`);
    await dm.resume('vol');
    expect((await read(c, 0, 8192)).equals(Buffer.alloc(8192))).toBe(true);
    expect(await write(c, 131072, Buffer.alloc(4096, 1))).toBe(0); // the zero target drops it
    expect(server.stats.forwarded).toBe(fwd + 2);

    // and back to A, at an offset
    await dm.load('vol', `0 ${SECTORS - 16} linear ${a} 16`);
    await dm.resume('vol');
    expect((await read(c, 0, 8192 - 16 * 512)).equals(x.subarray(16 * 512))).toBe(true);
    expect(await write(c, 0, Buffer.alloc(512, 0x33), FLAG_FUA)).toBe(0);
    expect(readFileSync(a).subarray(16 * 512, 17 * 512).equals(Buffer.alloc(512, 0x33))).toBe(true);
    expect(readFileSync(a).subarray(131072 + 8192, 131072 + 8192 + 4096).equals(modelA.subarray(131072 + 8192, 131072 + 8192 + 4096))).toBe(true);
    expect(server.stats.forwarded).toBe(fwd + 2);

    // reloaded read-only: the thread does not write, the engine refuses
    await dm.load('vol', `0 ${SECTORS} linear ${a} 0`, { readOnly: true });
    await dm.resume('vol');
    const before = readFileSync(a);
    expect(await write(c, 0, Buffer.alloc(4096, 0x77))).not.toBe(0);
    expect(readFileSync(a).equals(before)).toBe(true);
    expect((await read(c, 0, 8192)).equals(x)).toBe(true); // reads still come from the file
    expect(server.stats.threaded).toBe(1);
  });

  test('a table with file lines and other lines: the thread serves the file lines, the engine the rest', async () => {
    const { dm, server, c, a, b, modelA, modelB } = await setup(1);
    const half = SECTORS / 2;
    await dm.suspend('vol');
    await dm.load('vol', `0 ${half} zero\n${half} ${half} linear ${b} 0`);
    await dm.resume('vol');
    expect(server.stats.threaded).toBe(1);
    const fwd = server.stats.forwarded;
    // the linear half, by the thread itself
    expect((await read(c, SIZE / 2, 65536)).equals(modelB.subarray(0, 65536))).toBe(true);
    expect(await write(c, SIZE / 2 + 65536, Buffer.alloc(4096, 0x3c))).toBe(0);
    expect(readFileSync(b).subarray(65536, 65536 + 4096).equals(Buffer.alloc(4096, 0x3c))).toBe(true);
    expect(server.stats.forwarded).toBe(fwd);
    // the zero half, and a READ across both halves, by the engine
    expect((await read(c, 0, 65536)).equals(Buffer.alloc(65536))).toBe(true);
    const across = await read(c, SIZE / 2 - 4096, 8192);
    expect(across.subarray(0, 4096).equals(Buffer.alloc(4096))).toBe(true);
    expect(across.subarray(4096).equals(modelB.subarray(0, 4096))).toBe(true);
    expect(server.stats.forwarded).toBe(fwd + 2);
    expect(readFileSync(a).equals(modelA)).toBe(true); // the old table's file, untouched
  });

  test('resume of a running device leaves the thread\'s file I/O alone (nothing was stopped)', async () => {
    // file I/O through libuv's pool, so READs are in flight on the thread's descriptors
    // while resume runs; a resume that swapped the thread's ranges anyway closed them under
    // those READs
    process.env.DMKIT_SYNC_IO = '0';
    let s: Setup;
    try {
      s = await setup(1);
    } finally {
      delete process.env.DMKIT_SYNC_IO;
    }
    const { dm, server, c, modelA } = s;
    const r = prng(99);
    for (let round = 0; round < 20; round++) {
      const reads = new Map<bigint, number>();
      for (let i = 0; i < 48; i++) {
        const off = r.int((SIZE - 65536) / 512) * 512;
        reads.set(c.send(CMD.READ, { offset: off, length: 65536 }), off);
      }
      await dm.resume('vol');
      await dm.resume('vol');
      const got = await c.collect([...reads.keys()]);
      for (const [k, off] of reads) expect(readData(got.get(k)!, off, 65536).equals(modelA.subarray(off, off + 65536))).toBe(true);
    }
    expect(server.stats.forwarded).toBe(0);
    expect(server.stats.threaded).toBe(1);
  });

  test('a thread that cannot start: its connection closes, later ones are served on the main thread', async () => {
    const broken = join(dir, 'broken-entry.mjs');
    writeFileSync(broken, "throw new Error('connection thread cannot start');\n");
    const { dm, server, c, a, modelA } = await setup(1, pathToFileURL(broken));
    // the client handed to the dead thread is not left hanging: its connection closes
    await expect(c.roundTrip(CMD.READ, { offset: 0, length: 4096 })).rejects.toThrow();
    expect(server.stats.threaded).toBe(1);
    await waitFor(() => dm.get('vol').openCount === 0, 'the connection to let go of vol');
    expect(dm.get('vol').openCount).toBe(0);
    const c2 = await RawNbd.connect(join(dir, `s${seq - 1}.sock`));
    clients.push(c2);
    await c2.open('vol', { sr: true });
    expect((await read(c2, 4096, 8192)).equals(modelA.subarray(4096, 4096 + 8192))).toBe(true);
    expect(await write(c2, 0, Buffer.alloc(4096, 0x66))).toBe(0);
    expect(readFileSync(a).subarray(0, 4096).equals(Buffer.alloc(4096, 0x66))).toBe(true);
    expect(server.stats.threaded).toBe(1);
    expect(dm.get('vol').openCount).toBe(1);
  });

  test('a thread that dies mid-transfer: its client sees a close, acknowledged writes stand, nothing of it is left open', async () => {
    // the real thread entry, which dies (an uncaught error) once the test creates `trigger`
    const trigger = join(dir, 'crash-now');
    const crashing = join(dir, 'crashing-entry.mjs');
    const realEntry = new URL('../../src/nbd/conn-worker-entry.mjs', import.meta.url).href;
    writeFileSync(crashing, [
      "import { existsSync } from 'node:fs';",
      `await import(${JSON.stringify(realEntry)});`,
      `setInterval(() => { if (existsSync(${JSON.stringify(trigger)})) throw new Error('connection thread crashed'); }, 5);`,
      '',
    ].join('\n'));
    const { dm, server, c, a, modelA } = await setup(1, pathToFileURL(crashing));
    const BLOCK = 4096;
    const acked: number[] = [];
    let sent = 0;
    const pattern = (i: number): Buffer => Buffer.alloc(BLOCK, (i % 251) + 1);
    const sendNext = (): void => {
      if (sent < SIZE / BLOCK) c.send(CMD.WRITE, { offset: sent * BLOCK, payload: pattern(sent++) });
    };
    for (let i = 0; i < 16; i++) sendNext();
    const connected = fdsOn(a); // the device's descriptors and the thread's own
    let closed = false;
    while (!closed) {
      try {
        const r = await c.readReply();
        expect(r.kind === 'simple' && r.errno).toBe(0);
        acked.push(Number(r.cookie) - 1); // cookies count from 1, in send order
        if (acked.length === 32) writeFileSync(trigger, '');
        sendNext();
      } catch {
        closed = true;
      }
    }
    rmSync(trigger);
    // the crash came mid-stream: some writes were answered, not all
    expect(acked.length).toBeGreaterThanOrEqual(32);
    expect(acked.length).toBeLessThan(SIZE / BLOCK);
    const onDisk = readFileSync(a);
    for (const i of acked) expect(onDisk.subarray(i * BLOCK, (i + 1) * BLOCK).equals(pattern(i))).toBe(true);
    expect(onDisk.subarray(sent * BLOCK).equals(modelA.subarray(sent * BLOCK))).toBe(true);
    // the connection is no longer an opener, and the thread's descriptors did not leak
    await waitFor(() => dm.get('vol').openCount === 0, 'the connection to let go of vol');
    expect(dm.get('vol').openCount).toBe(0);
    const afterCrash = fdsOn(a);
    expect(afterCrash).toBeLessThan(connected);
    // a new connection goes to a new thread, which serves the device as written
    const c2 = await RawNbd.connect(join(dir, `s${seq - 1}.sock`));
    clients.push(c2);
    await c2.open('vol', { sr: true });
    const last = acked[acked.length - 1]!;
    expect((await read(c2, last * BLOCK, BLOCK)).equals(pattern(last))).toBe(true);
    expect(server.stats.threaded).toBe(2);
    expect(fdsOn(a)).toBe(connected);
    c2.destroy();
    await waitFor(() => dm.get('vol').openCount === 0, 'the connection to let go of vol');
    expect(fdsOn(a)).toBe(afterCrash); // what a connection that ended normally leaves
    // the image is free again once the device goes: another device can lock it
    await dm.remove('vol');
    await dm.create('again', { table: `0 ${SECTORS} linear ${a} 0` });
    expect((await dm.read('again', last * BLOCK, BLOCK)).equals(pattern(last))).toBe(true);
    await dm.remove('again');
    expect(fdsOn(a)).toBe(0);
  });

  test('a threaded connection is an opener; remove --force ends it', async () => {
    const { dm, server, c } = await setup(1);
    expect((await read(c, 0, 4096)).length).toBe(4096);
    expect(server.stats.threaded).toBe(1);
    expect(dm.get('vol').openCount).toBe(1);
    await expect(dm.remove('vol')).rejects.toMatchObject({ code: 'EBUSY' });
    const closed = new Promise<void>((res) => c.socket.once('close', () => res()));
    await dm.remove('vol', { force: true });
    // the export went away: a request now gets ESHUTDOWN, or the connection is already closing
    const reply = await c.roundTrip(CMD.READ, { offset: 0, length: 4096 }).catch(() => null);
    if (reply) expect(replyErrno(reply)).toBe(NBD_ESHUTDOWN);
    await closed;
    for (let i = 0; i < 100 && server.connections > 0; i++) await new Promise((res) => setTimeout(res, 20));
    expect(server.connections).toBe(0);
  });
});

describe('dmkit daemon --nbd-threads', { timeout: 60_000 }, () => {
  test('starts that many connection threads, and serves the same bytes with none', async () => {
    requireTools(['nbdcopy']);
    const tasks: number[] = [];
    for (const threads of [0, 1, 3]) {
      const sb = sandbox();
      try {
        await cli(sb, ['daemon', '--nbd-threads', String(threads)]);
        const img = image(sb, 'v.img', 4 * MiB, (i) => (i * 31 + 7) & 255);
        await cli(sb, ['create', 'v', '--table', `0 ${(4 * MiB) / 512} linear ${img} 0`]);
        const out = join(sb.dir, 'out.img');
        await ok('nbdcopy', [devUri(sb, 'v'), out]);
        expect(sha256(readFileSync(out))).toBe(sha256(readFileSync(img)));
        tasks.push(readdirSync(`/proc/${daemonPid(sb)}/task`).length);
      } finally {
        await cleanup(sb);
      }
    }
    // the same daemon but for its connection threads: each adds the same (a worker thread
    // and what Node runs beside it)
    const each = tasks[1]! - tasks[0]!;
    expect(each).toBeGreaterThanOrEqual(1);
    expect(tasks[2]! - tasks[0]!).toBe(3 * each);
  });
});
