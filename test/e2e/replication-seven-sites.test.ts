/**
 * One group of two devices replicated to seven remote sites at once, through every
 * transport and with mixed policies, by a real daemon:
 *
 *   slink 1  tcp   sync               → receiving daemon X (through its own fault proxy)
 *   slink 2  tcp   async              → receiving daemon X
 *   slink 3  tcp   async  ios=64      → receiving daemon Y   ← partitioned mid-write
 *   slink 4  tcp   async  compress=lz4 tls=on → receiving daemon Y
 *   slink 5  nbd   sync               → nbdkit (file plugin)
 *   slink 6  nbd   async              → nbdkit (file plugin)
 *   slink 7  blockdev async           → an image file (a copy on another disk)
 *
 * Each slink has its own dirty log per device. While slink 3's link is partitioned, the
 * group keeps writing: the other six catch up and equal the source, slink 3 shows its own
 * lag and state; after healing it catches up too, without resyncing (its entries were in
 * the ring). Every site's images equal the source's at the end.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanup, ok, sandbox, type Sandbox } from '../helpers/daemon.ts';
import { devUri } from '../helpers/daemon-nbd.ts';
import { ok as tool, requireTools, writeRandomImage } from '../helpers/nbd-tools.ts';
import { startNbdkit, type Nbdkit } from '../helpers/nbdkit.ts';
import { SiteDaemon } from '../helpers/site-daemon.ts';
import { FaultProxy } from '../support/fault-proxy.ts';

const SECTORS = 8192; // 4 MiB per device
const BYTES = SECTORS * 512;
const DEVS = 2;
const SITES = 7;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface SiteJson {
  slink: number; type: string; stateChar: string; state: string;
  lag: { ios: number; bytes: number };
  resyncedBytes: number;
  shipped: { ios: number; bytes: number };
  link: { connection?: string; state?: string } | null;
}

let a: Sandbox;
let x: SiteDaemon;
let y: SiteDaemon;
let kit: Nbdkit;
const proxies: FaultProxy[] = [];
/** the image of device d at slink s */
const images: string[][] = [];

const file = (name: string): string => path.join(a.dir, name);
function blank(p: string, bytes = BYTES): string {
  fs.writeFileSync(p, '');
  fs.truncateSync(p, bytes);
  return p;
}

async function sites(): Promise<SiteJson[]> {
  const out = JSON.parse(await ok(a, ['status', '--json', 'repl'])) as Array<{ lines: Array<{ detail: { sites: SiteJson[] } }> }>;
  return out[0]!.lines[0]!.detail.sites.filter((s) => s.slink > 0);
}

