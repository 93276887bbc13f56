/**
 * Per-device I/O statistics (src/core/io-stats.ts) end to end: a known sequence of I/O gives
 * exactly the expected counts, errors and bytes, and every histogram's buckets add up to its
 * count. (a) Through the library: reads, writes, a flush, discards and write-zeroes on a
 * `linear` line and an `error` line, bios refused by the contract checks, a bio queued while
 * suspended (counted once, at its dispatch), a reload and a rename (the device keeps its
 * numbers), and a device stacked on another (each counts the bios it sees). (b) The NBD server
 * in-process with two connection threads: the READs and WRITEs the threads do on the file
 * themselves are counted (nothing was passed to the main thread), and what they pass on is
 * counted once. (c) The real daemon and a real NBD client (nbdsh), with and without
 * connection threads, read through `dmkit info --json`.
 */
import fs from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import type { IoOp, IoOpStats, IoStatsSnapshot } from '../../src/core/io-stats.ts';
import { IO_OPS, LATENCY_BOUNDS_S } from '../../src/core/io-stats.ts';
import { DeviceMapper } from '../../src/index.ts';
import { deviceExports } from '../../src/nbd/provider.ts';
import { NbdServer } from '../../src/nbd/server.ts';
import { expectCode, makeImage, makeTempDir } from '../compliance/helpers.ts';
import { cleanup, image, ok as cli, sandbox } from '../helpers/daemon.ts';
import { devUri } from '../helpers/daemon-nbd.ts';
import { serveAndOpen } from '../helpers/nbd-file-provider.ts';
import { RawNbd, readData, replyErrno } from '../helpers/nbd-raw-client.ts';
import { ok, requireTools } from '../helpers/nbd-tools.ts';

const KiB = 1024;
const CMD = { READ: 0, WRITE: 1, FLUSH: 3 };

type Expected = Partial<Record<IoOp, { count: number; errors: number; bytes: number }>>;

/** the snapshot's count/errors/bytes per op are exactly `want` (ops not named: all zero), and it is consistent */
function expectStats(snap: IoStatsSnapshot, want: Expected): void {
  for (const op of IO_OPS) {
    const s: IoOpStats = snap.ops[op];
    expect({ op, count: s.count, errors: s.errors, bytes: s.bytes }).toEqual({ op, ...(want[op] ?? { count: 0, errors: 0, bytes: 0 }) });
    expect(s.buckets).toHaveLength(LATENCY_BOUNDS_S.length + 1);
    expect(s.buckets.reduce((a, b) => a + b, 0), `${op}: buckets add up to the count`).toBe(s.count);
    expect(s.seconds).toBeGreaterThanOrEqual(0);
    if (s.count === 0) expect(s.seconds).toBe(0);
  }
}

let dir: string;
const dms: DeviceMapper[] = [];
const servers: NbdServer[] = [];
const clients: RawNbd[] = [];

beforeAll(() => {
  dir = makeTempDir('dmkit-io-stats-');
});

