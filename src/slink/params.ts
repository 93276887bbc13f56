/**
 * A slink's parameters from the replicator's table, and back:
 *
 *   <slink#> [<policy> [<fallbehind>]] [<key>=<value>…]
 *
 *   policy      sync | synchronous | async | asynchronous, an async one optionally joined
 *               with +stall or +pull-ahead (async+pull-ahead); default async
 *   fallbehind  ios <N> | size <N>[s|k|m|g|t|p] | timeout <N>[t|s|m|h|d], or one token
 *               ios=N | size=64m | timeout=5s; only after an async policy or right after
 *               <slink#> (async by default); at most one
 *   key=value   transport options (key [a-z][a-z0-9-]*), kept in order for the transport
 *
 * Sizes without a unit are sectors; k, m, g, t, p are KiB, MiB, … (every one a whole number
 * of sectors). Timeouts without a unit, and with `t`, are milliseconds; s, m (minutes), h, d.
 * Units may be written in either case. `parsePolicy` and `parseFallBehind` also serve the
 * replicator's `policy <slink#> <policy>` and `fallbehind <slink#> <spec>` messages.
 *
 * Errors are `TargetArgError`s naming the slink and the word, e.g.
 * `slink 1: invalid fall-behind size '64x' (expected <N>[s|k|m|g|t|p])`.
 */
import { TargetArgError } from '../core/errors.ts';
import { escapeArg } from '../core/table-parse.ts';
import type { FallBehind, SlinkParams, SlinkPolicy } from './types.ts';

/** The policy a slink has when its table gives none. */
export const DEFAULT_POLICY: SlinkPolicy = Object.freeze({ mode: 'async', onFallBehind: 'sync' });

const POLICY = /^(synchronous|sync|asynchronous|async)(?:\+(.*))?$/s;
const VALID_POLICY = /^(?:synchronous|sync|asynchronous|async)(?:\+(?:stall|pull-ahead))?$/;
const POLICY_EXPECTED = 'sync|synchronous|async|asynchronous, optionally +stall or +pull-ahead';
const FALL_KINDS = ['ios', 'size', 'timeout'] as const;
type FallKind = (typeof FALL_KINDS)[number];
const FALL_WORD = /^(ios|size|timeout)(?:=(.*))?$/s;
const OPTION_KEY = /^[a-z][a-z0-9-]*$/;
const NUMBER_UNIT = /^([0-9]+)([A-Za-z]?)$/;
const LAYOUT = '<slink#> [<policy> [<fallbehind>]] [<key>=<value>…]';

/** sectors per unit of a fall-behind size */
const SIZE_UNITS: Readonly<Record<string, number>> = {
  '': 1, s: 1, k: 2, m: 2 ** 11, g: 2 ** 21, t: 2 ** 31, p: 2 ** 41,
};
/** milliseconds per unit of a fall-behind timeout */
const TIME_UNITS: Readonly<Record<string, number>> = {
  '': 1, t: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000,
};
const EXPECTED: Readonly<Record<FallKind, string>> = {
  ios: '<N>',
  size: '<N>[s|k|m|g|t|p]',
  timeout: '<N>[t|s|m|h|d]',
};

/**
 * Parse a slink's parameters (the words after `<slink_type> <#slink_params>`). The slink
 * number must lie in 0 … `maxSlink`. Throws `TargetArgError` naming the bad word.
 */
export function parseSlinkParams(args: readonly string[], maxSlink = 64): SlinkParams {
  const slink = parseSlinkNumber(args[0], maxSlink);
  let i = 1;
  let policy = DEFAULT_POLICY;
  let policyText: string | null = null;
  if (i < args.length && classify(args[i]!) === 'policy') {
    policyText = args[i]!;
    policy = parsePolicy(policyText, slink);
    i++;
  }
  let fallBehind: FallBehind | null = null;
  let fallBehindText: string | null = null;
  if (i < args.length && classify(args[i]!) === 'fall-behind') {
    const words = fallBehindWords(args, i);
    if (policy.mode === 'sync') fail(slink, `sync slink takes no fall-behind (got '${words.join(' ')}')`);
    fallBehind = parseFallBehind(words, slink);
    fallBehindText = words.join(' ');
    i += words.length;
  }
  const options: string[] = [];
  for (; i < args.length; i++) {
    const word = args[i]!;
    const kind = classify(word);
    if (kind === 'option') {
      options.push(parseOption(word, slink));
    } else if (kind === 'fall-behind') {
      const text = fallBehindWords(args, i).join(' ');
      if (policy.mode === 'sync') fail(slink, `sync slink takes no fall-behind (got '${text}')`);
      if (fallBehindText !== null) fail(slink, `more than one fall-behind ('${text}' after '${fallBehindText}')`);
      fail(slink, `fall-behind '${text}' out of place (expected ${LAYOUT})`);
    } else if (VALID_POLICY.test(word)) {
      fail(slink, policyText !== null
        ? `more than one policy ('${word}' after '${policyText}')`
        : `policy '${word}' out of place (expected ${LAYOUT})`);
    } else {
      const canFallBehind = policy.mode === 'async' && fallBehindText === null && options.length === 0;
      const expected = canFallBehind ? 'a fall-behind or <key>=<value>' : '<key>=<value>';
      fail(slink, `unexpected word '${word}' (expected ${expected})`);
    }
  }
  return { slink, policy, policyText, fallBehind, fallBehindText, options };
}

