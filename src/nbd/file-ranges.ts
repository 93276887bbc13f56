/**
 * File ranges handed to the NBD connection threads (docs/nbd.md, "Connection threads"), and
 * the lease that says when a thread may use them. The lease is two cells of shared memory:
 * GEN, the generation of ranges currently valid (0: none, go through the main thread), and
 * INFLIGHT, the file I/O a thread is running. A thread counts itself in before checking GEN,
 * the main thread zeroes GEN before waiting for INFLIGHT to reach 0: with sequentially
 * consistent atomics one of the two always sees the other, so no I/O starts after a stop.
 */
import fs from 'node:fs';
import type { FileRange } from './export.ts';

export const GEN = 0;
export const INFLIGHT = 1;

export function newLease(): Int32Array {
  return new Int32Array(new SharedArrayBuffer(8));
}

/** thread side: may I/O use the ranges of generation `gen`? If true, call leave() after it */
export function enter(lease: Int32Array, gen: number): boolean {
  if (gen === 0) return false;
  Atomics.add(lease, INFLIGHT, 1);
  if (Atomics.load(lease, GEN) === gen) return true;
  leave(lease);
  return false;
}

export function leave(lease: Int32Array): void {
  if (Atomics.sub(lease, INFLIGHT, 1) === 1 && Atomics.load(lease, GEN) === 0) Atomics.notify(lease, INFLIGHT);
}

/** main side: no more I/O on the current ranges; resolves when none is running */
export async function revoke(lease: Int32Array): Promise<void> {
  Atomics.store(lease, GEN, 0);
  for (;;) {
    const n = Atomics.load(lease, INFLIGHT);
    if (n <= 0) return;
    const w = (Atomics as unknown as AtomicsWithWaitAsync).waitAsync(lease, INFLIGHT, n);
    if (w.async) await w.value;
  }
}

/** main side: the thread is gone, whatever it counted will never leave */
export function abandon(lease: Int32Array): void {
  Atomics.store(lease, GEN, 0);
  Atomics.store(lease, INFLIGHT, 0);
  Atomics.notify(lease, INFLIGHT);
}

interface AtomicsWithWaitAsync {
  waitAsync(a: Int32Array, index: number, value: number): { async: boolean; value: Promise<unknown> | string };
}

/** close a descriptor handed over but not taken */
export function closeFd(fd: number): void {
  try {
    fs.closeSync(fd);
  } catch {
    /* already closed */
  }
}

/** close the descriptors of ranges nobody will use */
export function closeRanges(ranges: readonly FileRange[] | null): void {
  for (const r of ranges ?? []) closeFd(r.fd);
}
