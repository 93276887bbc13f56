/** Block digests on the thread pool (src/core/digest.ts) against xxh3-128 computed here. */
import xxhash from '@node-rs/xxhash';
import { afterAll, describe, expect, test } from 'vitest';
import { closeDigestPool, differingBlocks, digestBlocks } from '../../src/core/digest.ts';

const reference = (b: Buffer): string => xxhash.xxh3.xxh128(b).toString(16).padStart(32, '0');

afterAll(() => closeDigestPool());

describe('digestBlocks', () => {
  test('16 bytes per block, each the xxh3-128 of its block; a short last block is hashed as it is', async () => {
    const buf = Buffer.alloc(3 * 4096 + 512);
    for (let i = 0; i < buf.length; i++) buf[i] = (i * 7 + (i >> 12)) & 0xff;
    const d = await digestBlocks(buf, 4096);
    expect(d.length).toBe(4 * 16);
    for (let i = 0; i < 4; i++) {
      expect(d.subarray(i * 16, i * 16 + 16).toString('hex')).toBe(reference(buf.subarray(i * 4096, Math.min(buf.length, (i + 1) * 4096))));
    }
  });

  test('the caller may change its buffer at once; concurrent calls keep their own results', async () => {
    const a = Buffer.alloc(1 << 20, 1);
    const b = Buffer.from(a);
    b[5 * 4096 + 17] ^= 0xff;
    b[b.length - 1] ^= 0xff;
    const [da, db] = await Promise.all([digestBlocks(a, 4096), digestBlocks(b, 4096)]);
    a.fill(9);
    expect(differingBlocks(da, db)).toEqual([5, 255]);
    expect(differingBlocks(da, da)).toEqual([]);
  });

  test('an empty buffer has no digests; a bad block size is refused', async () => {
    expect((await digestBlocks(Buffer.alloc(0), 4096)).length).toBe(0);
    await expect(digestBlocks(Buffer.alloc(512), 0)).rejects.toThrow(/block size/);
  });
});
