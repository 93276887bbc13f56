/**
 * FileDev's two I/O paths: small requests run synchronously while they are fast, the rest
 * (and everything during a back-off after a slow call) go through the libuv pool. Both paths
 * must give the same bytes; which path ran is observable from when the promise settles
 * (a synchronous request has settled after a few microtask turns, a pool request needs an
 * event-loop turn for its callback).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import type { Bio } from '../../src/core/bio.ts';
import { FileDev, SYNC_BURST_BYTES, SYNC_TURN_DEVICES, type FileDevOptions } from '../../src/core/file-dev.ts';
import { prng } from '../compliance/helpers.ts';

const SECTORS = 4096; // 2 MiB
let dir: string;
let file: string;
let devs: FileDev[] = [];

function open(opts: FileDevOptions = {}): FileDev {
  const d = FileDev.open(file, file, opts);
  devs.push(d);
  return d;
}

function read(d: FileDev, sector: number, bytes: number): { bio: Bio; p: Promise<void> } {
  const bio: Bio = { op: 'read', sector, sectors: bytes / 512, data: Buffer.alloc(bytes, 0xee), flags: {} };
  return { bio, p: d.submit(bio) };
}

function write(d: FileDev, sector: number, bytes: number, fill: number): { data: Buffer; p: Promise<void> } {
  const data = Buffer.alloc(bytes, fill);
  return { data, p: d.submit({ op: 'write', sector, sectors: bytes / 512, data, flags: {} }) };
}

/** true when `p` settles within a few microtask turns, i.e. without an event-loop turn */
async function settledAtOnce(p: Promise<unknown>): Promise<boolean> {
  let settled = false;
  p.then(() => { settled = true; }, () => { settled = true; });
  for (let i = 0; i < 5; i++) await Promise.resolve();
  return settled;
}

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmkit-filedev-'));
  file = path.join(dir, 'img');
  const r = prng(7);
  const content = Buffer.alloc(SECTORS * 512);
  r.fill(content);
  fs.writeFileSync(file, content);
  devs = [];
});

