/**
 * Hostile input on the real daemon's nbd.sock: garbage instead of a handshake, bad magic
 * in options and requests, a huge option length, a huge WRITE length, unknown client flags,
 * and clients that vanish mid-handshake or mid-WRITE payload. Each ends only its own
 * connection: the daemon keeps its pid, `dmkit ls` answers, every connection's open count
 * is released, and the device's bytes are what they were.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import type { ControlClient } from '../../src/daemon/client.ts';
import type { DeviceSummary } from '../../src/daemon/protocol.ts';
import { cleanup, client, daemonPid, ok as cli, sandbox, type Sandbox } from '../helpers/daemon.ts';
import { devUri, nbdSock } from '../helpers/daemon-nbd.ts';
import { CMD, OPT, RawNbd } from '../helpers/nbd-raw-client.ts';
import { ok, requireTools, sha256, writeRandomImage } from '../helpers/nbd-tools.ts';

const SIZE = 4 * 1024 * 1024;
let sb: Sandbox;
let cl: ControlClient;
let pid: number;
let img: string;
let digest: string;

async function openCount(): Promise<number> {
  return (await cl.request<DeviceSummary>('info', { name: 'data' })).openCount;
}

/** after a hostile connection: the daemon serves on and nothing changed */
async function expectUnharmed(): Promise<void> {
  expect(daemonPid(sb)).toBe(pid);
  expect(await cli(sb, ['ls'])).toMatch(/^data\t\(253:0\)\n$/);
  for (let i = 0; i < 200 && (await openCount()) !== 0; i++) await new Promise((r) => setTimeout(r, 25));
  expect(await openCount()).toBe(0);
  const out = path.join(sb.dir, 'check.img');
  fs.rmSync(out, { force: true });
  await ok('nbdcopy', [devUri(sb, 'data'), out]);
  expect(sha256(fs.readFileSync(out))).toBe(digest);
  expect(sha256(fs.readFileSync(img))).toBe(digest);
}

beforeAll(async () => {
  requireTools(['nbdcopy']);
  sb = sandbox();
  img = path.join(sb.dir, 'data.img');
  digest = sha256(writeRandomImage(img, SIZE));
  await cli(sb, ['daemon']);
  await cli(sb, ['create', 'data', '--table', `0 ${SIZE / 512} linear ${img} 0`]);
  cl = await client(sb);
  pid = daemonPid(sb);
});

afterAll(async () => {
  cl?.close();
  if (sb) await cleanup(sb);
});

describe('hostile input on the daemon\'s nbd.sock', { timeout: 60_000 }, () => {
  test('garbage instead of a handshake, unknown client flags', async () => {
    const a = await RawNbd.connect(nbdSock(sb));
    a.write(randomBytes(4096));
    await a.closed();
    const b = await RawNbd.connect(nbdSock(sb));
    await b.greet(0xfffffff0);
    await b.closed();
    await expectUnharmed();
  });

  test('bad option magic, and a 4 GiB option length', async () => {
    const a = await RawNbd.connect(nbdSock(sb));
    await a.greet();
    a.write(Buffer.concat([RawNbd.optionHeader(OPT.go, 8, 0x0123456789abcdefn), Buffer.alloc(8)]));
    await a.closed();
    const b = await RawNbd.connect(nbdSock(sb));
    await b.greet();
    b.write(Buffer.concat([RawNbd.optionHeader(OPT.go, 0xffffffff), randomBytes(64 * 1024)]));
    await b.closed();
    await expectUnharmed();
  });

  test('bad request magic, and a WRITE claiming 4 GiB, after GO', async () => {
    const a = await RawNbd.connect(nbdSock(sb));
    await a.open('data', { sr: true });
    const bad = RawNbd.request(CMD.write, 0, 1n, 0, 4096);
    bad.writeUInt32BE(0xdeadbeef, 0);
    a.write(Buffer.concat([bad, randomBytes(4096)]));
    await a.closed();
    const b = await RawNbd.connect(nbdSock(sb));
    await b.open('data');
    b.write(Buffer.concat([RawNbd.request(CMD.write, 0, 2n, 0, 0xffffffff), randomBytes(256 * 1024)]));
    await b.closed();
    await expectUnharmed();
  });

  test('abrupt closes: mid-handshake, mid-option, mid-WRITE payload, with reads in flight', async () => {
    const a = await RawNbd.connect(nbdSock(sb));
    await a.greet();
    a.write(RawNbd.optionHeader(OPT.go, 100).subarray(0, 11));
    a.destroy();

    const b = await RawNbd.connect(nbdSock(sb));
    await b.open('data', { sr: true });
    // a complete header and half of its payload, then gone: the WRITE must not happen
    b.write(Buffer.concat([RawNbd.request(CMD.write, 0, 3n, 65536, 65536), randomBytes(32768)]));
    await new Promise((r) => setTimeout(r, 50));
    b.destroy();

    const c = await RawNbd.connect(nbdSock(sb));
    await c.open('data', { sr: true });
    for (let i = 0; i < 64; i++) c.send(CMD.read, { offset: (i * 65536) % SIZE, length: 65536 });
    c.write(RawNbd.request(CMD.write, 0, 999n, 0, 512).subarray(0, 13));
    c.destroy();
    await expectUnharmed();
  });
});