async function waitSites(cond: (s: SiteJson) => boolean, which: number[], what: string, limitMs = 60_000): Promise<SiteJson[]> {
  for (const end = Date.now() + limitMs; ; await sleep(50)) {
    const all = await sites();
    if (which.every((n) => cond(all.find((s) => s.slink === n)!))) return all;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(all.map((s) => [s.slink, s.stateChar, s.lag.ios, s.link]))}`);
  }
}

const caughtUp = (s: SiteJson): boolean => (s.stateChar === 'A' || s.stateChar === 'S') && s.lag.ios === 0;

beforeAll(async () => {
  requireTools(['nbdkit', 'nbdcopy']);
  a = sandbox();
  x = await SiteDaemon.start();
  y = await SiteDaemon.start();
  const exports = path.join(a.dir, 'exports');
  fs.mkdirSync(exports);
  for (let s = 1; s <= SITES; s++) {
    images[s] = [];
    for (let d = 0; d < DEVS; d++) {
      const img = blank(s <= 4 ? path.join((s <= 2 ? x : y).sb.dir, `s${s}d${d}.img`) : s <= 6 ? path.join(exports, `s${s}d${d}.img`) : file(`s${s}d${d}.img`));
      images[s]![d] = img;
      if (s <= 4) await (s <= 2 ? x : y).request('create', { name: `s${s}d${d}`, table: `0 ${SECTORS} linear ${img} 0` });
    }
  }
  kit = await startNbdkit(path.join(a.dir, 'nbdkit.sock'), ['file', `dir=${exports}`]);
  for (let s = 1; s <= 4; s++) proxies[s] = await FaultProxy.start({ target: { host: '127.0.0.1', port: (s <= 2 ? x : y).port } });
}, 120_000);

afterAll(async () => {
  for (const p of proxies) await p?.close();
  if (a) await cleanup(a);
  await x?.close();
  await y?.close();
  await kit?.kill();
});

describe('seven remote sites, mixed transports and policies', () => {
  it('all seven catch up and equal the source; one partitioned site lags alone, then catches up without a resync', async () => {
    const tcp = (s: number, policy: string[], opts: string[] = []): string => {
      const site = s <= 2 ? x : y;
      const words = [String(s), ...policy, 'retest=1', 'io-timeout=2', `peer=${proxies[s]!.address}`, `secret=${site.secretFile}`, ...opts];
      return `tcp ${words.length} ${words.join(' ')}`;
    };
    const slinks = [
      'blockdev 1 0',
      tcp(1, ['sync']),
      tcp(2, ['async']),
      tcp(3, ['async', 'ios=64']),
      tcp(4, ['async'], ['compress=lz4', 'tls=on']),
      'nbd 3 5 sync retest=1',
      'nbd 3 6 async retest=1',
      'blockdev 3 7 async retest=1',
    ];
    await ok(a, ['create', 'repl', '--table', `0 1 replicator ringbuffer 4 ${blank(file('rlog'), 33 << 20)} 0 auto 65536 ${slinks.join(' ')}`]);
    const sock = path.join(a.dir, 'nbdkit.sock');
    for (let d = 0; d < DEVS; d++) {
      const tuples = [`0 1 ${blank(file(`local${d}.img`))} nolog 0`];
      for (let s = 1; s <= SITES; s++) {
        const dev = s <= 4 ? `s${s}d${d}` : s <= 6 ? `nbd+unix:///s${s}d${d}.img?socket=${sock}` : images[s]![d]!;
        tuples.push(`${s} 1 ${dev} core 2 64 nosync`);
      }
      await ok(a, ['create', `vol${d}`, '--table', `0 ${SECTORS} replicator-dev dm:repl ${d} ${tuples.join(' ')}`]);
    }
    const all = [1, 2, 3, 4, 5, 6, 7];
    await waitSites((s) => caughtUp(s), all, 'all seven connected and idle');
    const types = (await sites()).map((s) => s.type);
    expect(types).toEqual(['tcp', 'tcp', 'tcp', 'tcp', 'nbd', 'nbd', 'blockdev']);

    // first batch: everyone catches up and equals the source
    for (let d = 0; d < DEVS; d++) {
      writeRandomImage(file(`data${d}.img`), BYTES);
      await tool('nbdcopy', [file(`data${d}.img`), devUri(a, `vol${d}`)]);
    }
    await waitSites(caughtUp, all, 'first batch everywhere');
    const source = (): Buffer[] => Array.from({ length: DEVS }, (_, d) => fs.readFileSync(file(`local${d}.img`)));
    let src = source();
    for (const s of all) for (let d = 0; d < DEVS; d++) expect(fs.readFileSync(images[s]![d]!).equals(src[d]!), `site ${s} device ${d}`).toBe(true);

    // slink 3's link partitioned both ways while a second batch is written
    proxies[3]!.partition('both');
    for (let d = 0; d < DEVS; d++) {
      writeRandomImage(file(`half${d}.img`), BYTES / 2);
      await tool('nbdcopy', [file(`half${d}.img`), devUri(a, `vol${d}`)]);
    }
    const during = await waitSites(caughtUp, [1, 2, 4, 5, 6, 7], 'the six others caught up during the partition');
    const s3 = during.find((s) => s.slink === 3)!;
    expect(s3.lag.ios).toBeGreaterThan(0);
    expect(s3.lag.bytes).toBeGreaterThan(0);
    src = source();
    for (const s of [1, 2, 4, 5, 6, 7]) for (let d = 0; d < DEVS; d++) expect(fs.readFileSync(images[s]![d]!).equals(src[d]!), `site ${s} device ${d} during the partition`).toBe(true);
    expect(fs.readFileSync(images[3]![0]!).equals(src[0]!)).toBe(false);

    // healed: slink 3 catches up from the ring, no resync
    proxies[3]!.heal();
    const end = await waitSites(caughtUp, all, 'slink 3 caught up after the partition', 90_000);
    expect(end.find((s) => s.slink === 3)!.resyncedBytes).toBe(0);
    for (const s of all) for (let d = 0; d < DEVS; d++) expect(fs.readFileSync(images[s]![d]!).equals(src[d]!), `site ${s} device ${d} at the end`).toBe(true);
    const info = await ok(a, ['info', 'repl']);
    for (const s of all) expect(info).toMatch(new RegExp(`Slink ${s}: `));
  }, 240_000);
});
