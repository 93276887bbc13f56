/**
 * Verify and checksum resync over the `tcp` slink between two real daemons: site A (the
 * sender: replicator and replicator-dev over a local image) and site B (a second daemon
 * receiving into a linear device over its own image). Blocks of B's image are damaged
 * behind dmkit's back (the file written directly); then
 *
 *  - `verify 1` finds exactly the damaged regions, with digests computed at B (the link's
 *    `digests` counter moves), and marks them out of sync;
 *  - `resync 1 checksum` sends exactly the damaged 4 KiB blocks (resyncedBytes) after
 *    comparing exactly those regions (comparedBytes), the connection never re-made
 *    (reconnects unchanged), and B's image ends equal to A's (the reference);
 *  - a verify under a continuous writer finds nothing: writes in flight are no false positives.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { cleanup, client, ok, sandbox, type Sandbox } from '../helpers/daemon.ts';
import { SiteDaemon } from '../helpers/site-daemon.ts';

const SECTORS = 16384; // 8 MiB
const BYTES = SECTORS * 512;
const REGION = 256; // 128 KiB
const NR = SECTORS / REGION; // 64
const BLOCK = 4096;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface SiteJson {
  slink: number; stateChar: string; mode: string;
  lag: { ios: number };
  resyncedBytes: number; comparedBytes: number;
  resync: unknown;
  lastVerify: { differing: number; regions: number } | null;
  link: { connection: string; reconnects: number; digests: number } | null;
}

let a: Sandbox;
let b: SiteDaemon;
let localImg: string;
let remoteImg: string;

beforeAll(async () => {
  b = await SiteDaemon.start();
});
afterAll(async () => {
  await b?.close();
});
afterEach(async () => {
  if (a) await cleanup(a);
});

async function site1(): Promise<SiteJson> {
  const out = JSON.parse(await ok(a, ['status', '--json', 'repl'])) as Array<{ lines: Array<{ detail: { sites: SiteJson[] } }> }>;
  return out[0]!.lines[0]!.detail.sites.find((s) => s.slink === 1)!;
}

async function waitSite(cond: (s: SiteJson) => boolean, what: string, limitMs = 60_000): Promise<SiteJson> {
  for (const end = Date.now() + limitMs; ; await sleep(100)) {
    const s = await site1();
    if (cond(s)) return s;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(s)}`);
  }
}

/** both images the same random bytes (a seeded site), B's device `name` receiving, A's repl + vol in sync (nosync dirty log) */
async function setup(name: string): Promise<void> {
  a = sandbox();
  localImg = path.join(a.dir, 'local.img');
  remoteImg = path.join(b.sb.dir, `${name}.img`);
  const seed = crypto.randomBytes(BYTES);
  fs.writeFileSync(localImg, seed);
  fs.writeFileSync(remoteImg, seed);
  await b.request('create', { name, table: `0 ${SECTORS} linear ${remoteImg} 0` });
  const rlog = path.join(a.dir, 'rlog');
  fs.writeFileSync(rlog, '');
  fs.truncateSync(rlog, 8 << 20);
  const words = ['1', 'async', 'retest=1', `peer=${b.address}`, `secret=${b.secretFile}`];
  await ok(a, ['create', 'repl', '--table', `0 1 replicator ringbuffer 4 ${rlog} 0 auto 16384 blockdev 1 0 tcp ${words.length} ${words.join(' ')}`]);
  await ok(a, ['create', 'vol', '--table', `0 ${SECTORS} replicator-dev dm:repl 0 0 1 ${localImg} nolog 0 1 1 ${name} core 2 ${REGION} nosync`]);
  await waitSite((s) => s.link?.connection === 'connected', 'connected');
}

async function write(offset: number, data: Buffer): Promise<void> {
  const cl = await client(a);
  try {
    await cl.request('io', { op: 'write', name: 'vol', offset, data: data.toString('base64') });
  } finally {
    cl.close();
  }
}

/** the first verify of a fresh replicator (lastVerify was null) */
async function verify(): Promise<{ differing: number; regions: number }> {
  expect((await site1()).lastVerify).toBeNull();
  expect((await ok(a, ['message', 'repl', '0', 'verify', '1'])).trim()).toBe('verify started');
  return (await waitSite((x) => x.lastVerify !== null, 'verify done')).lastVerify!;
}

function expectImagesEqual(what: string): void {
  const mine = fs.readFileSync(localImg);
  const theirs = fs.readFileSync(remoteImg);
  const bad: number[] = [];
  for (let o = 0; o < BYTES; o += BLOCK) if (!mine.subarray(o, o + BLOCK).equals(theirs.subarray(o, o + BLOCK))) bad.push(o / BLOCK);
  expect(bad, `${what}: blocks that differ`).toEqual([]);
}

describe('verify and checksum resync over tcp (two daemons)', { timeout: 180_000 }, () => {
  it('verify finds exactly the damaged regions with digests from B; resync checksum sends exactly the damaged blocks, no reconnect', async () => {
    await setup('ck1');
    await write(5 * BLOCK, crypto.randomBytes(64 * 1024)); // some shipping first
    await waitSite((s) => s.stateChar === 'A' && s.lag.ios === 0, 'caught up');
    // damage B's image: 5 blocks in regions 2, 9 and 63
    const at = [2 * REGION * 512 + 7 * BLOCK + 5, 9 * REGION * 512, 9 * REGION * 512 + BLOCK, 9 * REGION * 512 + 20 * BLOCK + 4095, BYTES - 1];
    const fd = fs.openSync(remoteImg, 'r+');
    for (const off of at) {
      const byte = Buffer.alloc(1);
      fs.readSync(fd, byte, 0, 1, off);
      byte[0] ^= 0x3c;
      fs.writeSync(fd, byte, 0, 1, off);
    }
    fs.closeSync(fd);
    const s0 = await site1();
    const v = await verify();
    expect(v).toEqual({ differing: 3, regions: NR });
    const s1 = await site1();
    expect(s1.comparedBytes - s0.comparedBytes).toBe(BYTES);
    expect(s1.link!.digests).toBeGreaterThan(s0.link!.digests); // computed at B, not read back and hashed here

    await ok(a, ['message', 'repl', '0', 'resync', '1', 'checksum']);
    const s2 = await waitSite((s) => s.mode === 'in-order' && s.resync === null && s.comparedBytes > s1.comparedBytes && s.lag.ios === 0, 'checksum resync done');
    expect(s2.resyncedBytes - s1.resyncedBytes).toBe(at.length * BLOCK);
    expect(s2.comparedBytes - s1.comparedBytes).toBe(3 * REGION * 512);
    expect(s2.link!.reconnects).toBe(s0.link!.reconnects);
    expect(s2.link!.connection).toBe('connected');
    expectImagesEqual('after checksum resync');
  });

  it('a verify under a continuous writer finds no difference (0 false positives); the images end equal', async () => {
    await setup('ck2');
    let stop = false;
    let writes = 0;
    const writer = (async () => {
      while (!stop) {
        await write(crypto.randomInt(SECTORS / 8) * BLOCK, crypto.randomBytes(BLOCK));
        writes++;
      }
    })();
    try {
      while (writes < 5) await sleep(50);
      expect(await verify()).toEqual({ differing: 0, regions: NR });
    } finally {
      stop = true;
      await writer;
    }
    expect(writes).toBeGreaterThan(5);
    await waitSite((s) => s.stateChar === 'A' && s.lag.ios === 0, 'caught up');
    expectImagesEqual('after verify under writes');
  });
});
