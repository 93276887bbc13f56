/**
 * Fuzzing over raw sockets with a seeded PRNG: random bytes, mutated handshakes and mutated
 * request streams (hostile lengths, unknown commands and flags, bad magic, truncation).
 * The image under test is exported read-only, so no mutated request may change it; a
 * writable in-memory export takes the fuzzed writes. Afterwards the server must still serve
 * (nbdinfo), have released every connection and handle, and the image digest must be equal.
 */
import { connect } from 'node:net';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, test } from 'vitest';
import { NbdServer } from '../../src/nbd/server.ts';
import { TestProvider } from '../helpers/nbd-file-provider.ts';
import { RawNbd } from '../helpers/nbd-raw-client.ts';
import { ok, prng, requireTools, sha256, unixUri, writeRandomImage } from '../helpers/nbd-tools.ts';

const MiB = 1024 * 1024;
const SEED = 0x5eed_2024;
const HANDSHAKE_CASES = 160;
const TRANSMISSION_CASES = 160;
const CONCURRENCY = 8;

let dir: string;
let sock: string;
let imgPath: string;
let digest: string;
let provider: TestProvider;
let server: NbdServer;

beforeAll(async () => {
  requireTools(['nbdinfo']);
  dir = mkdtempSync(join(tmpdir(), 'dmkit-nbdfuzz-'));
  sock = join(dir, 'nbd.sock');
  imgPath = join(dir, 'image.img');
  digest = sha256(writeRandomImage(imgPath, 4 * MiB));
  provider = new TestProvider([
    { kind: 'file', name: 'image', path: imgPath, readOnly: true },
    { kind: 'memory', name: 'scratch', size: 4 * MiB },
  ]);
  server = new NbdServer(provider, { handshakeTimeoutMs: 5000, graceMs: 500 });
  await server.listenUnix(sock);
});

