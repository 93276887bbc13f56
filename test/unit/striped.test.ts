/**
 * The striped mapping (src/targets/striped.ts `stripeSector`) against an independent
 * construction: lay the chunks out round-robin, one stripe after the other, and record
 * where every sector went; and against BigInt arithmetic far beyond 2^32.
 */
import { describe, expect, it } from 'vitest';
import { log } from '../../src/core/log.ts';
import type { TargetContext } from '../../src/core/types.ts';
import { CHUNK_ALIGN, striped, stripeSector, type StripePlace } from '../../src/targets/striped.ts';

/** Place chunk after chunk on stripe 0, 1, … N-1, 0, 1, …, each stripe filling up from 0. */
function layout(stripes: number, chunk: number, length: number): StripePlace[] {
  const next = new Array<number>(stripes).fill(0);
  const out: StripePlace[] = [];
  let stripe = 0;
  for (let s = 0; s < length; s += chunk) {
    for (let k = 0; k < chunk; k++) out.push({ stripe, sector: next[stripe]! + k });
    next[stripe]! += chunk;
    stripe = (stripe + 1) % stripes;
  }
  return out;
}

describe('stripeSector', () => {
  const geometries: Array<[stripes: number, chunk: number]> = [
    [1, 8], [2, 8], [2, 16], [3, 8], [3, 24], [4, 64], [5, 40], [7, 8], [8, 128],
  ];

  it.each(geometries)('matches a round-robin layout of chunks (%i stripes, chunk %i)', (stripes, chunk) => {
    const length = stripes * chunk * 9;
    const expected = layout(stripes, chunk, length);
    for (let s = 0; s < length; s++) {
      const got = stripeSector(s, stripes, chunk);
      if (got.stripe !== expected[s]!.stripe || got.sector !== expected[s]!.sector) {
        expect({ sector: s, got }).toEqual({ sector: s, got: expected[s] });
      }
    }
  });

  it('uses every sector of every stripe exactly once', () => {
    const stripes = 3;
    const chunk = 24;
    const width = chunk * 10;
    const seen = new Set<string>();
    for (let s = 0; s < stripes * width; s++) {
      const p = stripeSector(s, stripes, chunk);
      expect(p.sector).toBeLessThan(width);
      seen.add(`${p.stripe}:${p.sector}`);
    }
    expect(seen.size).toBe(stripes * width);
  });

  it('keeps a chunk contiguous on one stripe', () => {
    for (let s = 0; s < 16; s++) {
      const first = stripeSector(5 * 16, 3, 16);
      const p = stripeSector(5 * 16 + s, 3, 16);
      expect(p).toEqual({ stripe: first.stripe, sector: first.sector + s });
    }
  });

  it('agrees with BigInt arithmetic on large sectors', () => {
    const cases: Array<[sector: number, stripes: number, chunk: number]> = [
      [2 ** 40 + 12345, 3, 24],
      [2 ** 52 - 1, 7, 8],
      [2 ** 48 + 4096 * 5 + 17, 4, 4096],
      [0xffffffff * 9, 5, 40],
    ];
    for (const [sector, stripes, chunk] of cases) {
      const s = BigInt(sector);
      const c = BigInt(chunk);
      const n = BigInt(stripes);
      const idx = s / c;
      const want = { stripe: Number(idx % n), sector: Number((idx / n) * c + (s % c)) };
      expect(stripeSector(sector, stripes, chunk)).toEqual(want);
    }
  });

  it('documents the chunk alignment rule: multiples of 8 sectors (4 KiB)', () => {
    expect(CHUNK_ALIGN).toBe(8);
  });
});

/** argument parsing only: these tables fail before any device is opened */
describe('striped arguments', () => {
  const ctx = (length: number): TargetContext => ({
    device: 'vol', begin: 0, length, log: log('test'), event: () => {},
    open: (ref) => Promise.reject(new Error(`unexpected open of ${ref}`)),
  });
  const parse = (length: number, args: string): Promise<unknown> => Promise.resolve().then(() => striped.create(ctx(length), args.split(' ')));

  it.each([
    [64, '1', 'not enough arguments (expected <#stripes> <chunk_sectors> (<dev> <offset>)…)'],
    [64, '-2 8', "invalid stripe count '-2' (expected an integer from 1 to 4294967295)"],
    [64, '2 9 a 0 b 0', "invalid chunk size '9' (must be a multiple of 8 sectors, at least 8)"],
    [66, '3 8 a 0 b 0 c 0', 'target length not divisible by chunk size: 66 sectors over 3 stripes is 22 per stripe, not a multiple of 8'],
    [64, '3 8 a 0 b 0 c 0', 'target length not divisible by number of stripes: 64 sectors over 3 stripes'],
    [72, '3 24 a 0 b 0', 'not enough destinations: 3 stripes need 3 <dev> <offset> pairs, got 4 argument(s)'],
    [72, '3 24 a 0 b 0 c', 'not enough destinations: 3 stripes need 3 <dev> <offset> pairs, got 5 argument(s)'],
    [72, '3 24 a 0 b 0 c 0 d', "too many arguments (unexpected 'd')"],
    [72, '3 24 a 0 b 0x10 c 0', "invalid stripe 1 offset '0x10' (expected a non-negative integer)"],
  ])('length %i, `%s`: %s', async (length, args, message) => {
    await expect(parse(length, args)).rejects.toThrow(message);
  });

  it('opens each stripe once the arguments are good', async () => {
    await expect(parse(72, '3 24 a 0 b 0 c 0')).rejects.toThrow('stripe 0: unexpected open of a');
  });
});
