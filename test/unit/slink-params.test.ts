/**
 * Slink parameters (src/slink/params.ts): every policy and fall-behind form and unit, the
 * status-table round trip (through the real table parser, so escapes are checked too),
 * the helpers the replicator's messages use, and every error message exactly.
 */
import { describe, expect, it } from 'vitest';
import { TargetArgError } from '../../src/core/errors.ts';
import { parseTable } from '../../src/core/table-parse.ts';
import {
  DEFAULT_POLICY, checkSlinkCount, formatFallBehind, formatPolicy, formatSlinkParams, parseFallBehind, parsePolicy, parseSlinkParams,
} from '../../src/slink/params.ts';
import type { SlinkParams } from '../../src/slink/types.ts';

const parse = (text: string, max?: number): SlinkParams => parseSlinkParams(text === '' ? [] : text.split(' '), max);

/** Run `fn`, expect a TargetArgError (EINVAL), return its message. */
function failure(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(TargetArgError);
    expect((err as TargetArgError).code).toBe('EINVAL');
    return (err as Error).message;
  }
  throw new Error('expected a TargetArgError');
}

/** the words of formatSlinkParams as the table parser gives them back */
function viaTable(p: SlinkParams): string[] {
  return parseTable('t', `0 1 replicator ${formatSlinkParams(p).join(' ')}`)[0]!.args;
}

describe('slink number', () => {
  it.each([['0', 0], ['1', 1], ['64', 64], ['007', 7]])('%s', (word, n) => {
    expect(parse(word)).toEqual({
      slink: n, policy: { mode: 'async', onFallBehind: 'sync' }, policyText: null, fallBehind: null, fallBehindText: null, options: [],
    });
  });

  it('honours maxSlink', () => {
    expect(parse('3', 3).slink).toBe(3);
    expect(failure(() => parse('4', 3))).toBe("invalid slink number '4' (expected an integer from 0 to 3)");
  });

  it.each([
    ['', 'missing slink number'],
    ['65', "invalid slink number '65' (expected an integer from 0 to 64)"],
    ['-1', "invalid slink number '-1' (expected an integer from 0 to 64)"],
    ['x', "invalid slink number 'x' (expected an integer from 0 to 64)"],
    ['1.0', "invalid slink number '1.0' (expected an integer from 0 to 64)"],
    ['async', "invalid slink number 'async' (expected an integer from 0 to 64)"],
  ])('refuses %j', (text, message) => {
    expect(failure(() => parse(text))).toBe(message);
  });
});

describe('policy', () => {
  it.each([
    ['sync', 'sync', 'sync'],
    ['synchronous', 'sync', 'sync'],
    ['async', 'async', 'sync'],
    ['asynchronous', 'async', 'sync'],
    ['async+stall', 'async', 'stall'],
    ['asynchronous+stall', 'async', 'stall'],
    ['async+pull-ahead', 'async', 'pull-ahead'],
    ['asynchronous+pull-ahead', 'async', 'pull-ahead'],
  ] as const)('%s', (word, mode, onFallBehind) => {
    const p = parse(`2 ${word}`);
    expect(p.policy).toEqual({ mode, onFallBehind });
    expect(p.policyText).toBe(word);
    expect(p.fallBehind).toBeNull();
    expect(parsePolicy(word, 2)).toEqual({ mode, onFallBehind });
  });

  it('defaults to async, switching to sync when behind', () => {
    expect(parse('1').policy).toEqual(DEFAULT_POLICY);
    expect(DEFAULT_POLICY).toEqual({ mode: 'async', onFallBehind: 'sync' });
  });

  it.each([
    ['1 asyncc', "slink 1: unknown policy 'asyncc' (expected sync|synchronous|async|asynchronous, optionally +stall or +pull-ahead)"],
    ['1 ASYNC', "slink 1: unknown policy 'ASYNC' (expected sync|synchronous|async|asynchronous, optionally +stall or +pull-ahead)"],
    ['1 async+stal', "slink 1: unknown policy 'async+stal' (expected sync|synchronous|async|asynchronous, optionally +stall or +pull-ahead)"],
    ['1 async+', "slink 1: unknown policy 'async+' (expected sync|synchronous|async|asynchronous, optionally +stall or +pull-ahead)"],
    ['1 async+stall+pull-ahead', "slink 1: unknown policy 'async+stall+pull-ahead' (expected sync|synchronous|async|asynchronous, optionally +stall or +pull-ahead)"],
    ['1 sync+stall', "slink 1: sync slink takes no '+stall' in policy 'sync+stall' (only an async slink falls behind)"],
    ['1 synchronous+pull-ahead', "slink 1: sync slink takes no '+pull-ahead' in policy 'synchronous+pull-ahead' (only an async slink falls behind)"],
    ['1 async sync', "slink 1: more than one policy ('sync' after 'async')"],
    ['1 async ios 5 async', "slink 1: more than one policy ('async' after 'async')"],
    ['1 ios 5 sync', "slink 1: policy 'sync' out of place (expected <slink#> [<policy> [<fallbehind>]] [<key>=<value>…])"],
    ['1 peer=a async', "slink 1: policy 'async' out of place (expected <slink#> [<policy> [<fallbehind>]] [<key>=<value>…])"],
  ])('refuses %j', (text, message) => {
    expect(failure(() => parse(text))).toBe(message);
  });
});

