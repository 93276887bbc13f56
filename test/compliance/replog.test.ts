/**
 * Replication log compliance: one suite run against every log type (created through the
 * registry, as the replicator does; `ringbuffer` for now), on real files, every entry read
 * back compared with an independent reference list. Then what only the ring on disk must
 * do, checked by changing its bytes where the documented format (docs/formats/replog.md)
 * puts them: torn and corrupt entries, stale entries of an older log, open modes and their
 * messages, resize, device faults through the engine's own targets, bounded memory.
 */
import fs from 'node:fs';
import path from 'node:path';
import v8 from 'node:v8';
import vm from 'node:vm';
import { crc32c } from '@node-rs/crc32';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { FileDev } from '../../src/core/file-dev.ts';
import { log } from '../../src/core/log.ts';
import type { BlockDev } from '../../src/core/types.ts';
import { DeviceMapper } from '../../src/index.ts';
import { createReplog, listReplogs, registerReplog, unregisterReplog } from '../../src/replog/registry.ts';
import type { AppendEntry, CheckpointState, Replog, ReplogContext, ReplogEntry, ReplogReader, ReplogType } from '../../src/replog/types.ts';
import { makeTempDir, prng } from './helpers.ts';

const SECTOR = 512;
/** sectors before the ring area: header and two checkpoint slots (the documented layout) */
const DATA_SECTOR = 24;
const MIN = 4096;
const EMPTY = Buffer.alloc(0);

interface Fixture {
  dir: string;
  dm: DeviceMapper;
  files: FileDev[];
  events: number;
}

let fx: Fixture;

beforeEach(() => {
  fx = { dir: makeTempDir('dmkit-replog-'), dm: new DeviceMapper(), files: [], events: 0 };
});

afterEach(async () => {
  closeFiles();
  await fx.dm.close();
  fs.rmSync(fx.dir, { recursive: true, force: true });
});

function closeFiles(): void {
  for (const f of fx.files.splice(0)) f.close();
}

function ctx(): ReplogContext {
  return {
    device: 'repl',
    open: async (ref: string): Promise<BlockDev> => {
      if (ref.startsWith('dm:')) return fx.dm.get(ref.slice(3));
      const open = fx.files.find((f) => f.path === ref); // shared, as the engine shares devices
      if (open) return open;
      const f = FileDev.open(ref, ref);
      fx.files.push(f);
      return f;
    },
    event: () => void fx.events++,
    log: log('replog-test'),
  };
}

/** a sparse file of `sectors` */
function file(sectors: number, name = `rlog-${Math.random().toString(36).slice(2)}`): string {
  const f = path.join(fx.dir, name);
  fs.writeFileSync(f, EMPTY);
  fs.truncateSync(f, sectors * SECTOR);
  return f;
}

interface Impl {
  type: string;
  /** arguments of a new log of `sectors` on new storage */
  fresh(sectors: number): string[];
  /** arguments that open that log again */
  reopen(fresh: readonly string[]): string[];
}

const IMPLS: Impl[] = [
  { type: 'ringbuffer', fresh: (s) => [file(s + 64), '0', 'create', String(s)], reopen: (a) => [a[0]!, a[1]!, 'open'] },
];

/** The process stops here: nothing more is written (no checkpoint), files are closed. */
async function crash(rl: Replog): Promise<void> {
  await rl.destroy();
  closeFiles();
}

async function refused(p: Promise<unknown>): Promise<{ code: string; message: string }> {
  const err = await p.then(() => null, (e: { code: string; message: string }) => e);
  expect(err, 'expected a rejection').not.toBeNull();
  return err!;
}

type Rng = ReturnType<typeof prng>;

/** a random entry: mostly writes of 1…maxSectors sectors, some discards, write-zeroes, flushes */
function randomEntry(rng: Rng, maxSectors: number): AppendEntry {
  const kind = rng.int(16);
  const base = { devNr: rng.int(256), sector: rng.int(1 << 30), epoch: rng.int(1000), fua: rng.int(4) === 0 };
  if (kind === 0) return { ...base, op: 'flush', sector: 0, sectors: 0, data: EMPTY };
  if (kind === 1) return { ...base, op: 'discard', sectors: 1 + rng.int(1 << 20), data: EMPTY };
  if (kind === 2) return { ...base, op: 'write-zeroes', sectors: 1 + rng.int(4096), data: EMPTY };
  const sectors = 1 + rng.int(maxSectors);
  return { ...base, op: 'write', sectors, data: rng.fill(Buffer.alloc(sectors * SECTOR)) };
}

function write(sectors: number, fill: number, sector = 0): AppendEntry {
  return { devNr: 1, op: 'write', sector, sectors, data: Buffer.alloc(sectors * SECTOR, fill), epoch: 1, fua: false };
}

