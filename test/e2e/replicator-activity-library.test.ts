/**
 * The activity log inside a running group (src/targets/replicator-activity.ts), through
 * the library. These tests watch the engine from outside its hot path: they wrap the log's
 * `append`, the local device's `submit` and the activity log's `flushed` to record what
 * happened when, without changing what those do.
 *
 *  - a full flush (here every checkpoint: the local device is `dm:`, not held here) lets
 *    extents go only up to writes whose local write had completed before the flush began
 *    (a review found `localDone` counting a write whose local write was not even submitted:
 *    the head moved one turn before the write was counted in flight);
 *  - writes applied while the group is secondary go to the local device past the activity
 *    log: checkpoints say it is incomplete until a full flush after promote.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { DeviceMapper } from '../../src/index.ts';
import { decodeCheckpoint } from '../../src/replog/ring-format.ts';
import { image, makeGroup, tmpDir } from '../helpers/replication.ts';

let dm: DeviceMapper | null = null;
afterEach(async () => {
  await dm?.close();
  dm = null;
});

/** the newest checkpoint slot of the log file `rlog` */
function newestSlot(rlog: string): ReturnType<typeof decodeCheckpoint> {
  const b = fs.readFileSync(rlog);
  const uuid = b.subarray(16, 32);
  let best: ReturnType<typeof decodeCheckpoint> = null;
  for (const at of [4096, 8192]) {
    const cp = decodeCheckpoint(b.subarray(at, at + 4096), uuid);
    if (cp && (!best || cp.generation > best.generation)) best = cp;
  }
  return best;
}

interface Internals {
  log: { append(e: { op: string; sector: number }): Promise<number> };
  activity: { flushed(seq: number): void; snapshot(): { incomplete: boolean } };
  bindings(): Iterable<{ local: { submit(bio: { op: string; sector: number }): Promise<void> } }>;
  demote(discard: boolean): Promise<void>;
  promote(force: boolean): Promise<void>;
  checkpointNow(): Promise<void>;
}

describe('the activity log in a running group', { timeout: 120_000 }, () => {
  it('a full flush lets extents go only up to writes whose local write was done before it began', async () => {
    const dir = tmpDir();
    dm = new DeviceMapper();
    const S = 65536;
    const ring = 4096;
    const f = (n: string): string => path.join(dir, n);
    image(dir, 'rlog', ring + 64);
    image(dir, 'local0.img', S);
    image(dir, 'remote0.img', S);
    image(dir, 'dlog0', 64);
    await dm.create('site0', { table: `0 ${S} linear ${f('remote0.img')} 0` });
    // the local device through dm: not held here, so every checkpoint flushes the local device and the log
    await dm.create('loc0', { table: `0 ${S} linear ${f('local0.img')} 0` });
    await dm.create('repl', { table: `0 1 replicator ringbuffer 4 ${f('rlog')} 0 auto ${ring} blockdev 1 0 blockdev 2 1 async` });
    await dm.create('vol0', { table: `0 ${S} replicator-dev dm:repl 0 0 1 dm:loc0 nolog 0 1 1 dm:site0 disk 3 ${f('dlog0')} 64 nosync` });
    const group = dm.get('repl').liveTarget(0) as unknown as Internals;
    const b = [...group.bindings()][0]!;
    const seqOf = new Map<number, number>(); // sector → seq
    const append = group.log.append.bind(group.log);
    group.log.append = (e) => {
      const p = append(e);
      if (e.op === 'write') p.then((seq) => seqOf.set(e.sector, seq), () => undefined);
      return p;
    };
    const completed = new Set<number>(); // sectors whose local write completed
    const durable = new Set<number>(); // … and a local flush begun after that completed
    const submit = b.local.submit.bind(b.local);
    b.local.submit = (bio) => {
      if (bio.op === 'flush') {
        const before = [...completed];
        return submit(bio).then(() => {
          for (const s of before) durable.add(s);
        });
      }
      return submit(bio).then(() => {
        if (bio.op === 'write') completed.add(bio.sector);
      });
    };
    const violations: string[] = [];
    let covered = 0;
    const flushed = group.activity.flushed.bind(group.activity);
    group.activity.flushed = (x) => {
      for (const [sector, seq] of seqOf) {
        if (seq > x) continue;
        covered++;
        if (!durable.has(sector)) violations.push(`flushed(${x}) covers seq ${seq} (sector ${sector}), whose local write ${completed.has(sector) ? 'completed after the flush began' : 'is not complete'}`);
      }
      flushed(x);
    };
    // a slow site: the ring fills past half, and every append starts a checkpoint
    await dm.load('site0', `0 ${S} delay ${f('remote0.img')} 0 0 ${f('remote0.img')} 0 200`);
    await dm.resume('site0');
    let next = 0;
    const writer = async (): Promise<void> => {
      for (let i = 0; i < 150; i++) await dm!.write('vol0', ((next++ * 8) % (S - 8)) * 512, crypto.randomBytes(4096));
    };
    await Promise.all(Array.from({ length: 8 }, writer));
    expect(violations.slice(0, 5)).toEqual([]);
    expect(covered).toBeGreaterThan(100); // the check ran over many writes
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('writes applied as secondary make checkpoints say the activity log is incomplete, until a full flush after promote', async () => {
    const dir = tmpDir();
    const g = await makeGroup({ dir, devices: 1, sectors: 16 * 8192 });
    dm = g.dm;
    const rlog = path.join(dir, 'rlog');
    const group = dm.get('repl').liveTarget(0) as unknown as Internals;
    await dm.write('vol0', 0, crypto.randomBytes(4096));
    await group.checkpointNow();
    expect(newestSlot(rlog)!.state.activity).toEqual({ extents: [0], incomplete: false });
    await group.demote(false);
    // the receiver's writes: the device's map while secondary (to its local device only)
    const dev = dm.get('vol0').liveTarget(0) as unknown as { map(bio: unknown): Promise<void> };
    for (const x of [5, 9]) await dev.map({ op: 'write', sector: x * 8192, sectors: 8, data: crypto.randomBytes(4096), flags: {} });
    await group.checkpointNow();
    expect(newestSlot(rlog)!.state.activity!.incomplete).toBe(true);
    await group.promote(true);
    expect(group.activity.snapshot().incomplete).toBe(false);
    await group.checkpointNow();
    expect(newestSlot(rlog)!.state.activity!.incomplete).toBe(false);
  });
});
