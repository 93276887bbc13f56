/**
 * The `tcp` slink with `tls=on` (TLS-PSK) when a TLS handshake is damaged on the way: a real
 * sender (the tcp slink, through the registry) and a real receiver in-process, over an engine
 * whose device is an image file, with the fault-injecting proxy between them flipping one bit
 * of the handshake once. OpenSSL fails such a handshake with the same alert as two different
 * secrets (`bad record mac`), at both ends; the sender tries once more at once before it
 * takes it as a refusal:
 *
 *  - a bit of the ClientHello's random flipped on the first connect: the link ends
 *    `connected` without ever being `auth-failed`, the damage is counted (`badReplies`) and
 *    logged as such, never as a wrong secret; the receiver logs one failed handshake, then
 *    an authenticated one; what is written crosses byte for byte;
 *  - a bit of the ServerHello's random flipped while a lost connection is re-made: the same,
 *    and the writes made meanwhile arrive;
 *  - without TLS, a HELLO whose payload fails its CRC at the receiver (refused with EPROTO):
 *    the sender tries again at once too, and is connected without waiting for a retest;
 *  - a wrong secret with `tls=on` still ends `auth-failed` at once, "secret does not match"
 *    at both ends (the receiver refuses both handshakes), the write fails with EACCES and
 *    nothing is written; a retest of the refused link makes one handshake, not two.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import type { Bio } from '../../src/core/bio.ts';
import { BlockError, DeviceMapper } from '../../src/index.ts';
import type { Logger } from '../../src/core/log.ts';
import { loadSecret } from '../../src/replication/handshake.ts';
import { FEATURES, HEADER_SIZE, MAX_VERSION, MIN_VERSION, encodeJson } from '../../src/replication/protocol.ts';
import { ReplicationReceiver } from '../../src/replication/receiver.ts';
import { createSlink } from '../../src/slink/registry.ts';
import type { RemoteDevice, SiteLink } from '../../src/slink/types.ts';
import { FaultProxy } from '../support/fault-proxy.ts';

const SECTORS = 8192;
const STREAM = '00112233445566778899aabbccddeeff';
const SECRET = 'the receiving site shares this secret';
/** the slink's name, as its HELLO carries it */
const NAME = 'repl slink 1';
/**
 * Where the TLS handshake starts in each direction: after the HELLO (sender) and the
 * HELLO_REPLY (receiver), header and JSON payload, as handshake.ts writes them. A TLS 1.2
 * ClientHello or ServerHello has its 32-byte random at offset 11 (record header 5,
 * handshake header 4, version 2); a bit flipped there makes the two ends derive different
 * keys, as two different secrets would.
 */
const HELLO = HEADER_SIZE + encodeJson({ min: MIN_VERSION, max: MAX_VERSION, tls: true, tlsMode: 'psk', name: NAME, features: FEATURES }).length;
const HELLO_REPLY = HEADER_SIZE + encodeJson({ version: MAX_VERSION, tls: true, features: FEATURES }).length;
const IN_RANDOM = 11 + 9;

/** a logger that keeps what it is told */
function keeping(): Logger & { lines: string[] } {
  const lines: string[] = [];
  const keep = (m: string): void => void lines.push(m);
  return { lines, debug: keep, info: keep, warn: keep, error: keep, limited: (_k, m) => keep(m) };
}

/** wait until `check` passes (a state, not a timing; its last failure if it never does) */
const eventually = (check: () => void): Promise<void> => vi.waitFor(check, { timeout: 15_000, interval: 10 });

/** `sectors` sectors of random data */
const data = (sectors = 8): Buffer => crypto.randomBytes(sectors * 512);

const write = (sector: number, data: Buffer): Bio => ({ op: 'write', sector, sectors: data.length / 512, data, flags: {} });
const flush: Bio = { op: 'flush', sector: 0, sectors: 0, data: Buffer.alloc(0), flags: {} };

let tmp: string;
let dm: DeviceMapper;
let closers: Array<() => unknown>;

beforeEach(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'dmkit-tls-damage-'));
  dm = new DeviceMapper();
  closers = [];
});

afterEach(async () => {
  for (const c of closers.reverse()) await c();
  await dm.close();
  fs.rmSync(tmp, { recursive: true, force: true });
});

function secretFile(name: string, text: string): string {
  const f = path.join(tmp, name);
  fs.writeFileSync(f, text, { mode: 0o600 });
  return f;
}