/**
 * After a slink's counted parameters (`type`, then `words`, as many as its count said), the
 * word that follows (`next`, undefined at the end of the line) must be the next slink's
 * type. A word shaped like a slink parameter there (`key=value`, a policy, a fall-behind
 * keyword, a number) means the list is longer than its count: that is said, naming the
 * count and the first word past it, rather than reading the word as a slink type
 * (`missing slink parameters of 'retest=2' count`). Any other word is left to the slink
 * registry (`unknown slink type …`). The other way round, a count too large in the middle
 * of the line swallows the next slink's type and count: a counted word that is no
 * parameter, followed by a number, is said to be that. Throws `TargetArgError`:
 *
 *   slink 1 ('tcp'): its parameter count says 6, but a 7th, 'retest=2', follows where the next slink's type or the end of the line was expected
 *   slink 1 ('tcp'): its parameter count says 6, but its 6th, 'blockdev', looks like the next slink's type (expected 6 parameters, got 5)
 */
export function checkSlinkCount(type: string, words: readonly string[], next: string | undefined): void {
  const who = /^[0-9]+$/.test(words[0] ?? '') ? `slink ${Number(words[0])} ('${type}')` : `slink '${type}'`;
  // a count too large for a slink in the middle of the line takes the next slink's type and
  // count as parameters: a word no parameter is written as, then a number
  for (let i = 1; i < words.length; i++) {
    if (looksLikeParameter(words[i]!)) continue;
    if (!/^[0-9]+$/.test(words[i + 1] ?? next ?? '')) return; // not a slink's start: parseSlinkParams names the word
    throw new TargetArgError(
      `${who}: its parameter count says ${words.length}, but its ${ordinal(i + 1).replace(/^an? /, '')}, '${words[i]}', looks like the next slink's type (expected ${words.length} parameters, got ${i})`,
    );
  }
  if (next === undefined || !looksLikeParameter(next)) return;
  throw new TargetArgError(
    `${who}: its parameter count says ${words.length}, but ${ordinal(words.length + 1)}, '${next}', follows where the next slink's type or the end of the line was expected`,
  );
}

/** a word no slink type is written as, but a slink's parameter is */
function looksLikeParameter(word: string): boolean {
  return word.includes('=') || /^[0-9]+([.][0-9]+)?[A-Za-z]*$/.test(word) || FALL_WORD.test(word) || VALID_POLICY.test(word);
}

/** with its article: a 1st, a 2nd, a 7th, an 8th, an 11th, a 12th, an 18th, a 21st, an 80th … */
function ordinal(n: number): string {
  const teen = n % 100 >= 11 && n % 100 <= 13;
  const suffix = teen ? 'th' : ({ 1: 'st', 2: 'nd', 3: 'rd' } as Record<number, string>)[n % 10] ?? 'th';
  const an = String(n).startsWith('8') || n === 11 || n === 18;
  return `${an ? 'an' : 'a'} ${n}${suffix}`;
}

/**
 * A policy word (`sync`, `asynchronous+stall`, …) of slink `slink`. Throws
 * `TargetArgError`: an unknown word, or `+stall`/`+pull-ahead` on a sync policy.
 */
export function parsePolicy(word: string, slink: number): SlinkPolicy {
  const m = POLICY.exec(word);
  const reaction = m?.[2];
  if (!m || (reaction !== undefined && reaction !== 'stall' && reaction !== 'pull-ahead')) {
    fail(slink, `unknown policy '${word}' (expected ${POLICY_EXPECTED})`);
  }
  const mode = m[1]!.startsWith('sync') ? 'sync' : 'async';
  if (mode === 'sync' && reaction !== undefined) {
    fail(slink, `sync slink takes no '+${reaction}' in policy '${word}' (only an async slink falls behind)`);
  }
  return { mode, onFallBehind: reaction ?? 'sync' };
}

/**
 * A fall-behind of slink `slink` as one word (`size=64m`) or two (`size 64m`); nothing else.
 * Throws `TargetArgError` naming the kind and the bad value.
 */
