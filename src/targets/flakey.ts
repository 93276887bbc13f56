/**
 * flakey: a linear mapping that is up for `up_s` seconds after construction, then down for
 * `down_s` seconds, repeating, as dm-flakey. `up_s` 0 means always down, `down_s` 0 always up.
 *
 * While down (as the kernel since 6.5):
 *   - no features: every bio fails with EIO;
 *   - error_reads: reads fail; drop_writes: writes (and flushes, discards, write-zeroes)
 *     complete without being issued; error_writes: they fail;
 *   - corrupt_bio_byte <nth> <r|w> <value> <flags>: byte nth (1-based) of each matching bio
 *     becomes value: reads after they complete, writes in a copy (the caller's buffer is
 *     never changed). flags is the kernel's bi_opf mask: 0 matches every bio, REQ_FUA
 *     (0x20000) FUA writes; any other bit never matches in dmkit;
 *   - random_read_corrupt / random_write_corrupt <p>: with probability p / 10^9, one random
 *     byte of the bio gets a random value (writes again in a copy).
 * Anything not named above passes through to the device.
 */
import { randomInt } from 'node:crypto';
import type { Bio } from '../core/bio.ts';
import { ArgReader } from '../core/args.ts';
import { BlockError } from '../core/errors.ts';
import type { BlockDev, StatusType, Target, TargetContext, TargetType } from '../core/types.ts';
import { openDevice, refArg } from './common.ts';

const UINT32_MAX = 0xffffffff;
/** random_*_corrupt probabilities are parts of this */
export const PROBABILITY_BASE = 1_000_000_000;
/** the kernel's REQ_FUA and REQ_PREFLUSH bits of bi_opf, for corrupt_bio_byte's flags */
export const REQ_FUA = 1 << 17;
export const REQ_PREFLUSH = 1 << 18;
/** most feature words a table can give (drop_writes and error_writes exclude each other) */
const MAX_FEATURE_ARGS = 11;

interface CorruptByte {
  nth: number;
  dir: 'r' | 'w';
  value: number;
  flags: number;
}

export interface FlakeyFeatures {
  errorReads: boolean;
  dropWrites: boolean;
  errorWrites: boolean;
  corrupt: CorruptByte | null;
  /** parts per 10^9; 0 = off */
  randomRead: number;
  randomWrite: number;
}

function noFeatures(): FlakeyFeatures {
  return { errorReads: false, dropWrites: false, errorWrites: false, corrupt: null, randomRead: 0, randomWrite: 0 };
}

function isEmpty(f: FlakeyFeatures): boolean {
  return !f.errorReads && !f.dropWrites && !f.errorWrites && !f.corrupt && !f.randomRead && !f.randomWrite;
}

/** the feature words as the kernel prints them, in its order */
export function featureWords(f: FlakeyFeatures): string[] {
  const w: string[] = [];
  if (f.errorReads) w.push('error_reads');
  if (f.dropWrites) w.push('drop_writes');
  else if (f.errorWrites) w.push('error_writes');
  if (f.corrupt) w.push('corrupt_bio_byte', `${f.corrupt.nth}`, f.corrupt.dir, `${f.corrupt.value}`, `${f.corrupt.flags}`);
  if (f.randomRead) w.push('random_read_corrupt', `${f.randomRead}`);
  if (f.randomWrite) w.push('random_write_corrupt', `${f.randomWrite}`);
  return w;
}

function hit(p: number): boolean {
  return p > 0 && randomInt(PROBABILITY_BASE) < p;
}

class Flakey implements Target {
  readonly #dev: BlockDev;
  readonly #offset: number;
  readonly #up: number;
  readonly #down: number;
  readonly #f: FlakeyFeatures;
  readonly #errorReads: boolean;
  readonly #errorWrites: boolean;
  readonly #start = performance.now();
  readonly #device: string;

  constructor(device: string, dev: BlockDev, offset: number, up: number, down: number, f: FlakeyFeatures) {
    this.#device = device;
    this.#dev = dev;
    this.#offset = offset;
    this.#up = up;
    this.#down = down;
    this.#f = f;
    // no features at all: every bio fails while down
    this.#errorReads = f.errorReads || isEmpty(f);
    this.#errorWrites = f.errorWrites || isEmpty(f);
  }

