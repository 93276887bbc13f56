/**
 * Fault and lifecycle behaviour of the built-in targets through the library engine, over
 * real image files: suspend/resume with I/O held in a delay target, the error target,
 * flakey's features, striped stripe failure and events. Images are read back with node:fs.
 */
import fs from 'node:fs';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { DeviceMapper } from '../../src/index.ts';
import { SECTOR, expectCode, expectSameBytes, makeImage, makeTempDir, prng, sleep, track, waitFor } from './helpers.ts';

const IMG_SECTORS = 8192;

let dir: string;
let img: string;
let img2: string;
let dm: DeviceMapper;
const rng = prng(42);

/** sectors [sector, sector+count) of an image, read with node:fs */
function fileSectors(file: string, sector: number, count = 1): Buffer {
  const buf = Buffer.alloc(count * SECTOR);
  const fd = fs.openSync(file, 'r');
  try {
    fs.readSync(fd, buf, 0, buf.length, sector * SECTOR);
  } finally {
    fs.closeSync(fd);
  }
  return buf;
}

const randomSectors = (count: number): Buffer => rng.fill(Buffer.alloc(count * SECTOR));
const info = (name: string): string => dm.status(name)[0]!.params;

beforeEach(() => {
  dir = makeTempDir();
  img = makeImage(dir, 'a.img', IMG_SECTORS, 7);
  img2 = makeImage(dir, 'b.img', IMG_SECTORS, 8);
  dm = new DeviceMapper();
});

