/**
 * The `tcp` slink carrying the replication log's CRC (feature 'entry-crc'): a write tagged
 * with the CRC its entry was sealed with goes as a seeded IO frame, whose payload CRC the
 * sender derives from the tag without reading the data, and the site checks the bytes
 * against what was logged.
 *
 *  - a real sender (the tcp slink, through the registry) and a real receiver in-process,
 *    over an engine whose device is an image file: a good tag crosses; a tag whose CRC does
 *    not match the data (damaged after logging) is asked for again, never written, and the
 *    ship fails after MAX_RESENDS re-sends with a clear EIO, taking the later entries with it
 *    (not written either); the link works again afterwards and the entry, re-shipped, lands;
 *  - a fake site (the real server handshake, frames inspected as they arrive): with the
 *    feature, a tagged write is seeded and its CRC is the one derived from the tag (a tag
 *    with a wrong CRC proves the data was not scanned); untagged, compressed and
 *    integrity=none writes are not; a site without the feature (as the previous build)
 *    gets exactly today's frames;
 *  - a raw sender against the real receiver: a seeded frame without the feature, one too
 *    short, or the flag on another frame type closes the connection with the reason; a
 *    damaged seeded frame gets RESEND and is applied only once it comes back intact;
 *  - the RESTART frame (feature 'pipeline') obeys the same bound: a real sender and a real
 *    receiver with a proxy between them that damages every RESTART's payload: re-sent at
 *    most MAX_RESENDS times, then given up like an IO frame (the entries behind it fail with
 *    EIO, it is not sent again, the connection is re-made); the site applies nothing twice
 *    or out of order, and its image ends equal to the source's;
 *  - a receiver that completes the handshake and then answers nothing, not even an OPEN:
 *    the sender drops it after io-timeout and the write fails (the attempt used to hang).
 */
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { crc32c } from '@node-rs/crc32';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import type { Bio } from '../../src/core/bio.ts';
import { BlockError, DeviceMapper } from '../../src/index.ts';
import type { Logger } from '../../src/core/log.ts';
import type { BlockDev } from '../../src/core/types.ts';
import type { Frame, FrameSocket } from '../../src/replication/frame-socket.ts';
import { clientHandshake, loadSecret, serverHandshake } from '../../src/replication/handshake.ts';
import {
  Codec, FEATURES, FLAG_NO_CRC, FLAG_SEEDED, FrameType, HEADER_SIZE, IO_HEADER, IO_HEADER_SEEDED, IoOp, MAX_PAYLOAD,
  decodeIo, decodeJson, encodeHeader, encodeIo, encodeJson, seededCrc, type FrameHeader, type IoRequest,
} from '../../src/replication/protocol.ts';
import { ReplicationReceiver } from '../../src/replication/receiver.ts';
import { MAX_RESENDS } from '../../src/replication/sender.ts';
import { createSlink } from '../../src/slink/registry.ts';
import type { RemoteDevice, ShipTag, SiteLink, SlinkContext } from '../../src/slink/types.ts';

const SECTORS = 8192;
const STREAM = '0123456789abcdef0123456789abcdef';
const SECRET = 'the receiving site shares this secret';
/** the features of the build before 'entry-crc' */
const OLD_FEATURES = ['digest', 'pipeline', 'roles'];

/** a logger that keeps what it is told */
function keeping(): Logger & { lines: string[] } {
  const lines: string[] = [];
  const keep = (m: string): void => void lines.push(m);
  return { lines, debug: keep, info: keep, warn: keep, error: keep, limited: (_k, m) => keep(m) };
}

