/**
 * dmsetup table text → one `TableLine` per target, and back.
 *
 *   <start> <length> <target_type> [<arg> ...]
 *
 * Three stages:
 *  1. `splitEntries` (a pre-pass over the characters) joins continuation lines (a backslash
 *     at the very end of a line; the pieces are separated by a blank), strips comments (an
 *     unescaped `#` to the end of its physical line), tolerates CRLF, skips blank lines and
 *     remembers the physical line each entry starts on. Escapes are kept for stage 2.
 *  2. `TableLexer` splits an entry on spaces and tabs and removes escapes (`\x` → `x`).
 *  3. The nearley grammar (table-grammar.ne) parses the tokens: start, length, type, args.
 *     When it stops, the error names the field its waiting rule stands for.
 *
 * Only syntax is checked here. Zero lengths, unknown types, gaps and target arguments are
 * the table loader's, in the kernel's order.
 */
import nearley from 'nearley';
import compiledGrammar from './table-grammar.cjs';
import { TableError, TargetArgError } from './errors.ts';

/** One target of a table, as written. */
export interface TableLine {
  /** 1-based physical line of the entry's first token */
  line: number;
  start: number;
  length: number;
  type: string;
  /** arguments with escapes removed */
  args: string[];
}

const GRAMMAR = nearley.Grammar.fromCompiled(compiledGrammar);

/** Grammar rule → the field it stands for in error messages (see table-grammar.ne). */
const FIELDS: Readonly<Record<string, string>> = {
  start_sector: 'start sector',
  length: 'length',
  target_type: 'target type',
};

const INTEGER = /^[0-9]+$/;

/**
 * Parse a whole table. Returns [] for a table of only blank lines and comments.
 * Throws `TableError(device, line, undefined, detail)` on a syntax error.
 */
export function parseTable(device: string, text: string): TableLine[] {
  return splitEntries(device, text).map((entry) => parseEntry(device, entry));
}

/** `<start> <length> <type> <params>`; no trailing blank when params is empty. */
export function formatTableLine(l: { start: number; length: number; type: string; params: string }): string {
  const head = `${l.start} ${l.length} ${l.type}`;
  return l.params === '' ? head : `${head} ${l.params}`;
}

/**
 * Escape one argument so that `parseTable` gives it back unchanged: a backslash before
 * every whitespace character, `#` and `\`. Line breaks and the empty string cannot be
 * written in a table, so they throw `TargetArgError`.
 */