describe('fall-behind', () => {
  it.each([
    ['ios 100', { kind: 'ios', value: 100 }],
    ['ios=100', { kind: 'ios', value: 100 }],
    ['ios 1', { kind: 'ios', value: 1 }],
    ['size 128', { kind: 'size', sectors: 128, text: '128' }],
    ['size 128s', { kind: 'size', sectors: 128, text: '128s' }],
    ['size 128S', { kind: 'size', sectors: 128, text: '128S' }],
    ['size 1k', { kind: 'size', sectors: 2, text: '1k' }],
    ['size 3K', { kind: 'size', sectors: 6, text: '3K' }],
    ['size 64m', { kind: 'size', sectors: 131072, text: '64m' }],
    ['size=64m', { kind: 'size', sectors: 131072, text: '64m' }],
    ['size 64M', { kind: 'size', sectors: 131072, text: '64M' }],
    ['size 2g', { kind: 'size', sectors: 2 * 2 ** 21, text: '2g' }],
    ['size 1t', { kind: 'size', sectors: 2 ** 31, text: '1t' }],
    ['size 1P', { kind: 'size', sectors: 2 ** 41, text: '1P' }],
    ['timeout 250', { kind: 'timeout', ms: 250, text: '250' }],
    ['timeout 250t', { kind: 'timeout', ms: 250, text: '250t' }],
    ['timeout 5s', { kind: 'timeout', ms: 5000, text: '5s' }],
    ['timeout=5s', { kind: 'timeout', ms: 5000, text: '5s' }],
    ['timeout 5S', { kind: 'timeout', ms: 5000, text: '5S' }],
    ['timeout 2m', { kind: 'timeout', ms: 120_000, text: '2m' }],
    ['timeout 1h', { kind: 'timeout', ms: 3_600_000, text: '1h' }],
    ['timeout 1d', { kind: 'timeout', ms: 86_400_000, text: '1d' }],
  ] as const)('%s, after async and right after the slink number', (text, fallBehind) => {
    for (const policy of ['async', 'asynchronous', 'async+stall', 'asynchronous+pull-ahead', '']) {
      const p = parse(policy === '' ? `3 ${text}` : `3 ${policy} ${text}`);
      expect(p.fallBehind).toEqual(fallBehind);
      expect(p.fallBehindText).toBe(text);
      expect(p.policyText).toBe(policy === '' ? null : policy);
      expect(p.policy.mode).toBe('async');
      expect(p.options).toEqual([]);
    }
    expect(parseFallBehind(text.split(' '), 3)).toEqual(fallBehind);
  });

  it('keeps options after it', () => {
    const p = parse('1 async size=64m peer=10.0.0.2:7788 secret=/etc/dmkit/site1.key');
    expect(p.fallBehind).toEqual({ kind: 'size', sectors: 131072, text: '64m' });
    expect(p.options).toEqual(['peer=10.0.0.2:7788', 'secret=/etc/dmkit/site1.key']);
  });

  it.each([
    ['1 sync ios 100', "slink 1: sync slink takes no fall-behind (got 'ios 100')"],
    ['1 synchronous size=64m', "slink 1: sync slink takes no fall-behind (got 'size=64m')"],
    ['1 sync timeout', "slink 1: sync slink takes no fall-behind (got 'timeout')"],
    ['1 sync retest=5 ios 100', "slink 1: sync slink takes no fall-behind (got 'ios 100')"],
    ['1 size 64x', "slink 1: invalid fall-behind size '64x' (expected <N>[s|k|m|g|t|p])"],
    ['1 async size 64x', "slink 1: invalid fall-behind size '64x' (expected <N>[s|k|m|g|t|p])"],
    ['1 async size=64x', "slink 1: invalid fall-behind size '64x' (expected <N>[s|k|m|g|t|p])"],
    ['1 async size 64mb', "slink 1: invalid fall-behind size '64mb' (expected <N>[s|k|m|g|t|p])"],
    ['1 async size m', "slink 1: invalid fall-behind size 'm' (expected <N>[s|k|m|g|t|p])"],
    ['1 async size -1', "slink 1: invalid fall-behind size '-1' (expected <N>[s|k|m|g|t|p])"],
    ['1 async size 1.5m', "slink 1: invalid fall-behind size '1.5m' (expected <N>[s|k|m|g|t|p])"],
    ['1 async size=', "slink 1: invalid fall-behind size '' (expected <N>[s|k|m|g|t|p])"],
    ['1 async size 0', "slink 1: invalid fall-behind size '0' (expected a positive <N>[s|k|m|g|t|p])"],
    ['1 async size 0m', "slink 1: invalid fall-behind size '0m' (expected a positive <N>[s|k|m|g|t|p])"],
    ['1 async size 99999p', "slink 1: fall-behind size '99999p' is too large (at most 9007199254740991 sectors)"],
    ['1 async size', 'slink 1: missing value of fall-behind size (expected size <N>[s|k|m|g|t|p])'],
    ['1 async timeout 5x', "slink 1: invalid fall-behind timeout '5x' (expected <N>[t|s|m|h|d])"],
    ['1 async timeout 5ms', "slink 1: invalid fall-behind timeout '5ms' (expected <N>[t|s|m|h|d])"],
    ['1 async timeout=0s', "slink 1: invalid fall-behind timeout '0s' (expected a positive <N>[t|s|m|h|d])"],
    ['1 async timeout 9999999999999d', "slink 1: fall-behind timeout '9999999999999d' is too large (at most 9007199254740991 ms)"],
    ['1 async timeout', 'slink 1: missing value of fall-behind timeout (expected timeout <N>[t|s|m|h|d])'],
    ['1 async ios 0', "slink 1: invalid fall-behind ios '0' (expected a positive integer <N>)"],
    ['1 async ios 1k', "slink 1: invalid fall-behind ios '1k' (expected a positive integer <N>)"],
    ['1 async ios=-3', "slink 1: invalid fall-behind ios '-3' (expected a positive integer <N>)"],
    ['1 async ios peer=a', "slink 1: invalid fall-behind ios 'peer=a' (expected a positive integer <N>)"],
    ['1 async ios 99999999999999999999', "slink 1: invalid fall-behind ios '99999999999999999999' (expected a positive integer <N>)"],
    ['1 async ios', 'slink 1: missing value of fall-behind ios (expected ios <N>)'],
    ['1 async ios 5 size 6', "slink 1: more than one fall-behind ('size 6' after 'ios 5')"],
    ['1 ios=5 ios=6', "slink 1: more than one fall-behind ('ios=6' after 'ios=5')"],
    ['1 async peer=a ios 5', "slink 1: fall-behind 'ios 5' out of place (expected <slink#> [<policy> [<fallbehind>]] [<key>=<value>…])"],
  ])('refuses %j', (text, message) => {
    expect(failure(() => parse(text))).toBe(message);
  });

  it('parseFallBehind refuses anything but one fall-behind', () => {
    expect(failure(() => parseFallBehind([], 2))).toBe("slink 2: invalid fall-behind '' (expected ios|size|timeout <N>, or ios=<N> and so on)");
    expect(failure(() => parseFallBehind(['bytes', '5'], 2))).toBe("slink 2: invalid fall-behind 'bytes 5' (expected ios|size|timeout <N>, or ios=<N> and so on)");
    expect(failure(() => parseFallBehind(['ios=5', '6'], 2))).toBe("slink 2: invalid fall-behind 'ios=5 6' (expected ios|size|timeout <N>, or ios=<N> and so on)");
    expect(failure(() => parseFallBehind(['ios', '5', '6'], 2))).toBe("slink 2: invalid fall-behind 'ios 5 6' (expected ios|size|timeout <N>, or ios=<N> and so on)");
  });
});

