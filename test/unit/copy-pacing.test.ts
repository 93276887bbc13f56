/**
 * The copy service's rate counts the image a copy covers, also when `select` copies little
 * or nothing of a range (a checksum resync reads both sides of every region to choose):
 * on a fake clock, a 1 MiB/s copy of 8 ranges of 256 KiB whose `select` sends nothing
 * has covered about 1 MiB after one second, not all 2 MiB at once. No wall-clock timing:
 * the clock is vitest's.
 */
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import type { Bio } from '../../src/core/bio.ts';
import { copyRanges, type CopyRange } from '../../src/core/copy.ts';
import type { BlockDev } from '../../src/core/types.ts';

const mem = (sectors: number): BlockDev => ({ ref: 'mem', sectors, submit: (_bio: Bio) => Promise.resolve() });

beforeEach(() => vi.useFakeTimers({ toFake: ['Date', 'setTimeout', 'clearTimeout', 'performance'] }));
afterEach(() => vi.useRealTimers());

describe('copy pacing', () => {
  it.each([
    ['select sends nothing', async () => [] as CopyRange[]],
    ['select sends one 4 KiB block', async (r: CopyRange) => [{ sector: r.sector, sectors: 8 }]],
    ['no select (everything copied)', undefined],
  ])('a 1 MiB/s limit holds when %s', async (_what, select) => {
    const ranges = Array.from({ length: 8 }, (_, i) => ({ sector: i * 512, sectors: 512 })); // 8 × 256 KiB
    const done: number[] = [];
    const copy = copyRanges({
      src: mem(4096), dst: [mem(4096)], ranges, concurrency: 1, rate: () => 1 << 20, flushAtEnd: false,
      select, after: (r) => void done.push(r.sector),
    });
    await vi.advanceTimersByTimeAsync(10);
    const atStart = done.length;
    await vi.advanceTimersByTimeAsync(1000);
    const afterOneSecond = done.length;
    await vi.advanceTimersByTimeAsync(2000);
    await copy;
    expect(atStart).toBe(1); // the first range goes, then the pace holds the worker
    expect(afterOneSecond).toBeGreaterThanOrEqual(4);
    expect(afterOneSecond).toBeLessThanOrEqual(5); // 1 MiB/s: 4 ranges in a second (+ the one that waits at its end)
    expect(done).toHaveLength(8);
  });
});
