/**
 * Allocation extents (NBD `base:allocation`): merging, and taking a possibly short answer
 * for one part of a range.
 */
import type { Extent } from './types.ts';

/** join neighbouring extents of the same state */
export function mergeExtents(list: Extent[]): Extent[] {
  const out: Extent[] = [];
  for (const e of list) {
    if (e.sectors <= 0) continue;
    const last = out[out.length - 1];
    if (last && last.state === e.state) last.sectors += e.sectors;
    else out.push({ sectors: e.sectors, state: e.state });
  }
  return out;
}

/**
 * Append `part` (an allocation answer for `n` sectors, possibly short or overlong) to `out`,
 * clipped to `n`. Returns the sectors it covers: 0 for an empty answer, less than `n` for a
 * short one.
 */
export function appendClipped(out: Extent[], part: readonly Extent[], n: number): number {
  let covered = 0;
  for (const x of part) {
    const take = Math.min(x.sectors, n - covered);
    if (take > 0) out.push({ sectors: take, state: x.state });
    covered += take;
  }
  return covered;
}
