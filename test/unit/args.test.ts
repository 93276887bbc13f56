import { describe, expect, it } from 'vitest';
import { ArgReader } from '../../src/core/args.ts';
import { TargetArgError } from '../../src/core/errors.ts';

const reader = (...args: string[]): ArgReader => new ArgReader(args, 'linear');

/** Run `fn`, expect a TargetArgError, return its message. */
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

describe('ArgReader: position', () => {
  it('tracks remaining, atEnd and peek as arguments are read', () => {
    const r = reader('a', 'b');
    expect(r.target).toBe('linear');
    expect(r.remaining).toBe(2);
    expect(r.atEnd()).toBe(false);
    expect(r.peek()).toBe('a');
    expect(r.peek()).toBe('a');
    expect(r.next('first')).toBe('a');
    expect(r.remaining).toBe(1);
    expect(r.next('second')).toBe('b');
    expect(r.remaining).toBe(0);
    expect(r.atEnd()).toBe(true);
    expect(r.peek()).toBeUndefined();
  });

  it('is at the end with no arguments', () => {
    const r = reader();
    expect(r.remaining).toBe(0);
    expect(r.atEnd()).toBe(true);
    expect(r.peek()).toBeUndefined();
  });

  it('does not copy or change the array it reads', () => {
    const args = ['x', 'y'];
    const r = new ArgReader(args, 't');
    r.next('x');
    expect(args).toEqual(['x', 'y']);
  });
});

describe('ArgReader.next', () => {
  it('throws missing <what> at the end and does not move', () => {
    const r = reader();
    expect(failure(() => r.next('device path'))).toBe('missing device path');
    expect(r.remaining).toBe(0);
  });

  it('returns arguments as they are, spaces included', () => {
    expect(reader(' a b ').next('x')).toBe(' a b ');
  });
});

describe('ArgReader.uint', () => {
  it('reads decimal non-negative integers', () => {
    const r = reader('0', '42', '007', String(Number.MAX_SAFE_INTEGER));
    expect(r.uint('a')).toBe(0);
    expect(r.uint('b')).toBe(42);
    expect(r.uint('c')).toBe(7);
    expect(r.uint('d')).toBe(Number.MAX_SAFE_INTEGER);
    expect(r.atEnd()).toBe(true);
  });

  it.each(['-1', '+1', '1e3', '0x10', '1.5', '', ' 1', '1 ', 'abc', '9007199254740992', '\u0663'])(
    'rejects %j with the default range',
    (v) => {
      expect(failure(() => reader(v).uint('offset'))).toBe(`invalid offset '${v}' (expected a non-negative integer)`);
    },
  );

  it('checks min and max, both inclusive', () => {
    expect(reader('1', '8').uint('a', { min: 1, max: 8 })).toBe(1);
    expect(reader('8').uint('a', { min: 1, max: 8 })).toBe(8);
    expect(failure(() => reader('0').uint('region size', { min: 1, max: 8 }))).toBe(
      "invalid region size '0' (expected an integer from 1 to 8)",
    );
    expect(failure(() => reader('9').uint('region size', { min: 1, max: 8 }))).toBe(
      "invalid region size '9' (expected an integer from 1 to 8)",
    );
    expect(failure(() => reader('-1').uint('region size', { min: 1, max: 8 }))).toBe(
      "invalid region size '-1' (expected an integer from 1 to 8)",
    );
  });

  it('describes a range open at one end', () => {
    expect(failure(() => reader('0').uint('chunk size', { min: 1 }))).toBe(
      "invalid chunk size '0' (expected an integer of at least 1)",
    );
    expect(failure(() => reader('65').uint('stripes', { max: 64 }))).toBe(
      "invalid stripes '65' (expected an integer from 0 to 64)",
    );
  });

  it('never accepts a sign, even with a negative min', () => {
    expect(failure(() => reader('-1').uint('n', { min: -5 }))).toBe(
      "invalid n '-1' (expected a non-negative integer)",
    );
  });

  it('throws missing <what> at the end', () => {
    expect(failure(() => reader().uint('offset'))).toBe('missing offset');
  });
});