afterEach(async () => {
  await dm.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('(d) suspend and resume with I/O in flight', () => {
  it('suspend waits for held writes, queues new ones, and resume issues them through the new table', async () => {
    await dm.create('vol', { table: `0 2048 delay ${img} 0 0 ${img} 0 60000` });
    const a = randomSectors(8);
    const b = randomSectors(8);
    const w1 = track(dm.write('vol', 0, a));
    const w2 = track(dm.write('vol', 8 * SECTOR, b));
    await waitFor(() => info('vol') === '0 2 0', 'two writes held by the delay target');
    expect(w1.settled || w2.settled).toBe(false);

    await dm.suspend('vol');
    expect(w1.settled && w2.settled).toBe(true);
    await Promise.all([w1.promise, w2.promise]);
    expectSameBytes(fileSectors(img, 0, 16), Buffer.concat([a, b]), 'held writes after suspend');

    const c = randomSectors(4);
    const before = fileSectors(img, 16, 4);
    const w3 = track(dm.write('vol', 16 * SECTOR, c));
    await sleep(30);
    expect(w3.settled).toBe(false);
    expect(dm.get('vol').queued).toBe(1);

    await dm.load('vol', `0 2048 linear ${img} 4096`);
    await dm.resume('vol');
    await w3.promise;
    expectSameBytes(fileSectors(img, 4096 + 16, 4), c, 'queued write under the new table');
    expectSameBytes(fileSectors(img, 16, 4), before, 'old place of the queued write');
    expectSameBytes(await dm.read('vol', 16 * SECTOR, 4 * SECTOR), c, 'read back through the new table');
  });

  it('a delay target holds again after resume, and remove issues what it holds', async () => {
    await dm.create('vol', { table: `0 1024 delay ${img} 0 60000` });
    await dm.suspend('vol');
    await dm.resume('vol');
    const data = randomSectors(2);
    const w = track(dm.write('vol', 100 * SECTOR, data));
    await waitFor(() => info('vol') === '0 1 0', 'a write held');
    const r = track(dm.read('vol', 0, SECTOR));
    await waitFor(() => info('vol') === '1 1 0', 'a read held');
    await dm.remove('vol');
    await w.promise;
    await r.promise;
    expectSameBytes(fileSectors(img, 100, 2), data, 'held write issued at remove');
  });

  it('a flush held on one stripe (a stacked delay device) holds the striped flush until released', async () => {
    await dm.create('fast', { table: `0 1024 linear ${img} 0` });
    await dm.create('slow', { table: `0 1024 delay ${img2} 0 0 ${img2} 0 0 ${img2} 0 60000` });
    await dm.create('vol', { table: `0 2048 striped 2 8 dm:fast 0 dm:slow 0` });
    const f = track(dm.flush('vol'));
    await waitFor(() => info('slow') === '0 0 1', 'the flush held on the slow stripe');
    await sleep(20);
    expect(f.settled).toBe(false);
    await dm.suspend('slow'); // presuspend releases the held flush
    await f.promise;
    expect(info('slow')).toBe('0 0 0');
    await dm.remove('vol'); // slow stays suspended: close() must not flush through its delay
  });

  it('close() does not wait on a device stacked over a suspended one; queued I/O fails ENXIO', async () => {
    await dm.create('lower', { table: `0 1024 linear ${img} 0` });
    await dm.create('upper', { table: `0 1024 linear dm:lower 0` });
    await dm.create('other', { table: `0 1024 linear ${img2} 0` });
    await dm.suspend('lower');
    expect(dm.onSuspended('upper')).toBe(true);
    expect(dm.onSuspended('other')).toBe(false);
    const queued = track(dm.write('upper', 0, Buffer.alloc(SECTOR, 0x77)));
    await sleep(20);
    expect(queued.settled).toBe(false);
    const before = fs.readFileSync(img).subarray(0, SECTOR);
    const closed = track(dm.close());
    await waitFor(() => closed.settled, 'close() finishing');
    await expectCode(queued.promise, 'ENXIO');
    expectSameBytes(fs.readFileSync(img).subarray(0, SECTOR), before, 'the queued write never landed');
    dm = new DeviceMapper(); // for afterEach
  });
});

describe('(e) faults', () => {
  it('error fails reads, writes and discards with EIO; it takes no flush, so a flush succeeds', async () => {
    await dm.create('vol', { table: '0 64 error' });
    await expectCode(dm.read('vol', 0, SECTOR), 'EIO');
    await expectCode(dm.write('vol', 0, randomSectors(1)), 'EIO');
    await dm.flush('vol');
    await expectCode(dm.discard('vol', 0, 8 * SECTOR), 'EIO');
    await expectCode(dm.writeZeroes('vol', 0, 8 * SECTOR), 'EIO');
  });

  it('flakey drop_writes while down: writes are acknowledged but the image is unchanged', async () => {
    await dm.create('vol', { table: `0 1024 flakey ${img} 0 0 1 1 drop_writes` });
    const before = fileSectors(img, 0, 64);
    await dm.write('vol', 0, randomSectors(64), { fua: true });
    await dm.flush('vol');
    expectSameBytes(fileSectors(img, 0, 64), before, 'image after dropped writes');
    expectSameBytes(await dm.read('vol', 0, 64 * SECTOR), before, 'reads still pass');
  });

  it('flakey corrupt_bio_byte r: reads return the corrupted byte; the image is unchanged', async () => {
    await dm.create('vol', { table: `0 1024 flakey ${img} 16 0 1 5 corrupt_bio_byte 700 r 171 0` });
    const before = fileSectors(img, 16, 4);
    const got = await dm.read('vol', 0, 4 * SECTOR);
    const expected = Buffer.from(before);
    expected[699] = 171;
    expectSameBytes(got, expected, 'corrupted read');
    expectSameBytes(fileSectors(img, 16, 4), before, 'image');
  });

  it('flakey corrupt_bio_byte w: the image gets the corrupted byte, the caller keeps its buffer', async () => {
    await dm.create('vol', { table: `0 1024 flakey ${img} 0 0 1 5 corrupt_bio_byte 1 w 0 0` });
    const data = randomSectors(2);
    data[0] = 0x5a;
    const copy = Buffer.from(data);
    await dm.write('vol', 10 * SECTOR, data);
    expectSameBytes(data, copy, "caller's buffer");
    const expected = Buffer.from(copy);
    expected[0] = 0;
    expectSameBytes(fileSectors(img, 10, 2), expected, 'image');
  });

  it('flakey corrupt_bio_byte with REQ_FUA in its flags corrupts only FUA writes', async () => {
    await dm.create('vol', { table: `0 1024 flakey ${img} 0 0 1 5 corrupt_bio_byte 2 w 255 131072` });
    const data = randomSectors(1);
    data[1] = 1;
    await dm.write('vol', 0, data);
    expectSameBytes(fileSectors(img, 0), data, 'plain write');
    await dm.write('vol', SECTOR, data, { fua: true });
    expect(fileSectors(img, 1)[1]).toBe(255);
  });

  it('flakey with no features fails all I/O while down; error_reads / error_writes fail one direction', async () => {
    await dm.create('all', { table: `0 512 flakey ${img} 0 0 3` });
    await expectCode(dm.read('all', 0, SECTOR), 'EIO');
    await expectCode(dm.write('all', 0, randomSectors(1)), 'EIO');
    await expectCode(dm.flush('all'), 'EIO');
    await dm.create('er', { table: `0 512 flakey ${img} 1000 0 3 1 error_reads` });
    await expectCode(dm.read('er', 0, SECTOR), 'EIO');
    const data = randomSectors(1);
    await dm.write('er', 0, data);
    expectSameBytes(fileSectors(img, 1000), data, 'write under error_reads');
    await dm.create('ew', { table: `0 512 flakey ${img} 2000 0 3 1 error_writes` });
    await expectCode(dm.write('ew', 0, data), 'EIO');
    expectSameBytes(await dm.read('ew', 0, SECTOR), fileSectors(img, 2000), 'read under error_writes');
  });

  it('flakey random_*_corrupt at probability 10^9 changes at most one byte of every bio', async () => {
    await dm.create('vol', { table: `0 1024 flakey ${img} 0 0 1 4 random_read_corrupt 1000000000 random_write_corrupt 1000000000` });
    const count = (a: Buffer, b: Buffer): number => a.reduce((n, x, i) => n + (x === b[i] ? 0 : 1), 0);
    for (let i = 0; i < 8; i++) {
      expect(count(await dm.read('vol', i * 8 * SECTOR, 8 * SECTOR), fileSectors(img, i * 8, 8))).toBeLessThanOrEqual(1);
      const data = randomSectors(8);
      const copy = Buffer.from(data);
      await dm.write('vol', (100 + i * 8) * SECTOR, data);
      expectSameBytes(data, copy, "caller's buffer");
      expect(count(fileSectors(img, 100 + i * 8, 8), copy)).toBeLessThanOrEqual(1);
    }
  });

  it('flakey status: info empty, table in the kernel form and order', async () => {
    await dm.create('vol', { table: `0 512 flakey ${img} 8 3 4 2 drop_writes error_reads\n512 512 flakey ${img} 0 1 0` });
    expect(dm.status('vol').map((l) => l.params)).toEqual(['', '']);
    expect(dm.table('vol').map((l) => l.params)).toEqual([`${img} 8 3 4 2 error_reads drop_writes`, `${img} 0 1 0 0`]);
  });

  it('striped: a failing stripe turns D and raises one event per transition', async () => {
    await dm.create('bad', { table: '0 512 error' });
    await dm.create('vol', { table: `0 1024 striped 2 16 ${img} 0 dm:bad 0` });
    const ev = dm.get('vol').eventNr;
    expect(info('vol')).toBe(`2 ${img} dm:bad 1 AA`);
    await dm.write('vol', 0, randomSectors(16));
    await expectCode(dm.write('vol', 16 * SECTOR, randomSectors(16)), 'EIO');
    expect(info('vol')).toBe(`2 ${img} dm:bad 1 AD`);
    expect(dm.get('vol').eventNr).toBe(ev + 1);
    await expectCode(dm.read('vol', 0, 32 * SECTOR), 'EIO');
    await dm.flush('vol'); // the stripe's device holds an error table, which takes no flush (as in dm)
    expect(dm.get('vol').eventNr).toBe(ev + 1);
    expect(dm.table('vol')[0]!.params).toBe(`2 16 ${img} 0 dm:bad 0`);
  });
});
