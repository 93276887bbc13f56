/**
 * The server's two ways of reading a connection (src/nbd/direct-socket.ts): direct reads
 * (requests into a reused staging buffer, the rest of a large WRITE payload straight into its
 * own buffer) and the plain socket. The same request streams, cut into random pieces so that
 * headers and payloads straddle reads at every kind of boundary, with a small in-flight budget
 * so reading pauses and resumes mid-stream, must leave the same bytes as an independent
 * model on both servers.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { NbdServer } from '../../src/nbd/server.ts';
import { prng } from '../compliance/helpers.ts';
import { TestProvider, serveAndOpen } from '../helpers/nbd-file-provider.ts';
import { RawNbd, readData, replyErrno } from '../helpers/nbd-raw-client.ts';
import { sha256, writeRandomImage } from '../helpers/nbd-tools.ts';

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;
const CMD = { READ: 0, WRITE: 1, FLUSH: 3 };
const SIZES = [512, 4096, 28 * 1024, 64 * 1024, 65536 + 512, 300 * 1024, MiB];

let dir: string;
const servers: NbdServer[] = [];
const clients: RawNbd[] = [];

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'dmkit-nbd-direct-'));
});

afterAll(async () => {
  for (const c of clients) c.destroy();
  for (const s of servers) await s.close();
  rmSync(dir, { recursive: true, force: true });
});

interface Setup { server: NbdServer; provider: TestProvider; c: RawNbd; file: string; model: Buffer }

async function setup(name: string, directReads: boolean): Promise<Setup> {
  const file = join(dir, `${name}.img`);
  const model = Buffer.from(writeRandomImage(file, SIZE));
  const provider = new TestProvider([{ kind: 'file', name: 'disk', path: file }]);
  const server = new NbdServer(provider, { maxInFlightBytes: 3 * MiB, maxInFlightRequests: 64, directReads });
  servers.push(server);
  const c = await serveAndOpen(server, join(dir, `${name}.sock`), 'disk');
  clients.push(c);
  return { server, provider, c, file, model };
}

/**
 * One round: non-overlapping writes of mixed sizes with reads of other places between them.
 * With `hold`, the export parks every request until the stream has been sent, so payloads
 * taken from earlier reads must survive the reads after them.
 */
async function round({ c, model, provider }: Setup, seed: number, hold: boolean): Promise<void> {
  const r = prng(seed);
  const parts: Buffer[] = [];
  const writes: bigint[] = [];
  const reads = new Map<bigint, { offset: number; want: Buffer }>();
  // writes go to the first half in order; reads look at the second half, which no write touches
  let offset = r.int(8) * 512;
  while (true) {
    const len = SIZES[r.int(SIZES.length)]!;
    if (offset + len > SIZE / 2) break;
    const payload = r.fill(Buffer.alloc(len));
    const w = c.encode(CMD.WRITE, { offset, payload });
    parts.push(w.bytes);
    writes.push(w.cookie);
    payload.copy(model, offset);
    offset += len + r.int(4) * 512;
    if (r.int(3) === 0) {
      const rlen = SIZES[r.int(SIZES.length)]!;
      const roff = SIZE / 2 + r.int((SIZE / 2 - rlen) / 512) * 512;
      const q = c.encode(CMD.READ, { offset: roff, length: rlen });
      parts.push(q.bytes);
      reads.set(q.cookie, { offset: roff, want: Buffer.from(model.subarray(roff, roff + rlen)) });
    }
  }
  const stream = Buffer.concat(parts);
  const replies = c.collect([...writes, ...reads.keys()]);
  const release = hold ? provider.hold('disk') : null;
  for (let p = 0; p < stream.length; ) {
    const n = 1 + r.int(r.int(4) === 0 ? 200 * 1024 : 100);
    c.write(stream.subarray(p, p + n));
    p += n;
    if (r.int(16) === 0) await new Promise((res) => setTimeout(res, 1));
  }
  if (release) setTimeout(release, 50);
  const got = await replies;
  for (const w of writes) expect(replyErrno(got.get(w)!)).toBe(0);
  for (const [cookie, { offset: o, want }] of reads) expect(readData(got.get(cookie)!, o, want.length).equals(want)).toBe(true);
}

describe('direct reads and plain socket reads give the same bytes', { timeout: 60_000 }, () => {
  test.each([
    ['direct reads', true],
    ['plain socket', false],
  ])('%s', async (name, directReads) => {
    const s = await setup(name.replace(' ', '-'), directReads);
    const { server, c, file, model } = s;
    expect(server.stats.direct).toBe(directReads ? 1 : 0);
    for (let i = 0; i < 4; i++) await round(s, 100 + i, i % 2 === 1);
    expect(replyErrno(await c.roundTrip(CMD.FLUSH))).toBe(0);
    expect(sha256(readFileSync(file))).toBe(sha256(model));
    // and the server reads it all back the same way
    for (let o = 0; o < SIZE; o += MiB) {
      const back = readData(await c.roundTrip(CMD.READ, { offset: o, length: MiB }), o, MiB);
      expect(back.equals(model.subarray(o, o + MiB))).toBe(true);
    }
  });
});