function expectEntry(got: ReplogEntry | null, want: AppendEntry, seq: number): void {
  expect(got, `entry ${seq}`).not.toBeNull();
  const { data, payloadCrc, ...fields } = got!;
  // a log that hands out its CRC hands out the one that checks these bytes
  if (payloadCrc) expect(crc32c(data, payloadCrc.seed), `entry ${seq} payloadCrc`).toBe(payloadCrc.crc);
  expect({ ...fields, time: 0 }).toEqual({ seq, devNr: want.devNr, op: want.op, sector: want.sector, sectors: want.sectors, epoch: want.epoch, fua: want.fua, time: 0 });
  expect(data.equals(want.op === 'write' ? want.data : EMPTY), `entry ${seq} data`).toBe(true);
}

/** read `count` entries from `r` and compare them with ref (seq → entry) */
async function readAll(r: ReplogReader, ref: ReadonlyMap<number, AppendEntry>, count: number): Promise<void> {
  for (let i = 0; i < count; i++) {
    const seq = r.seq;
    expectEntry(await r.next(), ref.get(seq)!, seq);
  }
}

const state = (localDone: number, ...seqs: number[]): CheckpointState => ({
  localDone, slinks: seqs.map((seq, i) => ({ slink: i + 1, seq, mode: 'ship' as const })),
});

