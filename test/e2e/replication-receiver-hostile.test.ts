/**
 * The replication receiver (src/replication/receiver.ts) against hostile and broken peers,
 * in-process over a real engine whose device is an image file, the peer a raw `node:net`
 * socket speaking frames built here (the handshake's HMACs computed here too, from the
 * documented protocol). Wrong secrets, corrupted payloads (RESEND) and headers, garbage,
 * huge lengths, seeded fuzz before and after authentication, silent and surplus
 * connections, a wrong protocol version, and re-sent log entries: each ends (at most) its
 * own connection, the receiver serves the next client, no entry is applied twice, and the
 * device's bytes are exactly what the well-behaved clients wrote.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { crc32c } from '@node-rs/crc32';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { log } from '../../src/core/log.ts';
import { DeviceMapper } from '../../src/index.ts';
import { clientHandshake, loadSecret } from '../../src/replication/handshake.ts';
import {
  Codec, FrameType, HEADER_SIZE, IoOp, decodeHeader, encodeDigest, encodeHeader, encodeIo, encodeJson, encodeRestart, payloadOk,
  type FrameHeader, type IoRequest,
} from '../../src/replication/protocol.ts';
import { compress } from '../../src/replication/compress.ts';
import { ReplicationReceiver } from '../../src/replication/receiver.ts';
import { prng } from '../compliance/helpers.ts';

const SECTORS = 8192;
const STREAM = '0123456789abcdef0123456789abcdef';
const SECRET = 'the receiving site shares this secret';

interface RxFrame {
  readonly h: FrameHeader;
  readonly payload: Buffer;
}

/** poll `cond` (a state, not a timing): fails with `what` when it never holds */
async function until(cond: () => boolean, what: string, ms = 15_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`never happened: ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** `n` seeded pseudo-random bytes */
function bytes(rng: ReturnType<typeof prng>, n: number): Buffer {
  return rng.fill(Buffer.alloc((n + 3) & ~3)).subarray(0, n);
}

/** A raw peer: frames built by hand, replies parsed and kept in arrival order. */
class RawPeer {
  readonly sock: net.Socket;
  readonly frames: RxFrame[] = [];
  closed = false;
  readonly whenClosed: Promise<void>;
  #buf = Buffer.alloc(0);
  #wake: Array<() => void> = [];

  private constructor(sock: net.Socket) {
    this.sock = sock;
    sock.on('error', () => {});
    sock.on('data', (c: Buffer) => this.#data(c));
    this.whenClosed = new Promise((r) => sock.once('close', () => {
      this.closed = true;
      r();
      this.#notify();
    }));
  }

  static connect(port: number): Promise<RawPeer> {
    return new Promise((resolve, reject) => {
      const s = net.connect({ host: '127.0.0.1', port });
      const p = new RawPeer(s);
      s.once('connect', () => resolve(p));
      s.once('error', reject);
    });
  }

  send(type: number, id: number, parts: Buffer[] = [], noCrc = false): void {
    this.write(Buffer.concat([encodeHeader(type, id, parts, noCrc), ...parts]));
  }

  write(b: Buffer): void {
    if (!this.sock.destroyed) this.sock.write(b);
  }

  /** the first frame received that `match` accepts (taken out of the queue) */
  async take(match: (f: RxFrame) => boolean, what: string, ms = 15_000): Promise<RxFrame> {
    const end = Date.now() + ms;
    for (;;) {
      const i = this.frames.findIndex(match);
      if (i >= 0) return this.frames.splice(i, 1)[0]!;
      if (this.closed) throw new Error(`connection closed before ${what}; got ${this.describe()}`);
      if (Date.now() > end) throw new Error(`no ${what}; got ${this.describe()}`);
      await new Promise<void>((r) => {
        const t = setTimeout(r, 50);
        this.#wake.push(() => { clearTimeout(t); r(); });
      });
    }
  }

  /** the reply to request `id` */
  reply(id: number, what = `reply to ${id}`): Promise<RxFrame> {
    return this.take((f) => f.h.id === id && f.h.type !== FrameType.PONG, what);
  }

  /** the next frame of `type` */
  expect(type: FrameType, what: string): Promise<RxFrame> {
    return this.take((f) => f.h.type === type || f.h.type === FrameType.ERROR, what).then((f) => {
      if (f.h.type !== type) throw new Error(`${what}: got ERROR ${f.payload.toString()}`);
      return f;
    });
  }

  /** the connection is closed (by the receiver, unless we closed it); bounded, so a hang fails */
  async gone(what = 'the receiver closes the connection', ms = 15_000): Promise<void> {
    let t: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      t = setTimeout(() => reject(new Error(`never happened: ${what}; got ${this.describe()}`)), ms);
    });
    try {
      await Promise.race([this.whenClosed, timeout]);
    } finally {
      clearTimeout(t);
    }
  }

  describe(): string {
    return JSON.stringify(this.frames.map((f) => ({ type: f.h.type, id: f.h.id, p: f.payload.toString('utf8', 0, 200) })));
  }

  destroy(): void {
    this.sock.destroy();
  }

  #data(c: Buffer): void {
    this.#buf = Buffer.concat([this.#buf, c]);
    while (this.#buf.length >= HEADER_SIZE) {
      const h = decodeHeader(this.#buf.subarray(0, HEADER_SIZE));
      if (this.#buf.length < HEADER_SIZE + h.length) break;
      const payload = Buffer.from(this.#buf.subarray(HEADER_SIZE, HEADER_SIZE + h.length));
      if (!payloadOk(h, payload)) throw new Error(`receiver sent a frame ${h.id} with a bad payload CRC`);
      this.#buf = this.#buf.subarray(HEADER_SIZE + h.length);
      this.frames.push({ h, payload });
    }
    this.#notify();
  }

  #notify(): void {
    const w = this.#wake;
    this.#wake = [];
    for (const f of w) f();
  }
}

const json = (f: RxFrame): Record<string, unknown> => JSON.parse(f.payload.toString('utf8')) as Record<string, unknown>;

function proof(key: Buffer, role: 'server' | 'client', version: number, a: Buffer, b: Buffer): string {
  return crypto.createHmac('sha256', key).update(`dmkit-replication ${role} ${version}\n`).update(a).update(b).digest('hex');
}

/** the documented handshake, by hand; checks the receiver's proof before giving ours */
async function authenticate(p: RawPeer, key = Buffer.from(SECRET), features?: string[]): Promise<void> {
  p.send(FrameType.HELLO, 0, [encodeJson({ min: 1, max: 1, tls: false, name: 'raw peer', ...(features ? { features } : {}) })]);
  expect(json(await p.expect(FrameType.HELLO_REPLY, 'HELLO_REPLY'))).toEqual({ version: 1, tls: false, ...(features ? { features } : {}) });
  const nc = crypto.randomBytes(32);
  p.send(FrameType.AUTH_CHALLENGE, 0, [encodeJson({ nonce: nc.toString('hex') })]);
  const ar = json(await p.expect(FrameType.AUTH_RESPONSE, 'AUTH_RESPONSE'));
  const ns = Buffer.from(ar.nonce as string, 'hex');
  expect(ns.length).toBe(32);
  expect(ar.mac).toBe(proof(key, 'server', 1, nc, ns));
  p.send(FrameType.AUTH_PROOF, 0, [encodeJson({ mac: proof(key, 'client', 1, ns, nc) })]);
  const ok = await p.expect(FrameType.AUTH_OK, 'AUTH_OK');
  expect(ok.payload.length).toBe(0);
}

let nextId = 1000;

/** OPEN the device; returns OPEN_OK's fields */
async function open(p: RawPeer, device = 'vol'): Promise<{ handle: number; applied: number; sectors: number }> {
  const id = nextId++;
  p.send(FrameType.OPEN, id, [encodeJson({ stream: STREAM, slink: 0, device, devNr: 0, sectors: SECTORS })]);
  const f = await p.reply(id, 'OPEN_OK');
  if (f.h.type !== FrameType.OPEN_OK) throw new Error(`OPEN: got type ${f.h.type}: ${f.payload.toString()}`);
  return json(f) as { handle: number; applied: number; sectors: number };
}

/** a new peer, authenticated (offering `features`), with the device opened */
async function connected(features?: string[], device = 'vol'): Promise<{ p: RawPeer; o: { handle: number; applied: number; sectors: number } }> {
  const p = await peer();
  await authenticate(p, Buffer.from(SECRET), features);
  return { p, o: await open(p, device) };
}

/** the reply to `id` is an ERROR with `code`; returns its message */
async function refused(p: RawPeer, id: number, code: string): Promise<string> {
  const f = await p.reply(id);
  if (f.h.type !== FrameType.ERROR) throw new Error(`request ${id}: expected ERROR ${code}, got type ${f.h.type}`);
  const e = json(f);
  expect(e.code).toBe(code);
  return e.message as string;
}

/** an IO frame's parts: sub-header and data */
function ioParts(r: Partial<IoRequest> & { handle: number }, data?: Buffer): Buffer[] {
  const op = r.op ?? IoOp.WRITE;
  const sectors = r.sectors ?? (data ? data.length / 512 : 0);
  const sub = encodeIo({
    op, flags: 0, codec: Codec.NONE, seq: 0, epoch: 0, sector: 0, rawBytes: op === IoOp.WRITE ? sectors * 512 : 0, ...r, sectors,
  });
  return data ? [sub, data] : [sub];
}

/** send a write of `data` at `sector`, tagged (seq, epoch); returns the request id */
function sendWrite(p: RawPeer, handle: number, sector: number, data: Buffer, seq = 0, epoch = 0): number {
  const id = nextId++;
  p.send(FrameType.IO, id, ioParts({ handle, sector, seq, epoch }, data));
  return id;
}

/** send a frame of `type` whose last part has `mask` flipped in byte `at` after its CRC was computed; returns its id */
function sendDamaged(p: RawPeer, type: FrameType, parts: Buffer[], at: number, mask: number): number {
  const id = nextId++;
  const bad = Buffer.from(parts.at(-1)!);
  bad[at]! ^= mask;
  p.write(Buffer.concat([encodeHeader(type, id, parts), ...parts.slice(0, -1), bad]));
  return id;
}

async function acked(p: RawPeer, id: number): Promise<void> {
  const f = await p.reply(id);
  if (f.h.type !== FrameType.ACK) throw new Error(`request ${id}: got type ${f.h.type}: ${f.payload.toString()}`);
}

/** 512-byte sectors of recognisable content */
function content(tag: string, sectors = 1): Buffer {
  const b = Buffer.alloc(sectors * 512);
  for (let o = 0; o < b.length; o += 32) b.write(`${tag}@${o}`.padEnd(32, '.'), o, 'latin1');
  return b;
}

let tmp: string;
let img: string;
let secretFile: string;
let dm: DeviceMapper;
let rx: ReplicationReceiver;
let port: number;
let peers: RawPeer[];
let unhandled: unknown[];
const onUnhandled = (e: unknown): void => void unhandled.push(e);

async function startReceiver(extra: { handshakeTimeoutMs?: number; maxConnections?: number } = {}): Promise<void> {
  rx = new ReplicationReceiver(dm, {
    host: '127.0.0.1', port: 0, secret: loadSecret(secretFile), stateDir: path.join(tmp, 'state', 'replication'), ...extra,
  }, log('rx'));
  port = (await rx.listen()).port;
}

async function peer(): Promise<RawPeer> {
  const p = await RawPeer.connect(port);
  peers.push(p);
  return p;
}

const image = (): Buffer => fs.readFileSync(img);
const sectorOf = (b: Buffer, s: number, n = 1): Buffer => b.subarray(s * 512, (s + n) * 512);

beforeEach(async () => {
  unhandled = [];
  process.on('unhandledRejection', onUnhandled);
  process.on('uncaughtException', onUnhandled);
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'dmkit-rx-hostile-'));
  img = path.join(tmp, 'vol.img');
  fs.writeFileSync(img, Buffer.alloc(0));
  fs.truncateSync(img, SECTORS * 512);
  secretFile = path.join(tmp, 'secret');
  fs.writeFileSync(secretFile, SECRET, { mode: 0o600 });
  dm = new DeviceMapper();
  await dm.create('vol', { table: `0 ${SECTORS} linear ${img} 0` });
  peers = [];
});

afterEach(async () => {
  for (const p of peers) p.destroy();
  await rx?.close();
  await dm.close();
  fs.rmSync(tmp, { recursive: true, force: true });
  process.off('unhandledRejection', onUnhandled);
  process.off('uncaughtException', onUnhandled);
  expect(unhandled).toEqual([]);
});

describe('replication receiver: authentication', { timeout: 60_000 }, () => {
  test('a wrong secret is refused at both ends; nothing is written', async () => {
    await startReceiver();
    const wrong = path.join(tmp, 'wrong');
    fs.writeFileSync(wrong, 'not the secret the receiver has', { mode: 0o600 });
    const sock = net.connect({ host: '127.0.0.1', port });
    sock.on('error', () => {});
    await new Promise<void>((r) => sock.once('connect', () => r()));
    const err = await clientHandshake(sock, { secret: loadSecret(wrong), tls: false, timeoutMs: 10_000, name: 'intruder', where: 'test' })
      .then(() => null, (e: Error & { code?: string }) => e);
    expect(err?.code).toBe('EACCES');
    expect(err?.message).toContain(wrong);
    await until(() => rx.refused === 1, 'the receiver counts the refusal');
    expect(rx.lastRefusal).toMatch(/authentication failed/);
    sock.destroy();

    // a raw peer that skips checking the receiver and sends a made-up proof
    const p = await peer();
    p.send(FrameType.HELLO, 0, [encodeJson({ min: 1, max: 1, tls: false, name: 'raw' })]);
    await p.expect(FrameType.HELLO_REPLY, 'HELLO_REPLY');
    p.send(FrameType.AUTH_CHALLENGE, 0, [encodeJson({ nonce: crypto.randomBytes(32).toString('hex') })]);
    await p.expect(FrameType.AUTH_RESPONSE, 'AUTH_RESPONSE');
    p.send(FrameType.AUTH_PROOF, 0, [encodeJson({ mac: crypto.randomBytes(32).toString('hex') })]);
    const e = json(await p.take((f) => f.h.type === FrameType.ERROR, 'ERROR'));
    expect(e.code).toBe('EACCES');
    expect(e.message).toMatch(/authentication failed: the sender does not know our secret/);
    await p.gone();
    expect(p.frames.some((f) => f.h.type === FrameType.AUTH_OK)).toBe(false);
    await until(() => rx.refused === 2, 'second refusal counted');
    expect(rx.lastRefusal).toMatch(/does not know our secret/);

    // frames before authentication are not served
    const q = await peer();
    const openParts = [encodeJson({ stream: STREAM, slink: 0, device: 'vol', devNr: 0, sectors: SECTORS })];
    const ioFrame = ioParts({ handle: 1, sector: 0 }, content('sneaky'));
    q.write(Buffer.concat([encodeHeader(FrameType.OPEN, 1, openParts), ...openParts, encodeHeader(FrameType.IO, 2, ioFrame), ...ioFrame]));
    await q.gone();
    expect(q.frames.map((f) => f.h.type)).toEqual([FrameType.ERROR]);
    expect(json(q.frames[0]!).message).toMatch(/expected HELLO, got frame type 8/);

    expect(image().every((x) => x === 0)).toBe(true);
    expect(dm.get('vol').secondary).toBeNull();
    expect(rx.status()).toEqual([]);
  });

  test('the real clientHandshake with the right secret is accepted', async () => {
    await startReceiver();
    const sock = net.connect({ host: '127.0.0.1', port });
    sock.on('error', () => {});
    await new Promise<void>((r) => sock.once('connect', () => r()));
    const a = await clientHandshake(sock, { secret: loadSecret(secretFile), tls: false, timeoutMs: 10_000, name: 'friend', where: 'test' });
    expect(a.version).toBe(1);
    a.frames.send(FrameType.PING, 77);
    const pong = await a.frames.next(10_000, 'PONG');
    expect([pong.h.type, pong.h.id]).toEqual([FrameType.PONG, 77]);
    a.frames.destroy();
    expect(rx.refused).toBe(0);
  });

  test('a HELLO with no common version gets an ERROR naming the versions', async () => {
    await startReceiver();
    const p = await peer();
    p.send(FrameType.HELLO, 0, [encodeJson({ min: 99, max: 99, tls: false, name: 'future' })]);
    const f = await p.take(() => true, 'an answer to HELLO');
    expect(f.h.type).toBe(FrameType.ERROR);
    expect(json(f)).toEqual({ code: 'EPROTO', message: 'no common protocol version (peer speaks 99…99, we speak 1…1)' });
    await p.gone();
    await until(() => rx.refused === 1, 'refusal counted');
    expect(rx.lastRefusal).toContain('no common protocol version');
  });
});

describe('replication receiver: data', { timeout: 60_000 }, () => {
  test('an authenticated peer OPENs and writes; the device is secondary for everyone else', async () => {
    await startReceiver();
    const { p, o } = await connected();
    expect(o).toEqual({ handle: 1, applied: 0, epoch: 0, started: 0, sectors: SECTORS });
    expect(dm.get('vol').secondary).toMatch(STREAM);

    const a = content('seq1', 8);
    const b = content('seq2', 3);
    const ids = [sendWrite(p, o.handle, 16, a, 1, 1), sendWrite(p, o.handle, 100, b, 2, 1)];
    // another opener writes at the same time: refused, the device is secondary
    const local = content('local', 1);
    const localWrite = dm.write('vol', 16 * 512, local).then(() => null, (e: Error & { code?: string }) => e);
    for (const id of ids) await acked(p, id);
    expect((await localWrite)?.code).toBe('EROFS');
    await expect(dm.write('vol', 4096 * 512, local)).rejects.toMatchObject({ code: 'EROFS' });
    await expect(dm.discard('vol', 0, 4096)).rejects.toMatchObject({ code: 'EROFS' });
    let disk = image();
    expect(sectorOf(disk, 16, 8).equals(a)).toBe(true);
    expect(sectorOf(disk, 100, 3).equals(b)).toBe(true);
    expect(sectorOf(disk, 4096).every((x) => x === 0)).toBe(true);
    expect((await dm.read('vol', 16 * 512, 4096)).equals(a)).toBe(true); // reads are fine

    // a compressed write, a write-zeroes, a read (DATA), a flush (makes the position durable; epoch 3 began: 1…3 applied)
    const big = content('zstd', 64);
    const z = await compress(Codec.ZSTD, big);
    expect(z).not.toBeNull();
    const zid = nextId++;
    p.send(FrameType.IO, zid, [encodeIo({ handle: o.handle, op: IoOp.WRITE, flags: 0, codec: Codec.ZSTD, seq: 3, epoch: 2, sector: 1000, sectors: 64, rawBytes: big.length }), z!]);
    await acked(p, zid);
    const wz = nextId++;
    p.send(FrameType.IO, wz, ioParts({ handle: o.handle, op: IoOp.WRITE_ZEROES, sector: 17, sectors: 2, seq: 4, epoch: 3 }));
    await acked(p, wz);
    const rid = nextId++;
    p.send(FrameType.IO, rid, ioParts({ handle: o.handle, op: IoOp.READ, sector: 1000, sectors: 64 }));
    const data = await p.reply(rid);
    expect(data.h.type).toBe(FrameType.DATA);
    expect(data.payload.equals(big)).toBe(true);
    const fid = nextId++;
    p.send(FrameType.IO, fid, ioParts({ handle: o.handle, op: IoOp.FLUSH }));
    await acked(p, fid);
    expect(rx.status()).toEqual([{ stream: `${STREAM}.0`, peer: expect.stringContaining('127.0.0.1:'), devices: ['vol'], applied: 3, duplicates: 0 }]);

    disk = image();
    expect(sectorOf(disk, 1000, 64).equals(big)).toBe(true);
    expect(sectorOf(disk, 16).equals(sectorOf(a, 0))).toBe(true);
    expect(sectorOf(disk, 17, 2).every((x) => x === 0)).toBe(true);
    expect(sectorOf(disk, 19, 5).equals(a.subarray(3 * 512))).toBe(true);

    // refusals that keep the connection: unknown device, too small, a handle not open, past the end
    const e1 = nextId++;
    p.send(FrameType.OPEN, e1, [encodeJson({ stream: STREAM, slink: 0, device: 'nope', devNr: 1, sectors: 8 })]);
    expect(json(await p.reply(e1))).toMatchObject({ code: 'ENOENT' });
    const e2 = nextId++;
    p.send(FrameType.OPEN, e2, [encodeJson({ stream: STREAM, slink: 0, device: 'vol', devNr: 0, sectors: SECTORS + 1 })]);
    expect(json(await p.reply(e2))).toMatchObject({ code: 'ENOSPC' });
    const e3 = nextId++;
    p.send(FrameType.IO, e3, ioParts({ handle: 99, sector: 0 }, content('bad handle')));
    expect(json(await p.reply(e3))).toMatchObject({ code: 'EBADF' });
    const e4 = nextId++;
    p.send(FrameType.IO, e4, ioParts({ handle: o.handle, sector: SECTORS - 1 }, content('past the end', 2)));
    expect(json(await p.reply(e4))).toMatchObject({ code: 'ENOSPC' });
    p.send(FrameType.PING, 5);
    expect((await p.take((f) => f.h.type === FrameType.PONG, 'PONG')).h.id).toBe(5);
    expect(p.closed).toBe(false);
    expect(image().equals(disk)).toBe(true);

    // CLOSE makes the device writable again
    const c = nextId++;
    p.send(FrameType.CLOSE, c, [encodeJson({ handle: o.handle })]);
    await acked(p, c);
    expect(dm.get('vol').secondary).toBeNull();
    await dm.write('vol', 4096 * 512, local);
    expect(sectorOf(image(), 4096).equals(local)).toBe(true);
  });

  test('a corrupted payload is answered with RESEND and not written; the good frame then is', async () => {
    await startReceiver();
    const { p, o: { handle } } = await connected();
    const data = content('crc-checked', 4);
    const parts = ioParts({ handle, sector: 200, seq: 1, epoch: 1 }, data);
    const id = nextId++;
    const header = encodeHeader(FrameType.IO, id, parts);
    const bad = Buffer.from(data);
    bad[700] ^= 0x20;
    p.write(Buffer.concat([header, parts[0]!, bad]));
    const r = await p.reply(id, 'RESEND');
    expect(r.h.type).toBe(FrameType.RESEND);
    expect(r.payload.length).toBe(0);
    expect(sectorOf(image(), 200, 4).every((x) => x === 0)).toBe(true);
    // a corrupted sub-header is caught the same way
    const sub = Buffer.from(parts[0]!);
    sub[27] ^= 1; // the sector
    p.write(Buffer.concat([header, sub, data]));
    expect((await p.reply(id, 'second RESEND')).h.type).toBe(FrameType.RESEND);
    expect(image().every((x) => x === 0)).toBe(true);

    // the connection still works: the good frame is applied
    p.write(Buffer.concat([header, ...parts]));
    await acked(p, id);
    expect(sectorOf(image(), 200, 4).equals(data)).toBe(true);
    expect(image().subarray(0, 200 * 512).every((x) => x === 0)).toBe(true);
    expect(p.closed).toBe(false);
    expect(rx.status()[0]?.peer).not.toBeNull();
  });

  test('pipelined epochs: frames read after a damaged one are held until it comes back, then applied in order', async () => {
    await startReceiver();
    const { p, o: { handle } } = await connected();
    const first = content('epoch one', 2);
    const parts = ioParts({ handle, sector: 300, seq: 1, epoch: 1 }, first);
    const id = sendDamaged(p, FrameType.IO, parts, 100, 0x04);
    // the next epoch's entries (one over the same sectors) and a read come right behind it
    const later = content('epoch two', 2);
    const id2 = sendWrite(p, handle, 300, later, 2, 2);
    const id3 = sendWrite(p, handle, 310, content('epoch three'), 3, 3);
    expect((await p.reply(id, 'RESEND')).h.type).toBe(FrameType.RESEND);
    await new Promise((r) => setTimeout(r, 200));
    expect(image().every((x) => x === 0)).toBe(true); // nothing of epochs 2 and 3 was applied
    expect(rx.status()[0]?.applied).toBe(0);
    // the damaged frame again: it first, then the held ones in order
    p.write(Buffer.concat([encodeHeader(FrameType.IO, id, parts), ...parts]));
    await acked(p, id);
    await acked(p, id2);
    await acked(p, id3);
    expect(sectorOf(image(), 300, 2).equals(later)).toBe(true); // epoch 2 over epoch 1, not the other way
    expect(sectorOf(image(), 310).equals(content('epoch three'))).toBe(true);
    expect(rx.status()[0]?.applied).toBe(2); // epoch 3 began: epochs 1 and 2 are done
    expect(p.closed).toBe(false);
  });

  test('two damaged frames: each one re-sent takes its own place among the held ones', async () => {
    await startReceiver();
    const { p, o: { handle } } = await connected();
    const damaged = (sector: number, seq: number, data: Buffer): { id: number; parts: Buffer[] } => {
      const parts = ioParts({ handle, sector, seq, epoch: seq }, data);
      return { id: sendDamaged(p, FrameType.IO, parts, 9, 0x01), parts };
    };
    const a = damaged(400, 1, content('A'));
    const idB = sendWrite(p, handle, 410, content('B'), 2, 2);
    const c = damaged(410, 3, content('C')); // over B, one epoch later
    expect((await p.reply(a.id, 'RESEND A')).h.type).toBe(FrameType.RESEND);
    expect((await p.reply(c.id, 'RESEND C')).h.type).toBe(FrameType.RESEND);
    p.write(Buffer.concat([encodeHeader(FrameType.IO, a.id, a.parts), ...a.parts]));
    await acked(p, a.id);
    await acked(p, idB); // B was behind A only
    expect(sectorOf(image(), 410).equals(content('B'))).toBe(true);
    p.write(Buffer.concat([encodeHeader(FrameType.IO, c.id, c.parts), ...c.parts]));
    await acked(p, c.id);
    expect(sectorOf(image(), 400).equals(content('A'))).toBe(true);
    expect(sectorOf(image(), 410).equals(content('C'))).toBe(true);
    expect(p.closed).toBe(false);
  });
});

describe('replication receiver: pipelined epochs and RESTART', { timeout: 60_000 }, () => {
  const PIPELINE = ['digest', 'pipeline'];
  let holey: string;
  /** 'holey': sectors 0-4095 an image, 4096-8191 the error target (a write there fails at this site) */
  async function holeyDevice(): Promise<void> {
    holey = path.join(tmp, 'holey.img');
    fs.writeFileSync(holey, Buffer.alloc(0));
    fs.truncateSync(holey, 4096 * 512);
    await dm.create('holey', { table: `0 4096 linear ${holey} 0\n4096 4096 error` });
  }
  const holeyImage = (): Buffer => fs.readFileSync(holey);

  test('a failed entry holds later epochs back; a DIGEST or a read does not lift that, RESTART does', async () => {
    await holeyDevice();
    await startReceiver();
    const { p, o: { handle } } = await connected(PIPELINE, 'holey');
    const id1 = sendWrite(p, handle, 5000, content('fails here'), 1, 1);
    const id2 = sendWrite(p, handle, 10, content('same epoch'), 2, 1);
    const id3 = sendWrite(p, handle, 20, content('epoch two'), 3, 2); // pipelined behind the failing one
    expect(await refused(p, id1, 'EIO')).toMatch(/error target|I\/O error|EIO/i);
    await acked(p, id2);
    expect(await refused(p, id3, 'EIO')).toMatch(/entry 3 not applied: an entry of epoch 1 failed at this site/);
    // a verify's DIGEST and a retest's read come and go: the failed entry still holds epoch 3 back
    const idD = nextId++;
    p.send(FrameType.DIGEST, idD, [encodeDigest({ handle, sector: 0, sectors: 64, blockSectors: 8 })]);
    expect((await p.reply(idD, 'DIGEST answer')).h.type).toBe(FrameType.DATA);
    const idR = nextId++;
    p.send(FrameType.IO, idR, ioParts({ handle, op: IoOp.READ, sector: 0, sectors: 1 }));
    expect((await p.reply(idR, 'read answer')).h.type).toBe(FrameType.DATA);
    const id4 = sendWrite(p, handle, 30, content('epoch three'), 4, 3);
    expect(await refused(p, id4, 'EIO')).toMatch(/entry 4 not applied/);
    expect(sectorOf(holeyImage(), 20).every((x) => x === 0)).toBe(true);
    expect(sectorOf(holeyImage(), 30).every((x) => x === 0)).toBe(true);
    expect(sectorOf(holeyImage(), 10).equals(content('same epoch'))).toBe(true);
    // the sender gave entry 1 up (its dirty logs have it) and ships again from entry 3
    p.send(FrameType.RESTART, nextId++, [encodeRestart(3)]);
    const id3b = sendWrite(p, handle, 20, content('epoch two'), 3, 2);
    const id4b = sendWrite(p, handle, 30, content('epoch three'), 4, 3);
    await acked(p, id3b);
    await acked(p, id4b);
    expect(sectorOf(holeyImage(), 20).equals(content('epoch two'))).toBe(true);
    expect(sectorOf(holeyImage(), 30).equals(content('epoch three'))).toBe(true);
    // epoch 2 began past the failed entry 1: the position stays below it; epoch 3's start moved it to 3
    expect(rx.status()[0]?.applied).toBe(3);
    expect(p.closed).toBe(false);
  });

  test('a damaged RESTART is asked for again, and what follows it waits for it', async () => {
    await holeyDevice();
    await startReceiver();
    const { p, o: { handle } } = await connected(PIPELINE, 'holey');
    const id1 = sendWrite(p, handle, 5000, content('fails'), 1, 1);
    await refused(p, id1, 'EIO');
    const rparts = [encodeRestart(2)];
    const rid = sendDamaged(p, FrameType.RESTART, rparts, 7, 0x10);
    const id2 = sendWrite(p, handle, 40, content('after the restart'), 2, 2);
    expect((await p.reply(rid, 'RESEND of the RESTART')).h.type).toBe(FrameType.RESEND);
    await new Promise((r) => setTimeout(r, 200));
    expect(p.frames.some((f) => f.h.id === id2)).toBe(false); // held behind the RESTART, not refused
    p.send(FrameType.RESTART, rid, rparts);
    await acked(p, id2);
    expect(sectorOf(holeyImage(), 40).equals(content('after the restart'))).toBe(true);
  });

  test('RESTART without the feature, before OPEN, or malformed closes the connection with why', async () => {
    await startReceiver();
    const { p } = await connected(); // no features offered
    p.send(FrameType.RESTART, nextId++, [encodeRestart(1)]);
    await p.gone();
    expect(json(p.frames.find((f) => f.h.type === FrameType.ERROR)!).message).toMatch(/RESTART on a connection without the feature pipeline/);

    const q = await peer();
    await authenticate(q, Buffer.from(SECRET), PIPELINE);
    q.send(FrameType.RESTART, nextId++, [encodeRestart(1)]);
    await q.gone();
    expect(json(q.frames.find((f) => f.h.type === FrameType.ERROR)!).message).toMatch(/RESTART before any OPEN/);

    const { p: r } = await connected(PIPELINE);
    r.send(FrameType.RESTART, nextId++, [Buffer.alloc(7)]);
    await r.gone();
    expect(json(r.frames.find((f) => f.h.type === FrameType.ERROR)!).message).toMatch(/RESTART frame of 7 bytes \(expected 8\)/);
    const { p: z } = await connected(PIPELINE);
    z.send(FrameType.RESTART, nextId++, [Buffer.alloc(8)]);
    await z.gone();
    expect(json(z.frames.find((f) => f.h.type === FrameType.ERROR)!).message).toMatch(/RESTART frame: seq 0 is out of range/);
    // the receiver is still there and the device untouched
    const { p: w, o: { handle } } = await connected(PIPELINE);
    await acked(w, sendWrite(w, handle, 50, content('still serving'), 1, 1));
    expect(sectorOf(image(), 50).equals(content('still serving'))).toBe(true);
    expect(image().subarray(0, 50 * 512).every((x) => x === 0)).toBe(true);
  });
});

describe('replication receiver: REWIND', { timeout: 60_000 }, () => {
  const REWIND = ['pipeline', 'rewind'];
  /** send REWIND {seq, epoch}; returns the answer's payload */
  async function rewind(p: RawPeer, body: unknown): Promise<Record<string, unknown>> {
    const id = nextId++;
    p.send(FrameType.REWIND, id, [encodeJson(body)]);
    const f = await p.reply(id);
    if (f.h.type !== FrameType.REWIND) throw new Error(`REWIND: got type ${f.h.type}: ${f.payload.toString()}`);
    return json(f);
  }

  test('sets the position back: an entry at a seq applied before is applied again, not skipped; it survives a receiver restart', async () => {
    await startReceiver();
    const { p, o: { handle } } = await connected(REWIND);
    for (let seq = 1; seq <= 3; seq++) await acked(p, sendWrite(p, handle, 10 * seq, content(`old ${seq}`), seq, seq));
    // epoch 3 began: entries 1 and 2 are applied as far as the position goes
    await acked(p, sendWrite(p, handle, 20, content('dup 2'), 2, 2));
    expect(sectorOf(image(), 20).equals(content('old 2'))).toBe(true); // skipped as applied
    expect(await rewind(p, { seq: 1, epoch: 1 })).toEqual({ applied: 1, epoch: 1 });
    // the sender numbers anew from 2, in a later epoch: applied now
    await acked(p, sendWrite(p, handle, 20, content('new 2'), 2, 7));
    expect(sectorOf(image(), 20).equals(content('new 2'))).toBe(true);
    // OPEN_OK tells the highest seq begun too; a REWIND sets both (the sender holds the acks up to its seq)
    const { p: q, o } = await connected(REWIND);
    expect(o).toMatchObject({ applied: 1, epoch: 7, started: 2 });
    expect(await rewind(q, { seq: 5, epoch: 9 })).toEqual({ applied: 5, epoch: 9 });
    q.destroy();
    await rx.close();
    await startReceiver();
    const again = await connected(REWIND);
    expect(again.o).toMatchObject({ applied: 5, epoch: 9, started: 5 }); // the REWIND's position survives the restart
  });

  test('without the feature, before OPEN, or malformed closes the connection with why; the device is untouched', async () => {
    await startReceiver();
    const { p } = await connected(['pipeline']);
    p.send(FrameType.REWIND, nextId++, [encodeJson({ seq: 1, epoch: 1 })]);
    await p.gone();
    expect(json(p.frames.find((f) => f.h.type === FrameType.ERROR)!).message).toMatch(/REWIND on a connection without the feature rewind/);
    const q = await peer();
    await authenticate(q, Buffer.from(SECRET), REWIND);
    q.send(FrameType.REWIND, nextId++, [encodeJson({ seq: 1, epoch: 1 })]);
    await q.gone();
    expect(json(q.frames.find((f) => f.h.type === FrameType.ERROR)!).message).toMatch(/REWIND before any OPEN/);
    const { p: r } = await connected(REWIND);
    r.send(FrameType.REWIND, nextId++, [encodeJson({ seq: 'one', epoch: 1 })]);
    await r.gone();
    expect(json(r.frames.find((f) => f.h.type === FrameType.ERROR)!).message).toMatch(/REWIND.*seq/);
    expect(image().every((x) => x === 0)).toBe(true);
  });
});

describe('replication receiver: hostile bytes', { timeout: 120_000 }, () => {
  /** seed the device with known data through a good client, and keep a copy */
  async function seed(): Promise<Buffer> {
    const { p, o: { handle } } = await connected();
    const ids: number[] = [];
    for (let i = 0; i < 8; i++) ids.push(sendWrite(p, handle, i * 300, content(`seed${i}`, 16), i + 1, 1));
    for (const id of ids) await acked(p, id);
    p.destroy();
    await p.gone();
    await until(() => dm.get('vol').openCount === 0, 'the seeding connection released the device');
    return image();
  }

  /** a new well-behaved client is served: authenticates, opens, reads what is on disk */
  async function stillServes(copy: Buffer): Promise<void> {
    const { p, o: { handle } } = await connected();
    const id = nextId++;
    p.send(FrameType.IO, id, ioParts({ handle, op: IoOp.READ, sector: 0, sectors: 2400 }));
    const d = await p.reply(id);
    expect(d.h.type).toBe(FrameType.DATA);
    expect(d.payload.equals(copy.subarray(0, 2400 * 512))).toBe(true);
    p.send(FrameType.PING, 1);
    await p.take((f) => f.h.type === FrameType.PONG, 'PONG');
    p.destroy();
    await p.gone();
    await until(() => dm.get('vol').openCount === 0, 'the device is released');
  }

  /** a peer that may be authenticated and have opened the device */
  async function hostile(stage: 'raw' | 'authenticated' | 'opened'): Promise<{ p: RawPeer; handle: number }> {
    const p = await peer();
    if (stage === 'raw') return { p, handle: 0 };
    await authenticate(p);
    if (stage === 'authenticated') return { p, handle: 0 };
    return { p, handle: (await open(p)).handle };
  }

  test('corrupted headers, garbage, a 1 GiB frame: the connection closes, the device is untouched', async () => {
    await startReceiver();
    const copy = await seed();
    const stages = ['raw', 'authenticated', 'opened'] as const;
    for (const stage of stages) {
      // a header with one flipped bit (in the length), then the frame's payload
      {
        const { p, handle } = await hostile(stage);
        const parts = ioParts({ handle: handle || 1, sector: 0, seq: 100, epoch: 9 }, content('never', 2));
        const h = encodeHeader(FrameType.IO, 1, parts);
        h[18] ^= 0x01;
        p.write(Buffer.concat([h, ...parts]));
        await p.gone();
        expect(p.frames.filter((f) => f.h.type === FrameType.ACK)).toEqual([]);
      }
      // a bad magic with a matching CRC
      {
        const { p } = await hostile(stage);
        const h = Buffer.from(encodeHeader(FrameType.PING, 1, []));
        h.write('XXXX', 0, 'latin1');
        p.write(h);
        await p.gone();
      }
      // garbage
      {
        const { p } = await hostile(stage);
        p.write(bytes(prng(stages.indexOf(stage) + 1), 4096));
        await p.gone();
      }
      // a frame announcing 1 GiB (valid header CRC), then a trickle of its bytes
      {
        const { p } = await hostile(stage);
        const h = Buffer.from(encodeHeader(FrameType.IO, 1, []));
        h.writeUInt32BE(1 << 30, 16);
        h.writeUInt32BE(0, 20);
        h.writeUInt32BE(crc32c(h.subarray(0, 24)) >>> 0, 24);
        p.write(h);
        p.write(Buffer.alloc(64 * 1024, 0xaa));
        await p.gone();
      }
      // a payload over the control limit during the handshake / over 4 MiB after
      {
        const { p } = await hostile(stage);
        p.send(FrameType.HELLO, 0, [Buffer.alloc(stage === 'raw' ? 65 * 1024 : 4 * 1024 * 1024 + 65, 0x20)]);
        await p.gone();
      }
    }
    await until(() => dm.get('vol').openCount === 0, 'every hostile connection released the device');
    expect(image().equals(copy)).toBe(true);
    await stillServes(copy);
    expect(image().equals(copy)).toBe(true);
  });

  test('seeded fuzz: a few hundred random frames before and after authentication', async () => {
    await startReceiver();
    const copy = await seed();
    const rng = prng(0x5eed1234);
    let frames = 0;
    let closedByReceiver = 0;
    let survived = 0;
    for (let round = 0; round < 36; round++) {
      const stage = (['raw', 'authenticated', 'opened'] as const)[round % 3]!;
      const { p, handle } = await hostile(stage);
      let mustClose = false;
      const burst: Buffer[] = [];
      const n = 4 + rng.int(8);
      for (let i = 0; i < n; i++) {
        const kind = rng.int(6);
        const invalidIo = kind === 1 && handle !== 0;
        let type = rng.int(256);
        let parts: Buffer[];
        if (kind === 0) {
          // an IO sub-header with random fields on a handle that is not open
          type = FrameType.IO;
          const sub = bytes(rng, 40);
          sub.writeUInt32BE(2 + rng.int(1000), 0);
          parts = [sub, bytes(rng, rng.int(3) * 512)];
        } else if (invalidIo) {
          // the opened handle, with an IO sub-header that cannot be valid
          type = FrameType.IO;
          const sub = encodeIo({
            handle, op: IoOp.WRITE, flags: 0, codec: Codec.NONE, seq: rng.int(1000) + 1, epoch: rng.int(10), sector: rng.int(SECTORS), sectors: 1 + rng.int(8), rawBytes: 0,
          });
          sub.writeUInt32BE(512 * (1 + rng.int(8)) + 1 + rng.int(511), 36); // rawBytes never a whole number of sectors
          parts = [sub, bytes(rng, rng.int(4) * 512)];
        } else if (kind === 2) {
          // JSON of the wrong shape
          const shapes = [[1, 2], { stream: rng.int(9) }, 'x', null, { handle: 'one' }, { min: -1, max: 'z', tls: 3, name: 7 }, { nonce: 'zz', mac: 12 }];
          parts = [encodeJson(shapes[rng.int(shapes.length)])];
        } else {
          parts = [bytes(rng, rng.int(300))];
        }
        let frame = Buffer.concat([encodeHeader(type, rng.int(1 << 30), parts), ...parts]);
        const corrupt = rng.int(8) === 0 && frame.length > HEADER_SIZE;
        if (corrupt) {
          frame = Buffer.from(frame);
          frame[HEADER_SIZE + rng.int(frame.length - HEADER_SIZE)] ^= 1 << rng.int(8);
        }
        // Before authentication every frame here ends the connection. After it, a PING is
        // answered, a corrupted payload asked for again, and an IO frame may be refused
        // by itself (EBADF) when its random sub-header happens to be well formed; every
        // other frame breaks the protocol.
        if (stage === 'raw') mustClose = true;
        else if (!corrupt && type !== FrameType.PING && type !== FrameType.IO) mustClose = true;
        else if (!corrupt && type === FrameType.IO && (invalidIo || parts.reduce((t, x) => t + x.length, 0) < 40)) mustClose = true;
        burst.push(frame);
        frames++;
      }
      p.write(Buffer.concat(burst));
      if (mustClose) {
        await p.gone();
        closedByReceiver++;
      } else {
        // it may or may not have broken the protocol: either it closes, or it still answers
        p.send(FrameType.PING, 424242);
        await p.take((f) => f.h.type === FrameType.PONG && f.h.id === 424242, 'PONG after a survivable burst').catch(() => p.gone());
        if (p.closed) closedByReceiver++;
        else survived++;
        p.destroy();
      }
      expect(p.frames.some((f) => f.h.type === FrameType.ACK || f.h.type === FrameType.DATA)).toBe(false);
    }
    expect(frames).toBeGreaterThanOrEqual(200);
    expect(closedByReceiver + survived).toBe(36);
    expect(closedByReceiver).toBeGreaterThanOrEqual(12);
    await until(() => dm.get('vol').openCount === 0, 'every fuzz connection released the device');
    expect(image().equals(copy)).toBe(true);
    await stillServes(copy);
    expect(image().equals(copy)).toBe(true);
  });
});

describe('replication receiver: limits', { timeout: 60_000 }, () => {
  test('a silent connection is closed at the handshake deadline; so is one that stops mid-handshake', async () => {
    await startReceiver({ handshakeTimeoutMs: 300 });
    const p = await peer();
    await p.gone();
    expect(p.frames).toEqual([]);
    await until(() => rx.refused === 1, 'refusal counted');
    expect(rx.lastRefusal).toMatch(/no HELLO from the peer/);

    const q = await peer();
    q.send(FrameType.HELLO, 0, [encodeJson({ min: 1, max: 1, tls: false, name: 'slow' })]);
    await q.gone();
    expect(q.frames.map((f) => f.h.type)).toEqual([FrameType.HELLO_REPLY]);
    await until(() => rx.refused === 2, 'second refusal counted');
    expect(rx.lastRefusal).toMatch(/no AUTH_CHALLENGE/);

    // a half header, forever
    const r = await peer();
    r.write(encodeHeader(FrameType.HELLO, 0, []).subarray(0, 10));
    await r.gone();
    await until(() => rx.refused === 3, 'third refusal counted');

    // an authenticated connection is not subject to the deadline: still served later
    const { p: s, o: { handle } } = await connected();
    const fast = await peer(); // and a new one meanwhile closes on time
    await fast.gone();
    const id = sendWrite(s, handle, 7, content('after the deadline'), 1, 1);
    await acked(s, id);
    expect(sectorOf(image(), 7).equals(content('after the deadline'))).toBe(true);
  });

  test('a connection over the cap is closed at once and counted', async () => {
    await startReceiver({ maxConnections: 2 });
    const a = await peer();
    const b = await peer();
    await authenticate(a);
    await authenticate(b);
    const c = await peer();
    await c.gone();
    expect(c.frames).toEqual([]);
    await until(() => rx.refused === 1, 'the refusal is counted');
    expect(rx.lastRefusal).toContain('connection cap of 2 reached');
    expect(a.closed || b.closed).toBe(false);
    // one goes: a new connection is served again
    a.destroy();
    await a.gone();
    let served = false;
    for (let i = 0; i < 100 && !served; i++) {
      const d = await peer();
      d.send(FrameType.HELLO, 0, [encodeJson({ min: 1, max: 1, tls: false, name: 'next' })]);
      served = await d.take((f) => f.h.type === FrameType.HELLO_REPLY, 'HELLO_REPLY').then(() => true, () => false);
      if (!served) await new Promise((r) => setTimeout(r, 20)); // the receiver has yet to see a's close
    }
    expect(served).toBe(true);
  });

  test('close() ends connected peers', async () => {
    await startReceiver();
    const { p } = await connected();
    const q = await peer(); // mid-handshake
    const closing = rx.close();
    const done = await Promise.race([closing.then(() => 'closed'), new Promise((r) => setTimeout(() => r('still open'), 10_000))]);
    expect(done).toBe('closed');
    await p.gone();
    await q.gone();
  });
});

describe('replication receiver: takeover', { timeout: 60_000 }, () => {
  test('a connection gone while its OPEN waits for the old connection\'s writes opens nothing', async () => {
    await startReceiver();
    const { p: a, o: { handle } } = await connected();
    expect(dm.get('vol').openCount).toBe(1);
    // a's write stays in flight while the device is suspended
    await dm.suspend('vol');
    sendWrite(a, handle, 300, content('in flight'), 1, 1);
    await until(() => rx.stream(STREAM, 0).inflight === 1, 'the write is in flight');
    // b takes the stream over: a is closed, b's OPEN waits for a's write
    const b = await peer();
    await authenticate(b);
    b.send(FrameType.OPEN, 1, [encodeJson({ stream: STREAM, slink: 0, device: 'vol', devNr: 0, sectors: SECTORS })]);
    await a.gone();
    expect(json(a.frames.find((f) => f.h.type === FrameType.ERROR)!).message).toMatch(/replaced by a new connection/);
    await until(() => rx.status()[0]?.peer?.endsWith(`:${b.sock.localPort}`) === true, 'b owns the stream');
    // … and goes away before it finishes
    b.destroy();
    await b.gone();
    await until(() => rx.status()[0]?.peer === null, 'the stream has no connection');
    await dm.resume('vol');
    expect(sectorOf(image(), 300).equals(content('in flight'))).toBe(true);
    await until(() => dm.get('vol').openCount === 0, 'no connection holds the device open');
    // a late OPEN must not reopen it behind our back
    for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r));
    expect(dm.get('vol').openCount).toBe(0);
    // a new sender is served as usual
    const { p: c, o } = await connected();
    await acked(c, sendWrite(c, o.handle, 301, content('after'), 2, 1));
    expect(dm.get('vol').openCount).toBe(1);
  });
});

describe('replication receiver: open counts', { timeout: 60_000 }, () => {
  test('a device OPENed twice on one connection holds one open per handle, released by CLOSE or the connection\'s end', async () => {
    await startReceiver();
    const p = await peer();
    await authenticate(p);
    const first = await open(p);
    const second = await open(p);
    expect(second.handle).not.toBe(first.handle);
    expect(dm.get('vol').openCount).toBe(2);
    await acked(p, sendWrite(p, first.handle, 400, content('first handle')));
    await acked(p, sendWrite(p, second.handle, 401, content('second handle')));
    expect(sectorOf(image(), 400).equals(content('first handle'))).toBe(true);
    expect(sectorOf(image(), 401).equals(content('second handle'))).toBe(true);
    // CLOSE of one: the other still holds the device, which stays secondary
    const c = nextId++;
    p.send(FrameType.CLOSE, c, [encodeJson({ handle: first.handle })]);
    await acked(p, c);
    expect(dm.get('vol').openCount).toBe(1);
    expect(dm.get('vol').secondary).not.toBeNull();
    await expect(dm.write('vol', 0, content('local'))).rejects.toMatchObject({ code: 'EROFS' });
    const stale = sendWrite(p, first.handle, 402, content('closed handle'));
    expect(json(await p.reply(stale))).toMatchObject({ code: 'EBADF' });
    const again = nextId++;
    p.send(FrameType.CLOSE, again, [encodeJson({ handle: first.handle })]);
    expect(json(await p.reply(again))).toMatchObject({ code: 'EBADF' });
    expect(sectorOf(image(), 402).every((x) => x === 0)).toBe(true);
    // a third open, then the connection goes: every open is released
    await open(p);
    expect(dm.get('vol').openCount).toBe(2);
    p.destroy();
    await p.gone();
    await until(() => dm.get('vol').openCount === 0, 'the device is released');
    // the device stays secondary until a CLOSE: the sender will be back
    expect(dm.get('vol').secondary).not.toBeNull();
  });
});

describe('replication receiver: entries applied once', { timeout: 60_000 }, () => {
  test('re-sent entries after a reconnect are acknowledged, not applied again', async () => {
    await startReceiver();
    // seq 1…10, one per epoch; 3 and 8 write the same sector (100), the others their own
    const sectorFor = (seq: number): number => (seq === 3 || seq === 8 ? 100 : 100 + seq);
    const body = (seq: number): Buffer => content(`entry ${seq}`);
    const { p, o: o1 } = await connected();
    expect(o1.applied).toBe(0);
    const ids = [];
    for (let seq = 1; seq <= 10; seq++) ids.push(sendWrite(p, o1.handle, sectorFor(seq), body(seq), seq, seq));
    for (const id of ids) await acked(p, id);
    expect(sectorOf(image(), 100).equals(body(8))).toBe(true);
    p.destroy();
    await p.gone();
    await until(() => rx.status()[0]?.peer === null, 'the stream lost its connection');

    const { p: q, o: o2 } = await connected();
    expect(o2.applied).toBe(9); // epoch 10 began: 1…9 are on the device for sure
    const again = [];
    for (let seq = 5; seq <= 12; seq++) again.push(sendWrite(q, o2.handle, sectorFor(seq), body(seq), seq, seq));
    for (const id of again) await acked(q, id);
    // an old entry sent again (its seq ≤ applied), and one with other bytes than the original
    await acked(q, sendWrite(q, o2.handle, sectorFor(3), body(3), 3, 3));
    await acked(q, sendWrite(q, o2.handle, sectorFor(8), content('an impostor of 8'), 8, 8));
    const disk = image();
    expect(sectorOf(disk, 100).equals(body(8))).toBe(true);
    for (let seq = 1; seq <= 12; seq++) if (seq !== 3 && seq !== 8) expect(sectorOf(disk, sectorFor(seq)).equals(body(seq)), `entry ${seq}`).toBe(true);
    expect(rx.status()).toEqual([{ stream: `${STREAM}.0`, peer: expect.stringContaining('127.0.0.1:'), devices: ['vol'], applied: 11, duplicates: 7 }]);

    // a flush entry (alone in its epoch) moves the position to itself; it survives the receiver
    const f = nextId++;
    q.send(FrameType.IO, f, ioParts({ handle: o2.handle, op: IoOp.FLUSH, seq: 13, epoch: 13 }));
    await acked(q, f);
    expect(rx.status()[0]!.applied).toBe(13);
    q.destroy();
    await q.gone();
    await rx.close();
    await startReceiver();
    const { p: r, o: o3 } = await connected();
    expect(o3.applied).toBe(13);
    await acked(r, sendWrite(r, o3.handle, sectorFor(3), body(3), 3, 3));
    // an entry of an epoch before the current one, not yet applied, breaks the protocol
    const old = sendWrite(r, o3.handle, 150, content('too late'), 14, 11);
    await r.gone();
    expect(r.frames.some((fr) => fr.h.id === old && fr.h.type === FrameType.ACK)).toBe(false);
    const err = r.frames.find((fr) => fr.h.type === FrameType.ERROR);
    expect(err && json(err).message).toMatch(/entry 14 of epoch 11 arrived after epoch 13 began/);
    expect(sectorOf(image(), 100).equals(body(8))).toBe(true);
    expect(sectorOf(image(), 150).every((x) => x === 0)).toBe(true);
    expect(rx.status()[0]!.duplicates).toBe(1);
  });
});