afterEach(() => {
  for (const d of devs) d.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('FileDev I/O paths', () => {
  it('serves small requests synchronously and large ones through the pool', async () => {
    const d = open({ syncIoMax: 64 * 1024 });
    const small = read(d, 8, 4096);
    expect(await settledAtOnce(small.p)).toBe(true);
    const large = read(d, 8, 128 * 1024);
    expect(await settledAtOnce(large.p)).toBe(false);
    await large.p;
    const want = fs.readFileSync(file).subarray(8 * 512, 8 * 512 + 128 * 1024);
    expect(large.bio.data.equals(want)).toBe(true);
    expect(small.bio.data.equals(want.subarray(0, 4096))).toBe(true);
  });

  it('writes are synchronous up to four times the read limit (or syncWriteMax), not above', async () => {
    const d = open({ syncIoMax: 64 * 1024, syncSlowMs: 1000 });
    const w256 = write(d, 0, 256 * 1024, 0x11);
    expect(await settledAtOnce(w256.p)).toBe(true);
    const r128 = read(d, 0, 128 * 1024); // reads keep the 64 KiB limit
    expect(await settledAtOnce(r128.p)).toBe(false);
    await r128.p;
    expect(r128.bio.data.equals(w256.data.subarray(0, 128 * 1024))).toBe(true);
    const big = write(d, 1024, 256 * 1024 + 512, 0x22);
    expect(await settledAtOnce(big.p)).toBe(false);
    await big.p;
    devs.pop()!.close();
    const none = open({ syncIoMax: 64 * 1024, syncWriteMax: 0 });
    const small = write(none, 2048, 512, 0x33);
    expect(await settledAtOnce(small.p)).toBe(false);
    await small.p;
    expect(await settledAtOnce(read(none, 0, 4096).p)).toBe(true);
    const content = fs.readFileSync(file);
    expect(content.subarray(0, 256 * 1024).equals(w256.data)).toBe(true);
    expect(content.subarray(1024 * 512, 1024 * 512 + big.data.length).equals(big.data)).toBe(true);
    expect(content.subarray(2048 * 512, 2049 * 512).equals(small.data)).toBe(true);
  });

  it('syncIoMax 0 sends every request through the pool', async () => {
    const d = open({ syncIoMax: 0 });
    const small = read(d, 0, 512);
    expect(await settledAtOnce(small.p)).toBe(false);
    await small.p;
    expect(small.bio.data.equals(fs.readFileSync(file).subarray(0, 512))).toBe(true);
  });

  it('DMKIT_SYNC_IO sets the default', async () => {
    const old = process.env.DMKIT_SYNC_IO;
    process.env.DMKIT_SYNC_IO = '0';
    try {
      const d = open();
      expect(await settledAtOnce(read(d, 0, 4096).p)).toBe(false);
    } finally {
      if (old === undefined) delete process.env.DMKIT_SYNC_IO;
      else process.env.DMKIT_SYNC_IO = old;
    }
    devs.pop()!.close();
    delete process.env.DMKIT_SYNC_IO;
    try {
      expect(await settledAtOnce(read(open(), 0, 4096).p)).toBe(true);
    } finally {
      if (old !== undefined) process.env.DMKIT_SYNC_IO = old;
    }
  });

  it('two slow synchronous calls in a row send I/O to the pool for the back-off period, then it comes back', async () => {
    // every call counts as slow: the first two are synchronous, the next ones wait out the back-off
    const d = open({ syncIoMax: 64 * 1024, syncSlowMs: -1, syncBackoffMs: 150 });
    expect(await settledAtOnce(read(d, 0, 4096).p)).toBe(true);
    expect(await settledAtOnce(read(d, 0, 4096).p)).toBe(true);
    const w: Bio = { op: 'write', sector: 16, sectors: 8, data: Buffer.alloc(4096, 0x5a), flags: {} };
    const wp = d.submit(w);
    expect(await settledAtOnce(wp)).toBe(false);
    await wp;
    expect(await settledAtOnce(read(d, 0, 4096).p)).toBe(false);
    await new Promise((r) => setTimeout(r, 200));
    expect(await settledAtOnce(read(d, 0, 4096).p)).toBe(true);
    expect(fs.readFileSync(file).subarray(16 * 512, 24 * 512).equals(Buffer.alloc(4096, 0x5a))).toBe(true);
  });

  it('a caller looping on awaited requests still lets timers run', async () => {
    const d = open({ syncIoMax: 64 * 1024 });
    let stop = false;
    setTimeout(() => { stop = true; }, 20);
    const data = Buffer.alloc(4096, 1);
    let n = 0;
    // without a bound on synchronous completions this loop never yields and the timer
    // never fires; the cap keeps a broken build from hanging the suite
    while (!stop && n < 300_000) {
      await d.submit({ op: 'write', sector: (n % 64) * 8, sectors: 8, data, flags: {} });
      n++;
    }
    expect(stop).toBe(true);
  });

  it('one turn of the event loop copies at most SYNC_BURST_BYTES synchronously', async () => {
    const d = open({ syncIoMax: 256 * 1024, syncSlowMs: 1000 });
    await new Promise((r) => setImmediate(r)); // a fresh turn: nothing counted yet
    const reads = Array.from({ length: 40 }, (_, i) => read(d, (i % 8) * 512, 256 * 1024));
    for (let i = 0; i < 5; i++) await Promise.resolve();
    const settled = await Promise.all(reads.map((x) => settledAtOnce(x.p)));
    const perTurn = SYNC_BURST_BYTES / (256 * 1024);
    expect(settled.slice(0, perTurn).every(Boolean)).toBe(true);
    expect(settled.slice(perTurn).some(Boolean)).toBe(false);
    await Promise.all(reads.map((x) => x.p));
    const content = fs.readFileSync(file);
    reads.forEach(({ bio }, i) => {
      const at = (i % 8) * 512 * 512;
      expect(bio.data.equals(content.subarray(at, at + 256 * 1024))).toBe(true);
    });
  });

  it('each device has its own burst: one that spent its turn does not send another to the pool', async () => {
    // a replicator writes the log, the local device and then the site's device for the same
    // writes: with one budget for the process the site's device went to the pool every turn
    const other = path.join(dir, 'img2');
    fs.writeFileSync(other, prng(8).fill(Buffer.alloc(SECTORS * 512)));
    const opts = { syncIoMax: 256 * 1024, syncSlowMs: 1000 };
    const a = open(opts);
    const b = FileDev.open(other, other, opts);
    devs.push(b);
    await new Promise((r) => setImmediate(r)); // a fresh turn: nothing counted yet
    const perTurn = SYNC_BURST_BYTES / (256 * 1024);
    const fromA = Array.from({ length: perTurn + 1 }, (_, i) => read(a, (i % 8) * 512, 256 * 1024));
    const fromB = read(b, 512, 256 * 1024); // in the same turn, after a's burst is spent
    const settledA = await Promise.all(fromA.map((x) => settledAtOnce(x.p)));
    expect(settledA.slice(0, perTurn).every(Boolean)).toBe(true);
    expect(settledA[perTurn]).toBe(false);
    expect(await settledAtOnce(fromB.p)).toBe(true);
    await Promise.all([...fromA.map((x) => x.p), fromB.p]);
    expect(fromB.bio.data.equals(fs.readFileSync(other).subarray(512 * 512, 512 * 512 + 256 * 1024))).toBe(true);
  });

  it('all devices together stop at SYNC_TURN_DEVICES bursts in a turn', async () => {
    const opts = { syncIoMax: 256 * 1024, syncSlowMs: 1000 };
    const many = Array.from({ length: SYNC_TURN_DEVICES + 1 }, (_, i) => {
      const f = path.join(dir, `many${i}`);
      fs.writeFileSync(f, prng(20 + i).fill(Buffer.alloc(SECTORS * 512)));
      const d = FileDev.open(f, f, opts);
      devs.push(d);
      return d;
    });
    await new Promise((r) => setImmediate(r)); // a fresh turn
    const perTurn = SYNC_BURST_BYTES / (256 * 1024);
    const reads = many.map((d) => Array.from({ length: perTurn }, (_, i) => read(d, (i % 8) * 512, 256 * 1024)));
    const settled = await Promise.all(reads.map((rs) => Promise.all(rs.map((x) => settledAtOnce(x.p)))));
    for (let i = 0; i < SYNC_TURN_DEVICES; i++) expect(settled[i]!.every(Boolean)).toBe(true);
    expect(settled[SYNC_TURN_DEVICES]!.some(Boolean)).toBe(false);
    await Promise.all(reads.flat().map((x) => x.p));
  });

  it.each([
    ['always synchronous', { syncIoMax: 1 << 20 }],
    ['never synchronous', { syncIoMax: 0 }],
    ['default', {}],
    ['alternating back-off', { syncSlowMs: -1, syncBackoffMs: 1 }],
  ] as Array<[string, FileDevOptions]>)('random reads and writes give the reference bytes (%s)', async (_name, opts) => {
    const d = open(opts);
    const model = fs.readFileSync(file);
    const r = prng(99);
    for (let i = 0; i < 300; i++) {
      const sectors = 1 + r.int(r.int(2) === 0 ? 8 : 256);
      const sector = r.int(SECTORS - sectors + 1);
      if (r.int(2) === 0) {
        const data = r.fill(Buffer.alloc(sectors * 512));
        await d.submit({ op: 'write', sector, sectors, data, flags: r.int(8) === 0 ? { fua: true } : {} });
        data.copy(model, sector * 512);
      } else {
        const { bio, p } = read(d, sector, sectors * 512);
        await p;
        expect(bio.data.equals(model.subarray(sector * 512, (sector + sectors) * 512))).toBe(true);
      }
    }
    await d.flush();
    expect(fs.readFileSync(file).equals(model)).toBe(true);
  });

  it('reads past the end of a shrunken file are zero-filled on both paths', async () => {
    for (const syncIoMax of [0, 1 << 20]) {
      const d = open({ syncIoMax });
      fs.truncateSync(file, 1024 + 100);
      const { bio, p } = read(d, 0, 4096);
      await p;
      const want = Buffer.alloc(4096);
      fs.readFileSync(file).copy(want);
      expect(bio.data.equals(want)).toBe(true);
      d.close();
      devs.pop();
    }
  });

  it('read-only and closed devices fail the same way on both paths', async () => {
    for (const syncIoMax of [0, 1 << 20]) {
      const ro = FileDev.open(file, file, { readOnly: true, syncIoMax });
      await expect(ro.submit({ op: 'write', sector: 0, sectors: 1, data: Buffer.alloc(512), flags: {} }))
        .rejects.toMatchObject({ code: 'EROFS' });
      ro.close();
      await expect(read(ro, 0, 512).p).rejects.toMatchObject({ code: 'EIO', message: `${file} is closed` });
    }
  });
});

describe('FileDev FUA writes', () => {
  /** this process's descriptors open on `f`, with their open flags (octal, /proc/self/fdinfo) */
  function descriptorsOn(f: string): number[] {
    const flags: number[] = [];
    for (const fd of fs.readdirSync('/proc/self/fd')) {
      try {
        if (fs.readlinkSync(`/proc/self/fd/${fd}`) !== f) continue;
        const m = /^flags:\s+([0-7]+)$/m.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'));
        if (m) flags.push(parseInt(m[1]!, 8));
      } catch { /* closed meanwhile */ }
    }
    return flags;
  }

  it('go through a descriptor of the same file opened O_DSYNC (that write durable, not every dirty page), closed with the device', async () => {
    const O_DSYNC = fs.constants.O_DSYNC;
    for (const syncIoMax of [0, 1 << 20]) {
      const d = open({ syncIoMax });
      const data = Buffer.alloc(8192, 0x5a);
      await write(d, 0, 4096, 0x11).p; // a dirty page the FUA write leaves for the next flush
      expect(descriptorsOn(file).filter((f) => (f & O_DSYNC) !== 0)).toHaveLength(0);
      await d.submit({ op: 'write', sector: 64, sectors: 16, data, flags: { fua: true } });
      expect(descriptorsOn(file).filter((f) => (f & O_DSYNC) !== 0)).toHaveLength(1);
      const { bio, p } = read(d, 64, 8192);
      await p;
      expect(bio.data.equals(data)).toBe(true);
      expect(fs.readFileSync(file).subarray(0, 4096).equals(Buffer.alloc(4096, 0x11))).toBe(true);
      await d.flush();
      d.close();
      devs.pop();
      expect(descriptorsOn(file)).toHaveLength(0);
    }
  });
});

describe('FileDev shared with another thread (adopt)', () => {
  it('a flush through either covers writes through the other; the adopted one never drops the lock', async () => {
    const d = open();
    const share = d.share();
    const other = FileDev.adopt(file, file, share, d.sectors);
    const syncs = vi.spyOn(fs, 'fdatasync');
    try {
      await d.flush();
      expect(syncs).toHaveBeenCalledTimes(0); // nothing written yet
      await other.writeAt(Buffer.alloc(4096, 0x42), 8192, false);
      await d.flush(); // written through the other descriptor, flushed through this one
      expect(syncs).toHaveBeenCalledTimes(1);
      await other.flush();
      expect(syncs).toHaveBeenCalledTimes(1); // clean again
      await d.submit({ op: 'write', sector: 0, sectors: 1, data: Buffer.alloc(512, 1), flags: {} });
      await other.flush();
      expect(syncs).toHaveBeenCalledTimes(2);
    } finally {
      syncs.mockRestore();
    }
    other.close();
    // the lock belongs to the open file both shared: still held after the copy closed
    expect(() => FileDev.open(file, file)).toThrow(/locked by another engine/);
    const back = Buffer.alloc(4096);
    await d.readAt(back, 8192);
    expect(back.equals(Buffer.alloc(4096, 0x42))).toBe(true);
  });
});