describe('key=value options', () => {
  it('are kept in order, with any value', () => {
    const p = parse('4 peer=h:1 tls=on integrity=crc32c retest=5 x-9=a=b peer=again');
    expect(p.options).toEqual(['peer=h:1', 'tls=on', 'integrity=crc32c', 'retest=5', 'x-9=a=b', 'peer=again']);
    expect(p.policyText).toBeNull();
  });

  it.each([
    ['1 async foo', "slink 1: unexpected word 'foo' (expected a fall-behind or <key>=<value>)"],
    ['1 sync foo', "slink 1: unexpected word 'foo' (expected <key>=<value>)"],
    ['1 async ios 5 foo', "slink 1: unexpected word 'foo' (expected <key>=<value>)"],
    ['1 ios 5 foo', "slink 1: unexpected word 'foo' (expected <key>=<value>)"],
    ['1 peer=a foo', "slink 1: unexpected word 'foo' (expected <key>=<value>)"],
    ['1 foo', "slink 1: unknown policy 'foo' (expected sync|synchronous|async|asynchronous, optionally +stall or +pull-ahead)"],
    ['1 Peer=a', "slink 1: invalid option 'Peer=a' (expected <key>=<value> with a key of [a-z][a-z0-9-]*)"],
    ['1 =a', "slink 1: invalid option '=a' (expected <key>=<value> with a key of [a-z][a-z0-9-]*)"],
    ['1 9p=a', "slink 1: invalid option '9p=a' (expected <key>=<value> with a key of [a-z][a-z0-9-]*)"],
    ['1 a_b=c', "slink 1: invalid option 'a_b=c' (expected <key>=<value> with a key of [a-z][a-z0-9-]*)"],
    ['1 peer=', "slink 1: option 'peer=' has no value (expected peer=<value>)"],
  ])('refuses %j', (text, message) => {
    expect(failure(() => parse(text))).toBe(message);
  });
});