/** a receiving site in-process requiring TLS: `vol` over an empty image file, a real receiver, and the proxy in front of it */
async function receivingSite(requireTls = true): Promise<{ img: string; rxLog: ReturnType<typeof keeping>; proxy: FaultProxy }> {
  const img = path.join(tmp, 'vol.img');
  fs.writeFileSync(img, Buffer.alloc(0));
  fs.truncateSync(img, SECTORS * 512);
  await dm.create('vol', { table: `0 ${SECTORS} linear ${img} 0` });
  const rxLog = keeping();
  const secret = loadSecret(secretFile('site.key', SECRET));
  const rx = new ReplicationReceiver(dm, { host: '127.0.0.1', port: 0, secret, requireTls, stateDir: path.join(tmp, 'state') }, rxLog);
  const port = (await rx.listen()).port;
  closers.push(() => rx.close());
  const proxy = await FaultProxy.start({ target: { host: '127.0.0.1', port } });
  closers.push(() => proxy.close());
  return { img, rxLog, proxy };
}

interface Sender {
  link: SiteLink;
  dev: RemoteDevice;
  log: ReturnType<typeof keeping>;
  /** every connection state the link went through, in order */
  states: string[];
}

/** a tcp slink with tls=on through `proxy`, holding `secret`, its device `vol` attached */
async function sender(proxy: FaultProxy, secret = SECRET, tls = 'on'): Promise<Sender> {
  const log = keeping();
  const states: string[] = [];
  let link: SiteLink | null = null;
  const event = (): void => void (link && states.push(stats(link).connection as string));
  const file = secretFile('sender.key', secret);
  link = await createSlink('tcp', { device: 'repl', groupId: STREAM, event, log }, 1, [`peer=${proxy.address}`, `secret=${file}`, `tls=${tls}`, 'io-timeout=5', 'retest=600']);
  const l = link;
  closers.push(() => l.destroy());
  const dev = await link.attach({ device: 'vol', open: () => Promise.reject(new Error('not used')), length: SECTORS }, 0, ['vol']);
  return { link, dev, log, states };
}

/** the link's status, as `status --json` shows it */
const stats = (link: SiteLink): Record<string, unknown> => link.statusJson!() as Record<string, unknown>;

/** what the receiver logged: refusals, and senders let in */
const refusals = (rxLog: { lines: string[] }): string[] => rxLog.lines.filter((l) => l.startsWith('replication: refused '));
const admitted = (rxLog: { lines: string[] }): string[] => rxLog.lines.filter((l) => / authenticated over TLS$/.test(l));

/** writes entries seq `from`… at the sender (a reference image kept alongside), then a flush */
async function ship(dev: RemoteDevice, ref: Buffer, from: number, writes: Array<[number, Buffer]>): Promise<void> {
  let seq = from;
  for (const [sector, d] of writes) {
    await dev.submit(write(sector, d), { seq, epoch: seq });
    d.copy(ref, sector * 512);
    seq++;
  }
  await dev.submit(flush, { seq, epoch: seq });
}