afterAll(async () => {
  await server?.close();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

type Rand = () => number;
const int = (rand: Rand, n: number): number => Math.floor(rand() * n);
const pick = <T>(rand: Rand, xs: readonly T[]): T => xs[int(rand, xs.length)]!;

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
}

/** a plausible client handshake: flags, some options, usually ending in GO or EXPORT_NAME */
function handshakeBytes(rand: Rand, name: string, finish: boolean): Buffer {
  const parts: Buffer[] = [u32(pick(rand, [3, 3, 3, 1, 0]))];
  const n = int(rand, 5);
  for (let i = 0; i < n; i++) {
    switch (int(rand, 7)) {
      case 0: parts.push(RawNbd.option(8, Buffer.alloc(0))); break;
      case 1: parts.push(RawNbd.option(3, Buffer.alloc(0))); break;
      case 2: parts.push(RawNbd.option(6, RawNbd.goData(name, [0, 1, 2, 3]))); break;
      case 3: parts.push(RawNbd.option(9, RawNbd.metaData(name, pick(rand, [[], ['base:'], ['base:allocation', 'qemu:x']])))); break;
      case 4: parts.push(RawNbd.option(10, RawNbd.metaData(name, ['base:allocation']))); break;
      case 5: parts.push(RawNbd.option(int(rand, 20), Buffer.from('xyz'))); break;
      default: parts.push(RawNbd.option(5, Buffer.alloc(0)));
    }
  }
  if (finish) parts.push(rand() < 0.8 ? RawNbd.option(7, RawNbd.goData(name, [3])) : RawNbd.option(1, Buffer.from(name)));
  return Buffer.concat(parts);
}

function mutate(rand: Rand, b: Buffer): Buffer {
  const out = Buffer.from(b);
  const k = 1 + int(rand, 4);
  for (let i = 0; i < k && out.length > 0; i++) {
    const at = int(rand, out.length);
    switch (int(rand, 4)) {
      case 0: out[at] = int(rand, 256); break;
      case 1: out[at]! ^= 1 << int(rand, 8); break;
      case 2: out.fill(0xff, at, Math.min(out.length, at + 4)); break;
      default: out.fill(0, at, Math.min(out.length, at + 4));
    }
  }
  return rand() < 0.2 ? out.subarray(0, int(rand, out.length + 1)) : out;
}

/** a stream of requests: mostly well-formed, with random types, flags, ranges and sizes */
function requestBytes(rand: Rand, size: number): Buffer {
  const parts: Buffer[] = [];
  const n = 1 + int(rand, 24);
  for (let i = 0; i < n; i++) {
    const type = rand() < 0.85 ? int(rand, 8) : int(rand, 65536);
    const flags = rand() < 0.7 ? pick(rand, [0, 1, 2, 4, 8, 16, 3, 17]) : int(rand, 65536);
    const offset = pick(rand, [0, 512, 4096, size - 512, size, size + 512, int(rand, size), 2 ** 40, 2 ** 53]);
    let length = pick(rand, [0, 1, 512, 4096, 65536, 300 * 1024, size, 0xffffffff, int(rand, 70000)]);
    if (type === 1) length = Math.min(length, 128 * 1024); // WRITE payloads stay small...
    const hdr = RawNbd.request(type, flags, BigInt(i + 1), BigInt(Math.min(offset, 2 ** 53)), length);
    parts.push(hdr);
    if (type === 1) parts.push(Buffer.alloc(length, int(rand, 256)));
  }
  if (rand() < 0.1) parts.push(RawNbd.request(1, 0, 99n, 0, 0x7fffffff)); // ...except a hostile one
  if (rand() < 0.3) parts.push(RawNbd.request(2, 0, 100n, 0, 0)); // DISC
  return Buffer.concat(parts);
}

/** connect, run `script` (which writes), drain replies, half-close; resolves when the server closes */
function session(script: (write: (b: Buffer) => void, raw: RawNbd) => Promise<void>): Promise<void> {
  return (async () => {
    const raw = await RawNbd.connect(sock);
    raw.socket.on('error', () => {});
    try {
      await script((b) => raw.socket.write(b), raw);
    } catch {
      // the server may drop us mid-script: that is the point
    }
    raw.socket.end();
    await Promise.race([raw.closed(), new Promise((r) => setTimeout(r, 5000))]);
    expect(raw.ended).toBe(true);
    raw.destroy();
  })();
}

async function inBatches(n: number, run: (i: number) => Promise<void>): Promise<void> {
  for (let i = 0; i < n; i += CONCURRENCY) {
    await Promise.all(Array.from({ length: Math.min(CONCURRENCY, n - i) }, (_, k) => run(i + k)));
  }
}

function randomSplits(rand: Rand, b: Buffer, write: (b: Buffer) => void): Promise<void> {
  return (async () => {
    for (let p = 0; p < b.length;) {
      const n = 1 + int(rand, Math.max(1, Math.min(b.length - p, 4096)));
      write(b.subarray(p, p + n));
      p += n;
      if (rand() < 0.2) await new Promise((r) => setImmediate(r));
    }
  })();
}

test('fuzzed handshakes and request streams never hurt the server or the image', { timeout: 60_000 }, async () => {
  const rand = prng(SEED);

  // 1. random bytes and mutated handshakes
  await inBatches(HANDSHAKE_CASES, async (i) => {
    const r = prng(SEED + i);
    const bytes = i % 4 === 0
      ? Buffer.from(Array.from({ length: 1 + int(r, 300) }, () => int(r, 256)))
      : mutate(r, handshakeBytes(r, pick(r, ['image', 'scratch', '', 'nope']), r() < 0.7));
    await session(async (write, raw) => {
      await raw.read(18).catch(() => undefined);
      await randomSplits(r, bytes, write);
    });
  });

  // 2. valid handshakes followed by fuzzed request streams
  await inBatches(TRANSMISSION_CASES, async (i) => {
    const r = prng(SEED * 7 + i);
    const name = r() < 0.6 ? 'image' : 'scratch';
    await session(async (write, raw) => {
      const sr = r() < 0.7;
      await raw.open(name, { sr, meta: sr && r() < 0.7 });
      let bytes = requestBytes(r, 4 * MiB);
      if (r() < 0.3) bytes = mutate(r, bytes);
      await randomSplits(r, bytes, write);
    });
  });

  // 3. a few plain garbage floods during transmission
  for (let i = 0; i < 8; i++) {
    await session(async (write, raw) => {
      await raw.open('image');
      write(Buffer.from(Array.from({ length: 64 * 1024 }, () => int(rand, 256))));
    });
  }

  // the server still serves, released everything, and the image is unchanged
  const socketRaw = connect(sock);
  await new Promise<void>((res, rej) => socketRaw.once('connect', res).once('error', rej));
  socketRaw.destroy();
  expect((await ok('nbdinfo', ['--size', unixUri(sock, 'image')])).trim()).toBe(String(4 * MiB));
  expect((await ok('nbdinfo', ['--size', unixUri(sock, 'scratch')])).trim()).toBe(String(4 * MiB));
  for (let i = 0; i < 250 && (server.connections > 0 || provider.openHandles > 0); i++) {
    await new Promise((r) => setTimeout(r, 20));
  }
  expect(server.connections).toBe(0);
  expect(provider.openHandles).toBe(0);
  expect(sha256(readFileSync(imgPath))).toBe(digest);
  expect(server.stats.go + server.stats.exportName).toBeGreaterThan(TRANSMISSION_CASES);
});