describe('round trip: formatSlinkParams → table → parseSlinkParams', () => {
  it.each([
    '0', '1 sync', '1 synchronous retest=5', '2 async', '2 asynchronous+stall ios 100', '3 async+pull-ahead size=64m',
    '3 size 64M peer=a:1', '4 timeout=5s', '5 ios 7 a=1 b=2', '6 async timeout 3d secret=/k tls=off integrity=none',
  ])('%s re-emits what was given', (text) => {
    const p = parse(text);
    expect(formatSlinkParams(p)).toEqual(text.split(' '));
    expect(parseSlinkParams(viaTable(p))).toEqual(p);
  });

  it('escapes option values for the table', () => {
    const p = parseSlinkParams(['1', 'secret=/my keys/#1\\x']);
    expect(formatSlinkParams(p)).toEqual(['1', 'secret=/my\\ keys/\\#1\\\\x']);
    expect(parseSlinkParams(viaTable(p))).toEqual(p);
  });

  it('writes the canonical form of a value given without its text', () => {
    const p: SlinkParams = {
      slink: 2, policy: { mode: 'async', onFallBehind: 'stall' }, policyText: null,
      fallBehind: { kind: 'size', sectors: 131072, text: '64m' }, fallBehindText: null, options: ['retest=3'],
    };
    expect(formatSlinkParams(p)).toEqual(['2', 'async+stall', 'size', '64m', 'retest=3']);
    const back = parseSlinkParams(viaTable(p));
    expect(back.policy).toEqual(p.policy);
    expect(back.fallBehind).toEqual(p.fallBehind);
    expect(back.options).toEqual(p.options);
    expect(formatSlinkParams({ ...p, policy: DEFAULT_POLICY, fallBehind: null })).toEqual(['2', 'retest=3']);
    expect(formatSlinkParams({ ...p, policy: { mode: 'sync', onFallBehind: 'sync' }, fallBehind: null })).toEqual(['2', 'sync', 'retest=3']);
  });

  it('formatPolicy and formatFallBehind give canonical words', () => {
    expect(formatPolicy({ mode: 'sync', onFallBehind: 'stall' })).toBe('sync');
    expect(formatPolicy({ mode: 'async', onFallBehind: 'sync' })).toBe('async');
    expect(formatPolicy({ mode: 'async', onFallBehind: 'pull-ahead' })).toBe('async+pull-ahead');
    expect(formatFallBehind({ kind: 'ios', value: 9 })).toBe('ios 9');
    expect(formatFallBehind({ kind: 'timeout', ms: 5000, text: '5s' })).toBe('timeout 5s');
  });
});

