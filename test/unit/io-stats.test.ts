/**
 * The I/O statistics accumulator (src/core/io-stats.ts): bucket placement at and around the
 * bounds, errors (no bytes, still a latency), bytes, sums over slabs, and the meter's
 * completion callbacks (reused once warm, `after` called, errors mapped and rethrown).
 */
import { describe, expect, test } from 'vitest';
import {
  IO_OPS, IoMeter, IoStats, LATENCY_BOUNDS_S, OP_INDEX, SLAB_CELLS, bucketOf, claimWriter, newSlab, record, releaseWriter, snapshot,
} from '../../src/core/io-stats.ts';

const NB = LATENCY_BOUNDS_S.length + 1;

/** buckets with `n` at index i for each [i, n] */
function buckets(...at: Array<[number, number]>): number[] {
  const b = new Array<number>(NB).fill(0);
  for (const [i, n] of at) b[i] = n;
  return b;
}

describe('io-stats', () => {
  test('ops are the bio ops, in slab order; a slab is shared memory', () => {
    expect(IO_OPS).toEqual(['read', 'write', 'flush', 'discard', 'write-zeroes']);
    for (const [i, op] of IO_OPS.entries()) expect(OP_INDEX[op]).toBe(i);
    const s = newSlab();
    expect(s.length).toBe(SLAB_CELLS);
    expect(s.buffer).toBeInstanceOf(SharedArrayBuffer);
    expect([...s].every((v) => v === 0)).toBe(true);
  });

  test('a latency equal to a bound is in that bound\'s bucket; above the last bound is +Inf', () => {
    expect(LATENCY_BOUNDS_S.length).toBe(17);
    expect(bucketOf(0)).toBe(0);
    for (const [i, b] of LATENCY_BOUNDS_S.entries()) {
      expect(bucketOf(b), `at ${b}`).toBe(i);
      expect(bucketOf(b * 1.000001), `just above ${b}`).toBe(i + 1);
      if (i > 0) expect(bucketOf(b * 0.999999), `just below ${b}`).toBe(i);
    }
    expect(bucketOf(10)).toBe(16);
    expect(bucketOf(10.5)).toBe(17);
    expect(bucketOf(1e9)).toBe(17);
  });

  test('record: counts per op, bytes of successes only, seconds of all, errors', () => {
    const s = newSlab();
    record(s, OP_INDEX.read, 4096, 0.001, false);        // bucket 4 (le 0.001)
    record(s, OP_INDEX.read, 8192, 0.0011, false);       // bucket 5 (le 0.0025)
    record(s, OP_INDEX.read, 512, 0.00002, true);        // a failure: no bytes
    record(s, OP_INDEX.write, 65536, 11, false);         // +Inf
    record(s, OP_INDEX.flush, 0, 0.02, false);           // bucket 8 (le 0.025)
    record(s, OP_INDEX['write-zeroes'], 1 << 20, 0.00005, true);
    const { ops } = snapshot([s]);
    expect(ops.read).toEqual({ count: 3, errors: 1, bytes: 12288, seconds: expect.closeTo(0.00212, 12) as number, buckets: buckets([0, 1], [4, 1], [5, 1]) });
    expect(ops.write).toEqual({ count: 1, errors: 0, bytes: 65536, seconds: 11, buckets: buckets([17, 1]) });
    expect(ops.flush).toEqual({ count: 1, errors: 0, bytes: 0, seconds: 0.02, buckets: buckets([8, 1]) });
    expect(ops.discard).toEqual({ count: 0, errors: 0, bytes: 0, seconds: 0, buckets: buckets() });
    expect(ops['write-zeroes']).toEqual({ count: 1, errors: 1, bytes: 0, seconds: 0.00005, buckets: buckets([0, 1]) });
    for (const op of IO_OPS) expect(ops[op].buckets).toHaveLength(NB);
  });

  test('a snapshot sums every slab (holes skipped) and is a copy', () => {
    const st = new IoStats();
    expect(st.slab(0)).toBe(st.main);
    const w2 = st.slab(2); // slab 1 never made: a hole
    expect(st.slab(2)).toBe(w2);
    record(st.main, OP_INDEX.write, 4096, 0.0003, false);
    record(w2, OP_INDEX.write, 8192, 0.0003, false);
    record(w2, OP_INDEX.read, 512, 0.2, true);
    const snap = st.snapshot();
    expect(snap.ops.write).toEqual({ count: 2, errors: 0, bytes: 12288, seconds: expect.closeTo(0.0006, 12) as number, buckets: buckets([3, 2]) });
    expect(snap.ops.read).toMatchObject({ count: 1, errors: 1, bytes: 0, buckets: buckets([11, 1]) });
    record(st.main, OP_INDEX.write, 4096, 0.0003, false);
    expect(snap.ops.write.count).toBe(2);
    expect(st.snapshot().ops.write.count).toBe(3);
  });

  test('meter: completions record, call after, rethrow mapped errors; refusals count as failures of no time', async () => {
    const slab = newSlab();
    let after = 0;
    const m = new IoMeter(slab, () => { after++; }, (err) => new Error(`mapped: ${(err as Error).message}`));
    const t1 = m.start(OP_INDEX.write, 4096);
    await Promise.resolve().then(t1.ok, t1.fail);
    expect(after).toBe(1);
    // the completed record is reused: a warm meter allocates nothing per I/O
    const t2 = m.start(OP_INDEX.read, 8192);
    expect(t2).toBe(t1);
    await expect(Promise.reject(new Error('EIO')).then(t2.ok, t2.fail)).rejects.toThrow('mapped: EIO');
    expect(after).toBe(2);
    // two in flight at once: two records
    const a = m.start(OP_INDEX.discard, 1024);
    const b = m.start(OP_INDEX.discard, 2048);
    expect(a).not.toBe(b);
    a.ok();
    b.ok();
    m.refused(OP_INDEX.flush);
    expect(after).toBe(4); // a refusal was never in flight
    const { ops } = snapshot([slab]);
    expect(ops.write).toMatchObject({ count: 1, errors: 0, bytes: 4096 });
    expect(ops.read).toMatchObject({ count: 1, errors: 1, bytes: 0 });
    expect(ops.discard).toMatchObject({ count: 2, errors: 0, bytes: 3072 });
    expect(ops.flush).toEqual({ count: 1, errors: 1, bytes: 0, seconds: 0, buckets: buckets([0, 1]) });
    for (const op of IO_OPS) {
      expect(ops[op].seconds).toBeGreaterThanOrEqual(0);
      expect(ops[op].buckets.reduce((x, y) => x + y, 0)).toBe(ops[op].count);
    }
  });

  test('writer numbers: the lowest free one, reused after release', () => {
    const a = claimWriter();
    const b = claimWriter();
    expect(a).toBeGreaterThanOrEqual(1);
    expect(b).not.toBe(a);
    releaseWriter(a);
    expect(claimWriter()).toBe(a);
    releaseWriter(a);
    releaseWriter(b);
  });
});
