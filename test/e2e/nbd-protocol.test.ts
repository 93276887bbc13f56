/**
 * Protocol details no packaged client exercises, checked byte by byte over raw sockets:
 * option edge cases, unknown commands, EOVERFLOW, read splitting into chunks, REQ_ONE,
 * out-of-order replies, payloads split across packets, hostile lengths, bounded memory,
 * export removal and server shutdown with requests in flight, abrupt disconnects.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect as tlsConnect } from 'node:tls';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { NbdServer } from '../../src/nbd/server.ts';
import { TestProvider } from '../helpers/nbd-file-provider.ts';
import { RawNbd, expectAck, readData, replyErrno } from '../helpers/nbd-raw-client.ts';
import { ok, requireTools, sha256, unixUri, writeRandomImage } from '../helpers/nbd-tools.ts';

const MiB = 1024 * 1024;
const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, ZERO: 6, BS: 7 };
const FLAG = { FUA: 1, NO_HOLE: 2, DF: 4, REQ_ONE: 8, FAST_ZERO: 16 };
const REP = { ACK: 1, SERVER: 2, INFO: 3, META: 4, UNSUP: 0x80000001, INVALID: 0x80000003, TLS_REQD: 0x80000005, UNKNOWN: 0x80000006 };

let dir: string;
let sock: string;
let diskPath: string;
let model: Buffer;
let provider: TestProvider;
let server: NbdServer;
const clients: RawNbd[] = [];

async function client(): Promise<RawNbd> {
  const c = await RawNbd.connect(sock);
  clients.push(c);
  return c;
}

const settle = (ms = 20): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function until(cond: () => boolean): Promise<void> {
  for (let i = 0; i < 250 && !cond(); i++) await settle();
  expect(cond()).toBe(true);
}

beforeAll(async () => {
  requireTools(['nbdinfo']);
  dir = mkdtempSync(join(tmpdir(), 'dmkit-nbdp-'));
  sock = join(dir, 'nbd.sock');
  diskPath = join(dir, 'disk.img');
  model = Buffer.from(writeRandomImage(diskPath, 8 * MiB));
  provider = new TestProvider([
    { kind: 'file', name: 'disk', path: diskPath },
    { kind: 'memory', name: 'mem', size: 64 * MiB },
    { kind: 'memory', name: 'gone', size: MiB },
    { kind: 'memory', name: 'held', size: MiB },
    { kind: 'memory', name: 'abrupt', size: MiB },
  ]);
  server = new NbdServer(provider, { graceMs: 2000, maxInFlightBytes: 8 * MiB });
  await server.listenUnix(sock);
});

afterAll(async () => {
  for (const c of clients) c.destroy();
  await server?.close();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe('handshake', { timeout: 20_000 }, () => {
  test('greeting offers FIXED_NEWSTYLE|NO_ZEROES; unknown options get ERR_UNSUP and the session goes on', async () => {
    const c = await client();
    expect(await c.greet()).toBe(3);
    c.sendOption(99, Buffer.from('some data to skip'));
    expect((await c.optionReplies()).map((r) => r.type)).toEqual([REP.UNSUP]);
    c.sendOption(11);
    expect((await c.optionReplies()).map((r) => r.type)).toEqual([REP.UNSUP]);
    c.sendOption(10, RawNbd.metaData('disk', ['base:allocation']));
    expect((await c.optionReplies()).map((r) => r.type)).toEqual([REP.INVALID]);
    c.sendOption(6, RawNbd.goData('nope'));
    expect((await c.optionReplies()).map((r) => r.type)).toEqual([REP.UNKNOWN]);
    c.sendOption(3, Buffer.from('x'));
    expect((await c.optionReplies()).map((r) => r.type)).toEqual([REP.INVALID]);
    c.sendOption(3);
    const list = await c.optionReplies();
    expect(list.filter((r) => r.type === REP.SERVER).length).toBe(5);
    c.sendOption(8);
    expectAck(await c.optionReplies());
    c.sendOption(9, RawNbd.metaData('disk', []));
    const lm = await c.optionReplies();
    expect(lm.map((r) => r.type)).toEqual([REP.META, REP.ACK]);
    expect(lm[0]!.data.subarray(4).toString()).toBe('base:allocation');
    // INFO then GO with the same request answer the same
    c.sendOption(6, RawNbd.goData('disk', [0, 1, 2, 3]));
    const info = (await c.optionReplies()).filter((r) => r.type === REP.INFO).map((r) => r.data.toString('hex'));
    c.sendOption(7, RawNbd.goData('disk', [0, 1, 2, 3]));
    const go = (await c.optionReplies()).filter((r) => r.type === REP.INFO).map((r) => r.data.toString('hex'));
    expect(go).toEqual(info);
    expect(info).toContain('0003' + '00000200' + '00001000' + '02000000');
    const r = await c.roundTrip(CMD.READ, { offset: 0, length: 512 });
    expect(readData(r, 0, 512).equals(model.subarray(0, 512))).toBe(true);
  });

  test('EXPORT_NAME with and without NO_ZEROES', async () => {
    for (const flags of [3, 1]) {
      const c = await client();
      await c.greet(flags);
      c.sendOption(1, Buffer.from('disk'));
      const r = await c.read(flags === 3 ? 10 : 134);
      expect(Number(r.readBigUInt64BE(0))).toBe(8 * MiB);
      expect(r.readUInt16BE(8) & 0x80).toBe(0); // no SEND_DF without SR
      if (flags === 1) expect(r.subarray(10).equals(Buffer.alloc(124))).toBe(true);
      const reply = await c.roundTrip(CMD.READ, { offset: 4096, length: 4096 });
      expect(reply[0]!.kind).toBe('simple');
      expect(readData(reply, 4096, 4096).equals(model.subarray(4096, 8192))).toBe(true);
      c.send(CMD.DISC);
      await c.closed();
    }
    // an unknown name cannot be refused on the wire: the connection is dropped
    const c = await client();
    await c.greet();
    c.sendOption(1, Buffer.from('nope'));
    await c.closed();
  });

  test('hostile handshakes end only their own connection', async () => {
    const bad: Array<(c: RawNbd) => void> = [
      (c) => c.write(Buffer.from([0, 0, 0, 0x10])), // unknown client flag
      (c) => { c.write(Buffer.from([0, 0, 0, 3])); c.write(Buffer.alloc(16, 0x41)); }, // bad option magic
      (c) => { c.write(Buffer.from([0, 0, 0, 3])); c.sendOption(99, Buffer.alloc(0)); c.write(header(99, 0x7fffffff)); },
    ];
    for (const f of bad) {
      const c = await client();
      await c.read(18);
      f(c);
      await c.closed();
    }
    // more than 32 options
    const c = await client();
    await c.greet();
    for (let i = 0; i < 40; i++) c.sendOption(99);
    await c.closed();
    expect((await ok('nbdinfo', ['--size', unixUri(sock, 'disk')])).trim()).toBe(String(8 * MiB));
  });
});

function header(opt: number, len: number): Buffer {
  const h = Buffer.alloc(16);
  h.writeBigUInt64BE(0x49484156454f5054n, 0);
  h.writeUInt32BE(opt, 8);
  h.writeUInt32BE(len, 12);
  return h;
}

describe('transmission', { timeout: 20_000 }, () => {
  test('unknown commands and flags get EINVAL; oversize reads EOVERFLOW; BLOCK_STATUS needs a context', async () => {
    const c = await client();
    await c.open('mem', { sr: true });
    expect(replyErrno(await c.roundTrip(9, { offset: 0, length: 512 }))).toBe(22);
    expect(replyErrno(await c.roundTrip(CMD.READ, { offset: 0, length: 512, flags: 1 << 7 }))).toBe(22);
    expect(replyErrno(await c.roundTrip(CMD.READ, { offset: 0, length: 33 * MiB }))).toBe(75);
    expect(replyErrno(await c.roundTrip(CMD.BS, { offset: 0, length: 4096 }))).toBe(22);
    expect(replyErrno(await c.roundTrip(CMD.FLUSH, { offset: 512, length: 0 }))).toBe(22);
    expect(replyErrno(await c.roundTrip(CMD.READ, { offset: 2n ** 62n, length: 512 }))).toBe(22);
    expect(replyErrno(await c.roundTrip(CMD.WRITE, { offset: 2n ** 62n, payload: Buffer.alloc(512) }))).toBe(28);
    expect(replyErrno(await c.roundTrip(CMD.CACHE, { offset: 0, length: MiB }))).toBe(0);
  });

  test('large reads: one OFFSET_DATA chunk under SR (also with DF), one simple reply without SR', async () => {
    const sr = await client();
    await sr.open('disk', { sr: true });
    for (const flags of [0, FLAG.DF]) {
      const one = await sr.roundTrip(CMD.READ, { offset: MiB, length: 2 * MiB, flags });
      expect(one.map((r) => (r.kind === 'chunk' ? [r.type, r.flags & 1, r.data.length - 8] : r.kind))).toEqual([[1, 1, 2 * MiB]]);
      expect(readData(one, MiB, 2 * MiB).equals(model.subarray(MiB, 3 * MiB))).toBe(true);
    }
    const simple = await client();
    await simple.open('disk');
    const whole = await simple.roundTrip(CMD.READ, { offset: 0, length: 8 * MiB });
    expect(whole.length).toBe(1);
    expect(whole[0]!.kind).toBe('simple');
    expect(sha256(readData(whole, 0, 8 * MiB))).toBe(sha256(model));
  });

  test('large reads: the device sees pieces of <= 256 KiB, all started before any is done', async () => {
    const c = await client();
    await c.open('held', { sr: true });
    const data = Buffer.alloc(MiB);
    for (let i = 0; i < MiB; i += 4096) data.fill(i >> 12, i, i + 4096);
    expect(replyErrno(await c.roundTrip(CMD.WRITE, { offset: 0, payload: data }))).toBe(0);
    const release = provider.hold('held');
    const cookie = c.send(CMD.READ, { offset: 0, length: MiB - 512 });
    await until(() => provider.parked('held').length === 4);
    expect(provider.parked('held')).toEqual([256 * 1024, 256 * 1024, 256 * 1024, 256 * 1024 - 512]);
    release();
    const got = (await c.collect([cookie])).get(cookie)!;
    expect(got.length).toBe(1);
    expect(readData(got, 0, MiB - 512).equals(data.subarray(0, MiB - 512))).toBe(true);
  });

  test('BLOCK_STATUS: extents clipped to the request, REQ_ONE gives exactly one', async () => {
    const c = await client();
    await c.open('mem', { sr: true, meta: true });
    await c.roundTrip(CMD.WRITE, { offset: 128 * 1024, payload: Buffer.alloc(64 * 1024, 1) });
    const all = await c.roundTrip(CMD.BS, { offset: 0, length: 1024 * 1024 });
    const ext = (buf: Buffer): number[] => Array.from({ length: (buf.length - 4) / 4 }, (_, i) => buf.readUInt32BE(4 + 4 * i));
    expect(all.length).toBe(1);
    expect(ext(all[0]!.data)).toEqual([128 * 1024, 3, 64 * 1024, 0, 832 * 1024, 3]);
    const one = await c.roundTrip(CMD.BS, { offset: 0, length: 4096, flags: FLAG.REQ_ONE });
    expect(ext(one[0]!.data)).toEqual([4096, 3]);
    const one2 = await c.roundTrip(CMD.BS, { offset: 64 * 1024, length: 1024 * 1024, flags: FLAG.REQ_ONE });
    expect(ext(one2[0]!.data)).toEqual([64 * 1024, 3]);
  });

  test('pipelined requests are answered out of order and never interleave', async () => {
    const c = await client();
    await c.open('held', { sr: true });
    const release = provider.hold('held');
    const slow = c.send(CMD.READ, { offset: 0, length: 4096 });
    const fast = c.send(CMD.CACHE, { offset: 0, length: 4096 });
    const first = await c.readReply();
    expect(first.cookie).toBe(fast);
    release();
    const second = await c.readReply();
    expect(second.cookie).toBe(slow);
    // 200 mixed requests in one packet, all answered correctly
    const m = await client();
    await m.open('mem', { sr: true });
    const parts: Buffer[] = [];
    const expectRead = new Map<bigint, number>();
    const writes: bigint[] = [];
    for (let i = 0; i < 100; i++) {
      const w = m.encode(CMD.WRITE, { offset: i * 4096, payload: Buffer.alloc(4096, i) });
      parts.push(w.bytes);
      writes.push(w.cookie);
      const r = m.encode(CMD.READ, { offset: i * 4096, length: 4096 });
      parts.push(r.bytes);
      expectRead.set(r.cookie, i);
    }
    m.write(Buffer.concat(parts));
    const reads = await m.collect([...expectRead.keys(), ...writes]);
    expect(writes.every((w) => replyErrno(reads.get(w)!) === 0)).toBe(true);
    // a READ pipelined behind a WRITE to the same place may see old or new data, never a mix
    for (const [cookie, i] of expectRead) {
      const data = readData(reads.get(cookie)!, i * 4096, 4096);
      expect(data.equals(Buffer.alloc(4096, i)) || data.equals(Buffer.alloc(4096, 0))).toBe(true);
    }
    const verify = await m.roundTrip(CMD.READ, { offset: 0, length: 100 * 4096 });
    const back = readData(verify, 0, 100 * 4096);
    for (let i = 0; i < 100; i++) expect(back[i * 4096]).toBe(i);
  });

  test('WRITE payloads split across packets are reassembled', async () => {
    const c = await client();
    await c.open('disk');
    const payload = Buffer.alloc(192 * 1024);
    for (let i = 0; i < payload.length; i++) payload[i] = (i * 7) & 0xff;
    const { cookie, bytes } = c.encode(CMD.WRITE, { offset: 2 * MiB, payload, flags: FLAG.FUA });
    for (let p = 0; p < bytes.length; p += 1000) {
      c.write(bytes.subarray(p, p + 1000));
      if (p % 50_000 < 1000) await settle(1);
    }
    const r = await c.collect([cookie]);
    expect(replyErrno(r.get(cookie)!)).toBe(0);
    payload.copy(model, 2 * MiB);
    expect(sha256(readFileSync(diskPath))).toBe(sha256(model));

    // large and small WRITEs and READs back to back, dribbled in odd pieces: the reads after a
    // large payload take headers alone, also when a header arrives in parts
    const reqs: Array<{ cookie: bigint; bytes: Buffer; read?: number }> = [];
    const lens = [256 * 1024, 4096, 0, 128 * 1024, 0, 64 * 1024, 512, 300 * 1024];
    let off = 3 * MiB;
    for (const [i, len] of lens.entries()) {
      if (len === 0) {
        const e = c.encode(CMD.READ, { offset: 3 * MiB, length: 8192 });
        reqs.push({ ...e, read: 3 * MiB });
        continue;
      }
      const data = Buffer.alloc(len, 0x30 + i);
      reqs.push(c.encode(CMD.WRITE, { offset: off, payload: data }));
      data.copy(model, off);
      off += len;
    }
    const all = Buffer.concat(reqs.map((q) => q.bytes));
    for (let p = 0, k = 0; p < all.length; k++) {
      const n = [7, 1000, 21, 65536, 28, 13][k % 6]!;
      c.write(all.subarray(p, p + n));
      p += n;
      if (k % 8 === 0) await settle(1);
    }
    const got = await c.collect(reqs.map((q) => q.cookie));
    for (const q of reqs) {
      expect(replyErrno(got.get(q.cookie)!)).toBe(0);
      if (q.read !== undefined) expect(readData(got.get(q.cookie)!, q.read, 8192).length).toBe(8192);
    }
    expect(replyErrno(await c.roundTrip(CMD.FLUSH))).toBe(0);
    expect(sha256(readFileSync(diskPath))).toBe(sha256(model));
  });

  test('a WRITE longer than the maximum payload drops the connection, nothing else', async () => {
    const c = await client();
    await c.open('disk');
    c.write(RawNbd.request(CMD.WRITE, 0, 1n, 0, 0xfffffe00));
    c.write(Buffer.alloc(4096, 0xee));
    await c.closed();
    expect(sha256(readFileSync(diskPath))).toBe(sha256(model));
    expect((await ok('nbdinfo', ['--size', unixUri(sock, 'disk')])).trim()).toBe(String(8 * MiB));
  });

  test('memory stays bounded when a client sends reads and never reads the replies', async () => {
    const c = await client();
    await c.open('mem');
    c.socket.pause();
    const before = process.memoryUsage().arrayBuffers;
    const cookies: bigint[] = [];
    for (let i = 0; i < 12; i++) cookies.push(c.send(CMD.READ, { offset: 0, length: 16 * MiB }));
    await settle(300);
    const grown = process.memoryUsage().arrayBuffers - before;
    expect(grown).toBeLessThan(96 * MiB); // 12 × 16 MiB = 192 MiB if unbounded
    c.socket.resume();
    const all = await c.collect(cookies);
    expect([...all.values()].every((r) => replyErrno(r) === 0)).toBe(true);
  });
});

describe('lifecycle', { timeout: 20_000 }, () => {
  test('export gone: in-flight finishes, new requests get ESHUTDOWN, then the connection closes', async () => {
    const c = await client();
    await c.open('gone');
    const release = provider.hold('gone');
    const inflight = c.send(CMD.READ, { offset: 0, length: 4096 });
    await settle();
    provider.remove('gone');
    const late = c.send(CMD.READ, { offset: 0, length: 4096 });
    const first = await c.readReply();
    expect(first.cookie).toBe(late);
    expect(replyErrno([first])).toBe(108);
    release();
    const second = await c.readReply();
    expect(second.cookie).toBe(inflight);
    expect(replyErrno([second])).toBe(0);
    await c.closed();
  });

  test('DISC: requests in flight are answered first, then the server closes', async () => {
    const c = await client();
    await c.open('held');
    const release = provider.hold('held');
    const read = c.send(CMD.READ, { offset: 0, length: 4096 });
    const flush = c.send(CMD.FLUSH);
    c.send(CMD.DISC);
    c.send(CMD.READ, { offset: 0, length: 512 }); // after DISC: ignored
    await settle();
    expect(c.ended).toBe(false);
    release();
    const got = await c.collect([read, flush]);
    expect(replyErrno(got.get(read)!)).toBe(0);
    expect(replyErrno(got.get(flush)!)).toBe(0);
    await c.closed();
  });

  test('abrupt close with requests in flight releases the handle without errors', async () => {
    const handles = provider.openCount('abrupt');
    const c = await client();
    await c.open('abrupt');
    const release = provider.hold('abrupt');
    for (let i = 0; i < 8; i++) c.send(CMD.WRITE, { offset: i * 4096, payload: Buffer.alloc(4096, 9) });
    c.send(CMD.FLUSH);
    await settle();
    c.destroy();
    await settle();
    expect(provider.openCount('abrupt')).toBe(handles + 1);
    release();
    await until(() => provider.openCount('abrupt') === handles);
  });

  test('server close: ESHUTDOWN for what is still running after the grace period, all connections closed', async () => {
    const p = new TestProvider([{ kind: 'memory', name: 'm', size: MiB }]);
    const s = new NbdServer(p, { graceMs: 100 });
    const path = join(dir, 'close.sock');
    await s.listenUnix(path);
    const c = await RawNbd.connect(path);
    clients.push(c);
    await c.open('m', { sr: true });
    const idle = await RawNbd.connect(path);
    clients.push(idle);
    await idle.read(18); // still in the handshake
    const release = p.hold('m');
    const stuck = c.send(CMD.READ, { offset: 0, length: 4096 });
    await settle();
    expect(s.connections).toBe(2);
    const closing = s.close();
    const reply = await c.collect([stuck]);
    expect(replyErrno(reply.get(stuck)!)).toBe(108);
    await closing;
    await c.closed();
    await idle.closed();
    expect(s.connections).toBe(0);
    release();
    await until(() => p.openHandles === 0);
  });

  test('STARTTLS discards structured replies and meta contexts negotiated in plaintext', async () => {
    const key = 'cd'.repeat(32);
    const psk = join(dir, 'forget.psk');
    writeFileSync(psk, `alice:${key}\n`);
    const s = new NbdServer(provider, { tls: { pskFile: psk, require: false } });
    const path = join(dir, 'forget.sock');
    await s.listenUnix(path);
    const plain = await RawNbd.connect(path);
    clients.push(plain);
    await plain.greet();
    plain.sendOption(8);
    expectAck(await plain.optionReplies());
    plain.sendOption(10, RawNbd.metaData('mem', ['base:allocation']));
    expect((await plain.optionReplies()).map((r) => r.type)).toEqual([REP.META, REP.ACK]);
    plain.sendOption(5);
    expectAck(await plain.optionReplies());
    const tsock = tlsConnect({
      socket: plain.detach(),
      ciphers: 'PSK-AES128-GCM-SHA256:TLS_AES_128_GCM_SHA256',
      pskCallback: () => ({ identity: 'alice', psk: Buffer.from(key, 'hex') }),
      checkServerIdentity: () => undefined,
    });
    await new Promise<void>((res, rej) => tsock.once('secureConnect', res).once('error', rej));
    const c = RawNbd.over(tsock);
    clients.push(c);
    c.sendOption(7, RawNbd.goData('mem'));
    const go = await c.optionReplies();
    expectAck(go);
    const flags = go.find((r) => r.type === REP.INFO)!.data.readUInt16BE(10);
    expect(flags & 0x80).toBe(0); // no SEND_DF: SR was forgotten
    const r = await c.roundTrip(CMD.READ, { offset: 0, length: 4096 });
    expect(r[0]!.kind).toBe('simple');
    expect(replyErrno(await c.roundTrip(CMD.BS, { offset: 0, length: 4096 }))).toBe(22);
    c.send(CMD.DISC);
    await c.closed();
    await s.close();
  });

  test('TCP listener on loopback', async () => {
    const s = new NbdServer(provider, {});
    const { port } = await s.listenTcp('127.0.0.1', 0);
    expect(port).toBeGreaterThan(0);
    expect((await ok('nbdinfo', ['--size', `nbd://127.0.0.1:${port}/disk`])).trim()).toBe(String(8 * MiB));
    await s.close();
  });

  test('TLS required: options before STARTTLS get ERR_TLS_REQD, EXPORT_NAME disconnects', async () => {
    const psk = join(dir, 'k.psk');
    writeFileSync(psk, `alice:${'ab'.repeat(32)}\n`);
    const s = new NbdServer(provider, { tls: { pskFile: psk, require: true } });
    const path = join(dir, 'tls.sock');
    await s.listenUnix(path);
    const c = await RawNbd.connect(path);
    clients.push(c);
    await c.greet();
    for (const opt of [8, 3, 6, 7, 9, 10, 99]) {
      c.sendOption(opt, opt === 6 || opt === 7 ? RawNbd.goData('disk') : Buffer.alloc(0));
      expect((await c.optionReplies()).map((r) => r.type)).toEqual([REP.TLS_REQD]);
    }
    c.sendOption(1, Buffer.from('disk'));
    await c.closed();
    await s.close();
  });
});
