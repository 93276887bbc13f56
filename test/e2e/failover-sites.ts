/**
 * Sites for the roles-over-tcp tests (replication-failover, replication-failback): a real
 * daemon per site listening for replication, the failover howto's stack (a replicator with a
 * tcp slink per other site, a replicator-dev `vol` over the site's image with a disk dirty
 * log per slink), and polling helpers (states are polled with a generous deadline, never
 * timed).
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'vitest';
import { dmkit, ok } from '../helpers/daemon.ts';
import type { FaultProxy } from '../support/fault-proxy.ts';
import { SiteDaemon, writeSecret } from '../helpers/site-daemon.ts';

export const SECTORS = 4096; // 2 MiB
export const BYTES = SECTORS * 512;
export const REGION = 64; // sectors: 32 KiB dirty-log regions
export const REGION_BYTES = REGION * 512;
export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export interface SiteJson {
  slink: number; state: string; stateChar: string; mode: string; resyncedBytes: number; errors: number; lastError: string | null;
  lag: { ios: number };
  transport: string | null;
  link: { connection: string; refusal: string | null; lastError: string | null } | null;
}
export interface GroupJson {
  role: string; generation: string; peers: Record<string, string>; history: string[]; consistent: boolean; splitBrain: string | null; sites: SiteJson[];
}

const daemons: SiteDaemon[] = [];
export const proxies: FaultProxy[] = [];
/** stop every proxy and daemon started (afterAll); DMKIT_TEST_LOGS=DIR keeps each daemon's log there */
export async function closeAll(): Promise<void> {
  const keep = process.env.DMKIT_TEST_LOGS;
  for (const p of proxies.splice(0)) await p.close();
  for (const [i, d] of daemons.splice(0).entries()) {
    if (keep) fs.writeFileSync(path.join(keep, `site-${i}.log`), d.log());
    await d.close();
  }
}

export function blank(dir: string, name: string, bytes: number): string {
  const f = path.join(dir, name);
  fs.writeFileSync(f, '');
  fs.truncateSync(f, bytes);
  return f;
}

/** one site: its daemon, its image, and the stack (repl + vol) with a tcp slink per peer */
export class Site {
  readonly d: SiteDaemon;
  readonly img: string;
  constructor(d: SiteDaemon) {
    this.d = d;
    this.img = blank(d.sb.dir, 'local.img', BYTES);
  }

  /**
   * `peers`: slink number → address (HOST:PORT). `standby`: the group is demoted before its
   * device exists (the howto's order: a secondary connects to nobody, so the other sites'
   * devices need not exist yet).
   */
  async stack(peers: Array<[number, string]>, secret: string, standby = false): Promise<void> {
    const dir = this.d.sb.dir;
    const slinks = peers.map(([n, addr]) => {
      const w = [String(n), 'async', 'retest=1', 'io-timeout=30', `peer=${addr}`, `secret=${secret}`];
      return `tcp ${w.length} ${w.join(' ')}`;
    }).join(' ');
    await ok(this.d.sb, ['create', 'repl', '--table', `0 1 replicator ringbuffer 4 ${blank(dir, 'rlog', 8 << 20)} 0 auto 16384 blockdev 1 0 ${slinks}`]);
    if (standby) await ok(this.d.sb, ['demote', 'repl']);
    const tuples = peers.map(([n]) => `${n} 1 vol disk 3 ${blank(dir, `vol.${n}.log`, 1 << 20)} ${REGION} nosync`).join(' ');
    await ok(this.d.sb, ['create', 'vol', '--table', `0 ${SECTORS} replicator-dev dm:repl 0 0 1 ${this.img} nolog 0 ${tuples}`]);
  }

  async group(): Promise<GroupJson> {
    const out = JSON.parse(await ok(this.d.sb, ['status', '--json', 'repl'])) as Array<{ lines: Array<{ detail: GroupJson }> }>;
    return out[0]!.lines[0]!.detail;
  }

  async site(slink: number): Promise<SiteJson> {
    return (await this.group()).sites.find((s) => s.slink === slink)!;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    const f = path.join(this.d.sb.dir, `w-${crypto.randomBytes(4).toString('hex')}`);
    fs.writeFileSync(f, data);
    await ok(this.d.sb, ['io', 'write', 'vol', String(offset), f]);
    fs.rmSync(f);
  }

  image(): Buffer {
    return fs.readFileSync(this.img);
  }
}

