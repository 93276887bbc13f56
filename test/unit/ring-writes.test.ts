/**
 * The ringbuffer log's append writes (src/replog/ring-writes.ts): images carved from slabs
 * never share bytes, the write queue joins only writes that neighbour each other both in the
 * ring and in memory, and a burst of appends through a real log on a real file reaches the
 * device as fewer writes with every entry's bytes intact (read back, and recovered after a
 * reopen).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import type { Bio } from '../../src/core/bio.ts';
import { FileDev } from '../../src/core/file-dev.ts';
import { log } from '../../src/core/log.ts';
import type { BlockDev } from '../../src/core/types.ts';
import { createReplog } from '../../src/replog/registry.ts';
import { ImageSlab, SLAB_BYTES, SLAB_MAX, SPARE_BYTES, WriteQueue } from '../../src/replog/ring-writes.ts';
import type { AppendEntry, ReplogContext } from '../../src/replog/types.ts';

describe('ImageSlab', () => {
  it('hands out disjoint images, filling one slab before the next, and large ones apart', () => {
    const slab = new ImageSlab();
    const imgs: Buffer[] = [];
    for (let i = 0; i < 600; i++) imgs.push(slab.take(4608));
    imgs.forEach((b, i) => b.fill(i & 0xff));
    imgs.forEach((b, i) => expect(b.every((x) => x === (i & 0xff)), `image ${i}`).toBe(true));
    // consecutive images of one slab are neighbours in memory; a new slab starts when one is full
    const perSlab = Math.floor(SLAB_BYTES / 4608);
    expect(imgs[1]!.buffer).toBe(imgs[0]!.buffer);
    expect(imgs[1]!.byteOffset).toBe(imgs[0]!.byteOffset + 4608);
    expect(imgs[perSlab]!.buffer).not.toBe(imgs[perSlab - 1]!.buffer);
    const big = slab.take(SLAB_MAX + 512);
    expect(big.length).toBe(SLAB_MAX + 512);
    expect(big.buffer).not.toBe(imgs[599]!.buffer);
    const after = slab.take(512);
    expect(after.buffer).toBe(imgs[599]!.buffer); // the slab in use goes on
  });
});

describe('ImageSlab spares', () => {
  it('reuses a larger image given back for the next of its length only, up to SPARE_BYTES', () => {
    const slab = new ImageSlab();
    const n = 512 * 1024 + 512;
    const a = slab.take(n);
    const b = slab.take(n);
    expect(b.buffer).not.toBe(a.buffer);
    slab.give(a);
    expect(slab.spareBytes).toBe(n);
    expect(slab.take(n + 512).buffer).not.toBe(a.buffer); // another length: a fresh buffer
    expect(slab.take(n).buffer).toBe(a.buffer); // the same length: the spare
    expect(slab.take(n).buffer).not.toBe(a.buffer); // taken once only
    expect(slab.spareBytes).toBe(0);
    // small images are never kept: their slab may still be read through its other images
    const small = slab.take(4608);
    slab.give(small);
    expect(slab.spareBytes).toBe(0);
    // bounded: what would pass SPARE_BYTES is left to the garbage collector
    const big = Math.floor(SPARE_BYTES / 4) + 512;
    for (let i = 0; i < 5; i++) slab.give(slab.take(big + i * 512 + 512 * 8));
    expect(slab.spareBytes).toBeLessThanOrEqual(SPARE_BYTES);
    expect(slab.spareBytes).toBeGreaterThan(SPARE_BYTES / 2);
    slab.clear();
    expect(slab.spareBytes).toBe(0);
  });
});

describe('WriteQueue', () => {
  it('joins writes adjacent in the ring and in one buffer, keeps the rest apart, in order', () => {
    const q = new WriteQueue<string>();
    const mem = Buffer.alloc(8192);
    const other = Buffer.alloc(1024);
    expect(q.push('a', 1000, mem.subarray(0, 512))).toBe(true);
    expect(q.push('b', 1512, mem.subarray(512, 2048))).toBe(false);
    q.push('c', 4000, mem.subarray(2048, 2560)); // next in memory, not in the ring
    q.push('d', 4512, other.subarray(0, 512)); // next in the ring, another buffer
    q.push('e', 5024, other.subarray(512, 1024));
    q.push('f', 0, mem.subarray(2560, 3072)); // a wrap: next in memory, ring offset 0
    const got: Array<{ off: number; len: number; start: number; tags: string[] }> = [];
    q.drain((off, buf, tags) => got.push({ off, len: buf.length, start: buf.byteOffset, tags }));
    expect(got).toEqual([
      { off: 1000, len: 2048, start: mem.byteOffset, tags: ['a', 'b'] },
      { off: 4000, len: 512, start: mem.byteOffset + 2048, tags: ['c'] },
      { off: 4512, len: 1024, start: other.byteOffset, tags: ['d', 'e'] },
      { off: 0, len: 512, start: mem.byteOffset + 2560, tags: ['f'] },
    ]);
    // empty again: the next push asks for a drain, a drain of nothing writes nothing
    let calls = 0;
    q.drain(() => calls++);
    expect(calls).toBe(0);
    expect(q.push('g', 0, mem.subarray(0, 512))).toBe(true);
  });
});

describe('ringbuffer appends in one burst', () => {
  let dir: string;
  let files: FileDev[];
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmkit-ring-writes-'));
    files = [];
  });
  afterEach(() => {
    for (const f of files) f.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  /** the log's device, counting the writes that reach it */
  function ctx(writes: Bio[]): ReplogContext {
    return {
      device: 'repl',
      open: async (ref: string): Promise<BlockDev> => {
        const f = FileDev.open(ref, ref);
        files.push(f);
        return {
          ref: f.ref,
          get sectors() {
            return f.sectors;
          },
          submit: (bio: Bio) => {
            if (bio.op === 'write') writes.push({ ...bio, data: Buffer.from(bio.data) });
            return f.submit(bio);
          },
        };
      },
      event: () => undefined,
      log: log('ring-writes-test'),
    };
  }

  it('writes the entries of a burst together, each readable and recovered with its bytes', async () => {
    const f = path.join(dir, 'rlog');
    fs.writeFileSync(f, '');
    fs.truncateSync(f, 4096 * 512);
    const writes: Bio[] = [];
    const rl = await createReplog('ringbuffer', ctx(writes), [f, '0', 'create', '4096']);
    await rl.recover();
    const before = writes.length;
    const entries: AppendEntry[] = [];
    for (let i = 0; i < 64; i++) {
      const sectors = 1 + (i % 8);
      entries.push({ devNr: 0, op: 'write', sector: i * 16, sectors, data: Buffer.alloc(sectors * 512, i + 1), epoch: 1, fua: false });
    }
    // one burst: every append made before any of them settles
    const seqs = await Promise.all(entries.map((e) => rl.append(e)));
    expect(seqs).toEqual(entries.map((_, i) => i + 1));
    const burst = writes.length - before;
    expect(burst).toBeGreaterThan(0);
    expect(burst).toBeLessThan(entries.length / 4); // 64 entries of ≤ 4.5 KiB: a few slab-sized writes
    const check = async (r: ReturnType<typeof rl.reader>): Promise<void> => {
      for (const [i, want] of entries.entries()) {
        const got = await r.next();
        expect(got?.seq).toBe(i + 1);
        expect(got?.sector).toBe(want.sector);
        expect(got?.data.equals(want.data), `entry ${i + 1}`).toBe(true);
      }
    };
    await check(rl.reader(1));
    await rl.destroy();
    for (const d of files.splice(0)) d.close();
    // reopened: recovery finds every entry on the device, CRCs and back links intact
    const again = await createReplog('ringbuffer', ctx([]), [f, '0', 'open']);
    const rec = await again.recover();
    expect(rec.head).toBe(entries.length);
    expect(rec.tornTail).toBe(false);
    await check(again.reader(1));
    await again.destroy();
  });

  it('reuses a large entry\'s memory only once it is behind the tail and reclaimed, never one still held', async () => {
    const f = path.join(dir, 'rlog');
    const sectors = 8192 + 64; // a 4 MiB ring: entries of 512 KiB, 7 fit
    fs.writeFileSync(f, '');
    fs.truncateSync(f, sectors * 512);
    const rl = await createReplog('ringbuffer', ctx([]), [f, '0', 'create', String(sectors)]);
    await rl.recover();
    const big = (i: number): AppendEntry => ({ devNr: 0, op: 'write', sector: i * 1024, sectors: 1024, data: Buffer.alloc(512 * 1024, i), epoch: i, fua: false });
    for (let i = 1; i <= 4; i++) await rl.append(big(i));
    const r = rl.reader(1);
    const held = [];
    for (let i = 1; i <= 4; i++) held.push((await r.next())!);
    // entries 1 and 2 leave the ring; the caller still holds entry 2 (a ship in flight)
    await rl.checkpoint({ localDone: 4, slinks: [{ slink: 1, seq: 2, mode: 'ship' }] });
    expect(rl.tail).toBe(3);
    rl.reclaim!(2);
    const e5 = await rl.append(big(5)).then(() => rl.reader(5).next());
    expect(e5!.data.buffer).toBe(held[0]!.data.buffer); // entry 1's memory, reused
    const e6 = await rl.append(big(6)).then(() => rl.reader(6).next());
    expect(e6!.data.buffer).not.toBe(held[1]!.data.buffer); // entry 2 is held: not reused
    expect(held[1]!.data.equals(Buffer.alloc(512 * 1024, 2))).toBe(true);
    // a reclaim beyond the tail frees nothing the ring still has (entry 3 and on)
    rl.reclaim!(Infinity);
    const e7 = await rl.append(big(7)).then(() => rl.reader(7).next());
    expect(e7!.data.buffer).toBe(held[1]!.data.buffer);
    expect(e7!.data.buffer).not.toBe(held[2]!.data.buffer);
    for (const [k, e] of [[3, held[2]], [4, held[3]]] as const) expect(e!.data.equals(Buffer.alloc(512 * 1024, k)), `entry ${k}`).toBe(true);
    // every entry in the ring reads back with its own bytes, from memory and from the device
    const all = rl.reader(3);
    for (let k = 3; k <= 7; k++) expect((await all.next())!.data.equals(Buffer.alloc(512 * 1024, k)), `entry ${k}`).toBe(true);
    await rl.destroy();
    for (const d of files.splice(0)) d.close();
    const again = await createReplog('ringbuffer', ctx([]), [f, '0', 'open']);
    await again.recover();
    const disk = again.reader(3);
    for (let k = 3; k <= 7; k++) expect((await disk.next())!.data.equals(Buffer.alloc(512 * 1024, k)), `entry ${k} on disk`).toBe(true);
    await again.destroy();
  });
});
