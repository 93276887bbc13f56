import { describe, expect, it } from 'vitest';
import { TableError, TargetArgError } from '../../src/core/errors.ts';
import { escapeArg, formatTableLine, parseTable, type TableLine } from '../../src/core/table-parse.ts';

/** Parse and expect a TableError; returns it for further checks. */
function parseError(text: string, device = 'vg0'): TableError {
  try {
    parseTable(device, text);
  } catch (err) {
    expect(err).toBeInstanceOf(TableError);
    return err as TableError;
  }
  throw new Error(`expected ${JSON.stringify(text)} to fail`);
}

function args(text: string): string[] {
  const lines = parseTable('d', text);
  expect(lines).toHaveLength(1);
  return lines[0].args;
}

describe('parseTable: structure', () => {
  it('parses one target per line', () => {
    const text = '0 2048 linear /dev/sda 0\n2048 1024 zero\n3072 8 error\n';
    expect(parseTable('vg0', text)).toEqual<TableLine[]>([
      { line: 1, start: 0, length: 2048, type: 'linear', args: ['/dev/sda', '0'] },
      { line: 2, start: 2048, length: 1024, type: 'zero', args: [] },
      { line: 3, start: 3072, length: 8, type: 'error', args: [] },
    ]);
  });

  it('accepts a last line without a newline', () => {
    expect(parseTable('d', '0 8 zero')).toEqual([{ line: 1, start: 0, length: 8, type: 'zero', args: [] }]);
  });

  it('returns [] for empty, blank and comment-only tables', () => {
    expect(parseTable('d', '')).toEqual([]);
    expect(parseTable('d', '\n\n  \t\n')).toEqual([]);
    expect(parseTable('d', '# a comment\n   # another\n\n')).toEqual([]);
  });

  it('separates tokens with any run of spaces and tabs', () => {
    expect(parseTable('d', ' \t0\t\t8  linear \t/dev/x   16 \t ')).toEqual([
      { line: 1, start: 0, length: 8, type: 'linear', args: ['/dev/x', '16'] },
    ]);
  });

  it('keeps numeric arguments as strings and accepts a numeric type name', () => {
    expect(parseTable('d', '0 8 123 456 abc')[0]).toMatchObject({ type: '123', args: ['456', 'abc'] });
  });

  it('does not check gaps, zero lengths or types (the loader does)', () => {
    expect(parseTable('d', '5 0 no-such-target\n100 1 x')).toEqual([
      { line: 1, start: 5, length: 0, type: 'no-such-target', args: [] },
      { line: 2, start: 100, length: 1, type: 'x', args: [] },
    ]);
  });

  it('reads decimal numbers, leading zeros included, up to MAX_SAFE_INTEGER', () => {
    const max = String(Number.MAX_SAFE_INTEGER);
    expect(parseTable('d', `007 ${max} zero`)[0]).toMatchObject({ start: 7, length: Number.MAX_SAFE_INTEGER });
  });

  it('skips a leading byte order mark', () => {
    expect(parseTable('d', '\uFEFF0 8 zero')[0]).toMatchObject({ start: 0, type: 'zero' });
  });
});

describe('parseTable: comments', () => {
  it('starts a comment anywhere on a line', () => {
    expect(parseTable('d', '0 8 linear /dev/x 0 # the first disk\n# whole line\n8 8 zero#tight')).toEqual([
      { line: 1, start: 0, length: 8, type: 'linear', args: ['/dev/x', '0'] },
      { line: 3, start: 8, length: 8, type: 'zero', args: [] },
    ]);
  });

  it('cuts an argument at an unescaped #', () => {
    expect(args('0 8 t ab#cd ef')).toEqual(['ab']);
  });

  it('ends a comment at the end of its physical line, even after a backslash', () => {
    expect(parseTable('d', '0 8 zero # note \\\n8 8 zero')).toEqual([
      { line: 1, start: 0, length: 8, type: 'zero', args: [] },
      { line: 2, start: 8, length: 8, type: 'zero', args: [] },
    ]);
  });

  it('ignores an unterminated escape inside a comment', () => {
    expect(parseTable('d', '0 8 zero # trailing \\')).toHaveLength(1);
  });
});