  #isDown(): boolean {
    const elapsed = Math.floor((performance.now() - this.#start) / 1000);
    return elapsed % (this.#up + this.#down) >= this.#up;
  }

  #submit(bio: Bio, data = bio.data): Promise<void> {
    if (bio.op === 'flush') return this.#dev.submit(bio);
    return this.#dev.submit({ op: bio.op, sector: bio.sector + this.#offset, sectors: bio.sectors, data, flags: bio.flags });
  }

  map(bio: Bio): Promise<void> {
    if (!this.#isDown()) return this.#submit(bio);
    if (bio.op === 'read') return this.#downRead(bio);
    if (this.#errorWrites) return Promise.reject(new BlockError('EIO', `${this.#device}: flakey device is down`));
    if (this.#f.dropWrites) return Promise.resolve();
    if (bio.op !== 'write') return this.#submit(bio);
    const fixed = this.#matches(bio, 'w');
    const random = hit(this.#f.randomWrite);
    if (!fixed && !random) return this.#submit(bio);
    const copy = Buffer.from(bio.data);
    if (fixed) this.#corruptFixed(copy);
    if (random) corruptRandom(copy);
    return this.#submit(bio, copy);
  }

  #downRead(bio: Bio): Promise<void> {
    if (this.#errorReads) return Promise.reject(new BlockError('EIO', `${this.#device}: flakey device is down`));
    const fixed = this.#matches(bio, 'r');
    if (!fixed && !this.#f.randomRead) return this.#submit(bio);
    return this.#submit(bio).then(() => {
      if (fixed) this.#corruptFixed(bio.data);
      if (hit(this.#f.randomRead)) corruptRandom(bio.data);
    });
  }

  #matches(bio: Bio, dir: 'r' | 'w'): boolean {
    const c = this.#f.corrupt;
    if (!c || c.dir !== dir) return false;
    const opf = (bio.flags.fua ? REQ_FUA : 0) | (bio.flags.preflush ? REQ_PREFLUSH : 0);
    return (opf & c.flags) === c.flags;
  }

  #corruptFixed(data: Buffer): void {
    const c = this.#f.corrupt!;
    if (c.nth <= data.length) data[c.nth - 1] = c.value;
  }

  status(type: StatusType): string {
    if (type === 'info') return '';
    const words = featureWords(this.#f);
    return [refArg(this.#dev), this.#offset, this.#up, this.#down, words.length, ...words].join(' ');
  }
}

function corruptRandom(data: Buffer): void {
  if (data.length > 0) data[randomInt(data.length)] = randomInt(256);
}

/** `corrupt_bio_byte <nth_byte> <r|w> <value> <flags>` after its keyword */
function parseCorrupt(f: ArgReader): CorruptByte {
  if (f.remaining < 4) f.fail('feature corrupt_bio_byte needs 4 parameters: <nth_byte> <r|w> <value> <flags>');
  const nth = f.uint('corrupt_bio_byte byte number', { min: 1, max: UINT32_MAX });
  const dir = f.next('corrupt_bio_byte direction');
  const d = dir.toLowerCase();
  if (d !== 'r' && d !== 'w') f.fail(`invalid corrupt_bio_byte direction '${dir}' (expected r or w)`);
  const value = f.uint('corrupt_bio_byte value', { max: 255 });
  const flags = f.uint('corrupt_bio_byte flags', { max: UINT32_MAX });
  return { nth, dir: d, value, flags };
}

function parseProbability(f: ArgReader, name: string): number {
  if (f.atEnd()) f.fail(`feature ${name} needs a parameter: <probability> in parts per ${PROBABILITY_BASE}`);
  return f.uint(`${name} probability`, { max: PROBABILITY_BASE });
}

/** `[<#features> <feature>…]`, nothing after; feature names are case-insensitive, as the kernel's */
function parseFeatures(r: ArgReader): FlakeyFeatures {
  const f = noFeatures();
  if (r.atEnd()) return f;
  const fr = new ArgReader(r.group('feature', { max: MAX_FEATURE_ARGS }), 'flakey');
  r.expectEnd();
  const seen = new Set<string>();
  while (!fr.atEnd()) {
    const name = fr.next('feature').toLowerCase();
    if (seen.has(name)) fr.fail(`feature ${name} given twice`);
    seen.add(name);
    switch (name) {
      case 'error_reads': f.errorReads = true; break;
      case 'drop_writes': f.dropWrites = true; break;
      case 'error_writes': f.errorWrites = true; break;
      case 'corrupt_bio_byte': f.corrupt = parseCorrupt(fr); break;
      case 'random_read_corrupt': f.randomRead = parseProbability(fr, name); break;
      case 'random_write_corrupt': f.randomWrite = parseProbability(fr, name); break;
      default: fr.fail(`unknown feature '${name}'`);
    }
    if (f.dropWrites && f.errorWrites) fr.fail('feature drop_writes conflicts with feature error_writes');
  }
  const writeCorrupt = f.corrupt?.dir === 'w' || f.randomWrite > 0;
  if (f.dropWrites && writeCorrupt) fr.fail('feature drop_writes conflicts with random_write_corrupt and with corrupt_bio_byte in direction w');
  if (f.errorWrites && writeCorrupt) fr.fail('feature error_writes conflicts with random_write_corrupt and with corrupt_bio_byte in direction w');
  const readCorrupt = f.corrupt?.dir === 'r' || f.randomRead > 0;
  if (f.errorReads && readCorrupt) fr.fail('feature error_reads conflicts with random_read_corrupt and with corrupt_bio_byte in direction r');
  return f;
}

export const flakey: TargetType = {
  name: 'flakey',
  version: [1, 5, 0],
  /**
   * `<dev> <offset> <up_s> <down_s> [<#features> <feature>…]`
   *   up_s, down_s  seconds up then down, repeating (0 to 4294967295; not both 0)
   *   features      error_reads | drop_writes | error_writes
   *                 | corrupt_bio_byte <nth_byte> <r|w> <value 0-255> <flags>
   *                 | random_read_corrupt <p> | random_write_corrupt <p>   (p in 0..10^9)
   */
  async create(ctx: TargetContext, args: string[]): Promise<Target> {
    const r = new ArgReader(args, 'flakey');
    if (args.length < 4) r.fail('invalid argument count (expected <dev> <offset> <up_s> <down_s> [<#features> <feature>…])');
    const ref = r.next('device');
    const offset = r.uint('device sector');
    const up = r.uint('up interval', { max: UINT32_MAX });
    const down = r.uint('down interval', { max: UINT32_MAX });
    if (up + down === 0) r.fail('total (up + down) interval is zero');
    if (up + down > UINT32_MAX) r.fail(`interval overflow: up + down is ${up + down} seconds (at most ${UINT32_MAX})`);
    const features = parseFeatures(r);
    const dev = await openDevice(ctx, ref, offset);
    return new Flakey(ctx.device, dev, offset, up, down, features);
  },
};
