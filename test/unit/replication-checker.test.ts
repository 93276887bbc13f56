/**
 * The write-order-fidelity checker (test/helpers/replication-checker.ts) on hand-made
 * histories: valid prefixes, a prefix plus part of the writes in flight at the boundary,
 * and the ways an image can be wrong (a write without one it depends on, an acknowledged
 * write lost, torn or foreign content), plus the histories it refuses to judge.
 */
import { describe, expect, it } from 'vitest';
import { blockDigest, checkSite, describeProblem, HistoryError, type WriteRecord } from '../helpers/replication-checker.ts';

const BS = 16;
const BLOCKS = 8;

/** block `i` of write `id`: bytes no other write or initial block has */
function content(id: number, i: number): Buffer {
  const b = Buffer.alloc(BS, 0);
  b.writeUInt32LE(id, 0);
  b.writeUInt32LE(i + 1, 4);
  b.write('write', 8);
  return b;
}

interface Made extends WriteRecord {
  blocks: number;
}

/** write `id` on `dev` from `block` over `n` blocks, submitted at `sub`, acknowledged at `ack` */
function w(id: number, dev: number, block: number, n: number, sub: number, ack: number | null): Made {
  const digests = Array.from({ length: n }, (_, i) => blockDigest(content(id, i)));
  return { id, dev, offset: block * BS, digests, submitTime: sub, ackTime: ack, blocks: n };
}

const zeroes = (devs: number): Buffer[] => Array.from({ length: devs }, () => Buffer.alloc(BLOCKS * BS));

/** initial images with `apply` written in that order; `skip` lists [writeId, blockIndex] left out (a torn write) */
function imageOf(devs: number, apply: Made[], skip: Array<[number, number]> = []): Buffer[] {
  const img = zeroes(devs);
  for (const x of apply) {
    for (let i = 0; i < x.blocks; i++) {
      if (skip.some(([id, k]) => id === x.id && k === i)) continue;
      content(x.id, i).copy(img[x.dev]!, x.offset + i * BS);
    }
  }
  return img;
}

function check(writes: Made[], image: Buffer[], requireAcked = false) {
  return checkSite({ blockBytes: BS, writes, initial: zeroes(image.length), image, requireAcked });
}

describe('replication checker: valid states', () => {
  // a chain: each write submitted after the previous one was acknowledged, over two devices
  const a = w(1, 0, 0, 1, 1, 2);
  const b = w(2, 1, 3, 1, 3, 4);
  const c = w(3, 0, 0, 1, 5, 6); // overwrites a
  const d = w(4, 1, 5, 2, 7, 8);
  const chain = [a, b, c, d];

  it('every prefix of a chain is valid, and says how far it got', () => {
    for (let n = 0; n <= chain.length; n++) {
      const r = check(chain, imageOf(2, chain.slice(0, n)));
      expect(r.ok, `prefix ${n}`).toBe(true);
      expect(r.ackedPrefix).toBe(n);
      expect(r.ackedPresent).toBe(n);
      expect(r.cut).toBe(n === 0 ? null : chain[n - 1]!.submitTime);
    }
  });

  it('a prefix plus any subset of the writes in flight together at the boundary', () => {
    // x, y, z in flight together (all submitted before any acknowledgement); then q after them
    const p = w(1, 0, 0, 1, 1, 2);
    const x = w(2, 0, 1, 1, 3, 7);
    const y = w(3, 1, 1, 1, 4, 8);
    const z = w(4, 0, 2, 1, 5, 9);
    const q = w(5, 1, 2, 1, 10, 11);
    const all = [p, x, y, z, q];
    for (const subset of [[], [x], [y], [z], [x, z], [y, z], [x, y, z]]) {
      const r = check(all, imageOf(2, [p, ...subset]));
      expect(r.ok, `p + ${subset.map((s) => s.id).join(',')}`).toBe(true);
    }
    expect(check(all, imageOf(2, all)).ok).toBe(true);
  });

  it('a write still unacknowledged may be there or not', () => {
    const p = w(1, 0, 0, 1, 1, 2);
    const u = w(2, 1, 0, 1, 3, null);
    expect(check([p, u], imageOf(2, [p, u])).ok).toBe(true);
    expect(check([p, u], imageOf(2, [p])).ok).toBe(true);
    expect(check([p, u], imageOf(2, [p, u]), true).ok).toBe(true);
  });

  it('the last write may be torn (part of its blocks) when nothing depends on it', () => {
    const p = w(1, 0, 0, 1, 1, 2);
    const t = w(2, 0, 4, 3, 3, 4);
    expect(check([p, t], imageOf(1, [p, t], [[2, 1]])).ok).toBe(true);
    expect(check([p, t], imageOf(1, [p, t], [[2, 0], [2, 2]])).ok).toBe(true);
  });

  it('an overwritten block may show the newer write only', () => {
    const a = w(1, 0, 0, 2, 1, 2);
    const b = w(2, 0, 1, 1, 3, 4);
    const r = check([a, b], imageOf(1, [a, b]));
    expect(r.ok).toBe(true);
    expect(r.ackedPresent).toBe(2);
  });
});

