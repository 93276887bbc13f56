/**
 * Block digests on the thread pool (src/core/digest.ts) against xxh3-128 computed here with
 * @node-rs/xxhash (the digests' library before xxhash-addon: the wire protocol's DIGEST
 * answers must stay the same bits).
 */
import crypto from 'node:crypto';
import xxhash from '@node-rs/xxhash';
import { afterAll, describe, expect, test } from 'vitest';
import { closeDigestPool, differingBlocks, differingData, digestBlocks, digestFilled } from '../../src/core/digest.ts';
import digestWorker, { IMPLEMENTATION } from '../../src/core/digest-worker.mjs';

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

  test('digestFilled: hashes what fill wrote, in a buffer reused after; a failed fill rejects and the next digest is right', async () => {
    const a = crypto.randomBytes(64 * 4096);
    const b = crypto.randomBytes(64 * 4096);
    for (let round = 0; round < 3; round++) {
      const [da, db] = await Promise.all([
        digestFilled(a.length, 4096, async (into) => void a.copy(into)),
        digestFilled(b.length - 100, 4096, (into) => void b.copy(into, 0, 0, b.length - 100)),
      ]);
      expect(da.equals(await digestBlocks(a, 4096))).toBe(true);
      expect(db.length).toBe(64 * 16);
      expect(db.subarray(63 * 16).toString('hex')).toBe(reference(b.subarray(63 * 4096, b.length - 100)));
    }
    await expect(digestFilled(4096, 4096, async () => { throw new Error('read failed'); })).rejects.toThrow('read failed');
    expect((await digestFilled(a.length, 4096, (into) => void a.copy(into))).equals(await digestBlocks(a, 4096))).toBe(true);
  });
});

describe('differingData (both sides read here: compared byte for byte)', () => {
  test('exactly the blocks that differ, by one byte anywhere, a short last block included; buffers reused between calls', async () => {
    const a = crypto.randomBytes(32 * 4096 + 1000);
    for (const flips of [[], [0], [5 * 4096 + 4095], [7 * 4096, 8 * 4096, 31 * 4096 + 1], [a.length - 1], [0, 32 * 4096 + 999, 17 * 4096 + 2048]]) {
      const b = Buffer.from(a);
      for (const at of flips) b[at]! ^= 0x01;
      const got = await differingData(a.length, 4096, async (into) => void a.copy(into), async (into) => void b.copy(into));
      expect(got, JSON.stringify(flips)).toEqual([...new Set(flips.map((at) => Math.floor(at / 4096)))].sort((x, y) => x - y));
    }
    expect(await differingData(0, 4096, async () => {}, async () => {})).toEqual([]);
  });

  test('a failed read rejects; the next comparison is right', async () => {
    const a = crypto.randomBytes(8 * 4096);
    await expect(differingData(a.length, 4096, async (into) => void a.copy(into), async () => { throw new Error('site read failed'); })).rejects.toThrow('site read failed');
    const b = Buffer.from(a);
    b[3 * 4096] ^= 0xff;
    expect(await differingData(a.length, 4096, async (into) => void a.copy(into), async (into) => void b.copy(into))).toEqual([3]);
  });
});

describe('the digest thread\'s hash', () => {
  test('is xxhash-addon (not the slower fallback)', () => {
    expect(IMPLEMENTATION).toBe('xxhash-addon');
  });

  test('gives the same digests as @node-rs/xxhash xxh3-128 on random data: every length 0 … 1024, random lengths to 20 KiB, 4 KiB blocks', () => {
    const one = (b: Buffer): string => Buffer.from(digestWorker({ data: b, blockBytes: Math.max(1, b.length) })).toString('hex');
    for (let n = 0; n <= 1024; n++) {
      const b = crypto.randomBytes(n);
      expect(one(b), `${n} bytes`).toBe(n === 0 ? '' : reference(b));
    }
    for (let i = 0; i < 300; i++) {
      const b = crypto.randomBytes(crypto.randomInt(1025, 20 * 1024));
      expect(one(b), `${b.length} bytes`).toBe(reference(b));
    }
    const img = crypto.randomBytes(1 << 20);
    const d = Buffer.from(digestWorker({ data: img, blockBytes: 4096 }));
    for (let i = 0; i < 256; i++) expect(d.subarray(i * 16, i * 16 + 16).toString('hex')).toBe(reference(img.subarray(i * 4096, (i + 1) * 4096)));
  });
});
