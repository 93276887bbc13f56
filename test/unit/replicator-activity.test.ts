/**
 * The replicator's activity log (src/targets/replicator-activity.ts) against its one rule:
 * at every moment, each write that has gone past `enter` and is not yet covered by a full
 * flush lies in the extents of the newest durable checkpoint, or that checkpoint says it is
 * incomplete. The host here is the group's part reduced to what the activity log sees: a
 * checkpoint that is durable some turns after it was asked for (or fails), and a full flush
 * that covers every write over before it began. Writers are random, concurrent and many, with
 * a small log, so that extents come and go all the time.
 */
import { describe, expect, it } from 'vitest';
import { ActivityLog, EXTENT_SECTORS, LAST_EXTENT, extentKey, extentsByDevice, type ActivitySnapshot } from '../../src/targets/replicator-activity.ts';

interface Write { dev: number; sector: number; sectors: number; seq: number; held: boolean; over: boolean }

/** a few turns of the event loop */
const turns = (n: number): Promise<void> => new Promise((r) => {
  let left = n;
  const step = (): void => (--left <= 0 ? r() : void setImmediate(step));
  setImmediate(step);
});

class World {
  al: ActivityLog;
  durable: ActivitySnapshot = { extents: [], incomplete: false, version: 0 };
  /** writes past enter */
  writes: Write[] = [];
  /** every write with seq ≤ it is over, durably flushed */
  flushedUpTo = 0;
  head = 0;
  persists = 0;
  flushes = 0;
  failNext = 0;
  violations: string[] = [];

  constructor(capacity: number) {
    this.al = new ActivityLog({
      persist: async () => {
        const snap = this.al.snapshot();
        this.persists++;
        await turns(1 + (this.persists % 3));
        if (this.failNext > 0) {
          this.failNext--;
          throw Object.assign(new Error('EIO: slot write failed'), { code: 'EIO' });
        }
        if (snap.version >= this.durable.version) this.durable = snap;
        this.al.persisted(snap.version);
      },
      flushAll: async () => {
        const done = this.done();
        this.flushes++;
        await turns(2);
        if (done > this.flushedUpTo) this.flushedUpTo = done;
        return done;
      },
      done: () => this.done(),
    }, capacity);
  }

  /** a full flush now (a checkpoint that flushed everything), with every write over */
  flushedAll(): void {
    this.flushedUpTo = this.done();
    this.al.flushed(this.flushedUpTo);
  }

  /** the highest seq with every write up to it over */
  done(): number {
    let low = this.head;
    for (const w of this.writes) if (!w.over && w.seq - 1 < low) low = w.seq - 1;
    return low;
  }

  /** the rule, checked for every write not covered by a flush */
  check(where: string): void {
    if (this.durable.incomplete) return;
    const held = new Set(this.durable.extents);
    for (const w of this.writes) {
      if (w.over && w.seq <= this.flushedUpTo) continue;
      for (let k = extentKey(w.dev, w.sector); k <= extentKey(w.dev, w.sector + w.sectors - 1); k++) {
        if (!held.has(k)) this.violations.push(`${where}: write seq ${w.seq} to extent ${k} not in the durable activity log`);
      }
    }
  }

  async write(dev: number, sector: number, sectors: number): Promise<boolean> {
    const e = this.al.enter(dev, sector, sectors);
    const held = e === true ? true : await e;
    const w: Write = { dev, sector, sectors, seq: ++this.head, held, over: false };
    this.writes.push(w);
    this.check(`after enter of seq ${w.seq}`);
    await turns(1 + (w.seq % 4));
    this.check(`during seq ${w.seq}`);
    w.over = true;
    this.al.leave(dev, sector, sectors, w.seq, held);
    return held;
  }
}