describe.each(IMPLS)('replog compliance: $type', (impl) => {
  async function fresh(sectors = MIN): Promise<{ rl: Replog; args: string[] }> {
    const args = impl.fresh(sectors);
    const rl = await createReplog(impl.type, ctx(), args);
    const rec = await rl.recover();
    expect(rec).toEqual({ state: null, head: 0, entries: 0, tornTail: false });
    return { rl, args };
  }

  async function reopen(args: readonly string[]): Promise<Replog> {
    return createReplog(impl.type, ctx(), impl.reopen(args));
  }

  it('starts empty, appends in call order with consecutive seqs, reads back in order', async () => {
    const { rl } = await fresh();
    expect([rl.type, rl.size, rl.head, rl.tail, rl.used()]).toEqual([impl.type, MIN, 0, 1, 0]);
    expect(await rl.reader(1).next()).toBeNull();
    const rng = prng(1);
    const ref = new Map<number, AppendEntry>();
    const entries = Array.from({ length: 60 }, () => randomEntry(rng, 64));
    const t0 = Date.now();
    const seqs = await Promise.all(entries.map((e) => rl.append(e)));
    expect(seqs).toEqual(entries.map((_, i) => i + 1));
    entries.forEach((e, i) => ref.set(i + 1, e));
    expect([rl.head, rl.tail]).toEqual([60, 1]);
    expect(rl.used()).toBeGreaterThan(60);
    const r = rl.reader(1);
    for (let seq = 1; seq <= 60; seq++) {
      const got = await r.next();
      expectEntry(got, ref.get(seq)!, seq);
      expect(got!.time).toBeGreaterThanOrEqual(t0);
      expect(got!.time).toBeLessThanOrEqual(Date.now());
    }
    expect(await r.next()).toBeNull();
    await rl.append(write(3, 7));
    ref.set(61, write(3, 7));
    await readAll(r, ref, 1);
    const mid = rl.reader(30);
    expect(mid.seq).toBe(30);
    await readAll(mid, ref, 32);
    expect(() => rl.reader(63)).toThrow(expect.objectContaining({ code: 'EINVAL' }));
    await rl.destroy();
  });

  it('resolves appends in seq order, each only once every earlier entry is written', async () => {
    // the first 64 KiB of the ring (entries 1-16) sit behind a delay target: later ones finish first
    const f = file(MIN + 64);
    const fast = DATA_SECTOR + 128;
    await fx.dm.create('slowring', { table: `0 ${fast} delay ${f} 0 0 ${f} 0 150\n${fast} ${MIN + 64 - fast} linear ${f} ${fast}` });
    const rl = await createReplog(impl.type, ctx(), ['dm:slowring', '0', 'create', String(MIN)]);
    await rl.recover();
    const order: number[] = [];
    const all = Array.from({ length: 40 }, (_, i) => rl.append(write(7, i)).then((seq) => void order.push(seq)));
    await new Promise((r) => setTimeout(r, 50));
    expect(order).toEqual([]); // entries 17… are written, but 1…16 are not yet
    await Promise.all(all);
    expect(order).toEqual(Array.from({ length: 40 }, (_, i) => i + 1));
    await rl.destroy();
  });

  it('refuses with ENOSPC when full (writing nothing) and EINVAL when an entry can never fit', async () => {
    const { rl } = await fresh();
    const big = await refused(rl.append(write(MIN, 1)));
    expect(big.code).toBe('EINVAL');
    let n = 0;
    for (;;) {
      const err = await rl.append(write(128, n)).then(() => null, (e: { code: string }) => e);
      if (err) {
        expect(err.code).toBe('ENOSPC');
        break;
      }
      n++;
    }
    expect(rl.head).toBe(n);
    const used = rl.used();
    expect(used).toBeGreaterThan(MIN - DATA_SECTOR - 2 * 129);
    expect((await refused(rl.append(write(128, 0)))).code).toBe('ENOSPC');
    expect([rl.head, rl.used()]).toEqual([n, used]);
    // positions at 5: entries 1-5 go, 6… stay
    await rl.checkpoint(state(n, 5));
    expect(rl.tail).toBe(6);
    expect(rl.used()).toBeLessThan(used);
    expect(await rl.append(write(128, 99))).toBe(n + 1);
    await rl.destroy();
  });

  it('frees only what a persisted checkpoint no longer needs', async () => {
    const { rl, args } = await fresh();
    const ref = new Map<number, AppendEntry>();
    for (let i = 1; i <= 20; i++) {
      ref.set(i, write(8, i));
      await rl.append(ref.get(i)!);
    }
    const behind = rl.reader(3);
    await rl.checkpoint({ localDone: 20, slinks: [{ slink: 1, seq: 12, mode: 'ship' }, { slink: 2, seq: 7, mode: 'log' }] });
    expect(rl.tail).toBe(8); // the lowest position (slink 2 at 7) + 1
    expect((await refused(behind.next())).code).toBe('EOVERFLOW');
    expect(() => rl.reader(7)).toThrow(expect.objectContaining({ code: 'EOVERFLOW' }));
    await readAll(rl.reader(8), ref, 13);
    // positions going back never bring entries back; the tail stays
    await rl.checkpoint(state(20, 2));
    expect(rl.tail).toBe(8);
    await expect(rl.checkpoint(state(21))).rejects.toMatchObject({ code: 'EINVAL' });
    await crash(rl);
    const again = await reopen(args);
    const rec = await again.recover();
    expect(rec).toEqual({ state: state(20, 2), head: 20, entries: 13, tornTail: false });
    expect(again.tail).toBe(8);
    await readAll(again.reader(8), ref, 13);
    await again.destroy();
  });

  it('wraps around many times with entries of varied sizes, recovering on the way', async () => {
    const { args, ...first } = await fresh(); // a 2 MiB log: the ring wraps every ~2 MiB
    const rng = prng(7);
    const ref = new Map<number, AppendEntry>();
    let rl = first.rl;
    let reader = rl.reader(1);
    let appended = 0;
    let laps = 0;
    while (appended < 48 * 1024 * 1024) {
      // fill until full, with entries up to 768 KiB (some written from the caller's buffer)
      for (;;) {
        const e = randomEntry(rng, rng.int(8) === 0 ? 1536 : 64);
        const seq = await rl.append(e).catch((err: { code: string }) => {
          expect(err.code).toBe('ENOSPC');
          return 0;
        });
        if (seq === 0) break;
        expect(seq).toBe(rl.head);
        ref.set(seq, e);
        appended += e.data.length + SECTOR;
      }
      // ship most of it, keep a few entries across the wrap
      const ship = Math.max(0, rl.head - reader.seq + 1 - rng.int(4));
      await readAll(reader, ref, ship);
      await rl.checkpoint(state(rl.head, reader.seq - 1));
      for (const s of ref.keys()) if (s < rl.tail) ref.delete(s);
      if (++laps % 6 === 0) {
        const head = rl.head;
        await crash(rl);
        rl = await reopen(args);
        const rec = await rl.recover();
        expect(rec.head).toBe(head);
        expect(rec.tornTail).toBe(false);
        expect(rec.entries).toBe(ref.size);
        reader = rl.reader(rl.tail);
      }
    }
    expect(laps).toBeGreaterThan(20);
    await readAll(reader, ref, rl.head - reader.seq + 1);
    expect(await reader.next()).toBeNull();
    await rl.destroy();
  }, 30_000);

  it('recovers after a crash: the last checkpoint and every entry after it', async () => {
    const { rl, args } = await fresh();
    const rng = prng(3);
    const ref = new Map<number, AppendEntry>();
    for (let i = 1; i <= 40; i++) {
      ref.set(i, randomEntry(rng, 32));
      await rl.append(ref.get(i)!);
    }
    const cp = { localDone: 30, slinks: [{ slink: 0, seq: 30, mode: 'ship' as const }, { slink: 3, seq: 10, mode: 'log' as const }] };
    await rl.checkpoint(cp);
    for (let i = 41; i <= 50; i++) {
      ref.set(i, randomEntry(rng, 32));
      await rl.append(ref.get(i)!);
    }
    const used = rl.used();
    await rl.flush();
    await crash(rl);
    const again = await reopen(args);
    expect([again.size, again.head]).toEqual([MIN, 0]);
    await expect(again.append(write(1, 1))).rejects.toMatchObject({ code: 'EINVAL' }); // recover() first
    expect(await again.recover()).toEqual({ state: cp, head: 50, entries: 40, tornTail: false });
    expect([again.head, again.tail, again.used()]).toEqual([50, 11, used]);
    await readAll(again.reader(11), ref, 40);
    expect(await again.append(write(2, 2))).toBe(51);
    await expect(again.recover()).rejects.toMatchObject({ code: 'EINVAL' });
    await again.destroy();
  });

  it('checkpoints while appends are in flight, up to one still being written', async () => {
    const { rl, args } = await fresh();
    const ref = new Map<number, AppendEntry>();
    for (let i = 1; i <= 10; i++) ref.set(i, write(4, i));
    const first = Promise.all([1, 2, 3, 4, 5].map((i) => rl.append(ref.get(i)!)));
    await first;
    const later = Promise.all([6, 7, 8, 9, 10].map((i) => rl.append(ref.get(i)!)));
    await rl.checkpoint(state(5)); // tail 6: an entry whose append has not resolved yet
    expect(rl.tail).toBe(6);
    expect(await later).toEqual([6, 7, 8, 9, 10]);
    await rl.checkpoint(state(10)); // everything: the ring is empty
    expect([rl.tail, rl.used()]).toEqual([11, 0]);
    ref.set(11, write(4, 11));
    expect(await rl.append(ref.get(11)!)).toBe(11);
    await crash(rl);
    const again = await reopen(args);
    expect(await again.recover()).toEqual({ state: state(10), head: 11, entries: 1, tornTail: false });
    await readAll(again.reader(11), ref, 1);
    await again.destroy();
  });

  it('after a restart, reads from any kept seq and checkpoints anywhere (nothing of it cached)', async () => {
    const { rl, args } = await fresh(MIN * 4);
    const rng = prng(11);
    const ref = new Map<number, AppendEntry>();
    for (let i = 1; i <= 1500; i++) {
      ref.set(i, randomEntry(rng, 12));
      await rl.append(ref.get(i)!);
    }
    await crash(rl);
    let again = await reopen(args);
    expect((await again.recover()).head).toBe(1500);
    for (const from of [1, 2, 77, 640, 1499, 1500]) await readAll(again.reader(from), ref, Math.min(40, 1501 - from));
    expect(await again.reader(1501).next()).toBeNull();
    await crash(again);
    again = await reopen(args);
    await again.recover();
    await again.checkpoint(state(1500, 899)); // the tail's position and back link come from a walk
    expect(again.tail).toBe(900);
    await crash(again);
    again = await reopen(args);
    expect(await again.recover()).toEqual({ state: state(1500, 899), head: 1500, entries: 601, tornTail: false });
    await readAll(again.reader(900), ref, 601);
    await again.destroy();
  });

  it('serves a reader far behind the head from the device once the cache dropped its entries', async () => {
    const { rl } = await fresh(81920); // 40 MiB
    const payload = (i: number): Buffer => Buffer.alloc(64 * 1024, i & 0xff);
    for (let i = 1; i <= 480; i++) { // 30 MiB: the first ~14 MiB are no longer cached
      await rl.append({ devNr: 2, op: 'write', sector: i, sectors: 128, data: payload(i), epoch: 0, fua: false });
    }
    const r = rl.reader(1);
    const held: ReplogEntry[] = [];
    for (let i = 1; i <= 480; i++) {
      const e = await r.next();
      expect([e!.seq, e!.sector]).toEqual([i, i]);
      held.push(e!);
    }
    // entries handed out stay intact while held (each window is its own buffer)
    held.forEach((e, i) => expect(e.data.equals(payload(i + 1)), `entry ${i + 1}`).toBe(true));
    await rl.destroy();
  });

  it('prints a table its type accepts back for the same log, and <used>/<size>', async () => {
    const { rl } = await fresh();
    await rl.append(write(16, 1));
    const words = rl.status('table').split(' ');
    expect(rl.status('info')).toBe(`${rl.used()}/${MIN}`);
    await rl.destroy();
    const again = await createReplog(impl.type, ctx(), words);
    expect(again.status('table')).toBe(words.join(' '));
    expect((await again.recover()).head).toBe(1);
    expect(again.status('info')).toBe(`${again.used()}/${MIN}`);
    await again.destroy();
  });

  it('keeps memory bounded: 200 MiB through a 16 MiB ring', async () => {
    v8.setFlagsFromString('--expose-gc');
    const gc = vm.runInNewContext('gc') as () => void;
    const { rl } = await fresh(32768);
    const reader = rl.reader(1);
    const payload = Buffer.alloc(64 * 1024, 0x5a);
    gc();
    const base = process.memoryUsage().arrayBuffers;
    let peak = 0;
    for (let i = 1; i <= 3200; i++) {
      await rl.append({ devNr: 0, op: 'write', sector: i * 128, sectors: 128, data: payload, epoch: i, fua: false });
      if (i % 16 === 0) {
        for (let e = await reader.next(); e; e = await reader.next()) expect(e.sector).toBe(e.seq * 128);
        await rl.checkpoint(state(rl.head, reader.seq - 1));
      }
      if (i % 400 === 0) {
        gc();
        peak = Math.max(peak, process.memoryUsage().arrayBuffers - base);
      }
    }
    expect(rl.head).toBe(3200);
    expect(peak).toBeLessThan(64 * 1024 * 1024);
    await rl.destroy();
  }, 20_000);
});

