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
import { afterAll, describe, expect, it } from 'vitest';
import { dmkit, ok } from '../helpers/daemon.ts';
import { FaultProxy } from '../support/fault-proxy.ts';
import { BYTES, REGION_BYTES, closeAll, newSecret, newSite, pair, proxies, put, sameAs, sleep, splitBrain, until } from './failover-sites.ts';

afterAll(closeAll);

describe('roles over tcp', () => {
  it('failover to B after A dies with unshipped writes; A is demoted and resynced from B (the union only); failback copies nothing', async () => {
    let proxy!: FaultProxy;
    // P1: the whole device at A, shipped to B (a new second site: secondary before anything is written)
    const { a, b, ref } = await pair('a', async (port) => {
      proxy = await FaultProxy.start({ target: { host: '127.0.0.1', port } });
      proxies.push(proxy);
      return proxy.address;
    });
    expect((await b.group()).role).toBe('secondary');
    const w = await dmkit(b.d.sb, ['io', 'write', 'vol', '0', a.img]);
    expect(w.code).not.toBe(0);
    expect(w.stderr).toMatch(/EROFS|secondary/);
    await until('A to note that B holds its generation', () => a.group(), (g) => g.sites[1]!.lag.ios === 0);
    const genA = (await a.group()).generation;
    await until('B to take A\'s generation', () => b.group(), (g) => g.generation === genA && g.consistent).catch((e: Error) => {
      throw new Error(`${e.message}\nB log: ${b.d.logTail()}\nA log: ${a.d.logTail()}`);
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
    // with its backlog (its 3 writes) it shows its slink down (D), consistently everywhere
    const refused = await until('A to be refused by B', () => a.site(1), (s) => s.link?.refusal === 'peer-primary' && s.stateChar === 'D');
    expect([refused.state, refused.link!.connection]).toEqual(['down', 'down']);
    expect(refused.lag.ios).toBeGreaterThan(0);
    expect(await ok(a.d.sb, ['status', 'repl'])).toMatch(/ 1:D,[1-9]\d*,/);
    expect(a.image().equals(ref)).toBe(false);

    // A is demoted: B resyncs the union of {1, 5, 40} (A) and {5, 20, 21} (B): 5 regions
    await ok(a.d.sb, ['demote', 'repl']);
    const demoted = await a.site(1);
    expect([demoted.stateChar, demoted.link!.refusal, demoted.link!.lastError, demoted.lastError]).toEqual(['R', null, null, null]);
    await sameAs(a, ref, 'A to equal B after the resync').catch(async (e: Error) => {
      throw new Error(`${e.message}\nB: ${JSON.stringify(await b.group())}\nA: ${JSON.stringify(await a.group())}\nA log: ${a.d.logTail()}`);
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
    // nothing left from A's refused era: its promotion did not find the link down and mark every region dirty
    expect(a.d.log()).not.toMatch(/data flush failed/);
    expect(a.image().equals(ref)).toBe(true);
  }, 180_000);

  it('split brain: detected on both sides from the generation ids, nothing copied, until one side is demoted with --discard-my-data', async () => {
    const { a, b, ref } = await pair('a');
    await until('B to be consistent', () => b.group(), (x) => x.consistent && x.role === 'secondary');

    // A writes while its slink is suspended (a new generation), B is promoted (--force: A is
    // connected) and written; at reconnect both sides say split-brain; neither image changes
    await splitBrain(a, b, ref);

    // the operator discards A's changes: B resyncs A's {7, 8} and its own {8, 50}
    await ok(a.d.sb, ['demote', 'repl', '--discard-my-data']);
    await sameAs(a, ref, 'A to equal B');
    const bs = await until('B to ship in order', () => b.site(1), (s) => s.mode === 'in-order');
    expect(bs.resyncedBytes).toBe(3 * REGION_BYTES);
    await until('the split brain to be cleared on both sides', async () => [(await a.group()).splitBrain, (await b.group()).splitBrain], (v) => v.every((x) => x === null));
  }, 180_000);

  it('unplanned failover with three sites: a third site that got more of the old primary than the new one is resynced whole (checksum) and equals it', async () => {
    const secret = newSecret();
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
    const secret = newSecret();
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
