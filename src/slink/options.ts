/**
 * Transport options (`key=value` words of a slink's parameters) as every transport reads
 * them: known keys only, each at most once, the common `retest=<seconds>`, and other
 * `<key>=<seconds>` values (`readSeconds`).
 *
 *   const opts = readOptions(slink, 'nbd', options, ['retest']);
 *   const retestMs = readRetest(slink, opts.get('retest'));
 */
import { TargetArgError } from '../core/errors.ts';

/** How long after a failure a slink is retested when its table does not say (15 s). */
export const DEFAULT_RETEST_MS = 15_000;
/** the longest retest interval, in seconds (a Node timer holds at most 2^31 − 1 ms) */
export const MAX_RETEST_SECONDS = Math.floor((2 ** 31 - 1) / 1000);

/**
 * Split `key=value` words into a map; throws `TargetArgError` for a word that is not
 * `key=value`, a key not in `known` (the message lists them), or a key given twice.
 */
export function readOptions(
  slink: number, transport: string, options: readonly string[], known: readonly string[],
): Map<string, string> {
  const out = new Map<string, string>();
  const expected = known.length === 0 ? 'none' : known.map((k) => `${k}=…`).join(', ');
  for (const word of options) {
    const eq = word.indexOf('=');
    if (eq <= 0) throw new TargetArgError(`slink ${slink}: invalid ${transport} option '${word}' (expected <key>=<value>)`);
    const key = word.slice(0, eq);
    if (!known.includes(key)) {
      throw new TargetArgError(`slink ${slink}: unknown ${transport} option '${key}' (expected ${expected})`);
    }
    if (out.has(key)) throw new TargetArgError(`slink ${slink}: ${transport} option '${key}' given twice`);
    out.set(key, word.slice(eq + 1));
  }
  return out;
}

/**
 * The `retest=<seconds>` value (a positive integer of at most MAX_RETEST_SECONDS) in
 * milliseconds; DEFAULT_RETEST_MS when absent. Throws `TargetArgError` for a bad value.
 */
export function readRetest(slink: number, value: string | undefined): number {
  return readSeconds(slink, 'retest', value, DEFAULT_RETEST_MS);
}

/**
 * A `<key>=<seconds>` value (a positive integer of at most MAX_RETEST_SECONDS, so a Node
 * timer holds it) in milliseconds; `defaultMs` when absent. Throws `TargetArgError`
 * naming the key for a bad value.
 */
export function readSeconds(slink: number, key: string, value: string | undefined, defaultMs: number): number {
  if (value === undefined) return defaultMs;
  const n = /^[0-9]+$/.test(value) ? Number(value) : NaN;
  if (!Number.isSafeInteger(n) || n < 1 || n > MAX_RETEST_SECONDS) {
    throw new TargetArgError(`slink ${slink}: invalid ${key} '${value}' (expected seconds, an integer from 1 to ${MAX_RETEST_SECONDS})`);
  }
  return n * 1000;
}