describe('parseTable: escapes', () => {
  it('escapes a blank, a #, a backslash and ordinary characters', () => {
    expect(args('0 8 t a\\ b c\\#d e\\\\f \\x\\y')).toEqual(['a b', 'c#d', 'e\\f', 'xy']);
  });

  it('escapes a tab and a lone carriage return', () => {
    expect(args('0 8 t a\\\tb c\\\rd')).toEqual(['a\tb', 'c\rd']);
  });

  it('lets an escaped backslash before # still start a comment', () => {
    expect(args('0 8 t a\\\\#comment')).toEqual(['a\\']);
  });

  it('makes an argument of a lone escaped blank', () => {
    expect(args('0 8 t \\  x')).toEqual([' ', 'x']);
  });

  it('unescapes the type and numbers too', () => {
    expect(parseTable('d', '\\0 1\\0 lin\\ ear')[0]).toMatchObject({ start: 0, length: 10, type: 'lin ear' });
  });
});

describe('parseTable: continuation', () => {
  it('joins a line ending in a backslash to the next, separated by a blank', () => {
    const text = '0 8 replicator \\\n  a b\\\nc \\\n d\n8 8 zero';
    expect(parseTable('d', text)).toEqual([
      { line: 1, start: 0, length: 8, type: 'replicator', args: ['a', 'b', 'c', 'd'] },
      { line: 5, start: 8, length: 8, type: 'zero', args: [] },
    ]);
  });

  it('can split the fixed fields', () => {
    expect(parseTable('d', '0\\\n8\\\nzero')).toEqual([{ line: 1, start: 0, length: 8, type: 'zero', args: [] }]);
  });

  it('numbers an entry by the line of its first token', () => {
    const text = '# header\n\n\\\n   \\\n0 8 zero # x\n\n  8 8 \\\n zero\n';
    expect(parseTable('d', text).map((l) => l.line)).toEqual([5, 7]);
  });

  it('joins onto a comment-only line', () => {
    expect(parseTable('d', '0 8 t a \\\n# more args later\n8 8 zero')).toEqual([
      { line: 1, start: 0, length: 8, type: 't', args: ['a'] },
      { line: 3, start: 8, length: 8, type: 'zero', args: [] },
    ]);
  });

  it('accepts a continuation on the last line', () => {
    expect(parseTable('d', '0 8 zero \\\n')).toEqual([{ line: 1, start: 0, length: 8, type: 'zero', args: [] }]);
  });

  it('reports errors on the line where the entry starts', () => {
    expect(parseError('0 8 zero\n8 \\\n x zero').message).toBe(
      "vg0: line 2: invalid length 'x' (expected a non-negative integer)",
    );
  });
});

describe('parseTable: CRLF', () => {
  it('reads CRLF line endings and CRLF continuations', () => {
    const text = '# c\r\n0 8 linear /dev/x 0\r\n\r\n8 8 t a \\\r\n b\r\n';
    expect(parseTable('d', text)).toEqual([
      { line: 2, start: 0, length: 8, type: 'linear', args: ['/dev/x', '0'] },
      { line: 4, start: 8, length: 8, type: 't', args: ['a', 'b'] },
    ]);
  });

  it('treats a stray carriage return as a blank', () => {
    expect(parseTable('d', '0 8 zero\r')).toEqual([{ line: 1, start: 0, length: 8, type: 'zero', args: [] }]);
    expect(args('0 8 t a\rb')).toEqual(['a', 'b']);
  });
});