// ---------------------------------------------------------------------------------------
// The ring on disk

/** ring byte offset of entry `k` (1-based) in a new log whose entries are all `bytes` long */
const entryAt = (k: number, bytes: number): number => DATA_SECTOR * SECTOR + (k - 1) * bytes;

describe('ringbuffer on disk', () => {
  async function fresh(f: string, sectors = MIN, mode = 'create'): Promise<Replog> {
    const rl = await createReplog('ringbuffer', ctx(), [f, '0', mode, String(sectors)]);
    await rl.recover();
    return rl;
  }
  async function reopened(f: string): Promise<{ rl: Replog; head: number; entries: number; tornTail: boolean }> {
    closeFiles();
    const rl = await createReplog('ringbuffer', ctx(), [f, '0', 'open']);
    const rec = await rl.recover();
    return { rl, head: rec.head, entries: rec.entries, tornTail: rec.tornTail };
  }
  /** a log of 10 entries of 4 KiB payload (4608 bytes each), crashed */
  async function tenEntries(f: string): Promise<void> {
    const rl = await fresh(f);
    for (let i = 1; i <= 10; i++) await rl.append(write(8, i));
    await crash(rl);
  }
  const patch = (f: string, at: number, bytes: Buffer): void => {
    const fd = fs.openSync(f, 'r+');
    fs.writeSync(fd, bytes, 0, bytes.length, at);
    fs.closeSync(fd);
  };

  it('puts each entry where the format says: header, then the payload', async () => {
    const f = file(MIN);
    await tenEntries(f);
    const img = fs.readFileSync(f);
    for (let k = 1; k <= 10; k++) {
      const at = entryAt(k, 4608);
      expect(img.toString('latin1', at, at + 4)).toBe('DMKE');
      expect(img.readUInt32LE(at + 32)).toBe(k); // seq
      expect(img.readUInt32LE(at + 12)).toBe(4096); // payload bytes
      expect(img.subarray(at + 512, at + 4608).equals(Buffer.alloc(4096, k))).toBe(true);
      expect(img.readUInt32LE(at + 4)).toBe(crc32c(img.subarray(at + 8, at + 4608)));
      expect(img.subarray(at + 16, at + 32).equals(img.subarray(16, 32))).toBe(true); // the header's uuid
    }
  });

  it('hands out the CRC it sealed each entry with, from its cache and read back from the device', async () => {
    const f = file(MIN);
    const rl = await fresh(f);
    for (let i = 1; i <= 3; i++) await rl.append(write(8, i));
    const img = fs.readFileSync(f);
    const check = (e: ReplogEntry | null, k: number): void => {
      const at = entryAt(k, 4608);
      // the CRC in the entry's header on disk, and the CRC of that header's bytes 8–511
      expect(e!.payloadCrc).toEqual({ seed: crc32c(img.subarray(at + 8, at + 512)), crc: img.readUInt32LE(at + 4) });
    };
    const cached = rl.reader(1);
    for (let k = 1; k <= 3; k++) check(await cached.next(), k);
    await crash(rl);
    const { rl: again } = await reopened(f);
    const disk = again.reader(1);
    for (let k = 1; k <= 3; k++) check(await disk.next(), k);
    await again.destroy();
  });

  it.each([
    ['zeroed', (f: string, at: number) => patch(f, at + 512 + 1000, Buffer.alloc(3096))],
    ['cut short', (f: string, at: number) => {
      fs.truncateSync(f, at + 512 + 2048); // as a file system may leave it after a crash
      fs.truncateSync(f, (MIN + 64) * SECTOR);
    }],
    ['corrupted', (f: string, at: number) => patch(f, at + 600, Buffer.from([0xee]))],
  ])('discards a torn last entry (%s payload)', async (_, damage) => {
    const f = file(MIN + 64);
    await tenEntries(f);
    damage(f, entryAt(10, 4608));
    const { rl, head, entries, tornTail } = await reopened(f);
    expect({ head, entries, tornTail }).toEqual({ head: 9, entries: 9, tornTail: true });
    expect(await rl.append(write(8, 77))).toBe(10); // the next entry takes its place
    await crash(rl);
    const after = await reopened(f);
    expect([after.head, after.tornTail]).toEqual([10, false]);
    expect((await after.rl.reader(10).next())!.data.equals(Buffer.alloc(4096, 77))).toBe(true);
    await after.rl.destroy();
  });

  it('stops the scan at a corrupt entry in the middle', async () => {
    const f = file(MIN);
    await tenEntries(f);
    patch(f, entryAt(4, 4608) + 48, Buffer.from([0x01])); // entry 4's sector field
    const { rl, head, entries, tornTail } = await reopened(f);
    expect({ head, entries, tornTail }).toEqual({ head: 3, entries: 3, tornTail: true });
    expect(await rl.reader(1).next()).not.toBeNull();
    expect(() => rl.reader(5)).toThrow(expect.objectContaining({ code: 'EINVAL' }));
    await rl.destroy();
  });

  it('never takes an older log\'s entries at the same place for its own', async () => {
    const f = file(MIN);
    await tenEntries(f);
    const rl = await fresh(f); // create over it: a new uuid
    expect(rl.head).toBe(0);
    await rl.append(write(8, 50));
    await rl.append(write(8, 51));
    await crash(rl);
    const { rl: again, head, tornTail } = await reopened(f);
    expect([head, tornTail]).toEqual([2, false]); // old entries 3… sit right after, same sizes and seqs
    await again.destroy();
  });

  it('ignores an unacknowledged entry of this log left behind a torn one (back links)', async () => {
    const f = file(MIN);
    await tenEntries(f);
    patch(f, entryAt(8, 4608) + 600, Buffer.from([0xee])); // 8 torn; 9 and 10 were written but never acknowledged
    let { rl, head } = await reopened(f);
    expect(head).toBe(7);
    expect(await rl.append(write(8, 80))).toBe(8); // a new 8, same size: the old 9 now follows it
    await crash(rl);
    ({ rl, head } = await reopened(f));
    expect(head).toBe(8);
    await rl.destroy();
  });

  it('survives a torn checkpoint: the other slot holds the previous one', async () => {
    const f = file(MIN);
    const rl = await fresh(f);
    for (let i = 1; i <= 10; i++) await rl.append(write(8, i));
    await rl.checkpoint(state(4)); // generation 2: slot 0
    await rl.checkpoint(state(6)); // generation 3: slot 1
    await crash(rl);
    patch(f, (8 + 8) * SECTOR + 100, Buffer.from([0xff])); // slot 1 torn
    closeFiles();
    const again = await createReplog('ringbuffer', ctx(), [f, '0', 'open']);
    const rec = await again.recover();
    expect([rec.state, rec.head, rec.entries, again.tail]).toEqual([state(4), 10, 6, 5]);
    await again.destroy();
  });

  describe('open modes and their messages', () => {
    const where = (f: string): string => `ringbuffer: ${f} at sector 0`;
    async function refusedArgs(args: string[], code = 'EINVAL'): Promise<string> {
      const err = await refused(createReplog('ringbuffer', ctx(), args));
      expect(err.code).toBe(code);
      return err.message;
    }
    const headerOf = (f: string): Buffer => fs.readFileSync(f).subarray(0, 4096);
    const resealed = (h: Buffer): Buffer => {
      h.writeUInt32LE(crc32c(h.subarray(0, 4092)), 4092);
      return h;
    };

    it('opens, creates and auto-creates', async () => {
      const f = file(MIN * 2);
      expect(await refusedArgs([f, '0', 'open'])).toBe(`${where(f)}: no replication log (all zeroes, no magic); create or auto makes one`);
      const made = await createReplog('ringbuffer', ctx(), [f, '0']); // auto, default size: the device's room (< 64 MiB)
      expect(made.size).toBe(MIN * 2);
      expect(headerOf(f).toString('latin1', 0, 8)).toBe('DMKRLOG\0');
      await made.destroy();
      const opened = await createReplog('ringbuffer', ctx(), [f, '0', 'auto', String(MIN)]); // the header wins
      expect(opened.size).toBe(MIN * 2);
      await opened.destroy();
      const big = file(200000);
      const dflt = await createReplog('ringbuffer', ctx(), [big, '100', 'create']);
      expect([dflt.size, dflt.status('table')]).toEqual([131072, `${big} 100 open 131072`]);
      await dflt.destroy();
    });

    it('refuses foreign data, a corrupted header, another version; auto never overwrites them', async () => {
      const f = file(MIN);
      fs.writeFileSync(f, Buffer.concat([Buffer.from('XFSB'), Buffer.alloc(MIN * SECTOR - 4)]));
      for (const mode of ['open', 'auto']) {
        const suffix = mode === 'auto' ? '; auto never overwrites it (create does)' : '';
        expect(await refusedArgs([f, '0', mode])).toBe(`${where(f)}: not a replication log (foreign data, magic 5846534200000000)${suffix}`);
      }
      const rl = await fresh(f); // create overwrites foreign data
      await crash(rl);
      const good = headerOf(f);
      const flipped = Buffer.from(good);
      flipped[40] ^= 1;
      patch(f, 0, flipped);
      expect(await refusedArgs([f, '0', 'open'])).toBe(`${where(f)}: header CRC mismatch (corrupted log)`);
      expect(await refusedArgs([f, '0', 'auto'])).toBe(`${where(f)}: header CRC mismatch (corrupted log); auto never overwrites it (create does)`);
      const v2 = Buffer.from(good);
      v2.writeUInt32LE(2, 8);
      patch(f, 0, resealed(v2));
      expect(await refusedArgs([f, '0', 'open'])).toBe(`${where(f)}: unsupported replication log version 2 (this dmkit reads version 1)`);
      expect(headerOf(f).equals(v2)).toBe(true); // untouched
      const tiny = Buffer.from(good);
      tiny.writeUInt32LE(100, 32);
      patch(f, 0, resealed(tiny));
      expect(await refusedArgs([f, '0', 'open'])).toBe(`${where(f)}: invalid header: size 100 below 4096 sectors (corrupted log)`);
    });

    it('refuses a device too small, bad arguments and a size below the minimum', async () => {
      const f = file(MIN + 10);
      expect(await refusedArgs([f, '20', 'create'])).toBe(`ringbuffer: device too small for replog: ${f} has ${MIN + 10} sectors, needs ${MIN + 20} (dev_start 20 + size ${MIN})`);
      expect(await refusedArgs([f, '0', 'create', String(MIN + 11)])).toBe(`ringbuffer: device too small for replog: ${f} has ${MIN + 10} sectors, needs ${MIN + 11} (dev_start 0 + size ${MIN + 11})`);
      expect(await refusedArgs([f, '0', 'create', '4095'])).toBe('ringbuffer: invalid size 4095 (at least 4096 sectors: 2 MiB)');
      expect(await refusedArgs([f])).toBe('ringbuffer: invalid argument count 1 (expected <dev> <dev_start> [auto|create|open [<size>]])');
      expect(await refusedArgs([f, '0', 'open', '4096', 'x'])).toBe('ringbuffer: invalid argument count 5 (expected <dev> <dev_start> [auto|create|open [<size>]])');
      expect(await refusedArgs([f, '-1'])).toBe("ringbuffer: invalid dev_start '-1' (expected a non-negative integer)");
      expect(await refusedArgs([f, '0', 'make'])).toBe("ringbuffer: invalid open mode 'make' (expected one of auto, create, open)");
      expect(await refusedArgs([f, '0', 'open', '2M'])).toBe("ringbuffer: invalid size '2M' (expected a non-negative integer)");
      const missing = path.join(fx.dir, 'missing');
      expect(await refusedArgs([missing, '0'], 'ENOENT')).toContain(missing);
      // a log whose header asks for more than the device has (the file shrank)
      const g = file(MIN * 2);
      await (await fresh(g, MIN * 2)).destroy();
      closeFiles();
      fs.truncateSync(g, (MIN + 8) * SECTOR);
      expect(await refusedArgs([g, '0', 'open'])).toBe(`ringbuffer: device too small for replog: ${g} has ${MIN + 8} sectors, needs ${MIN * 2} (dev_start 0 + the header's size ${MIN * 2})`);
    });

    it('refuses to create over a log in use, and creates over it once released', async () => {
      const f = file(MIN);
      const live = await fresh(f);
      await live.append(write(8, 1));
      expect(await refusedArgs([f, '0', 'create'], 'EBUSY')).toBe(`${where(f)}: the log there is in use by another ringbuffer; refusing to overwrite it`);
      const second = await createReplog('ringbuffer', ctx(), [f, '0', 'open']); // a table reload opens it
      await second.destroy();
      expect(await refusedArgs([f, '0', 'create'], 'EBUSY')).toContain('in use');
      await live.destroy();
      const fresh2 = await fresh(f);
      expect(fresh2.head).toBe(0);
      await fresh2.destroy();
    });
  });

  describe('resize', () => {
    it('grows and shrinks an empty ring, and a ring whose entries fit, and says what does not fit', async () => {
      const f = file(MIN * 4);
      const rl = await fresh(f);
      await rl.resize(MIN * 3);
      expect([rl.size, rl.status('info')]).toEqual([MIN * 3, `0/${MIN * 3}`]);
      await expect(rl.resize(MIN * 4 + 1)).rejects.toThrow(`ringbuffer: device too small for replog: ${f} has ${MIN * 4} sectors, needs ${MIN * 4 + 1} (dev_start 0 + size ${MIN * 4 + 1})`);
      await expect(rl.resize(100)).rejects.toThrow('ringbuffer: invalid size 100 (at least 4096 sectors: 2 MiB)');
      const ref = new Map<number, AppendEntry>();
      for (let i = 1; i <= 600; i++) { // 600 × 4.5 KiB: 2.6 MiB, past the end of a minimum ring
        ref.set(i, write(8, i));
        await rl.append(ref.get(i)!);
      }
      const err = await refused(rl.resize(MIN));
      expect(err.code).toBe('EINVAL');
      expect(err.message).toMatch(/^ringbuffer: cannot shrink to 4096 sectors: the kept entries 1-600 reach ring byte 2764800, the new ring holds \d+$/);
      await rl.resize(MIN * 2);
      expect(rl.size).toBe(MIN * 2);
      await readAll(rl.reader(1), ref, 600);
      await rl.checkpoint(state(600)); // empty, head past the end of a minimum ring
      await rl.resize(MIN);
      expect(rl.size).toBe(MIN);
      ref.clear();
      for (let i = 601; i <= 700; i++) {
        ref.set(i, write(8, i));
        await rl.append(ref.get(i)!);
      }
      await crash(rl);
      const { rl: again, head, entries } = await reopened(f);
      expect([again.size, head, entries]).toEqual([MIN, 700, 100]);
      await readAll(again.reader(601), ref, 100);
      await again.destroy();
    });

    it('moves a reader waiting at the head along when a resize moves the empty ring', async () => {
      const f = file(81920 + 64);
      const rl = await fresh(f, 81920); // 40 MiB
      const chunk = (i: number): AppendEntry => ({ ...write(128, i & 0xff), sector: i });
      for (let i = 1; i <= 330; i++) await rl.append(chunk(i)); // the head is past 20 MiB
      const r = rl.reader(1);
      for (let e = await r.next(); e; e = await r.next()) expect(e.sector).toBe(e.seq);
      await rl.checkpoint(state(330));
      await rl.resize(40960); // empty, head beyond the new end: the ring restarts at offset 0
      for (let i = 331; i <= 630; i++) await rl.append(chunk(i)); // 19 MiB: the first ones leave the cache
      for (let i = 331; i <= 630; i++) {
        const e = await r.next();
        expect([e!.seq, e!.sector, e!.data.equals(chunk(i).data)]).toEqual([i, i, true]);
      }
      await rl.destroy();
    });

    it('runs appends made while a resize rewrites the header after it, in call order', async () => {
      const f = file(MIN * 2);
      await fx.dm.create('slowlog', { table: `0 ${MIN * 2} delay ${f} 0 0 ${f} 0 100` }); // writes take 100 ms
      const rl = await createReplog('ringbuffer', ctx(), ['dm:slowlog', '0', 'create', String(MIN)]);
      await rl.recover();
      await rl.append(write(8, 1));
      const used = rl.used();
      const resized = rl.resize(MIN * 2);
      await new Promise((r) => setTimeout(r, 30)); // the header write is held by the delay target
      const seqs = Promise.all([2, 3, 4].map((i) => rl.append(write(8, i))));
      expect(rl.used()).toBe(used); // they wait: no space taken yet
      await resized;
      expect(await seqs).toEqual([2, 3, 4]);
      expect([rl.size, rl.head]).toEqual([MIN * 2, 4]);
      await readAll(rl.reader(1), new Map([1, 2, 3, 4].map((i) => [i, write(8, i)])), 4);
      await rl.destroy();
    });

    it('refuses while the kept entries wrap around the end of the ring', async () => {
      const f = file(MIN * 2);
      const rl = await fresh(f);
      let n = 0;
      while (await rl.append(write(128, n)).then(() => true, () => false)) n++;
      await rl.checkpoint(state(n - 2));
      await rl.append(write(128, 0)); // at the ring's start: the kept entries wrap
      const err = await refused(rl.resize(MIN + 8));
      expect(err.message).toBe(`ringbuffer: cannot resize to ${MIN + 8} sectors: the kept entries ${n - 1}-${n + 1} wrap around the end of the ring (resize when it is empty, or once the tail has passed the wrap)`);
      await rl.destroy();
    });
  });

  describe('device faults (through the engine\'s targets)', () => {
    it('fails appends at the first write error, in order, with one event; checkpoints that fail free nothing', async () => {
      const f = file(MIN + 64);
      await fx.dm.create('rlog', { table: `0 ${MIN + 64} linear ${f} 0` });
      const rl = await createReplog('ringbuffer', ctx(), ['dm:rlog', '0', 'create', String(MIN)]);
      await rl.recover();
      for (let i = 1; i <= 10; i++) await rl.append(write(8, i));
      await fx.dm.load('rlog', `0 ${MIN + 64} flakey ${f} 0 0 1 1 error_writes`);
      await fx.dm.resume('rlog');
      const results = await Promise.allSettled([rl.append(write(8, 11)), rl.append(write(8, 12))]);
      expect(results.map((r) => (r.status === 'rejected' ? (r.reason as { code: string }).code : 'ok'))).toEqual(['EIO', 'EIO']);
      expect(fx.events).toBe(1);
      expect((await refused(rl.append(write(1, 0)))).code).toBe('EIO');
      expect(rl.head).toBe(10);
      const used = rl.used();
      expect((await refused(rl.checkpoint(state(8)))).code).toBe('EIO');
      expect([rl.tail, rl.used()]).toEqual([1, used]); // nothing freed
      await readAll(rl.reader(1), new Map(Array.from({ length: 10 }, (_, i) => [i + 1, write(8, i + 1)])), 10);
      await rl.destroy();
    });

    it('refuses to resume when the log cannot be read', async () => {
      const f = file(MIN + 64);
      const made = await createReplog('ringbuffer', ctx(), [f, '0', 'create', String(MIN)]);
      await crash(made);
      await fx.dm.create('rlog2', { table: `0 ${MIN + 64} flakey ${f} 0 0 1 1 error_reads` });
      const err = await refused(createReplog('ringbuffer', ctx(), ['dm:rlog2', '0', 'open']));
      expect(err).toMatchObject({ code: 'EIO' });
      expect(err.message).toMatch(/^ringbuffer: dm:rlog2 at sector 0: cannot read the log header: /);
    });
  });
});

describe('replog registry', () => {
  const wrapped: ReplogType = { name: 'test-wrapped-ring', create: (c, args) => createReplog('ringbuffer', c, args) };

  it('lists ringbuffer and refuses unknown and duplicate types', async () => {
    expect(listReplogs()).toContain('ringbuffer');
    const err = await refused(createReplog('nolog', ctx(), []));
    expect(err.message).toBe("unknown replog type 'nolog' (expected one of ringbuffer)");
    expect(() => registerReplog({ name: 'ringbuffer', create: wrapped.create })).toThrow(expect.objectContaining({ code: 'EEXIST' }));
  });

  it('refuses to unregister a type while a log of it exists', async () => {
    registerReplog(wrapped);
    const rl = await createReplog(wrapped.name, ctx(), [file(MIN), '0', 'create']);
    expect(() => unregisterReplog(wrapped.name)).toThrow(expect.objectContaining({ code: 'EBUSY' }));
    await rl.destroy();
    unregisterReplog(wrapped.name);
    expect(listReplogs()).not.toContain(wrapped.name);
  });
});
