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
import { ImageSlab, SLAB_BYTES, SLAB_MAX, WriteQueue } from '../../src/replog/ring-writes.ts';
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
});