export function parseFallBehind(words: readonly string[], slink: number): FallBehind {
  const m = words.length > 0 ? FALL_WORD.exec(words[0]!) : null;
  if (!m || words.length > (m[2] === undefined ? 2 : 1)) {
    fail(slink, `invalid fall-behind '${words.join(' ')}' (expected ios|size|timeout <N>, or ios=<N> and so on)`);
  }
  const kind = m[1] as FallKind;
  const value = m[2] ?? words[1];
  if (value === undefined) fail(slink, `missing value of fall-behind ${kind} (expected ${kind} ${EXPECTED[kind]})`);
  if (kind === 'ios') {
    const n = positive(value) ?? fail(slink, `invalid fall-behind ios '${value}' (expected a positive integer <N>)`);
    return { kind, value: n };
  }
  const units = kind === 'size' ? SIZE_UNITS : TIME_UNITS;
  const nu = NUMBER_UNIT.exec(value);
  const unit = nu ? units[nu[2]!.toLowerCase()] : undefined;
  if (!nu || unit === undefined) fail(slink, `invalid fall-behind ${kind} '${value}' (expected ${EXPECTED[kind]})`);
  const n = Number(nu[1]);
  if (n === 0) fail(slink, `invalid fall-behind ${kind} '${value}' (expected a positive ${EXPECTED[kind]})`);
  const total = n * unit;
  if (!Number.isSafeInteger(total)) {
    fail(slink, `fall-behind ${kind} '${value}' is too large (at most ${Number.MAX_SAFE_INTEGER} ${kind === 'size' ? 'sectors' : 'ms'})`);
  }
  return kind === 'size' ? { kind, sectors: total, text: value } : { kind, ms: total, text: value };
}

/**
 * The words of a slink's parameters for the replicator's status table, each escaped with
 * `escapeArg` (so `join(' ')` is table text, and the table parser's words parse back to the
 * same `SlinkParams`). Re-emits the policy and fall-behind as written; when a text is null
 * but the value is not the default, the canonical form (`async+stall`, `size 128`) is used.
 */
export function formatSlinkParams(p: SlinkParams): string[] {
  const words = [String(p.slink)];
  const policy = p.policyText ?? (samePolicy(p.policy, DEFAULT_POLICY) ? null : formatPolicy(p.policy));
  if (policy !== null) words.push(policy);
  const fallBehind = p.fallBehindText ?? (p.fallBehind ? formatFallBehind(p.fallBehind) : null);
  if (fallBehind !== null) words.push(...fallBehind.split(' '));
  words.push(...p.options);
  return words.map(escapeArg);
}

/** The canonical word of a policy: `sync`, `async`, `async+stall`, `async+pull-ahead`. */
export function formatPolicy(p: SlinkPolicy): string {
  if (p.mode === 'sync') return 'sync';
  return p.onFallBehind === 'sync' ? 'async' : `async+${p.onFallBehind}`;
}

/** The canonical text of a fall-behind: `ios 100`, `size 64m`, `timeout 5s` (values as written). */
export function formatFallBehind(f: FallBehind): string {
  return f.kind === 'ios' ? `ios ${f.value}` : `${f.kind} ${f.text}`;
}

function samePolicy(a: SlinkPolicy, b: SlinkPolicy): boolean {
  return a.mode === b.mode && (a.mode === 'sync' || a.onFallBehind === b.onFallBehind);
}

function parseSlinkNumber(word: string | undefined, max: number): number {
  if (word === undefined) throw new TargetArgError('missing slink number');
  const n = positive(word, 0);
  if (n === null || n > max) throw new TargetArgError(`invalid slink number '${word}' (expected an integer from 0 to ${max})`);
  return n;
}

/** what a word after `<slink#>` is, by its shape */
function classify(word: string): 'policy' | 'fall-behind' | 'option' {
  if (FALL_WORD.test(word)) return 'fall-behind';
  return word.includes('=') ? 'option' : 'policy';
}

/** the fall-behind starting at args[i]: one word (`ios=5`) or a keyword and what follows it */
function fallBehindWords(args: readonly string[], i: number): string[] {
  return args[i]!.includes('=') || i + 1 >= args.length ? [args[i]!] : [args[i]!, args[i + 1]!];
}

function parseOption(word: string, slink: number): string {
  const eq = word.indexOf('=');
  const key = word.slice(0, eq);
  if (!OPTION_KEY.test(key)) fail(slink, `invalid option '${word}' (expected <key>=<value> with a key of [a-z][a-z0-9-]*)`);
  if (eq === word.length - 1) fail(slink, `option '${word}' has no value (expected ${key}=<value>)`);
  return word;
}

/** a decimal integer ≥ min (default 1), or null */
function positive(word: string, min = 1): number | null {
  if (!/^[0-9]+$/.test(word)) return null;
  const n = Number(word);
  return Number.isSafeInteger(n) && n >= min ? n : null;
}

function fail(slink: number, message: string): never {
  throw new TargetArgError(`slink ${slink}: ${message}`);
}
