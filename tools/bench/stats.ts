/**
 * The few statistics the benchmark method needs: medians, per-pair ratios, spread.
 * Ratios are always dmkit / reference on a higher-is-better value (throughput).
 */

export function median(xs: readonly number[]): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

/** a[i] / b[i] for each pair i (a and b must have the same length) */
export function pairRatios(a: readonly number[], b: readonly number[]): number[] {
  if (a.length !== b.length) throw new Error(`pairRatios: ${a.length} vs ${b.length} samples`);
  return a.map((x, i) => x / b[i]!);
}

export function min(xs: readonly number[]): number {
  return xs.length ? Math.min(...xs) : NaN;
}

export function max(xs: readonly number[]): number {
  return xs.length ? Math.max(...xs) : NaN;
}

/** relative spread of a sample set: (max - min) / median */
export function spread(xs: readonly number[]): number {
  return (max(xs) - min(xs)) / median(xs);
}