describe('parseTable: errors', () => {
  const NN = 'expected a non-negative integer';
  const BIG = `expected a non-negative integer of at most ${Number.MAX_SAFE_INTEGER}`;
  const cases: Array<[string, string, string]> = [
    ['word start', 'abc 8 zero', `invalid start sector 'abc' (${NN})`],
    ['negative start', '-1 8 zero', `invalid start sector '-1' (${NN})`],
    ['exponent start', '1e3 8 zero', `invalid start sector '1e3' (${NN})`],
    ['hex start', '0x10 8 zero', `invalid start sector '0x10' (${NN})`],
    ['fraction start', '1.5 8 zero', `invalid start sector '1.5' (${NN})`],
    ['signed start', '+1 8 zero', `invalid start sector '+1' (${NN})`],
    ['huge start', '9007199254740992 8 zero', `invalid start sector '9007199254740992' (${BIG})`],
    ['negative length', '0 -5 zero', `invalid length '-5' (${NN})`],
    ['word length', '0 zero', `invalid length 'zero' (${NN})`],
    ['exponent length', '0 1e3 zero', `invalid length '1e3' (${NN})`],
    ['huge length', '0 99999999999999999999 zero', `invalid length '99999999999999999999' (${BIG})`],
    ['escaped blank in number', '0 1\\ 2 zero', `invalid length '1 2' (${NN})`],
    ['non-ASCII digits', '0 \u0663 zero', `invalid length '\u0663' (${NN})`],
    ['only a start', '0', 'missing length'],
    ['start before a comment', '0 # 8 zero', 'missing length'],
    ['no type', '0 8', 'missing target type'],
    ['no type, trailing blanks', '0 8 \t ', 'missing target type'],
    ['type commented out', '0 8 #zero', 'missing target type'],
    ['unterminated escape', '0 8 zero a\\', 'unterminated escape at end of table'],
  ];

  it.each(cases)('%s', (_name, text, detail) => {
    const err = parseError(text);
    expect(err.message).toBe(`vg0: line 1: ${detail}`);
    expect(err.device).toBe('vg0');
    expect(err.line).toBe(1);
    expect(err.target).toBeUndefined();
    expect(err.code).toBe('EINVAL');
  });

  it('names the device and the line of the bad entry', () => {
    const err = parseError('0 8 zero\n\n# c\n8 x zero\n', 'mirror0');
    expect(err.message).toBe("mirror0: line 4: invalid length 'x' (expected a non-negative integer)");
    expect(err.line).toBe(4);
  });

  it('reports an unterminated escape on a line of its own', () => {
    expect(parseError('0 8 zero\n\n\\').message).toBe('vg0: line 3: unterminated escape at end of table');
  });

  it('reports an unterminated escape at the line its entry starts', () => {
    expect(parseError('0 8 zero \\\n a\\').message).toBe('vg0: line 1: unterminated escape at end of table');
  });

  it('stops at the first bad entry', () => {
    expect(parseError('x 8 zero\n0 y zero').message).toMatch(/^vg0: line 1: invalid start sector 'x'/);
  });
});

describe('formatTableLine and escapeArg', () => {
  it('formats a line with and without params', () => {
    expect(formatTableLine({ start: 0, length: 8, type: 'linear', params: '/dev/x 0' })).toBe('0 8 linear /dev/x 0');
    expect(formatTableLine({ start: 8, length: 16, type: 'zero', params: '' })).toBe('8 16 zero');
  });

  it('escapes whitespace, # and backslash only', () => {
    expect(escapeArg('/dev/sda')).toBe('/dev/sda');
    expect(escapeArg('a b\tc#d\\e')).toBe('a\\ b\\\tc\\#d\\\\e');
    expect(escapeArg('\\')).toBe('\\\\');
  });

  it('refuses what a table cannot hold', () => {
    expect(() => escapeArg('')).toThrow(TargetArgError);
    expect(() => escapeArg('a\nb')).toThrow(/line break/);
    expect(() => escapeArg('a\rb')).toThrow(/line break/);
  });

  const awkward = [
    '/dev/disk/by-id/usb-My Disk',
    'C:\\images\\disk.img',
    '#not-a-comment',
    'ends-with-backslash\\',
    '\\',
    ' ',
    '\t lead and trail \t',
    'uni\u00a0code\u2003blanks',
    'emoji-💾',
    '0',
    'a\\#b',
  ];

  it('round-trips awkward arguments through parseTable', () => {
    const params = awkward.map(escapeArg).join(' ');
    const text = formatTableLine({ start: 0, length: 8, type: 'linear', params });
    expect(parseTable('d', text)).toEqual([{ line: 1, start: 0, length: 8, type: 'linear', args: awkward }]);
  });

  it('round-trips each argument as the last on a line, with a continuation after it', () => {
    for (const a of awkward) {
      const line = formatTableLine({ start: 0, length: 8, type: 't', params: escapeArg(a) });
      expect(args(line)).toEqual([a]);
      expect(args(`${line} \\\r\n${escapeArg(a)}\r\n`)).toEqual([a, a]);
    }
  });

  it('round-trips a parsed table through formatTableLine', () => {
    const text = '0 8 t a\\ b c\\#d\n8 8 zero\n16 8 t \\\\ \\ \n';
    const lines = parseTable('d', text);
    const again = lines
      .map((l) => formatTableLine({ ...l, params: l.args.map(escapeArg).join(' ') }))
      .join('\n');
    expect(parseTable('d', again)).toEqual(lines);
  });
});