describe('tcp slink: a handshake damaged on the way', { timeout: 60_000 }, () => {
  it('a flipped bit in the ClientHello on the first connect: connected, never auth-failed, counted as damage; data crosses byte for byte', async () => {
    const { img, rxLog, proxy } = await receivingSite();
    proxy.corrupt('up', { afterBytes: HELLO + IN_RANDOM, count: 1 });
    const s = await sender(proxy);
    await eventually(() => expect(stats(s.link).connection).toBe('connected'));
    expect(proxy.stats.corrupted).toBe(1);
    expect(s.states).not.toContain('auth-failed');
    expect(stats(s.link)).toMatchObject({ connection: 'connected', lastError: null, badReplies: 1, tls: true });
    // the receiver: the damaged TLS handshake refused (it cannot tell), then the next one let in
    await eventually(() => expect(admitted(rxLog)).toHaveLength(1));
    expect(refusals(rxLog)).toHaveLength(1);
    expect(refusals(rxLog)[0]).toMatch(/TLS-PSK handshake failed/);
    expect(rxLog.lines.indexOf(admitted(rxLog)[0]!)).toBeGreaterThan(rxLog.lines.indexOf(refusals(rxLog)[0]!));
    // the sender: damage, not a wrong secret
    expect(s.log.lines.filter((l) => /the first was damaged on the way \(not a different secret\)/.test(l))).toHaveLength(1);
    expect(s.log.lines.join('\n')).not.toMatch(/does not match|authentication failed/);

    const ref = Buffer.alloc(SECTORS * 512);
    await ship(s.dev, ref, 1, [[0, data()], [1000, data(64)], [SECTORS - 8, data()]]);
    expect(fs.readFileSync(img).equals(ref)).toBe(true);
    expect(s.states.at(-1)).toBe('connected');
  });

  it('a flipped bit in the ServerHello while a lost connection is re-made: reconnected, never auth-failed; the writes made meanwhile arrive', async () => {
    const { img, rxLog, proxy } = await receivingSite();
    const s = await sender(proxy);
    await eventually(() => expect(stats(s.link).connection).toBe('connected'));
    const ref = Buffer.alloc(SECTORS * 512);
    await ship(s.dev, ref, 1, [[8, data()]]);

    proxy.reset();
    proxy.corrupt('down', { afterBytes: HELLO_REPLY + IN_RANDOM, count: 1 }); // the next connection's bytes
    await ship(s.dev, ref, 3, [[16, data(32)], [4000, data()]]);
    await eventually(() => expect(stats(s.link).reconnects).toBe(1));
    expect(proxy.stats.corrupted).toBe(1);
    expect(s.states).toContain('connecting');
    expect(s.states).not.toContain('auth-failed');
    expect(stats(s.link)).toMatchObject({ connection: 'connected', lastError: null, badReplies: 1 });
    await eventually(() => expect(admitted(rxLog)).toHaveLength(2));
    expect(refusals(rxLog)).toHaveLength(1);
    expect(refusals(rxLog)[0]).toMatch(/TLS-PSK handshake failed/);
    expect(s.log.lines.join('\n')).not.toMatch(/does not match|authentication failed/);
    expect(fs.readFileSync(img).equals(ref)).toBe(true);
  });

  it('tls=off: a HELLO damaged on the first connect (its CRC fails at the receiver): connected at once, never down', async () => {
    const { img, rxLog, proxy } = await receivingSite(false);
    proxy.corrupt('up', { afterBytes: HEADER_SIZE + 4, count: 1 }); // a byte of the HELLO's JSON
    const s = await sender(proxy, SECRET, 'off'); // retest=600: only the retry at once can connect within the wait
    await eventually(() => expect(stats(s.link).connection).toBe('connected'));
    expect(proxy.stats.corrupted).toBe(1);
    expect(s.states).not.toContain('down');
    expect(stats(s.link)).toMatchObject({ connection: 'connected', lastError: null, badReplies: 1, tls: false });
    expect(s.log.lines.filter((l) => /a handshake failed \(.*\) and the next one, made at once, got in/.test(l))).toHaveLength(1);
    expect(rxLog.lines.join('\n')).toMatch(/CRC/);
    const ref = Buffer.alloc(SECTORS * 512);
    await ship(s.dev, ref, 1, [[0, data()], [2000, data(16)]]);
    expect(fs.readFileSync(img).equals(ref)).toBe(true);
  });

  it('a wrong secret still ends auth-failed at once, "secret does not match" at both ends, nothing written; a retest makes one handshake', async () => {
    const { img, rxLog, proxy } = await receivingSite();
    const started = Date.now();
    const s = await sender(proxy, 'a different secret of the sender');
    expect(stats(s.link).connection).toBe('auth-failed');
    expect(Date.now() - started).toBeLessThan(5000); // confirmed at once, not after a retest
    expect(stats(s.link).lastError).toMatch(/: authentication failed: the peer's replication secret does not match ours \(TLS-PSK handshake failed: bad record mac\)$/);
    expect(stats(s.link).badReplies).toBe(0);
    // the receiver refused both handshakes, each saying why, and let nothing in
    await eventually(() => expect(refusals(rxLog)).toHaveLength(2));
    for (const r of refusals(rxLog)) expect(r).toMatch(/authentication failed: the peer's replication secret does not match ours/);
    expect(admitted(rxLog)).toHaveLength(0);
    expect(s.log.lines.join('\n')).toMatch(/secret does not match/);
    expect(s.log.lines.join('\n')).not.toMatch(/damaged on the way/);

    const e = await s.dev.submit(write(0, data()), { seq: 1, epoch: 1 }).then(() => null, (x: unknown) => x);
    expect(e).toBeInstanceOf(BlockError);
    expect((e as BlockError).code).toBe('EACCES');
    expect((e as Error).message).toMatch(/secret does not match/);

    // a retest of the refused link: one more handshake, still auth-failed, never `connecting`
    const before = s.states.length;
    await expect(s.dev.test()).rejects.toMatchObject({ code: 'EACCES' });
    await eventually(() => expect(refusals(rxLog)).toHaveLength(3));
    expect(s.states.slice(before)).toEqual([]);
    expect(stats(s.link).connection).toBe('auth-failed');
    expect(proxy.stats.connections).toBe(3);
    expect(fs.readFileSync(img).equals(Buffer.alloc(SECTORS * 512))).toBe(true);
  });
});
