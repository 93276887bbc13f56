/**
 * DIGEST frames at the replication receiver (src/replication/session.ts), in-process over a
 * real engine whose device is an image file; the peer authenticates with the real
 * clientHandshake and then sends frames built here. Digests are checked against xxh3-128
 * computed here over the image file; hostile requests (oversize, out of range, bad block
 * size, a handle not open) each get an ERROR, leave the connection and the device as they
 * were; a DIGEST that cannot be framed ends its connection only, and the receiver serves
 * the next. A connection's DIGESTs are answered DIGESTS_AT_ONCE (2) at a time, each by its
 * request's id. Feature negotiation: the receiver offers `digest` to a HELLO that lists it, and
 * answers a HELLO without features exactly as before.
 */
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import xxhash from '@node-rs/xxhash';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { log } from '../../src/core/log.ts';
import { DeviceMapper } from '../../src/index.ts';
import type { Frame, FrameSocket } from '../../src/replication/frame-socket.ts';
import { clientHandshake, loadSecret } from '../../src/replication/handshake.ts';
import {
  FrameType, MAX_DIGEST_SECTORS, decodeJson, encodeDigest, encodeJson, type DigestRequest,
} from '../../src/replication/protocol.ts';
import { ReplicationReceiver } from '../../src/replication/receiver.ts';
import { DIGESTS_AT_ONCE } from '../../src/replication/session.ts';

const SECTORS = 8192;
const STREAM = '0123456789abcdef0123456789abcdef';

let tmp: string;
let img: string;
let dm: DeviceMapper;
let rx: ReplicationReceiver;
let port: number;
const socks: net.Socket[] = [];
let nextId = 1;

beforeEach(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'dmkit-rx-digest-'));
  img = path.join(tmp, 'vol.img');
  const data = Buffer.alloc(SECTORS * 512);
  for (let i = 0; i < data.length; i += 4) data.writeUInt32LE((i * 2654435761) >>> 0, i);
  fs.writeFileSync(img, data);
  fs.writeFileSync(path.join(tmp, 'secret'), 'the receiving site shares this secret', { mode: 0o600 });
  dm = new DeviceMapper();
  await dm.create('vol', { table: `0 ${SECTORS} linear ${img} 0` });
  rx = new ReplicationReceiver(dm, { host: '127.0.0.1', port: 0, secret: loadSecret(path.join(tmp, 'secret')), stateDir: path.join(tmp, 'state') }, log('rx'));
  port = (await rx.listen()).port;
});

afterEach(async () => {
  for (const s of socks.splice(0)) s.destroy();
  await rx.close();
  await dm.close();
  fs.rmSync(tmp, { recursive: true, force: true });
});

/** an authenticated connection (the real client handshake) with `device` opened */
async function connected(device = 'vol'): Promise<{ frames: FrameSocket; handle: number; features: readonly string[] }> {
  const sock = net.connect({ host: '127.0.0.1', port });
  socks.push(sock);
  sock.on('error', () => {});
  await new Promise<void>((r) => sock.once('connect', () => r()));
  const a = await clientHandshake(sock, { secret: loadSecret(path.join(tmp, 'secret')), tls: false, timeoutMs: 10_000, name: 'digest test', where: 'test' });
  const id = nextId++;
  a.frames.send(FrameType.OPEN, id, [encodeJson({ stream: STREAM, slink: 0, device, devNr: 0, sectors: SECTORS })]);
  const f = await a.frames.next(10_000, 'OPEN_OK');
  expect(f.h.type).toBe(FrameType.OPEN_OK);
  return { frames: a.frames, handle: decodeJson(f.payload, 'OPEN_OK').handle as number, features: a.features };
}

async function ask(frames: FrameSocket, r: DigestRequest): Promise<Frame> {
  const id = nextId++;
  frames.send(FrameType.DIGEST, id, [encodeDigest(r)]);
  const f = await frames.next(10_000, `reply to DIGEST ${id}`);
  expect(f.h.id).toBe(id);
  return f;
}