describe('replication checker: invalid states', () => {
  it('a write without an earlier one it depends on (another device)', () => {
    const a = w(1, 0, 0, 1, 1, 2);
    const b = w(2, 1, 0, 1, 3, 4);
    const r = check([a, b], imageOf(2, [b]));
    expect(r.ok).toBe(false);
    expect(r.problems).toEqual([{ kind: 'missing', dev: 0, block: 0, found: null, required: 1, requiredAck: 2, cut: 3 }]);
    expect(describeProblem(r.problems[0]!)).toBe('device 0 block 0: shows its initial content, but write 1 (acknowledged at 2, before the cut 3) or a newer one must be there');
  });

  it('a write of the next epoch without one of the epoch before it', () => {
    const x = w(1, 0, 1, 1, 1, 5);
    const y = w(2, 1, 1, 1, 2, 6);
    const q = w(3, 0, 2, 1, 7, 8); // depends on x and y
    expect(check([x, y, q], imageOf(2, [x, q])).ok).toBe(false);
    expect(check([x, y, q], imageOf(2, [y, q])).problems[0]).toMatchObject({ kind: 'missing', dev: 0, block: 1, required: 1 });
  });

  it('an older write on a block after a newer one was shown elsewhere (reordered overwrite)', () => {
    const a = w(1, 0, 0, 1, 1, 2);
    const b = w(2, 0, 0, 1, 3, 4); // overwrites a
    const c = w(3, 1, 0, 1, 5, 6);
    // block 0 of device 0 still shows a, though c (after b) is there
    const r = check([a, b, c], imageOf(2, [a, c]));
    expect(r.problems).toEqual([{ kind: 'missing', dev: 0, block: 0, found: 1, required: 2, requiredAck: 4, cut: 5 }]);
  });

  it('a torn write that a later write depends on', () => {
    const t = w(1, 0, 4, 2, 1, 2);
    const n = w(2, 1, 0, 1, 3, 4);
    expect(check([t, n], imageOf(2, [t, n], [[1, 1]])).problems[0]).toMatchObject({ kind: 'missing', dev: 0, block: 5, required: 1 });
  });

  it('requireAcked: a lost acknowledged write', () => {
    const a = w(1, 0, 0, 1, 1, 2);
    const b = w(2, 0, 1, 1, 3, 4);
    expect(check([a, b], imageOf(1, [a])).ok).toBe(true);
    const r = check([a, b], imageOf(1, [a]), true);
    expect(r.problems).toEqual([{ kind: 'missing', dev: 0, block: 1, found: null, required: 2, requiredAck: 4, cut: null }]);
    expect(describeProblem(r.problems[0]!)).toMatch(/every acknowledged write must be there/);
  });

  it('torn or unknown content, content of a write never submitted, content on the wrong block', () => {
    const a = w(1, 0, 0, 1, 1, 2);
    const img = imageOf(1, [a]);
    img[0]![3 * BS] = 0x55; // block 3 is neither initial nor a write
    content(9, 0).copy(img[0]!, 4 * BS); // write 9 is not in the history
    content(1, 0).copy(img[0]!, 6 * BS); // write 1's block, two blocks too far
    const r = check([a], img);
    expect(r.ok).toBe(false);
    expect(r.problems.map((p) => [p.kind, p.block])).toEqual([['unknown', 3], ['unknown', 4], ['misplaced', 6]]);
    expect(describeProblem(r.problems[2]!)).toBe("device 0 block 6: holds write 1's content for device 0 block 0");
  });

  it('counts every problem, lists the first maxProblems', () => {
    const a = w(1, 0, 0, 8, 1, 2);
    const r = checkSite({ blockBytes: BS, writes: [a], initial: zeroes(1), image: zeroes(1), requireAcked: true, maxProblems: 3 });
    expect(r.problemCount).toBe(8);
    expect(r.problems).toHaveLength(3);
  });
});

describe('replication checker: histories it refuses', () => {
  it('two writes to one block in flight together', () => {
    const a = w(1, 0, 0, 1, 1, 4);
    const b = w(2, 0, 0, 1, 2, 3);
    expect(() => check([a, b], zeroes(1))).toThrow(HistoryError);
  });

  it('content that does not identify its write', () => {
    const a = w(1, 0, 0, 1, 1, 2);
    const b = { ...w(2, 0, 0, 1, 3, 4), digests: a.digests };
    expect(() => check([a, b], zeroes(1))).toThrow(/not unique/);
    const z = { ...w(3, 0, 2, 1, 1, 2), digests: [blockDigest(Buffer.alloc(BS))] };
    expect(() => check([z], zeroes(1))).toThrow(/not unique/);
  });

  it('writes outside the device or not whole blocks, an ack before its submit', () => {
    expect(() => check([w(1, 0, BLOCKS - 1, 2, 1, 2)], zeroes(1))).toThrow(/inside the device/);
    expect(() => check([{ ...w(1, 0, 0, 1, 1, 2), offset: 3 }], zeroes(1))).toThrow(/whole blocks/);
    expect(() => check([w(1, 0, 0, 1, 5, 5)], zeroes(1))).toThrow(/before it was submitted/);
  });
});
