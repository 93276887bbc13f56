/**
 * The lease between the main thread and a connection thread (src/nbd/file-ranges.ts): file
 * I/O may start only under the current generation, and revoke() resolves only once the I/O
 * that entered before it has left, so suspend cannot return while a thread still writes.
 */
import { describe, expect, it } from 'vitest';
import { GEN, INFLIGHT, abandon, enter, leave, newLease, revoke } from '../../src/nbd/file-ranges.ts';

const tick = (ms = 20): Promise<void> => new Promise((r) => setTimeout(r, ms));

describe('file-range lease', () => {
  it('lets I/O in only under the current generation, never under generation 0', () => {
    const l = newLease();
    expect(enter(l, 0)).toBe(false);
    Atomics.store(l, GEN, 3);
    expect(enter(l, 2)).toBe(false);
    expect(enter(l, 3)).toBe(true);
    expect(Atomics.load(l, INFLIGHT)).toBe(1);
    leave(l);
    expect(Atomics.load(l, INFLIGHT)).toBe(0);
  });

  it('revoke waits for the I/O in flight and lets no new I/O in meanwhile', async () => {
    const l = newLease();
    Atomics.store(l, GEN, 7);
    expect(enter(l, 7)).toBe(true);
    expect(enter(l, 7)).toBe(true);
    let revoked = false;
    const p = revoke(l).then(() => { revoked = true; });
    expect(enter(l, 7)).toBe(false); // stopped at once
    await tick();
    expect(revoked).toBe(false);
    leave(l);
    await tick();
    expect(revoked).toBe(false); // one still in flight
    leave(l);
    await p;
    expect(revoked).toBe(true);
    expect(Atomics.load(l, INFLIGHT)).toBe(0);
  });

  it('revoke with nothing in flight resolves at once; abandon releases a waiting revoke', async () => {
    const l = newLease();
    Atomics.store(l, GEN, 1);
    await revoke(l);
    Atomics.store(l, GEN, 2);
    expect(enter(l, 2)).toBe(true); // a thread that then dies
    let revoked = false;
    const p = revoke(l).then(() => { revoked = true; });
    await tick();
    expect(revoked).toBe(false);
    abandon(l);
    await p;
    expect(revoked).toBe(true);
  });
});
