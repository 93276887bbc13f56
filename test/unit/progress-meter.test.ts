/**
 * The progress meter's rules (src/core/progress-meter.ts, docs/core.md "Progress"): done
 * and percent never go back within a run, the total grows with new work, rate over the
 * window, ETA from what remains, and when a run starts again.
 */
import { describe, expect, it } from 'vitest';
import { ProgressMeter, WINDOW_MS } from '../../src/core/progress-meter.ts';

const p = (doneSectors: number, totalSectors: number, work = 'resync') => ({ work, doneSectors, totalSectors });

describe('ProgressMeter', () => {
  it('keeps done and percent from going back when the target\'s done drops (regions dirtied again)', () => {
    const m = new ProgressMeter();
    expect(m.sample(p(0, 1000), 0)).toMatchObject({ doneSectors: 0, totalSectors: 1000, percent: 0, rate: 0, eta: null });
    expect(m.sample(p(600, 1000), 1000)).toMatchObject({ doneSectors: 600, totalSectors: 1000, percent: 60 });
    // writes dirty 200 sectors already copied: the target says 400/1000
    expect(m.sample(p(400, 1000), 2000)).toMatchObject({ doneSectors: 600, totalSectors: 1200, percent: 60 });
    // copying goes on: 100 more done, the honest share 700/1200 = 58% is held at 60
    expect(m.sample(p(500, 1000), 3000)).toMatchObject({ doneSectors: 700, totalSectors: 1200, percent: 60 });
    expect(m.sample(p(900, 1000), 4000)).toMatchObject({ doneSectors: 1100, totalSectors: 1200, percent: 91 });
    expect(m.sample(p(1000, 1000), 5000)).toMatchObject({ doneSectors: 1200, totalSectors: 1200, percent: 100, eta: 0 });
  });

  it('shows 99% at most while anything remains', () => {
    const m = new ProgressMeter();
    expect(m.sample(p(9999, 10000), 0)!.percent).toBe(99);
  });

  it('measures the rate over the window and the ETA from what remains', () => {
    const m = new ProgressMeter();
    m.sample(p(0, 100_000), 0);
    // 2048 sectors (1 MiB) per second
    const r = m.sample(p(2048, 100_000), 1000)!;
    expect(r.rate).toBe(1 << 20);
    expect(r.eta).toBeCloseTo(((100_000 - 2048) * 512) / (1 << 20), 1);
    // only the last WINDOW_MS count: a stall long ago does not drag the rate down
    let t = 1000;
    let done = 2048;
    for (; t < 1000 + 3 * WINDOW_MS; t += 1000) m.sample(p((done += 4096), 1_000_000), t);
    expect(m.sample(p((done += 4096), 1_000_000), t)!.rate).toBe(2 << 20);
    // nothing moves for a whole window: rate 0, ETA unknown
    let last = null;
    for (let u = t + 1000; u <= t + WINDOW_MS + 1000; u += 1000) last = m.sample(p(done, 1_000_000), u);
    expect(last).toMatchObject({ rate: 0, eta: null });
  });

  it('starts a new run after no work, with other work, after completion, or after a long gap', () => {
    const m = new ProgressMeter();
    m.sample(p(800, 1000), 0);
    expect(m.sample(null, 100)).toBeNull();
    expect(m.running).toBe(false);
    expect(m.sample(p(0, 1000), 200)).toMatchObject({ doneSectors: 0, percent: 0 });
    expect(m.sample(p(10, 50, 'verify'), 300)).toMatchObject({ work: 'verify', doneSectors: 10, totalSectors: 50, percent: 20 });
    m.sample(p(50, 50, 'verify'), 400);
    expect(m.sample(p(0, 50, 'verify'), 500)).toMatchObject({ doneSectors: 0, percent: 0 });
    m.sample(p(40, 50, 'verify'), 600);
    expect(m.sample(p(5, 50, 'verify'), 600 + 60_000)).toMatchObject({ doneSectors: 5, percent: 10 });
  });
});
