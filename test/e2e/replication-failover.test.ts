/**
 * Roles over tcp between real daemons (docs/howto/failover.md): every site runs the same
 * stack (a replicator with a tcp slink to each other site, a replicator-dev `vol` over its
 * own image with a disk dirty log) and listens for replication; one group is primary.
 *
 *  - failover and failback: A has written data its site B never got (held in a partitioned
 *    link) when it is SIGKILLed; B is promoted and written; A comes back primary and is
 *    refused (peer-primary) until it is demoted; then B resyncs exactly the union of the
 *    regions A wrote unshipped and B wrote since promotion, and A equals B byte for byte
 *    (an independent reference). Failback moves the role home with no resync at all.
 *  - split brain: A writes while its slink is suspended (a new generation), B is promoted
 *    (refused while A is connected and primary, unless --force) and written; at reconnect
 *    both sides say split-brain, nothing is copied either way, until A is demoted with
 *    --discard-my-data: then a partial resync makes A equal B.
 *  - follow the sun: three sites, the primary role going A → B → C → A with writes in each
 *    era; every move is demote → promote, and no byte is resynced anywhere.
 *  - an unplanned failover with three sites: C got writes of A that B never got when A is
 *    SIGKILLed; B is promoted and written; C, which only received A's generation, is
 *    resynced whole by checksum and ends equal to B (without that, a partial resync would
 *    leave A's extra writes at C).
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { dmkit, ok } from '../helpers/daemon.ts';
import { FaultProxy } from '../support/fault-proxy.ts';
import { SiteDaemon, writeSecret } from '../helpers/site-daemon.ts';

const SECTORS = 4096; // 2 MiB
const BYTES = SECTORS * 512;
const REGION = 64; // sectors: 32 KiB dirty-log regions
const REGION_BYTES = REGION * 512;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface SiteJson {
  slink: number; stateChar: string; mode: string; resyncedBytes: number; lastError: string | null;
  lag: { ios: number };
  link: { connection: string; refusal: string | null } | null;
}
interface GroupJson { role: string; generation: string; consistent: boolean; splitBrain: string | null; sites: SiteJson[] }

const daemons: SiteDaemon[] = [];
const proxies: FaultProxy[] = [];
afterAll(async () => {
  for (const p of proxies) await p.close();
  for (const d of daemons) await d.close();
});

function blank(dir: string, name: string, bytes: number): string {
  const f = path.join(dir, name);
  fs.writeFileSync(f, '');
  fs.truncateSync(f, bytes);
  return f;
}

/** one site: its daemon, its image, and the stack (repl + vol) with a tcp slink per peer */
class Site {
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

async function until<T>(what: string, probe: () => Promise<T>, cond: (v: T) => boolean, limitMs = 30_000): Promise<T> {
  for (const end = Date.now() + limitMs; ; await sleep(100)) {
    const v = await probe();
    if (cond(v)) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(v)}`);
  }
}

/** wait until `site`'s image equals `ref` */
async function sameAs(site: Site, ref: Buffer, what: string): Promise<void> {
  await until(what, async () => site.image().equals(ref), (v) => v);
}

/** write `bytes` at `offset` into the reference too */
async function put(site: Site, ref: Buffer | null, offset: number, bytes: number): Promise<Buffer> {
  const data = crypto.randomBytes(bytes);
  await site.write(offset, data);
  if (ref) data.copy(ref, offset);
  return data;
}

async function newSite(secret: string): Promise<Site> {
  const d = await SiteDaemon.start({ secretFile: secret });
  daemons.push(d);
  return new Site(d);
}

describe('roles over tcp', () => {
  it('failover to B after A dies with unshipped writes; A is demoted and resynced from B (the union only); failback copies nothing', async () => {
    const secretDir = fs.mkdtempSync(path.join(process.env.TMPDIR ?? '/tmp', 'dmkit-keys-'));
    const secret = writeSecret(secretDir);
    const a = await newSite(secret);
    const b = await newSite(secret);
    const proxy = await FaultProxy.start({ target: { host: '127.0.0.1', port: b.d.port } });
    proxies.push(proxy);
    await b.stack([[1, a.d.address]], secret, true); // a new second site: secondary before anything is written
    await a.stack([[1, proxy.address]], secret);
    expect((await b.group()).role).toBe('secondary');

    // P1: the whole device at A, shipped to B
    const ref = crypto.randomBytes(BYTES);
    await a.write(0, ref);
    await sameAs(b, ref, 'B to hold P1');
    const w = await dmkit(b.d.sb, ['io', 'write', 'vol', '0', a.img]);
    expect(w.code).not.toBe(0);
    expect(w.stderr).toMatch(/EROFS|secondary/);
    await until('A to note that B holds its generation', () => a.group(), (g) => g.sites[1]!.lag.ios === 0);
    const genA = (await a.group()).generation;
    await until('B to take A\'s generation', () => b.group(), (g) => g.generation === genA && g.consistent).catch((e: Error) => {
      throw new Error(`${e.message}\nB log: ${fs.readFileSync(path.join(b.d.sb.dir, 'daemon.log'), 'utf8').slice(-3000)}\nA log: ${fs.readFileSync(path.join(a.d.sb.dir, 'daemon.log'), 'utf8').slice(-3000)}`);
    });
    await sleep(1000); // a checkpoint records that B has it all

    // A writes 3 regions that never reach B (the link holds them), then dies
    proxy.partition('up');
    const aOnly = [1, 5, 40].map((r) => r * REGION_BYTES);
    for (const off of aOnly) await put(a, null, off, REGION_BYTES);
    await a.d.kill();
    proxy.reset();
    proxy.heal();
    await sleep(300);
    expect(b.image().equals(ref)).toBe(true); // nothing of A's last writes arrived

    // failover: B is promoted and written (one region A also wrote, two others)
    await ok(b.d.sb, ['promote', 'repl']);
    const g = await b.group();
    expect(g.role).toBe('primary');
    for (const r of [5, 20, 21]) await put(b, ref, r * REGION_BYTES, REGION_BYTES);

    // A returns primary (its role file): B refuses it, A refuses B; nothing is copied
    await a.d.restart();
    expect((await a.group()).role).toBe('primary');
    await until('A to be refused by B', () => a.site(1), (s) => s.link?.refusal === 'peer-primary');
    expect(a.image().equals(ref)).toBe(false);

    // A is demoted: B resyncs the union of {1, 5, 40} (A) and {5, 20, 21} (B): 5 regions
    await ok(a.d.sb, ['demote', 'repl']);
    await sameAs(a, ref, 'A to equal B after the resync').catch(async (e: Error) => {
      throw new Error(`${e.message}\nB: ${JSON.stringify(await b.group())}\nA: ${JSON.stringify(await a.group())}\nA log: ${fs.readFileSync(path.join(a.d.sb.dir, "daemon.log"), "utf8").slice(-3000)}`);
    });
    const bs = await until('B to ship to A in order', () => b.site(1), (s) => s.mode === 'in-order' && s.stateChar === 'A');
    expect(bs.resyncedBytes).toBe(5 * REGION_BYTES);
    expect(b.image().equals(ref)).toBe(true);
    await until('A to be consistent', () => a.group(), (x) => x.consistent);
    const wa = await dmkit(a.d.sb, ['io', 'write', 'vol', '0', a.img]);
    expect(wa.stderr).toMatch(/EROFS|secondary/);

    // B keeps writing in order to A
    await put(b, ref, 30 * REGION_BYTES, 2 * REGION_BYTES);
    await sameAs(a, ref, 'A to get B\'s later writes');

    // failback: B demoted, A promoted; A's writes reach B; no resync either way
    await until('B to have shipped everything', () => b.site(1), (s) => s.lag.ios === 0);
    await ok(b.d.sb, ['demote', 'repl']);
    await ok(a.d.sb, ['promote', 'repl']);
    for (const r of [2, 3, 60]) await put(a, ref, r * REGION_BYTES, REGION_BYTES);
    await sameAs(b, ref, 'B to get A\'s writes after failback');
    const as = await until('A to ship in order', () => a.site(1), (s) => s.mode === 'in-order' && s.lag.ios === 0);
    expect(as.resyncedBytes).toBe(0);
    expect(a.image().equals(ref)).toBe(true);
  }, 180_000);

  it('split brain: detected on both sides from the generation ids, nothing copied, until one side is demoted with --discard-my-data', async () => {
    const secretDir = fs.mkdtempSync(path.join(process.env.TMPDIR ?? '/tmp', 'dmkit-keys-'));
    const secret = writeSecret(secretDir);
    const a = await newSite(secret);
    const b = await newSite(secret);
    await b.stack([[1, a.d.address]], secret, true);
    await a.stack([[1, b.d.address]], secret);
    const ref = crypto.randomBytes(BYTES);
    await a.write(0, ref);
    await sameAs(b, ref, 'B to hold P1');
    await until('B to be consistent', () => b.group(), (x) => x.consistent && x.role === 'secondary');

    // A writes while its slink is suspended: A starts a new generation
    const gen0 = (await a.group()).generation;
    await ok(a.d.sb, ['message', 'repl', '0', 'slink', 'suspend', '1']);
    const aRef = Buffer.from(ref);
    for (const r of [7, 8]) await put(a, aRef, r * REGION_BYTES, REGION_BYTES);
    expect((await a.group()).generation).not.toBe(gen0);

    // B cannot be promoted while A is connected and primary, unless forced
    const refused = await dmkit(b.d.sb, ['promote', 'repl']);
    expect(refused.code).not.toBe(0);
    expect(refused.stderr).toMatch(/EBUSY|connected and primary/);
    await ok(b.d.sb, ['promote', 'repl', '--force']);
    for (const r of [8, 50]) await put(b, ref, r * REGION_BYTES, REGION_BYTES);

    // A's slink comes back: both sides say split-brain; neither image changes
    await ok(a.d.sb, ['message', 'repl', '0', 'slink', 'resume', '1']);
    await until('A to see the split brain', () => a.group(), (x) => x.splitBrain !== null);
    await until('B to see the split brain', () => b.group(), (x) => x.splitBrain !== null);
    await sleep(1500);
    expect(a.image().equals(aRef)).toBe(true);
    expect(b.image().equals(ref)).toBe(true);
    expect((await b.site(1)).resyncedBytes).toBe(0);

    // the operator discards A's changes: B resyncs A's {7, 8} and its own {8, 50}
    await ok(a.d.sb, ['demote', 'repl', '--discard-my-data']);
    await sameAs(a, ref, 'A to equal B');
    const bs = await until('B to ship in order', () => b.site(1), (s) => s.mode === 'in-order');
    expect(bs.resyncedBytes).toBe(3 * REGION_BYTES);
    await until('the split brain to be cleared on both sides', async () => [(await a.group()).splitBrain, (await b.group()).splitBrain], (v) => v.every((x) => x === null));
  }, 180_000);

  it('unplanned failover with three sites: a third site that got more of the old primary than the new one is resynced whole (checksum) and equals it', async () => {
    const secretDir = fs.mkdtempSync(path.join(process.env.TMPDIR ?? '/tmp', 'dmkit-keys-'));
    const secret = writeSecret(secretDir);
    const [a, b, c] = [await newSite(secret), await newSite(secret), await newSite(secret)];
    const sites = [a, b, c];
    for (const i of [1, 2, 0]) await sites[i]!.stack(sites.flatMap((o, j) => (j === i ? [] : [[j + 1, o.d.address] as [number, string]])), secret, i !== 0);
    const ref = Buffer.alloc(BYTES);
    for (let k = 0; k < 4; k++) await put(a, ref, k * 5 * REGION_BYTES, REGION_BYTES);
    for (const s of sites) await sameAs(s, ref, 'every site equals the reference');
    // A's slink to B is suspended: what A writes now reaches C only
    await ok(a.d.sb, ['message', 'repl', '0', 'slink', 'suspend', '2']);
    const onlyC = Buffer.from(ref);
    for (let k = 0; k < 3; k++) await put(a, onlyC, (40 + k * 3) * REGION_BYTES, REGION_BYTES);
    await sameAs(c, onlyC, 'C has the writes B never got');
    expect(b.image().equals(ref)).toBe(true);
    await a.d.kill(); // A dies as primary: nobody demotes it

    await ok(b.d.sb, ['promote', 'repl']);
    expect((await b.group()).role).toBe('primary');
    const afterB = Buffer.from(ref);
    await put(b, afterB, 20 * REGION_BYTES, REGION_BYTES);
    // C (slink 3 of B) is judged a full resync: only the differing blocks cross, and C ends equal to B
    await until('B to ship to C in order', () => b.site(3), (x) => x.mode === 'in-order' && x.lag.ios === 0 && x.resyncedBytes > 0, 60_000);
    await sameAs(c, afterB, 'C equals B');
    expect(b.image().equals(afterB)).toBe(true);
    const s3 = await b.site(3);
    expect(s3.resyncedBytes).toBeLessThan(BYTES); // a checksum resync: not the whole image
    expect(b.d.log()).toMatch(/slink 3: vol: the site asks for a full resync/);
  }, 240_000);

  it('follow the sun: the primary role goes A → B → C → A; every site equals the reference after each era and nothing is resynced', async () => {
    const secretDir = fs.mkdtempSync(path.join(process.env.TMPDIR ?? '/tmp', 'dmkit-keys-'));
    const secret = writeSecret(secretDir);
    const sites = [await newSite(secret), await newSite(secret), await newSite(secret)];
    // slink numbers: site i reaches site j as slink j+1 (1, 2, 3; never its own)
    for (const i of [1, 2, 0]) await sites[i]!.stack(sites.flatMap((o, j) => (j === i ? [] : [[j + 1, o.d.address] as [number, string]])), secret, i !== 0);
    const ref = Buffer.alloc(BYTES);
    const order = [0, 1, 2, 0];
    for (const [era, p] of order.entries()) {
      const primary = sites[p]!;
      if (era > 0) {
        const prev = sites[order[era - 1]!]!;
        for (const [j] of sites.entries()) {
          if (j !== order[era - 1]) await until(`site ${j} to be shipped to`, () => prev.site(j + 1), (s) => s.lag.ios === 0 && s.mode === 'in-order');
        }
        await ok(prev.d.sb, ['demote', 'repl']);
        await ok(primary.d.sb, ['promote', 'repl']);
      }
      for (let k = 0; k < 4; k++) await put(primary, ref, ((era * 13 + k * 7) % 64) * REGION_BYTES, REGION_BYTES);
      for (const s of sites) await sameAs(s, ref, `era ${era}: every site to equal the reference`);
    }
    for (const s of sites) {
      for (const x of (await s.group()).sites) if (x.slink > 0) expect(x.resyncedBytes).toBe(0);
    }
  }, 240_000);
});