/** xxh3-128 of each block of the image's sectors [sector, sector + sectors), as the receiver should answer */
function expected(sector: number, sectors: number, block: number): Buffer {
  const data = fs.readFileSync(img).subarray(sector * 512, (sector + sectors) * 512);
  const out: Buffer[] = [];
  for (let o = 0; o < data.length; o += block * 512) {
    out.push(Buffer.from(xxhash.xxh3.xxh128(data.subarray(o, Math.min(data.length, o + block * 512))).toString(16).padStart(32, '0'), 'hex'));
  }
  return Buffer.concat(out);
}

describe('DIGEST at the receiver', { timeout: 60_000 }, () => {
  test('negotiated in HELLO; answers the digests of the device as it is, a short last block hashed as it is', async () => {
    const { frames, handle, features } = await connected();
    expect(features).toEqual(['digest', 'entry-crc', 'pipeline', 'roles', 'rewind']);
    const whole = await ask(frames, { handle, sector: 0, sectors: MAX_DIGEST_SECTORS, blockSectors: 8 });
    expect(whole.h.type).toBe(FrameType.DATA);
    expect(whole.payload.length).toBe((MAX_DIGEST_SECTORS / 8) * 16);
    expect(whole.payload.equals(expected(0, MAX_DIGEST_SECTORS, 8))).toBe(true);
    const short = await ask(frames, { handle, sector: SECTORS - 20, sectors: 20, blockSectors: 8 });
    expect(short.payload.length).toBe(3 * 16);
    expect(short.payload.equals(expected(SECTORS - 20, 20, 8))).toBe(true);
    const big = await ask(frames, { handle, sector: 128, sectors: 256, blockSectors: 128 });
    expect(big.payload.equals(expected(128, 256, 128))).toBe(true);
  });

  test('hostile requests get ERROR (EINVAL, EBADF) and change nothing; the connection stays; a DIGEST that cannot be framed ends only its connection', async () => {
    const { frames, handle } = await connected();
    const before = fs.readFileSync(img);
    const bad: Array<[DigestRequest, string, RegExp]> = [
      [{ handle, sector: 0, sectors: MAX_DIGEST_SECTORS + 8, blockSectors: 8 }, 'EINVAL', /DIGEST of 8200 sectors \(expected 1 … 8192\)/],
      [{ handle, sector: 0, sectors: 0, blockSectors: 8 }, 'EINVAL', /DIGEST of 0 sectors/],
      [{ handle, sector: SECTORS - 8, sectors: 16, blockSectors: 8 }, 'EINVAL', /beyond the device's 8192 sectors/],
      [{ handle, sector: 2 ** 40, sectors: 8, blockSectors: 8 }, 'EINVAL', /beyond the device/],
      [{ handle, sector: 0, sectors: 64, blockSectors: 0 }, 'EINVAL', /DIGEST block of 0 sectors/],
      [{ handle, sector: 0, sectors: 64, blockSectors: 4 }, 'EINVAL', /power of two from 8/],
      [{ handle, sector: 0, sectors: 64, blockSectors: 24 }, 'EINVAL', /DIGEST block of 24 sectors/],
      [{ handle, sector: 0, sectors: 64, blockSectors: MAX_DIGEST_SECTORS * 2 }, 'EINVAL', /DIGEST block of 16384 sectors/],
      [{ handle: handle + 99, sector: 0, sectors: 8, blockSectors: 8 }, 'EBADF', /not open/],
    ];
    for (const [r, code, message] of bad) {
      const f = await ask(frames, r);
      expect(f.h.type, JSON.stringify(r)).toBe(FrameType.ERROR);
      const e = decodeJson(f.payload, 'ERROR');
      expect(e.code).toBe(code);
      expect(e.message).toMatch(message);
    }
    // the same connection still answers
    expect((await ask(frames, { handle, sector: 8, sectors: 8, blockSectors: 8 })).payload.equals(expected(8, 8, 8))).toBe(true);
    // a payload of the wrong length cannot be a DIGEST: EPROTO, that connection closed
    const id = nextId++;
    const parts = [encodeDigest({ handle, sector: 0, sectors: 8, blockSectors: 8 }).subarray(0, 20)];
    frames.send(FrameType.DIGEST, id, parts);
    const f = await frames.next(10_000, 'ERROR');
    expect(f.h.type).toBe(FrameType.ERROR);
    expect(decodeJson(f.payload, 'ERROR')).toMatchObject({ code: 'EPROTO', message: expect.stringMatching(/DIGEST frame of 20 bytes/) });
    // the receiver serves the next connection; the device is untouched
    const next = await connected();
    expect((await ask(next.frames, { handle: next.handle, sector: 0, sectors: 64, blockSectors: 8 })).payload.equals(expected(0, 64, 8))).toBe(true);
    expect(fs.readFileSync(img).equals(before)).toBe(true);
  });

  test('pipelined DIGESTs are answered two at a time, each DATA by its request\'s id', async () => {
    // every read of `slow` waits READ_MS: 6 requests take 3 × READ_MS two at a time, 6 × one at a time
    const READ_MS = 300;
    await dm.create('slow', { table: `0 ${SECTORS} delay ${img} 0 ${READ_MS}` });
    const { frames, handle } = await connected('slow');
    const asks: DigestRequest[] = [
      { handle, sector: 0, sectors: MAX_DIGEST_SECTORS, blockSectors: 8 },
      { handle, sector: 8, sectors: 8, blockSectors: 8 },
      { handle, sector: 4096, sectors: 1000, blockSectors: 16 },
      { handle, sector: SECTORS - 20, sectors: 20, blockSectors: 8 },
      { handle, sector: 64, sectors: 2048, blockSectors: 2048 },
      { handle, sector: 100, sectors: 3, blockSectors: 8 },
    ];
    const ids = asks.map(() => nextId++);
    const t0 = performance.now();
    asks.forEach((r, i) => frames.send(FrameType.DIGEST, ids[i]!, [encodeDigest(r)]));
    const replies = new Map<number, Frame>();
    const at = new Map<number, number>();
    while (replies.size < asks.length) {
      const f = await frames.next(10_000, 'DIGEST replies');
      expect(replies.has(f.h.id), `a second reply for ${f.h.id}`).toBe(false);
      replies.set(f.h.id, f);
      at.set(f.h.id, performance.now() - t0);
    }
    const elapsed = performance.now() - t0;
    asks.forEach((r, i) => {
      const f = replies.get(ids[i]!)!;
      expect(f.h.type, `reply to ${ids[i]}`).toBe(FrameType.DATA);
      expect(f.payload.equals(expected(r.sector, r.sectors, r.blockSectors)), `digests of request ${i}`).toBe(true);
    });
    expect(DIGESTS_AT_ONCE).toBe(2);
    // two at a time: never more (≥ 3 reads' wait), and not one at a time (6 reads' wait)
    expect(elapsed).toBeGreaterThanOrEqual(3 * READ_MS - 5);
    expect(elapsed).toBeLessThan(5.5 * READ_MS);
    // the first two were answered together, before the next two started their reads
    expect(Math.max(at.get(ids[0]!)!, at.get(ids[1]!)!)).toBeLessThan(2 * READ_MS);
  });

  test('a HELLO without features gets a reply without them (an older sender), with them only the common ones', async () => {
    const { FrameSocket: FS } = await import('../../src/replication/frame-socket.ts');
    for (const [hello, reply] of [
      [{}, { version: 1, tls: false }],
      [{ features: ['digest', 'teleport'] }, { version: 1, tls: false, features: ['digest'] }],
      [{ features: [] }, { version: 1, tls: false, features: [] }],
    ] as const) {
      const sock = net.connect({ host: '127.0.0.1', port });
      socks.push(sock);
      sock.on('error', () => {});
      await new Promise<void>((r) => sock.once('connect', () => r()));
      const frames = new FS(sock, { maxPayload: 65536 });
      frames.send(FrameType.HELLO, 0, [encodeJson({ min: 1, max: 1, tls: false, name: 'raw', ...hello })]);
      const f = await frames.next(10_000, 'HELLO_REPLY');
      expect(decodeJson(f.payload, 'HELLO_REPLY')).toEqual(reply);
      frames.destroy();
    }
  });
});