export function escapeArg(s: string): string {
  if (s === '') throw new TargetArgError('cannot write an empty argument in a table');
  if (/[\r\n]/.test(s)) throw new TargetArgError(`cannot write a line break in a table argument (${JSON.stringify(s)})`);
  return s.replace(/[\s#\\]/g, '\\$&');
}

// ---------------------------------------------------------------------------------------
// Stage 1: physical lines → entries

interface RawEntry {
  /** physical line of the first token */
  line: number;
  /** the entry with comments removed and continuations joined; escapes still in place */
  text: string;
}

function isBlank(c: string): boolean {
  return c === ' ' || c === '\t' || c === '\r';
}

function splitEntries(device: string, text: string): RawEntry[] {
  const entries: RawEntry[] = [];
  let buf = '';
  let first = 0; // line of the entry's first token; 0 while there is none
  let line = 1;
  let comment = false;
  const flush = (): void => {
    if (first !== 0) entries.push({ line: first, text: buf });
    buf = '';
    first = 0;
  };

  for (let i = text.startsWith('\uFEFF') ? 1 : 0; i < text.length; i++) {
    const c = text[i];
    if (c === '\n') {
      line++;
      comment = false;
      flush();
    } else if (comment || (c === '\r' && text[i + 1] === '\n')) {
      // inside a comment, or the CR of a CRLF
    } else if (c === '#') {
      comment = true;
    } else if (c === '\\') {
      const n = text[i + 1];
      if (n === undefined) {
        throw new TableError(device, first || line, undefined, 'unterminated escape at end of table');
      }
      const crlf = n === '\r' && text[i + 2] === '\n';
      if (n === '\n' || crlf) {
        // continuation: the next physical line belongs to this entry
        i += crlf ? 2 : 1;
        line++;
        buf += ' ';
      } else {
        if (first === 0) first = line;
        buf += c + n;
        i++;
      }
    } else {
      if (first === 0 && !isBlank(c)) first = line;
      buf += c;
    }
  }
  flush();
  return entries;
}

// ---------------------------------------------------------------------------------------
// Stage 2: the lexer nearley reads tokens from

interface TableToken {
  type: 'uint' | 'word';
  /** the argument with escapes removed */
  value: string;
  /** the argument as written */
  text: string;
  /** offset in the entry text */
  offset: number;
  /** the value of a `uint` */
  number?: number;
}

class TableLexer implements nearley.Lexer {
  #text = '';
  #pos = 0;

  reset(data: string): void {
    this.#text = data;
    this.#pos = 0;
  }

  next(): TableToken | undefined {
    const text = this.#text;
    let pos = this.#pos;
    while (pos < text.length && isBlank(text[pos])) pos++;
    if (pos === text.length) {
      this.#pos = pos;
      return undefined;
    }
    const offset = pos;
    let value = '';
    while (pos < text.length && !isBlank(text[pos])) {
      if (text[pos] === '\\' && pos + 1 < text.length) pos++;
      value += text[pos++];
    }
    this.#pos = pos;
    const token: TableToken = { type: 'word', value, text: text.slice(offset, pos), offset };
    if (INTEGER.test(value) && Number.isSafeInteger(Number(value))) {
      token.type = 'uint';
      token.number = Number(value);
    }
    return token;
  }

  save(): nearley.LexerState {
    return {};
  }

  formatError(token: nearley.Token, message: string): string {
    return typeof token === 'string' ? `${message} at '${token}'` : `${message} at '${token.value}'`;
  }

  has(type: string): boolean {
    return type === 'uint' || type === 'word';
  }
}

// ---------------------------------------------------------------------------------------
// Stage 3: nearley, and its failures turned into messages

interface EntryResult {
  start: number;
  length: number;
  type: string;
  args: string[];
}

/** The parts of nearley's Parser its types leave out: the Earley table, per token. */
interface ParserInternals {
  current: number;
  table: Array<{ scannable: Array<{ rule: { name: string } }> } | undefined>;
}

function parseEntry(device: string, entry: RawEntry): TableLine {
  const parser = new nearley.Parser(GRAMMAR, { lexer: new TableLexer() });
  try {
    parser.feed(entry.text);
  } catch (err) {
    const token = (err as { token?: TableToken }).token;
    if (token === undefined) throw err;
    throw new TableError(device, entry.line, undefined, invalid(waitingFor(parser), token));
  }
  const results = parser.results as EntryResult[];
  if (results.length === 0) {
    const field = waitingFor(parser);
    throw new TableError(device, entry.line, undefined, field ? `missing ${field}` : 'incomplete entry');
  }
  if (results.length > 1) throw new Error(`table grammar is ambiguous (${results.length} parses)`);
  const { start, length, type, args } = results[0];
  return { line: entry.line, start, length, type, args };
}

/** The field whose rule was waiting for a token when the parse stopped, if any. */
function waitingFor(parser: nearley.Parser): string | undefined {
  const { table, current } = parser as unknown as ParserInternals;
  for (const state of table[current]?.scannable ?? []) {
    const field = FIELDS[state.rule.name];
    if (field !== undefined) return field;
  }
  return undefined;
}

function invalid(field: string | undefined, token: TableToken): string {
  if (field === undefined) return `unexpected '${token.value}'`;
  const why = INTEGER.test(token.value)
    ? `expected a non-negative integer of at most ${Number.MAX_SAFE_INTEGER}`
    : 'expected a non-negative integer';
  return `invalid ${field} '${token.value}' (${why})`;
}