/** poll `cond` (a state, not a timing): fails with `what` when it never holds */
async function until(cond: () => boolean, what: string, ms = 15_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`never happened: ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** `sectors` sectors of recognisable content */
function content(tag: string, sectors = 8): Buffer {
  const b = Buffer.alloc(sectors * 512);
  for (let o = 0; o < b.length; o += 32) b.write(`${tag}@${o}`.padEnd(32, '.'), o, 'latin1');
  return b;
}

const write = (sector: number, data: Buffer): Bio => ({ op: 'write', sector, sectors: data.length / 512, data, flags: {} });

/** the tag the shipper hands over: the entry's place, and the CRC the log sealed its data with */
function tagOf(seq: number, epoch: number, logged: Buffer, seed = 0x5eed0000 + seq): ShipTag {
  return { seq, epoch, payloadCrc: { seed, crc: crc32c(logged, seed) >>> 0 } };
}

/** `b` with one byte flipped: what a payload damaged in memory after it was logged looks like */
function damaged(b: Buffer, at = 1000): Buffer {
  const d = Buffer.from(b);
  d[at]! ^= 0x20;
  return d;
}

let tmp: string;
let secretFile: string;
let dm: DeviceMapper;
let links: SiteLink[];
let closers: Array<() => unknown>;

beforeEach(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'dmkit-entry-crc-'));
  secretFile = path.join(tmp, 'secret');
  fs.writeFileSync(secretFile, SECRET, { mode: 0o600 });
  dm = new DeviceMapper();
  links = [];
  closers = [];
});

afterEach(async () => {
  for (const l of links) await l.destroy();
  for (const c of closers.reverse()) await c();
  await dm.close();
  fs.rmSync(tmp, { recursive: true, force: true });
});

const sctx = (lg: Logger): SlinkContext => ({ device: 'repl', groupId: STREAM, event: () => {}, log: lg });

/** a tcp slink to `port` with `options`, its device `vol` attached */
async function sender(port: number, options: string[] = [], lg: Logger = keeping()): Promise<{ link: SiteLink; dev: RemoteDevice }> {
  const link = await createSlink('tcp', sctx(lg), 1, [`peer=127.0.0.1:${port}`, `secret=${secretFile}`, 'io-timeout=5', ...options]);
  links.push(link);
  const dev = await link.attach({ device: 'vol', open: () => Promise.reject(new Error('not used')), length: SECTORS }, 0, ['vol']);
  return { link, dev };
}

/** the link's status counters (tcp: resends, reconnects …) */
const stats = (link: SiteLink): Record<string, unknown> => link.statusJson!() as Record<string, unknown>;

/** a receiving site in-process: the engine's device `vol` over an empty image file, and a real receiver */
async function receivingSite(rxLog: Logger = keeping()): Promise<{ img: string; port: number }> {
  const img = path.join(tmp, 'vol.img');
  fs.writeFileSync(img, Buffer.alloc(0));
  fs.truncateSync(img, SECTORS * 512);
  await dm.create('vol', { table: `0 ${SECTORS} linear ${img} 0` });
  const rx = new ReplicationReceiver(dm, { host: '127.0.0.1', port: 0, secret: loadSecret(secretFile), stateDir: path.join(tmp, 'state') }, rxLog);
  const port = (await rx.listen()).port;
  closers.push(() => rx.close());
  return { img, port };
}

// --- a real sender and a real receiver --------------------------------------------------

describe('entry-crc: sender and receiver', { timeout: 60_000 }, () => {
  let img: string;
  let port: number;
  let rxLog: ReturnType<typeof keeping>;

  beforeEach(async () => {
    rxLog = keeping();
    ({ img, port } = await receivingSite(rxLog));
  });

  const image = (): Buffer => fs.readFileSync(img);
  const at = (sector: number, n: number): Buffer => image().subarray(sector * 512, (sector + n) * 512);

  it('a write tagged with its log CRC crosses and lands byte for byte', async () => {
    const { link, dev } = await sender(port);
    const d = content('logged');
    await dev.submit(write(64, d), tagOf(1, 1, d));
    await dev.submit({ op: 'flush', sector: 0, sectors: 0, data: Buffer.alloc(0), flags: {} }, { seq: 2, epoch: 2, payloadCrc: { seed: 7, crc: 7 } });
    expect(at(64, 8).equals(d)).toBe(true);
    expect(stats(link).resends).toBe(0);
  });

  it('a payload that no longer matches its log CRC is asked for again, never written, and the ship fails after MAX_RESENDS', async () => {
    const lg = keeping();
    const { link, dev } = await sender(port, [], lg);
    const logged = content('as logged');
    const before = image();
    // entry 1 was damaged after the log sealed it; entry 2 (a later epoch) goes behind it, pipelined
    const first = dev.submit(write(100, damaged(logged)), tagOf(1, 1, logged)).then(() => null, (e: unknown) => e);
    const second = dev.submit(write(200, content('later')), tagOf(2, 2, content('later'))).then(() => null, (e: unknown) => e);
    const e1 = await first;
    expect(e1).toBeInstanceOf(BlockError);
    expect((e1 as BlockError).code).toBe('EIO');
    expect((e1 as Error).message).toMatch(new RegExp(`log entry 1 \\(request \\d+\\) failed its CRC at the receiver ${MAX_RESENDS + 1} times: its data does not match the CRC the replication log sealed it with`));
    const e2 = await second;
    expect(e2).toBeInstanceOf(BlockError);
    expect((e2 as BlockError).code).toBe('EIO');
    expect((e2 as Error).message).toMatch(/not sent: log entry 1 \(request \d+\) failed before it/);
    // asked for again each time, bounded: the original and MAX_RESENDS re-sends
    expect(stats(link).resends).toBe(MAX_RESENDS + 1);
    expect(rxLog.lines.some((l) => /frame \d+ failed its CRC; asked for it again/.test(l))).toBe(true);
    expect(lg.lines.some((l) => /failed its CRC at the receiver 4 times/.test(l))).toBe(true);
    // nothing of either reached the site's device
    expect(image().equals(before)).toBe(true);

    // the connection is made again, and the site did not move past the entry it never got:
    // shipped again (from the log, intact), it is applied, then the later one
    await until(() => stats(link).reconnects === 1, 'the link reconnects'); // counted once its device is open again
    expect(stats(link).connection).toBe('connected');
    await dev.test();
    await dev.submit(write(100, logged), tagOf(1, 1, logged));
    await dev.submit(write(200, content('later')), tagOf(2, 2, content('later')));
    expect(at(100, 8).equals(logged)).toBe(true);
    expect(at(200, 8).equals(content('later'))).toBe(true);
    expect(stats(link).resends).toBe(MAX_RESENDS + 1);
  });

  it('without a tag, and with compression, writes still cross (CRC computed over the frame)', async () => {
    const { dev } = await sender(port, ['compress=zstd']);
    const d = content('compressible', 64);
    await dev.submit(write(0, d), tagOf(1, 1, d)); // compressed: the log's CRC is not of these bytes
    await dev.submit(write(1000, content('untagged')));
    expect(at(0, 64).equals(d)).toBe(true);
    expect(at(1000, 8).equals(content('untagged'))).toBe(true);
  });
});

// --- a fake site: what the sender puts on the wire ---------------------------------------

interface Seen {
  readonly h: FrameHeader;
  /** null: the frame failed its CRC here */
  readonly payload: Buffer | null;
}

/**
 * A site speaking the real server handshake, offering `features`; it answers OPEN and every
 * IO (ACK, even for one that failed its CRC: it only watches) and keeps the IO frames seen.
 * `silent`: it answers nothing after the handshake (and counts the OPENs it got).
 */
async function fakeSite(features: readonly string[], silent = false): Promise<{ port: number; seen: Seen[]; opens: () => number }> {
  const seen: Seen[] = [];
  let opens = 0;
  const server = net.createServer((sock) => {
    sock.on('error', () => {});
    void serverHandshake(sock, { secret: loadSecret(secretFile), requireTls: false, timeoutMs: 5000, features }, 'fake site').then((a) => {
      a.frames.maxPayload = MAX_PAYLOAD;
      a.frames.handle({
        frame: (f: Frame) => {
          if (f.h.type === FrameType.OPEN) opens++;
          if (silent) return;
          if (f.h.type === FrameType.OPEN) a.frames.send(FrameType.OPEN_OK, f.h.id, [encodeJson({ handle: 1, applied: 0, sectors: SECTORS })]);
          if (f.h.type === FrameType.PING) a.frames.send(FrameType.PONG, f.h.id);
          if (f.h.type === FrameType.IO) {
            seen.push({ h: f.h, payload: f.payload });
            a.frames.send(FrameType.ACK, f.h.id);
          }
        },
        corrupt: (h) => {
          seen.push({ h, payload: null });
          a.frames.send(FrameType.ACK, h.id);
        },
        closed: () => {},
      });
    }, () => sock.destroy());
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  closers.push(() => new Promise<void>((r) => server.close(() => r())));
  return { port: (server.address() as net.AddressInfo).port, seen, opens: () => opens };
}

/** the sub-header the sender builds for a write of `data` at `sector` on handle 1 */
const subOf = (sector: number, data: Buffer, tag: ShipTag, seeded: boolean): Buffer => encodeIo({
  handle: 1, op: IoOp.WRITE, flags: 0, codec: Codec.NONE, seq: tag.seq, epoch: tag.epoch, sector, sectors: data.length / 512,
  rawBytes: data.length, ...(seeded ? { seed: tag.payloadCrc!.seed } : {}),
});

/** a new slink (`options`) to a fake site offering `features`, one tagged write of `d` at `sector`: the frame the site saw */
async function shipOne(
  features: readonly string[], sector: number, d: Buffer, tag: ShipTag, options: string[] = [],
): Promise<{ f: Seen; dev: RemoteDevice; seen: Seen[] }> {
  const site = await fakeSite(features);
  const { dev } = await sender(site.port, options);
  await dev.submit(write(sector, d), tag);
  const [f] = site.seen.splice(0);
  return { f: f!, dev, seen: site.seen };
}

describe('entry-crc: on the wire', { timeout: 60_000 }, () => {
  it('to a site with the feature a tagged write is seeded, its CRC derived from the tag, not from the data', async () => {
    const d = content('seeded');
    const tag = tagOf(5, 3, d);
    const { f: good, dev, seen } = await shipOne(FEATURES, 8, d, tag);
    expect(good.h.flags).toBe(FLAG_SEEDED);
    expect(good.h.length).toBe(IO_HEADER_SEEDED + d.length);
    const sub = subOf(8, d, tag, true);
    expect(good.payload!.equals(Buffer.concat([sub, d]))).toBe(true);
    expect(decodeIo(good.payload!, true).seed).toBe(tag.payloadCrc!.seed);
    expect(good.h.crc).toBe(seededCrc(sub, tag.payloadCrc!.crc));

    // a tag whose CRC is deliberately not the data's: the frame carries the tag's, so the site
    // finds the mismatch (a sender that scanned the data would have sent a CRC that matches)
    const wrong: ShipTag = { seq: 6, epoch: 3, payloadCrc: { seed: 99, crc: 0x12345678 } };
    await dev.submit(write(16, d), wrong);
    const [bad] = seen.splice(0);
    expect(bad!.payload).toBeNull(); // failed its CRC at the site
    expect(bad!.h.flags).toBe(FLAG_SEEDED);
    expect(bad!.h.crc).toBe(seededCrc(subOf(16, d, wrong, true), 0x12345678));
    expect(bad!.h.crc).not.toBe(seededCrc(subOf(16, d, wrong, true), crc32c(d, 99) >>> 0));
  });

  it('untagged, compressed, split or integrity=none writes are not seeded', async () => {
    const site = await fakeSite(FEATURES);
    const { dev } = await sender(site.port);
    const d = content('plain');
    await dev.submit(write(8, d)); // no tag
    await dev.submit(write(16, d), { seq: 1, epoch: 1 }); // a tag without a CRC
    await dev.submit({ op: 'discard', sector: 0, sectors: 8, data: Buffer.alloc(0), flags: {} }, { seq: 2, epoch: 2, payloadCrc: { seed: 1, crc: 1 } });
    const big = Buffer.alloc(9000 * 512, 0x5a); // over one frame: split, the parts are not the entry's payload
    await dev.submit(write(0, big), tagOf(3, 3, big));
    const frames = site.seen.splice(0);
    expect(frames.length).toBe(5); // the big write in two frames
    for (const f of frames) {
      expect(f.h.flags).toBe(0);
      expect(f.payload).not.toBeNull();
      expect(f.h.crc).toBe(crc32c(f.payload!) >>> 0);
      expect(decodeIo(f.payload!).seed).toBeUndefined();
    }

    const c = content('compressible', 64);
    const { f: zf } = await shipOne(FEATURES, 0, c, tagOf(1, 1, c), ['compress=zstd']);
    expect(zf.h.flags).toBe(0);
    expect(decodeIo(zf.payload!).codec).toBe(Codec.ZSTD);
    expect(zf.h.crc).toBe(crc32c(zf.payload!) >>> 0);

    const { f: nf } = await shipOne(FEATURES, 0, d, tagOf(1, 1, d), ['integrity=none']);
    expect(nf.h.flags).toBe(FLAG_NO_CRC);
    expect(nf.h.crc).toBe(0);
    expect(nf.payload!.length).toBe(IO_HEADER + d.length);
  });

  it('a site without the feature (the previous build) gets today\'s frames: 40-byte sub-header, CRC over the payload', async () => {
    for (const features of [OLD_FEATURES, []]) {
      const d = content('old site');
      const tag = tagOf(9, 4, d);
      const { f, dev, seen } = await shipOne(features, 24, d, tag);
      expect(f.h.flags).toBe(0);
      expect(f.payload!.equals(Buffer.concat([subOf(24, d, tag, false), d]))).toBe(true);
      expect(f.h.crc).toBe(crc32c(f.payload!) >>> 0);
      // even when the tag's CRC is wrong: the old site checks a CRC the sender computed
      await dev.submit(write(32, d), { seq: 10, epoch: 4, payloadCrc: { seed: 1, crc: 2 } });
      const [g] = seen.splice(0);
      expect(g!.payload).not.toBeNull();
      expect(g!.h.flags).toBe(0);
    }
  });
});

// --- a raw sender against the real receiver ------------------------------------------------

describe('entry-crc: the receiver refuses malformed seeded frames', { timeout: 60_000 }, () => {
  let img: string;
  let port: number;

  beforeEach(async () => {
    ({ img, port } = await receivingSite());
  });

  /** a raw sender: the real client handshake offering `features`, then frames by hand */
  async function rawSender(features: readonly string[]): Promise<{ frames: FrameSocket; got: Frame[]; closed: () => boolean }> {
    const sock = net.connect({ host: '127.0.0.1', port });
    sock.on('error', () => {});
    await new Promise<void>((r) => sock.once('connect', () => r()));
    const a = await clientHandshake(sock, { secret: loadSecret(secretFile), tls: false, timeoutMs: 5000, name: 'raw sender', where: 'raw', features });
    closers.push(() => a.frames.destroy());
    a.frames.maxPayload = MAX_PAYLOAD;
    const got: Frame[] = [];
    let closed = false;
    a.frames.handle({ frame: (f) => void got.push(f), corrupt: () => {}, closed: () => void (closed = true) });
    return { frames: a.frames, got, closed: () => closed };
  }

  async function opened(s: { frames: FrameSocket; got: Frame[] }): Promise<number> {
    s.frames.send(FrameType.OPEN, 1, [encodeJson({ stream: STREAM, slink: 1, device: 'vol', devNr: 0, sectors: SECTORS })]);
    await until(() => s.got.some((f) => f.h.id === 1), 'OPEN_OK');
    return decodeJson(s.got.find((f) => f.h.id === 1)!.payload, 'OPEN_OK').handle as number;
  }

  /** the receiver closes the connection with ERROR id 0 EPROTO; its message */
  async function refusedWith(s: { got: Frame[]; closed: () => boolean }): Promise<string> {
    await until(() => s.closed(), 'the receiver closes the connection');
    const e = s.got.find((f) => f.h.type === FrameType.ERROR && f.h.id === 0);
    expect(e, 'an ERROR frame before the close').toBeDefined();
    const o = decodeJson(e!.payload, 'ERROR');
    expect(o.code).toBe('EPROTO');
    return o.message as string;
  }

  /** a header like encodeHeader's with `flags` set (its header CRC made good again) */
  function flagged(type: number, id: number, parts: Buffer[], flags: number, dataCrc?: number): Buffer {
    const h = encodeHeader(type, id, parts, false, dataCrc);
    h.writeUInt8(flags, 5);
    h.writeUInt32BE(crc32c(h.subarray(0, 24)) >>> 0, 24);
    return Buffer.concat([h, ...parts]);
  }

  const io = (handle: number, sector: number, data: Buffer, seed?: number, r: Partial<IoRequest> = {}): Buffer => encodeIo({
    handle, op: IoOp.WRITE, flags: 0, codec: Codec.NONE, seq: 0, epoch: 0, sector, sectors: data.length / 512, rawBytes: data.length,
    ...(seed === undefined ? {} : { seed }), ...r,
  });

  it('a seeded frame on a connection without the feature', async () => {
    const s = await rawSender(OLD_FEATURES);
    const handle = await opened(s);
    const d = content('no feature');
    const sub = io(handle, 0, d, 3);
    s.frames.send(FrameType.IO, 2, [sub, d], false, crc32c(d, 3) >>> 0);
    expect(await refusedWith(s)).toBe('frame 2 (type 11) has flag bit 1 (seeded CRC) on a connection without the feature entry-crc');
    expect(fs.readFileSync(img).subarray(0, d.length).every((x) => x === 0)).toBe(true);
  });

  it('a seeded frame shorter than its sub-header, and the flag on another frame type', async () => {
    const s = await rawSender(FEATURES);
    await opened(s);
    s.frames.socket.write(flagged(FrameType.IO, 2, [Buffer.alloc(IO_HEADER)], FLAG_SEEDED));
    expect(await refusedWith(s)).toBe('seeded IO frame 2 of 40 bytes is shorter than its 44-byte sub-header');

    const t = await rawSender(FEATURES);
    t.frames.socket.write(flagged(FrameType.PING, 0, [], FLAG_SEEDED));
    expect(await refusedWith(t)).toBe('frame 0 (type 15) has flag bit 1 (seeded CRC), which only IO frames may carry');

    const u = await rawSender(FEATURES);
    const uh = await opened(u);
    const flush = io(uh, 0, Buffer.alloc(0), 5, { op: IoOp.FLUSH, rawBytes: 0, sectors: 0 });
    u.frames.send(FrameType.IO, 2, [flush], false, 5);
    expect(await refusedWith(u)).toMatch(/^seeded IO frame: op 3, codec 0 \(expected an uncompressed write/);
  });

  it('a damaged seeded frame gets RESEND and is not applied; intact, it is', async () => {
    const s = await rawSender(FEATURES);
    const handle = await opened(s);
    const d = content('checked at the site');
    const seed = 0xabcdef01;
    const sub = io(handle, 512, d, seed);
    const crc = crc32c(d, seed) >>> 0;
    // the data flipped after its CRC was taken, then the seed flipped, then a sub-header byte
    for (const [id, what, parts] of [
      [10, 'data', [sub, damaged(d)]],
      [11, 'seed', [io(handle, 512, d, seed ^ 1), d]],
      [12, 'sub-header', [io(handle, 513, d, seed), d]],
    ] as const) {
      s.frames.socket.write(Buffer.concat([encodeHeader(FrameType.IO, id, [sub, d], false, crc), ...parts]));
      await until(() => s.got.some((f) => f.h.id === id), `the answer to the frame with a flipped ${what}`);
      expect(s.got.find((f) => f.h.id === id)!.h.type, what).toBe(FrameType.RESEND);
      expect(fs.readFileSync(img).subarray(512 * 512, 520 * 512).every((x) => x === 0), what).toBe(true);
    }
    // each re-sent intact (the receiver holds what follows a frame it asked for again)
    for (const id of [10, 11, 12]) s.frames.send(FrameType.IO, id, [sub, d], false, crc);
    await until(() => s.got.filter((f) => f.h.type === FrameType.ACK).length === 3, 'the re-sent frames are acknowledged');
    expect(fs.readFileSync(img).subarray(512 * 512, 520 * 512).equals(d)).toBe(true);
    expect(s.closed()).toBe(false);
  });
});

// --- a RESTART asked for again: the same bound as IO frames ---------------------------------

/** RESTART frames seen on one connection past which the sender is taken to loop (the bound is MAX_RESENDS + 1) */
const LOOPING = MAX_RESENDS + 20;

/** one log entry of the source: its own epoch, 8 sectors of content naming its seq */
interface Entry {
  readonly seq: number;
  readonly sector: number;
  readonly data: Buffer;
}

const entry = (seq: number, sector: number): Entry => ({ seq, sector, data: content(`entry ${seq}`) });

/** the seq an applied write carries (its first bytes, as `content` writes them), or -1 for another write */
const seqOf = (data: Buffer): number => {
  const m = /^entry (\d+)@0\./.exec(data.subarray(0, 32).toString('latin1'));
  return m ? Number(m[1]) : -1;
};

/**
 * A proxy that forwards whole frames from the sender to the receiver, and the receiver's
 * bytes back unchanged. While `damage` > 0 it flips a payload byte of each RESTART frame
 * (one fewer to damage each time). It records the ids of the RESTART frames of each
 * connection as they pass.
 */
async function restartDamagingProxy(target: number): Promise<{ port: number; damage: number; restarts: number[][] }> {
  const p = { port: 0, damage: 0, restarts: [] as number[][] };
  const socks = new Set<net.Socket>();
  const server = net.createServer((down) => {
    const seen: number[] = [];
    p.restarts.push(seen);
    const up = net.connect({ host: '127.0.0.1', port: target });
    for (const s of [down, up]) {
      socks.add(s);
      s.on('error', () => {});
      s.on('close', () => { socks.delete(s); down.destroy(); up.destroy(); });
    }
    up.on('data', (b: Buffer) => down.write(b));
    let pending = Buffer.alloc(0);
    down.on('data', (b: Buffer) => {
      pending = Buffer.concat([pending, b]);
      while (pending.length >= HEADER_SIZE) {
        const end = HEADER_SIZE + pending.readUInt32BE(16);
        if (pending.length < end) break;
        const frame = Buffer.from(pending.subarray(0, end));
        pending = pending.subarray(end);
        if (frame[4] === FrameType.RESTART) {
          seen.push(Number(frame.readBigUInt64BE(8)));
          if (p.damage > 0) {
            p.damage--;
            frame[end - 1]! ^= 0x01; // the payload: its CRC fails, the header's does not
          }
        }
        up.write(frame);
      }
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  p.port = (server.address() as net.AddressInfo).port;
  closers.push(() => new Promise<void>((r) => {
    for (const s of socks) s.destroy();
    server.close(() => r());
  }));
  return p;
}

describe('tcp: a RESTART asked for again', { timeout: 60_000 }, () => {
  let img: string;
  let proxy: Awaited<ReturnType<typeof restartDamagingProxy>>;
  /** the seqs of the writes the receiver applied to its device, in the order it submitted them */
  let applied: number[];
  /** what the source device holds: the site's image must end equal to it */
  let source: Buffer;
  let lg: ReturnType<typeof keeping>;
  let link: SiteLink;
  let dev: RemoteDevice;

  beforeEach(async () => {
    const site = await receivingSite();
    img = site.img;
    source = Buffer.alloc(SECTORS * 512);
    // every write the receiver applies goes through the writer it gets as the device turns secondary
    applied = [];
    const md = dm.get('vol');
    const setSecondary = md.setSecondary.bind(md);
    md.setSecondary = async (owner: string): Promise<BlockDev> => {
      const w = await setSecondary(owner);
      return {
        ref: w.ref,
        get sectors() { return w.sectors; },
        submit: (bio: Bio) => {
          if (bio.op === 'write') applied.push(seqOf(bio.data));
          return w.submit(bio);
        },
      };
    };
    proxy = await restartDamagingProxy(site.port);
    lg = keeping();
    ({ link, dev } = await sender(proxy.port, [], lg));
  });

  const image = (): Buffer => fs.readFileSync(img);

  /** ship `entries` pipelined (each its own epoch, seq = epoch), as the shipper does; each settles to null or its error */
  const ship = (entries: readonly Entry[]): Array<Promise<unknown>> => entries.map((e) => dev.submit(
    { op: 'write', sector: e.sector, sectors: 8, data: e.data, flags: {} }, { seq: e.seq, epoch: e.seq },
  ).then(() => {
    e.data.copy(source, e.sector * 512);
    return null;
  }, (err: unknown) => err));

  /** every promise settled, or the sender seen looping on a RESTART (more of them on one connection than the bound allows) */
  async function settledOrLooping(ps: Array<Promise<unknown>>): Promise<unknown[] | null> {
    let out: unknown[] | null = null;
    void Promise.all(ps).then((r) => (out = r));
    await until(() => out !== null || proxy.restarts.some((c) => c.length > LOOPING), 'the ships settle or the RESTART loops');
    return out;
  }

  it(`is re-sent at most ${MAX_RESENDS} times, then given up like an IO frame: the entries behind it fail, the connection is re-made, and the site never applies anything twice or out of order`, async () => {
    // entries write over one another, so the image also shows the order they were applied in
    const entries = [1, 2, 3, 4, 5, 6, 7].map((seq) => entry(seq, 8 * (seq % 3)));
    expect(proxy.restarts.length).toBe(1);

    // generation 1: its RESTART crosses intact, entries 1-3 land
    dev.restart!(1, 1);
    expect(await Promise.all(ship(entries.slice(0, 3)))).toEqual([null, null, null]);
    expect(proxy.restarts[0]!.length).toBe(1);
    expect(applied).toEqual([1, 2, 3]);
    expect(image().equals(source)).toBe(true);
    const before = image();

    // generation 2 starts at entry 4; the link damages every RESTART: 4-7 go pipelined behind it
    proxy.damage = Infinity;
    dev.restart!(4, 2);
    const results = await settledOrLooping(ship(entries.slice(3)));
    const sent = proxy.restarts[0]!.slice(1);
    expect(sent.length, 'the RESTART frames of generation 2 on the first connection: the original and MAX_RESENDS re-sends').toBe(MAX_RESENDS + 1);
    expect(new Set(sent).size, 'the same frame each time').toBe(1);
    const rid = sent[0]!;
    expect(results).not.toBeNull();
    for (const e of results!) {
      expect(e).toBeInstanceOf(BlockError);
      expect((e as BlockError).code).toBe('EIO');
      expect((e as Error).message).toMatch(new RegExp(`not sent: RESTART at entry 4 \\(frame ${rid}\\) failed before it \\(its payload keeps failing its CRC on the way\\)`));
    }
    expect(lg.lines).toContain(`repl slink 1: 127.0.0.1:${proxy.port}: RESTART at entry 4 (frame ${rid}) failed its CRC at the receiver ${MAX_RESENDS + 1} times: its payload keeps failing its CRC on the way; not sent again`);
    expect(stats(link).resends).toBe(MAX_RESENDS + 1);
    // nothing behind the RESTART reached the site's device
    expect(applied).toEqual([1, 2, 3]);
    expect(image().equals(before)).toBe(true);

    // the connection is made again; the given-up RESTART is not sent on it (a round trip
    // after the reconnect: anything sent before it has passed the proxy)
    await until(() => stats(link).reconnects === 1, 'the link reconnects');
    expect(stats(link).connection).toBe('connected');
    await dev.test();
    expect(proxy.restarts.length).toBe(2);
    expect(proxy.restarts[1]).toEqual([]);
    expect(applied).toEqual([1, 2, 3]);

    // the shipper's retest starts generation 3 at the oldest entry the site still needs (4);
    // its RESTART is damaged once (within the bound: re-sent, and taken), and 4-7 land
    proxy.damage = 1;
    dev.restart!(4, 3);
    expect(await Promise.all(ship(entries.slice(3)))).toEqual([null, null, null, null]);
    expect(proxy.restarts[1]!.length).toBe(2);
    expect(proxy.restarts[1]![0]).toBe(proxy.restarts[1]![1]);
    expect(proxy.restarts[1]![0]).not.toBe(rid);
    expect(stats(link).resends).toBe(MAX_RESENDS + 2);
    expect(stats(link).reconnects).toBe(1);
    // each entry applied once, in log order, and the site's image is the source's
    expect(applied).toEqual([1, 2, 3, 4, 5, 6, 7]);
    expect(image().equals(source)).toBe(true);
  });

  it('given up with no entry behind it, still re-makes the connection and is not sent again; later entries land', async () => {
    proxy.damage = Infinity;
    dev.restart!(1, 1);
    await until(() => stats(link).reconnects === 1 || proxy.restarts[0]!.length > LOOPING, 'the link reconnects or the RESTART loops');
    expect(proxy.restarts[0]!.length).toBe(MAX_RESENDS + 1);
    expect(new Set(proxy.restarts[0]).size).toBe(1);
    expect(lg.lines.some((l) => l.includes(`RESTART at entry 1 (frame ${proxy.restarts[0]![0]}) failed its CRC at the receiver ${MAX_RESENDS + 1} times`))).toBe(true);
    await dev.test();
    expect(stats(link).connection).toBe('connected');
    expect(proxy.restarts.length).toBe(2);
    expect(proxy.restarts[1]).toEqual([]);

    proxy.damage = 0;
    const entries = [1, 2, 3].map((seq) => entry(seq, 8 * (seq % 2)));
    expect(await Promise.all(ship(entries))).toEqual([null, null, null]);
    expect(proxy.restarts[1]).toEqual([]);
    expect(applied).toEqual([1, 2, 3]);
    expect(image().equals(source)).toBe(true);
  });
});

describe('tcp: a receiver that answers no OPEN', { timeout: 60_000 }, () => {
  it('is dropped after io-timeout like any silent one: the write fails, nothing hangs', async () => {
    const site = await fakeSite(FEATURES, true);
    const { link, dev } = await sender(site.port); // io-timeout=5
    const err = await dev.submit(write(0, content('never answered'))).then(() => null, (e: unknown) => e);
    expect(err).toBeInstanceOf(BlockError);
    expect((err as Error).message).toMatch(/^repl slink 1: 127\.0\.0\.1:\d+: /);
    expect(site.opens()).toBeGreaterThanOrEqual(1);
    expect(site.seen).toEqual([]);
    expect(stats(link).connection).toBe('down');
  });
});