export async function until<T>(what: string, probe: () => Promise<T>, cond: (v: T) => boolean, limitMs = 30_000): Promise<T> {
  for (const end = Date.now() + limitMs; ; await sleep(100)) {
    const v = await probe();
    if (cond(v)) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(v)}`);
  }
}

/** wait until `site`'s image equals `ref` */
export async function sameAs(site: Site, ref: Buffer, what: string): Promise<void> {
  await until(what, async () => site.image().equals(ref), (v) => v);
}

/** write `bytes` at `offset` into the reference too */
export async function put(site: Site, ref: Buffer | null, offset: number, bytes: number): Promise<Buffer> {
  const data = crypto.randomBytes(bytes);
  await site.write(offset, data);
  if (ref) data.copy(ref, offset);
  return data;
}

export async function newSite(secret: string): Promise<Site> {
  const d = await SiteDaemon.start({ secretFile: secret });
  daemons.push(d);
  return new Site(d);
}

/** a new shared secret file (mode 0600) in a directory of its own */
export function newSecret(): string {
  return writeSecret(fs.mkdtempSync(path.join(process.env.TMPDIR ?? '/tmp', 'dmkit-keys-')));
}

/**
 * Two sites with the howto's stack, `primary` shipping to the other (a standby made
 * secondary before its device exists), both holding `ref` (random, written whole at the
 * primary). `through`: the primary reaches the other site at this address instead (a proxy
 * started once the other site listens).
 */
export async function pair(primary: 'a' | 'b', through?: (port: number) => Promise<string>): Promise<{ a: Site; b: Site; ref: Buffer; secret: string }> {
  const secret = newSecret();
  const a = await newSite(secret);
  const b = await newSite(secret);
  const [p, s] = primary === 'a' ? [a, b] : [b, a];
  await s.stack([[1, p.d.address]], secret, true);
  await p.stack([[1, through ? await through(s.d.port) : s.d.address]], secret);
  const ref = crypto.randomBytes(BYTES);
  await p.write(0, ref);
  await sameAs(s, ref, 'the secondary to hold the primary\'s data');
  return { a, b, ref, secret };
}

/**
 * A split brain as the howto makes one: A (primary, shipping to B in order) writes regions
 * 7 and 8 while its slink is suspended (a new generation), B is promoted (refused while A
 * is connected and primary, so with --force) and writes 8 and 50 (into `ref`); A's slink
 * resumes. Both sides say split-brain and nothing is copied either way. Returns A's image
 * as it should be.
 */
export async function splitBrain(a: Site, b: Site, ref: Buffer): Promise<Buffer> {
  const gen0 = (await a.group()).generation;
  await ok(a.d.sb, ['message', 'repl', '0', 'slink', 'suspend', '1']);
  const aRef = Buffer.from(ref);
  for (const r of [7, 8]) await put(a, aRef, r * REGION_BYTES, REGION_BYTES);
  expect((await a.group()).generation).not.toBe(gen0);

  const refused = await dmkit(b.d.sb, ['promote', 'repl']);
  expect(refused.code).not.toBe(0);
  expect(refused.stderr).toMatch(/EBUSY|connected and primary/);
  await ok(b.d.sb, ['promote', 'repl', '--force']);
  for (const r of [8, 50]) await put(b, ref, r * REGION_BYTES, REGION_BYTES);

  await ok(a.d.sb, ['message', 'repl', '0', 'slink', 'resume', '1']);
  await until('A to see the split brain', () => a.group(), (x) => x.splitBrain !== null);
  await until('B to see the split brain', () => b.group(), (x) => x.splitBrain !== null);
  await sleep(1500);
  expect(a.image().equals(aRef)).toBe(true);
  expect(b.image().equals(ref)).toBe(true);
  expect((await a.site(1)).resyncedBytes).toBe(0);
  expect((await b.site(1)).resyncedBytes).toBe(0);
  return aRef;
}

/**
 * A (primary: `repl` and `vol` with a tcp slink 1 to B) and B (a plain receiving device
 * `vol`, linear over `bImg`), with `ref` written at A and held by B. Both daemons are closed
 * by closeAll.
 */
export async function primaryAndReceiver(): Promise<{ a: Site; b: SiteDaemon; bImg: string; ref: Buffer }> {
  const secret = newSecret();
  const b = await SiteDaemon.start({ secretFile: secret });
  daemons.push(b);
  const bImg = blank(b.sb.dir, 'site.img', BYTES);
  await ok(b.sb, ['create', 'vol', '--table', `0 ${SECTORS} linear ${bImg} 0`]);
  const a = await newSite(secret);
  await a.stack([[1, b.address]], secret);
  const ref = crypto.randomBytes(BYTES);
  await a.write(0, ref);
  await until('B to hold A\'s data', async () => fs.readFileSync(bImg).equals(ref), (v) => v);
  return { a, b, bImg, ref };
}