describe('ArgReader.int', () => {
  it('reads negative and positive decimal integers', () => {
    const r = reader('-5', '0', '12', '-0', String(-Number.MAX_SAFE_INTEGER));
    expect(r.int('a')).toBe(-5);
    expect(r.int('b')).toBe(0);
    expect(r.int('c')).toBe(12);
    expect(Object.is(r.int('d'), 0)).toBe(true);
    expect(r.int('e')).toBe(-Number.MAX_SAFE_INTEGER);
  });

  it.each(['+1', '--1', '1e3', '-0x10', '-1.5', 'x', '-', '-9007199254740992'])('rejects %j', (v) => {
    expect(failure(() => reader(v).int('delta'))).toBe(`invalid delta '${v}' (expected an integer)`);
  });

  it('checks min and max', () => {
    expect(reader('-3').int('a', { min: -3, max: 3 })).toBe(-3);
    expect(failure(() => reader('-4').int('bias', { min: -3, max: 3 }))).toBe(
      "invalid bias '-4' (expected an integer from -3 to 3)",
    );
    expect(failure(() => reader('4').int('bias', { max: 3 }))).toBe(
      "invalid bias '4' (expected an integer of at most 3)",
    );
    expect(failure(() => reader('-1').int('bias', { min: 0 }))).toBe(
      "invalid bias '-1' (expected a non-negative integer)",
    );
    expect(failure(() => reader('-11').int('bias', { min: -10 }))).toBe(
      "invalid bias '-11' (expected an integer of at least -10)",
    );
  });

  it('throws missing <what> at the end', () => {
    expect(failure(() => reader().int('delta'))).toBe('missing delta');
  });
});

describe('ArgReader.oneOf', () => {
  const modes = ['sync', 'nosync'] as const;

  it('returns the matching choice', () => {
    const mode: 'sync' | 'nosync' = reader('nosync').oneOf('mode', modes);
    expect(mode).toBe('nosync');
  });

  it('compares exactly', () => {
    expect(failure(() => reader('SYNC').oneOf('mode', modes))).toBe(
      "invalid mode 'SYNC' (expected one of sync, nosync)",
    );
  });

  it('throws missing <what> at the end', () => {
    expect(failure(() => reader().oneOf('mode', modes))).toBe('missing mode');
  });
});

describe('ArgReader.group', () => {
  it('reads a count and that many arguments', () => {
    const r = reader('2', 'handle_errors', 'keep_log', 'tail');
    expect(r.group('features', { max: 8 })).toEqual(['handle_errors', 'keep_log']);
    expect(r.next('rest')).toBe('tail');
  });

  it('reads an empty group', () => {
    const r = reader('0', 'x');
    expect(r.group('features', {})).toEqual([]);
    expect(r.peek()).toBe('x');
  });

  it('reads a group that ends the arguments', () => {
    const r = reader('1', 'a');
    expect(r.group('log args', { min: 1 })).toEqual(['a']);
    expect(r.atEnd()).toBe(true);
  });

  it('checks the count', () => {
    expect(failure(() => reader('x').group('features', { max: 2 }))).toBe(
      "invalid features count 'x' (expected an integer from 0 to 2)",
    );
    expect(failure(() => reader('3', 'a', 'b', 'c').group('features', { max: 2 }))).toBe(
      "invalid features count '3' (expected an integer from 0 to 2)",
    );
    expect(failure(() => reader('0').group('log args', { min: 1 }))).toBe(
      "invalid log args count '0' (expected an integer of at least 1)",
    );
  });

  it('refuses a count beyond the arguments left', () => {
    expect(failure(() => reader('3', 'a', 'b').group('features', {}))).toBe(
      'not enough arguments for features (expected 3, got 2)',
    );
  });

  it('throws missing <what> count at the end', () => {
    expect(failure(() => reader().group('features', {}))).toBe('missing features count');
  });
});

describe('ArgReader.expectEnd and fail', () => {
  it('passes when every argument was read', () => {
    const r = reader('a');
    r.next('a');
    expect(() => r.expectEnd()).not.toThrow();
    expect(() => reader().expectEnd()).not.toThrow();
  });

  it('names the first extra argument', () => {
    const r = reader('a', 'b', 'c');
    r.next('a');
    expect(failure(() => r.expectEnd())).toBe("too many arguments (unexpected 'b')");
  });

  it('throws a TargetArgError with the message as given', () => {
    expect(failure(() => reader().fail('device too small'))).toBe('device too small');
  });

  it('leaves the target name out of every message', () => {
    const messages = [
      failure(() => reader().next('x')),
      failure(() => reader('q').uint('x')),
      failure(() => reader('q').oneOf('x', ['a'])),
      failure(() => reader('q').group('x', {})),
      failure(() => reader('q').expectEnd()),
    ];
    for (const m of messages) expect(m).not.toMatch(/linear/);
  });
});
