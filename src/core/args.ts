/**
 * The argument reader every target constructor uses (dm's `struct dm_arg_set` with
 * `dm_read_arg` / `dm_read_arg_group` / `dm_shift_arg`).
 *
 * Every read names what it reads; a bad or missing argument throws `TargetArgError` with a
 * message that names that argument and quotes the bad value. Messages leave out device,
 * line and target type: the table loader prefixes `device: line N: target: `.
 *
 *   const r = new ArgReader(args, 'linear');
 *   const dev = r.next('device path');
 *   const offset = r.uint('offset');
 *   r.expectEnd();
 */
import { TargetArgError } from './errors.ts';

/** Bounds of an integer argument; both inclusive. */
export interface IntRange {
  min?: number;
  max?: number;
}

const UINT = /^[0-9]+$/;
const INT = /^-?[0-9]+$/;
const MAX = Number.MAX_SAFE_INTEGER;

export class ArgReader {
  readonly #args: readonly string[];
  readonly #target: string;
  #pos = 0;

  /** `target` is the target type reading its arguments; kept for logs, not for messages. */
  constructor(args: readonly string[], target: string) {
    this.#args = args;
    this.#target = target;
  }

  /** the target type whose arguments these are */
  get target(): string {
    return this.#target;
  }

  /** how many arguments are left */
  get remaining(): number {
    return this.#args.length - this.#pos;
  }

  /** true when every argument has been read */
  atEnd(): boolean {
    return this.#pos >= this.#args.length;
  }

  /** the next argument without consuming it; undefined at the end */
  peek(): string | undefined {
    return this.#args[this.#pos];
  }

  /** Consume the next argument. Throws `missing ${what}` at the end. */
  next(what: string): string {
    const v = this.#args[this.#pos];
    if (v === undefined) this.fail(`missing ${what}`);
    this.#pos++;
    return v;
  }

  /**
   * A decimal non-negative integer (no sign, exponent, fraction or hex) in [min, max];
   * min defaults to 0 and max to Number.MAX_SAFE_INTEGER.
   */
  uint(what: string, opts: IntRange = {}): number {
    const { min = 0, max = MAX } = opts;
    return this.#integer(what, UINT, Math.max(min, 0), max);
  }

  /** A decimal integer, optionally negative, in [min, max] (default: any safe integer). */
  int(what: string, opts: IntRange = {}): number {
    const { min = -MAX, max = MAX } = opts;
    return this.#integer(what, INT, min, max);
  }

  /** One of a fixed set of keywords, compared exactly. */
  oneOf<T extends string>(what: string, choices: readonly T[]): T {
    const v = this.next(what);
    const found = choices.find((c) => c === v);
    if (found === undefined) this.fail(`invalid ${what} '${v}' (expected one of ${choices.join(', ')})`);
    return found;
  }

  /**
   * A counted group, as dm's `<#features> <feature>…`: reads a count N in [min, max]
   * (default 0 to any), then N arguments, returned as they are.
   */
  group(what: string, opts: IntRange = {}): string[] {
    const count = this.uint(`${what} count`, opts);
    if (count > this.remaining) {
      this.fail(`not enough arguments for ${what} (expected ${count}, got ${this.remaining})`);
    }
    const out = this.#args.slice(this.#pos, this.#pos + count);
    this.#pos += count;
    return out;
  }

  /** Throws `too many arguments (unexpected 'x')` unless every argument has been read. */
  expectEnd(): void {
    const v = this.peek();
    if (v !== undefined) this.fail(`too many arguments (unexpected '${v}')`);
  }

  /** Throw a `TargetArgError` with this message (for checks the reader cannot make). */
  fail(message: string): never {
    throw new TargetArgError(message);
  }

  #integer(what: string, syntax: RegExp, min: number, max: number): number {
    const v = this.next(what);
    const n = syntax.test(v) ? Number(v) + 0 : NaN; // + 0 turns -0 into 0
    if (!Number.isSafeInteger(n) || n < min || n > max) {
      this.fail(`invalid ${what} '${v}' (${describeRange(min, max)})`);
    }
    return n;
  }
}

/** "expected an integer from 1 to 8", "expected a non-negative integer", … */
function describeRange(min: number, max: number): string {
  const low = min > -MAX;
  const high = max < MAX;
  if (low && high) return `expected an integer from ${min} to ${max}`;
  if (high) return `expected an integer of at most ${max}`;
  if (min === 0) return 'expected a non-negative integer';
  if (low) return `expected an integer of at least ${min}`;
  return 'expected an integer';
}