describe('activity log', () => {
  it('keeps every write not yet flushed in its durable extents, under random concurrent writers and a small log', async () => {
    const world = new World(6);
    let rand = 12345;
    const next = (n: number): number => {
      rand = (rand * 1103515245 + 12345) % 2147483648;
      return rand % n;
    };
    const writer = async (): Promise<void> => {
      for (let i = 0; i < 150; i++) {
        const dev = next(3);
        // extents 0 … 11, sometimes a write across two of them
        const sector = next(12) * EXTENT_SECTORS + (next(4) === 0 ? EXTENT_SECTORS - 8 : next(64) * 8);
        await world.write(dev, sector, 16);
        if (next(10) === 0) world.al.flushed(0); // a checkpoint that flushed nothing new: no effect
      }
    };
    await Promise.all(Array.from({ length: 8 }, writer));
    expect(world.violations).toEqual([]);
    expect(world.head).toBe(1200);
    // extents came and went: the log stayed within its size, flushing to make room
    expect(world.al.size).toBeLessThanOrEqual(6);
    expect(world.flushes).toBeGreaterThan(0);
    expect(world.al.stats.misses).toBeGreaterThan(50);
  });

  it('a write to extents held and durable goes on at once; one to a new extent waits for a checkpoint holding it', async () => {
    const world = new World(4);
    await world.write(0, 0, 8);
    expect(world.durable.extents).toEqual([extentKey(0, 0)]);
    const before = world.persists;
    expect(world.al.enter(0, 64, 8)).toBe(true); // same extent: no wait, no checkpoint
    world.al.leave(0, 64, 8, world.head, true);
    expect(world.persists).toBe(before);
    const e = world.al.enter(1, 5 * EXTENT_SECTORS, 8);
    expect(e).not.toBe(true);
    expect(world.durable.extents).not.toContain(extentKey(1, 5 * EXTENT_SECTORS));
    await e;
    expect(world.durable.extents).toContain(extentKey(1, 5 * EXTENT_SECTORS));
    world.al.leave(1, 5 * EXTENT_SECTORS, 8, ++world.head, true);
  });

  it('an extent goes only after a flush covered its last write, and never while a write to it is in flight', async () => {
    const world = new World(2);
    await world.write(0, 0, 8); // extent 0
    await world.write(0, EXTENT_SECTORS, 8); // extent 1: full
    const inflight = world.al.enter(0, 0, 8); // extent 0 in flight from here
    expect(inflight).toBe(true);
    // extent 2 needs room: extent 1 goes after a flush (extent 0 is busy)
    await world.write(0, 2 * EXTENT_SECTORS, 8);
    expect(world.flushes).toBe(1);
    expect(new Set(world.al.snapshot().extents)).toEqual(new Set([extentKey(0, 0), extentKey(0, 2 * EXTENT_SECTORS)]));
    world.al.leave(0, 0, 8, ++world.head, true);
    expect(world.violations).toEqual([]);
  });

  it('when every extent is busy a write goes on outside them, and the checkpoint says incomplete until a flush covers it', async () => {
    const world = new World(1);
    const busy = world.al.enter(0, 0, 8); // extent 0, in flight until the end
    expect(busy).not.toBe(true);
    expect(await busy).toBe(true);
    const held = await world.write(0, 3 * EXTENT_SECTORS, 8);
    expect(held).toBe(false);
    expect(world.flushes).toBe(0); // none could go: no flush is tried
    expect(world.al.stats.outside).toBe(1);
    expect(world.durable.incomplete).toBe(true);
    expect(world.al.snapshot().incomplete).toBe(true); // not flushed since
    world.flushedAll();
    expect(world.al.snapshot().incomplete).toBe(false);
    world.al.leave(0, 0, 8, ++world.head, true);
  });

  it('a failed checkpoint fails the write and counts nothing; the next write tries again', async () => {
    const world = new World(4);
    world.failNext = 1;
    await expect(world.write(2, 0, 8)).rejects.toThrow(/slot write failed/);
    expect(world.writes).toEqual([]);
    await world.write(2, 0, 8);
    expect(world.durable.extents).toEqual([extentKey(2, 0)]);
    // nothing left counted in flight: a flush lets the extent go to make room
    world.flushedAll();
    for (let x = 1; x <= 4; x++) await world.write(2, x * EXTENT_SECTORS, 8);
    expect(world.al.snapshot().extents).not.toContain(extentKey(2, 0));
    expect(world.violations).toEqual([]);
  });

  it('extents recovered stay until a flush covers the head; pinned ones stay until unpinned, beyond the size', async () => {
    const world = new World(2);
    world.head = 100;
    const keys = [extentKey(0, 0), extentKey(0, EXTENT_SECTORS), extentKey(1, 0)];
    world.al.restore(keys, 100);
    expect(world.al.pinned).toBe(3);
    // two more fit beside the pinned ones; a flush does not let a pinned one go
    await world.write(3, 0, 8);
    await world.write(3, EXTENT_SECTORS, 8);
    world.flushedAll();
    await world.write(3, 2 * EXTENT_SECTORS, 8);
    const held = new Set(world.al.snapshot().extents);
    for (const k of keys) expect(held.has(k)).toBe(true);
    expect(held.size).toBe(5);
    world.al.unpin();
    world.flushedAll();
    await world.write(3, 3 * EXTENT_SECTORS, 8);
    expect(world.al.size).toBeLessThanOrEqual(2);
    // a recovered checkpoint that kept none (or was incomplete): incomplete until a flush covers its head
    const other = new World(4);
    other.al.restore(null, 50);
    other.al.flushed(60);
    expect(other.al.snapshot().incomplete).toBe(true); // until unpinned (every device flushed since, the sites verified)
    other.al.unpin();
    expect(other.al.snapshot().incomplete).toBe(false);
    const third = new World(4);
    third.al.restore(null, 50);
    third.al.unpin();
    third.al.flushed(49);
    expect(third.al.snapshot().incomplete).toBe(true);
    third.al.flushed(50);
    expect(third.al.snapshot().incomplete).toBe(false);
  });

  it('a log full of extents pinned after a power loss: writes to others go outside at once (no flush, one checkpoint), and checkpoints say incomplete', async () => {
    const world = new World(490);
    world.head = 1000;
    world.al.restore(Array.from({ length: 490 }, (_, i) => extentKey(0, i * EXTENT_SECTORS)), 1000);
    const persists = world.persists;
    let outside = 0;
    for (let i = 0; i < 100; i++) if (!(await world.write(0, (1000 + (i % 5)) * EXTENT_SECTORS, 8))) outside++;
    expect(outside).toBe(100);
    expect(world.flushes).toBe(0);
    expect(world.persists - persists).toBe(1); // the first write outside; the others find it durable
    expect(world.durable.incomplete).toBe(true);
    expect(world.violations).toEqual([]);
    // once verified (unpinned), the extents may go and the writes find room again
    world.al.unpin();
    world.flushedAll();
    expect(await world.write(0, 1000 * EXTENT_SECTORS, 8)).toBe(true);
  });

  it('extents whose last write the local devices have not done yet (a replay waiting) are not flushed for: the write goes outside at once', async () => {
    const world = new World(2);
    world.head = 500;
    world.al.restore([extentKey(0, 0), extentKey(0, EXTENT_SECTORS)], 500);
    world.al.unpin();
    world.writes.push({ dev: 1, sector: 2 * EXTENT_SECTORS, sectors: 8, seq: 400, held: true, over: false }); // not over: done() stays under 500
    const stuck = world.al.enter(1, 0, 8);
    expect(stuck).not.toBe(true);
    const held = await (stuck as Promise<boolean>);
    expect(held).toBe(false); // the log is full of extents recovered at head 500, which no flush can let go yet
    expect(world.flushes).toBe(0);
    world.al.leave(1, 0, 8, 400, held);
  });

  it('a sequential stream has the next extent held before it gets there (no wait every 4 MiB); random writes hold no extra extents', async () => {
    const world = new World(490);
    for (let i = 0; i < 40; i++) await world.write(0, i * 2048, 2048); // 1 MiB writes over 10 extents
    expect(world.al.stats.misses).toBe(1); // the first write only
    expect(world.al.stats.prefetched).toBe(25); // extents 1 … 25: up to 16 ahead of the stream, refilled at 8
    const random = new World(490);
    for (const x of [7, 3, 11, 5, 9]) await random.write(1, x * EXTENT_SECTORS + 2048, 8);
    expect([random.al.stats.misses, random.al.stats.prefetched, random.al.size]).toEqual([5, 0, 5]);
    expect(world.violations).toEqual([]);
  });

  it('a device that leaves keeps its extents until a restart, whatever flushes come; room stays for the others', async () => {
    const world = new World(3);
    await world.write(4, 0, 8);
    await world.write(4, 2 * EXTENT_SECTORS, 8);
    world.al.keepDevice(4);
    expect(world.al.pinned).toBe(2);
    world.flushedAll();
    for (const x of [1, 3, 5, 7, 9]) await world.write(0, x * EXTENT_SECTORS, 8);
    const held = new Set(world.al.snapshot().extents);
    expect(held.has(extentKey(4, 0)) && held.has(extentKey(4, 2 * EXTENT_SECTORS))).toBe(true);
    expect(world.al.size).toBeLessThanOrEqual(5); // the kept two and the three of the log's size
    world.al.unpin(); // (not for those: only a restart lets them go)
    expect(world.al.pinned).toBe(2);
  });

  it('a write across two extents that finds room for one only holds neither', async () => {
    const world = new World(1);
    const busy = world.al.enter(0, 0, 8);
    expect(await busy).toBe(true);
    const held = await world.write(0, 2 * EXTENT_SECTORS - 8, 16); // extents 1 and 2: no room
    expect(held).toBe(false);
    expect(world.al.snapshot().extents).toEqual([extentKey(0, 0)]);
    world.al.leave(0, 0, 8, ++world.head, true);
  });

  it('keys: 4 MiB extents per device, the last key standing for the rest of a huge device', () => {
    expect(extentKey(0, 0)).toBe(0);
    expect(extentKey(0, EXTENT_SECTORS - 1)).toBe(0);
    expect(extentKey(0, EXTENT_SECTORS)).toBe(1);
    expect(extentKey(255, 0)).toBe(255 * 2 ** 24);
    expect(extentKey(3, 2 ** 50)).toBe(3 * 2 ** 24 + LAST_EXTENT);
    expect(extentsByDevice([extentKey(1, 0), extentKey(2, EXTENT_SECTORS * 7), extentKey(1, EXTENT_SECTORS)])).toEqual(new Map([[1, [0, 1]], [2, [7]]]));
  });
});