describe('checkSlinkCount: what follows a slink\'s counted parameters', () => {
  const late = "follows where the next slink's type or the end of the line was expected";
  const words = (n: number): string[] => ['1', ...Array.from({ length: n - 1 }, (_, i) => `k${i}=v`)];

  it('the end of the line, or a word that may be a slink type, passes', () => {
    for (const next of [undefined, 'blockdev', 'local', 'tcp', 'nbd', 'frob', 'my-plugin']) {
      expect(() => checkSlinkCount('tcp', words(6), next)).not.toThrow();
    }
  });

  it.each([
    ['retest=2', 6, `slink 1 ('tcp'): its parameter count says 6, but a 7th, 'retest=2', ${late}`],
    ['sync', 1, `slink 1 ('tcp'): its parameter count says 1, but a 2nd, 'sync', ${late}`],
    ['async+stall', 2, `slink 1 ('tcp'): its parameter count says 2, but a 3rd, 'async+stall', ${late}`],
    ['ios', 3, `slink 1 ('tcp'): its parameter count says 3, but a 4th, 'ios', ${late}`],
    ['size=64m', 7, `slink 1 ('tcp'): its parameter count says 7, but an 8th, 'size=64m', ${late}`],
    ['0', 10, `slink 1 ('tcp'): its parameter count says 10, but an 11th, '0', ${late}`],
    ['x=1', 11, `slink 1 ('tcp'): its parameter count says 11, but a 12th, 'x=1', ${late}`],
    ['x=1', 17, `slink 1 ('tcp'): its parameter count says 17, but an 18th, 'x=1', ${late}`],
    ['x=1', 20, `slink 1 ('tcp'): its parameter count says 20, but a 21st, 'x=1', ${late}`],
    ['x=1', 21, `slink 1 ('tcp'): its parameter count says 21, but a 22nd, 'x=1', ${late}`],
  ])('a parameter-shaped %s after %i parameters', (next, n, message) => {
    expect(failure(() => checkSlinkCount('tcp', words(n), next))).toBe(message);
  });

  it('a count too large swallows the next slink\'s type and count: said so; any other odd word is left to parseSlinkParams', () => {
    const five = ['1', 'peer=a:1', 'secret=/s', 'tls=on', 'compress=lz4'];
    expect(failure(() => checkSlinkCount('tcp', [...five, 'blockdev'], '1')))
      .toBe("slink 1 ('tcp'): its parameter count says 6, but its 6th, 'blockdev', looks like the next slink's type (expected 6 parameters, got 5)");
    expect(failure(() => checkSlinkCount('tcp', ['1', 'async', 'local', '1', '0'], 'blockdev')))
      .toBe("slink 1 ('tcp'): its parameter count says 5, but its 3rd, 'local', looks like the next slink's type (expected 5 parameters, got 2)");
    for (const [words, next] of [[['1', 'fast'], undefined], [['1', 'fast'], 'blockdev'], [['1', 'fast', 'x=1'], undefined], [[...five, 'frob'], 'blockdev']] as const) {
      expect(() => checkSlinkCount('tcp', words, next)).not.toThrow();
    }
  });

  it('names the slink by its number as written, or by its type alone when the number is not one', () => {
    expect(failure(() => checkSlinkCount('local', ['007'], 'sync'))).toBe(`slink 7 ('local'): its parameter count says 1, but a 2nd, 'sync', ${late}`);
    expect(failure(() => checkSlinkCount('local', ['x'], 'sync'))).toBe(`slink 'local': its parameter count says 1, but a 2nd, 'sync', ${late}`);
  });
});