afterAll(async () => {
  for (const c of clients) c.destroy();
  for (const s of servers) await s.close();
  for (const dm of dms) await dm.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

function engine(): DeviceMapper {
  const dm = new DeviceMapper();
  dms.push(dm);
  return dm;
}

describe('I/O statistics through the library', () => {
  test('a known sequence on a linear line and an error line gives exactly its counts and bytes', async () => {
    const img = makeImage(dir, 'lib.img', 2048, 1);
    const dm = engine();
    // bytes [0, 1 MiB): the image; [1 MiB, 2 MiB): error
    await dm.create('vol', { table: `0 2048 linear ${img} 0\n2048 2048 error` });
    const ERR = 1024 * KiB;
    expectStats(dm.ioStats('vol'), {});

    for (let i = 0; i < 3; i++) await dm.write('vol', i * 8 * KiB, Buffer.alloc(8 * KiB, i + 1));
    expect((await dm.read('vol', 0, 4 * KiB)).every((b) => b === 1)).toBe(true);
    await dm.read('vol', 8 * KiB, 4 * KiB);
    await dm.flush('vol');
    await dm.discard('vol', 0, 4 * KiB);
    await dm.writeZeroes('vol', 64 * KiB, 8 * KiB);
    // a write with a preflush is one write (its flush is part of it)
    await dm.write('vol', 32 * KiB, Buffer.alloc(4 * KiB, 9), { preflush: true, fua: true });
    const ok1 = {
      read: { count: 2, errors: 0, bytes: 8 * KiB },
      write: { count: 4, errors: 0, bytes: 28 * KiB },
      flush: { count: 1, errors: 0, bytes: 0 },
      discard: { count: 1, errors: 0, bytes: 4 * KiB },
      'write-zeroes': { count: 1, errors: 0, bytes: 8 * KiB },
    };
    expectStats(dm.ioStats('vol'), ok1);

    // failures on the error line: errors, no bytes; a bio split across both lines is one failed bio
    await expectCode(dm.read('vol', ERR, 4 * KiB), 'EIO');
    await expectCode(dm.write('vol', ERR + 4 * KiB, Buffer.alloc(4 * KiB)), 'EIO');
    await expectCode(dm.write('vol', ERR - 4 * KiB, Buffer.alloc(8 * KiB)), 'EIO');
    await expectCode(dm.discard('vol', ERR, 4 * KiB), 'EIO');
    await expectCode(dm.writeZeroes('vol', ERR, 4 * KiB), 'EIO');
    // refused by the contract checks (beyond the end, a buffer of the wrong size): failures too
    await expectCode(dm.read('vol', 2048 * KiB, 4 * KiB), 'EINVAL');
    await expectCode(dm.write('vol', 2048 * KiB - 512, Buffer.alloc(4 * KiB)), 'ENOSPC');
    await expectCode(dm.get('vol').submit({ op: 'read', sector: 0, sectors: 8, data: Buffer.alloc(512), flags: {} }), 'EINVAL');
    const failed = {
      read: { count: 2 + 3, errors: 3, bytes: 8 * KiB },
      write: { count: 4 + 3, errors: 3, bytes: 28 * KiB },
      flush: { count: 1, errors: 0, bytes: 0 },
      discard: { count: 1 + 1, errors: 1, bytes: 4 * KiB },
      'write-zeroes': { count: 1 + 1, errors: 1, bytes: 8 * KiB },
    };
    expectStats(dm.ioStats('vol'), failed);
    // an error line takes no flush: a flush still succeeds
    await dm.flush('vol');
    failed.flush.count = 2;

    // a write queued while suspended is counted once, when it runs; a reload keeps the numbers
    await dm.suspend('vol');
    const queued = dm.write('vol', 128 * KiB, Buffer.alloc(16 * KiB, 7));
    await dm.load('vol', `0 2048 linear ${img} 0\n2048 2048 error`);
    expectStats(dm.ioStats('vol'), failed);
    await dm.resume('vol');
    await queued;
    failed.write.count++;
    failed.write.bytes += 16 * KiB;
    expectStats(dm.ioStats('vol'), failed);

    // a rename keeps them
    dm.rename('vol', 'vol2');
    expectStats(dm.ioStats('vol2'), failed);
    await dm.read('vol2', 128 * KiB, 16 * KiB);
    failed.read.count++;
    failed.read.bytes += 16 * KiB;
    expectStats(dm.get('vol2').ioStats(), failed);

    // stacked: each device counts the bios it sees
    await dm.create('top', { table: '0 1024 linear dm:vol2 1024' });
    await dm.read('top', 0, 4 * KiB);
    await dm.write('top', 4 * KiB, Buffer.alloc(4 * KiB, 3));
    expectStats(dm.ioStats('top'), { read: { count: 1, errors: 0, bytes: 4 * KiB }, write: { count: 1, errors: 0, bytes: 4 * KiB } });
    failed.read.count++;
    failed.read.bytes += 4 * KiB;
    failed.write.count++;
    failed.write.bytes += 4 * KiB;
    expectStats(dm.ioStats('vol2'), failed);

    // a removed and recreated device starts from zero
    await dm.remove('top');
    await dm.create('top', { table: '0 1024 zero' });
    expectStats(dm.ioStats('top'), {});
  });

  test('a read-only device counts refused writes as failures', async () => {
    const img = makeImage(dir, 'ro.img', 256, 2);
    const dm = engine();
    await dm.create('ro', { table: `0 256 linear ${img} 0`, readOnly: true });
    await dm.read('ro', 0, 8 * KiB);
    await expectCode(dm.write('ro', 0, Buffer.alloc(4 * KiB)), 'EROFS');
    await expectCode(dm.discard('ro', 0, 4 * KiB), 'EROFS');
    expectStats(dm.ioStats('ro'), {
      read: { count: 1, errors: 0, bytes: 8 * KiB },
      write: { count: 1, errors: 1, bytes: 0 },
      discard: { count: 1, errors: 1, bytes: 0 },
    });
  });
});

async function nbdRead(c: RawNbd, offset: number, length: number): Promise<Buffer> {
  return readData(await c.roundTrip(CMD.READ, { offset, length }), offset, length);
}

async function nbdWrite(c: RawNbd, offset: number, payload: Buffer): Promise<void> {
  expect(replyErrno(await c.roundTrip(CMD.WRITE, { offset, payload }))).toBe(0);
}

describe('I/O statistics of NBD connection threads (in-process server)', { timeout: 60_000 }, () => {
  test('file I/O done on two threads is counted, what they pass on is counted once', async () => {
    const img = makeImage(dir, 'threads.img', 2048, 3);
    const dm = engine();
    // [0, 1 MiB): the file, served by the threads themselves; [1 MiB, 1.5 MiB): zero, passed to the main thread
    await dm.create('vol', { table: `0 2048 linear ${img} 0\n2048 1024 zero` });
    const server = new NbdServer(deviceExports(dm), { threads: 2 });
    servers.push(server);
    const sock = join(dir, 'threads.sock');
    const a = await serveAndOpen(server, sock, 'vol');
    clients.push(a);
    const b = await RawNbd.connect(sock);
    clients.push(b);
    await b.open('vol', { sr: true });

    // pipelined on both connections: 12 writes of 8 KiB and 5 reads of 16 KiB on a, 4 writes of 4 KiB and 6 reads of 4 KiB on b
    const ca = [
      ...Array.from({ length: 12 }, (_, i) => a.send(CMD.WRITE, { offset: i * 8 * KiB, payload: Buffer.alloc(8 * KiB, i) })),
      ...Array.from({ length: 5 }, (_, i) => a.send(CMD.READ, { offset: 512 * KiB + i * 16 * KiB, length: 16 * KiB })),
    ];
    const cb = [
      ...Array.from({ length: 4 }, (_, i) => b.send(CMD.WRITE, { offset: 256 * KiB + i * 4 * KiB, payload: Buffer.alloc(4 * KiB, 0xee) })),
      ...Array.from({ length: 6 }, (_, i) => b.send(CMD.READ, { offset: 768 * KiB + i * 4 * KiB, length: 4 * KiB })),
    ];
    const [ra, rb] = await Promise.all([a.collect(ca), b.collect(cb)]);
    for (const r of [...ra.values(), ...rb.values()]) expect(replyErrno(r)).toBe(0);
    expect(server.stats.threaded).toBe(2);
    expect(server.stats.forwarded).toBe(0); // all of it was the threads' own file I/O
    const want = {
      read: { count: 11, errors: 0, bytes: 5 * 16 * KiB + 6 * 4 * KiB },
      write: { count: 16, errors: 0, bytes: 12 * 8 * KiB + 4 * 4 * KiB },
    };
    expectStats(dm.ioStats('vol'), want);

    // passed to the main thread: a read of the zero line and a FLUSH, each counted once
    expect((await nbdRead(a, 1024 * KiB, 8 * KiB)).every((x) => x === 0)).toBe(true);
    expect(replyErrno(await b.roundTrip(CMD.FLUSH))).toBe(0);
    expect(server.stats.forwarded).toBe(2);
    want.read.count++;
    want.read.bytes += 8 * KiB;
    expectStats(dm.ioStats('vol'), { ...want, flush: { count: 1, errors: 0, bytes: 0 } });

    // a reload hands the threads new ranges; they count on into the same numbers
    await dm.load('vol', `0 2048 linear ${img} 0\n2048 1024 zero`);
    await dm.resume('vol');
    await nbdWrite(a, 0, Buffer.alloc(64 * KiB, 5));
    expect((await nbdRead(b, 0, 64 * KiB)).every((x) => x === 5)).toBe(true);
    want.read.count++;
    want.read.bytes += 64 * KiB;
    want.write.count++;
    want.write.bytes += 64 * KiB;
    expectStats(dm.ioStats('vol'), { ...want, flush: { count: 1, errors: 0, bytes: 0 } });
  });
});

describe('I/O statistics through the daemon and a real NBD client', { timeout: 60_000 }, () => {
  test.each([
    ['with a connection thread', 1],
    ['without connection threads', 0],
  ])('nbdsh\'s writes and reads show in `dmkit info --json` %s', async (_name, threads) => {
    requireTools(['nbdsh']);
    const sb = sandbox();
    try {
      await cli(sb, ['daemon', '--nbd-threads', String(threads)]);
      const img = image(sb, 'v.img', 1024 * KiB);
      await cli(sb, ['create', 'v', '--table', `0 2048 linear ${img} 0`]);
      const script = [
        'for i in range(10): h.pwrite(b"\\x5a" * 4096, i * 4096)',
        'for i in range(7): assert h.pread(8192, 65536 + i * 8192) == bytes(8192)',
        'h.flush()',
        'assert h.pread(4096, 0) == b"\\x5a" * 4096',
      ].join('\n');
      await ok('nbdsh', ['-u', devUri(sb, 'v'), '-c', script]);
      const [info] = JSON.parse(await cli(sb, ['info', 'v', '--json'])) as Array<{ name: string; io: IoStatsSnapshot }>;
      expect(info!.name).toBe('v');
      expectStats(info!.io, {
        read: { count: 8, errors: 0, bytes: 7 * 8192 + 4096 },
        write: { count: 10, errors: 0, bytes: 10 * 4096 },
        flush: { count: 1, errors: 0, bytes: 0 },
      });
    } finally {
      await cleanup(sb);
    }
  });
});
