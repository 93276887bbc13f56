/**
 * Resync rate control (src/targets/resync-control.ts): the `resync-rate` argument, and what
 * a site's flow lets go at once in each mode: fixed (4 ranges, paced at the limit), auto
 * with the application quiet (a window of bytes), auto with application writes in flight
 * (one range at a time).
 */
import { describe, expect, it } from 'vitest';
import { parseResyncRate, ResyncControl, type ResyncFlow } from '../../src/targets/resync-control.ts';

const KiB = 1024;
const MiB = 1 << 20;

/** start ranges of `bytes` until one waits; returns how many went (the waiting one is left to the abort) */
async function startable(flow: ResyncFlow, bytes: number, max = 64): Promise<number> {
  const abort = new AbortController();
  let n = 0;
  for (; n < max; n++) {
    let went = false;
    const p = flow.acquire(n, bytes, abort.signal).then(() => (went = true));
    await new Promise((r) => setImmediate(r));
    if (!went) {
      abort.abort();
      await p;
      flow.release(n, bytes); // the aborted acquire counted itself in
      break;
    }
  }
  for (let i = 0; i < n; i++) flow.release(i, bytes);
  return n;
}

describe('resync-rate argument', () => {
  it('auto, bytes per second, and k/m/g in either case', () => {
    expect(parseResyncRate('auto')).toBeNull();
    expect(parseResyncRate('0')).toBe(0);
    expect(parseResyncRate('52428800')).toBe(50 * MiB);
    expect(parseResyncRate('512k')).toBe(512 * KiB);
    expect(parseResyncRate('40M')).toBe(40 * MiB);
    expect(parseResyncRate('2g')).toBe(2 * 1024 * MiB);
  });

  it('refuses anything else with the expected syntax', () => {
    for (const w of ['8x', '-1', '1.5m', 'm', '', 'AUTO']) {
      expect(() => parseResyncRate(w), w).toThrow(/expected auto, or bytes per second: <N>\[k\|m\|g\]/);
    }
    expect(() => parseResyncRate('99999999999g')).toThrow(/too large/);
  });
});

describe('a site flow', () => {
  it('starts in auto mode; set() switches to fixed and back', () => {
    const c = new ResyncControl();
    expect(c.status()).toMatchObject({ mode: 'auto', limit: null });
    c.set('8m');
    expect(c.status()).toMatchObject({ mode: 'fixed', limit: 8 * MiB });
    expect(c.flow(1).rate()).toBe(8 * MiB);
    expect(c.flowStatus(1)).toMatchObject({ mode: 'fixed', windowBytes: null, backoff: null });
    c.set('0');
    expect(c.flow(1).rate()).toBe(0);
    c.set('auto');
    expect(c.status()).toMatchObject({ mode: 'auto', limit: null });
  });

  it('fixed: 4 ranges in flight whatever their size', async () => {
    const c = new ResyncControl();
    c.set('100m');
    expect(await startable(c.flow(1), 64 * KiB)).toBe(4);
    expect(await startable(c.flow(1), 1 * MiB)).toBe(4);
  });

  it('auto, application quiet: the window in bytes (4 MiB to start)', async () => {
    const c = new ResyncControl();
    expect(await startable(c.flow(1), 1 * MiB)).toBe(4);
    expect(await startable(c.flow(2), 512 * KiB)).toBe(8); // a flow per site
    expect(c.flow(1).rate()).toBe(0); // no pacing
  });

  it('auto, application writes in flight: one range at a time, and the status says why', async () => {
    const c = new ResyncControl();
    const f = c.flow(1);
    const t = c.appStart();
    expect(c.appBusy).toBe(true);
    expect(await startable(f, 64 * KiB)).toBe(1);
    expect(c.flowStatus(1).backoff).toMatch(/^app-writes/);
    expect(c.status().appWrites.inFlight).toBe(1);
    c.appEnd(t);
    expect(c.status().appWrites.inFlight).toBe(0);
  });

  it('a range always goes when none is in flight, and a waiting one goes when another is released', async () => {
    const c = new ResyncControl();
    const f = c.flow(1);
    c.appStart(); // busy: one at a time
    await f.acquire(0, 64 * KiB);
    let second = false;
    const p = f.acquire(1, 64 * KiB).then(() => (second = true));
    await new Promise((r) => setTimeout(r, 10));
    expect(second).toBe(false);
    f.release(0, 64 * KiB);
    await p;
    expect(second).toBe(true);
    expect(f.status().inFlightBytes).toBe(64 * KiB);
  });
});
