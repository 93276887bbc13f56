/**
 * Failback and what follows it, and how a slink's refusal and errors show, with real
 * daemons over tcp (docs/howto/failover.md, docs/targets/replicator.md "Status"):
 *
 *  - after a planned move (B primary, A a connected secondary: B demoted, A promoted), A
 *    records that B holds A's new generation (`peers`) and its slink never failed; so a
 *    write at A while B is away starts a new generation, and a later split brain (B
 *    promoted with --force and written) is detected on both sides; nothing is copied
 *    either way, and discarding A's changes makes A equal B.
 *  - the old primary returns with nothing to ship: both sides refuse each other and show
 *    the slink down (`D`) with the refusal in status, info and --json, steadily across
 *    retests; after its demote no refusal or error is left, and A ends equal to B.
 *  - a stopped receiver: the link's error names the slink and the site once; once
 *    connected again (by a retest), no error is shown as current, and A records B at the
 *    generation A started while B was away.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { ok } from '../helpers/daemon.ts';
import { REGION_BYTES, closeAll, pair, put, sameAs, sleep, splitBrain, until, type Site } from './failover-sites.ts';

afterAll(closeAll);

/** `dmkit status repl`'s state letter of slink `n` (`1:D,0,0` → D) */
async function letter(site: Site, n: number): Promise<string> {
  const line = await ok(site.d.sb, ['status', 'repl']);
  return new RegExp(`\\b${n}:([A-Z]),`).exec(line)?.[1] ?? `(no slink ${n} in '${line.trim()}')`;
}

/** `dmkit info repl`'s line of slink `n` */
async function infoLine(site: Site, n: number): Promise<string> {
  const out = await ok(site.d.sb, ['info', 'repl']);
  return out.split('\n').find((l) => l.startsWith(`Slink ${n}:`)) ?? `(no slink ${n} in ${out})`;
}

/** two sites, B primary shipping to a connected secondary A, both holding `ref` */
async function bPrimary(): Promise<{ a: Site; b: Site; ref: Buffer }> {
  const { a, b, ref } = await pair('b');
  const genB = (await b.group()).generation;
  await until('A to hold B\'s generation in order', () => a.group(), (g) => g.generation === genB && g.consistent);
  await until('B to know A holds it', () => b.group(), (g) => g.peers['1'] === genB && g.sites[1]!.lag.ios === 0);
  return { a, b, ref };
}

describe('failback over tcp', () => {
  it('after B demote → A promote, A knows B holds its generation: a write while B is away rotates it, and a split brain is reported on both sides', async () => {
    const { a, b, ref } = await bPrimary();

    // the planned move
    await ok(b.d.sb, ['demote', 'repl']);
    await ok(a.d.sb, ['promote', 'repl']);
    const genA = (await a.group()).generation;
    await until('B to hold A\'s new generation', () => b.group(), (g) => g.generation === genA && g.consistent && g.role === 'secondary');
    const ga = await until('A to record that B holds its generation', () => a.group(), (g) => g.peers['1'] === genA);
    // the move cost nothing: no resync, no failed I/O (the link, idle while A was secondary, is connected first)
    expect([ga.sites[1]!.resyncedBytes, ga.sites[1]!.errors, ga.sites[1]!.lastError]).toEqual([0, 0, null]);
    expect(a.d.log()).not.toMatch(/data flush failed|slink 1 down/);

    // B goes away (A's slink suspended) and A writes: A starts a new generation; B is
    // promoted anyway (--force) and written: both wrote since genA. A's slink comes back:
    // split brain at both, nothing copied either way
    await splitBrain(a, b, ref);

    // resolved as the howto says: A's changes go, A ends equal to B
    await ok(a.d.sb, ['demote', 'repl', '--discard-my-data']);
    await sameAs(a, ref, 'A to equal B after discarding its changes');
    await until('the split brain to be cleared on both sides', async () => [(await a.group()).splitBrain, (await b.group()).splitBrain], (v) => v.every((x) => x === null));
  }, 180_000);

  it('the old primary returns and is refused: its slink shows D with the refusal in status, info and --json (nothing to ship: no I/O fails); after its demote the refusal and errors are gone', async () => {
    const { a, b, ref } = await pair('a');
    await until('A to have shipped everything', () => a.site(1), (s) => s.lag.ios === 0);
    await sleep(1000); // a checkpoint records it

    // A dies with nothing unshipped; B takes over and writes
    await a.d.kill();
    await ok(b.d.sb, ['promote', 'repl']);
    for (const r of [9, 20]) await put(b, ref, r * REGION_BYTES, REGION_BYTES);

    // A comes back primary: each side refuses the other, and both show it down, consistently
    await a.d.restart();
    {
      const sa = await until('A\'s slink to be down and refused', () => a.site(1), (s) => s.stateChar === 'D' && s.link?.refusal === 'peer-primary');
      expect(sa.state).toBe('down');
      expect(sa.link!.connection).toBe('down');
      expect(sa.lastError).toMatch(/the site is primary/);
      expect(await letter(a, 1)).toBe('D');
      expect(await infoLine(a, 1)).toMatch(/^Slink 1: +down, down to 127\.0\.0\.1:\d+, refused: peer-primary, .*last error: .*the site is primary/);
      const sb = await until('B\'s slink to be down and refused', () => b.site(1), (s) => s.stateChar === 'D' && s.link?.refusal === 'peer-primary');
      expect(sb.state).toBe('down');
      expect(await letter(b, 1)).toBe('D');
      expect(await infoLine(b, 1)).toMatch(/refused: peer-primary/);
      // and it stays so: each retest (every second) is refused again, without flapping
      for (let i = 0; i < 10; i++) {
        await sleep(250);
        const s = await a.site(1);
        expect([s.stateChar, s.link!.connection, s.link!.refusal]).toEqual(['D', 'down', 'peer-primary']);
      }
    }

    // A is demoted: the cause is gone at both sides; B ships A what it lacks; nothing stale is left
    await ok(a.d.sb, ['demote', 'repl']);
    const da = await until('A\'s slink to drop its refusal', () => a.site(1), (s) => s.link?.refusal === null);
    expect(da.stateChar).toBe('R'); // a secondary ships nothing
    expect(da.link!.lastError).toBeNull();
    expect(da.lastError).toBeNull();
    expect(await infoLine(a, 1)).not.toMatch(/refused|error/);
    await sameAs(a, ref, 'A to equal B after the resync');
    const bs = await until('B to ship to A in order', () => b.site(1), (s) => s.stateChar === 'A' && s.mode === 'in-order' && s.link?.refusal === null);
    expect(bs.link!.lastError).toBeNull();
    expect(bs.lastError).toBeNull();
    expect(bs.resyncedBytes).toBe(0); // B's {9, 20} were still in its ring: shipped in order; A had nothing unshipped
    expect(await letter(b, 1)).toBe('A');
    expect(await infoLine(b, 1)).not.toMatch(/refused|error/);
    expect(b.image().equals(ref)).toBe(true);
  }, 180_000);

  it('a receiver that is stopped: info names the slink once in its error; once connected again no error is shown as current', async () => {
    const { a, b, ref } = await pair('a');

    await b.d.kill();
    await put(a, ref, 4 * REGION_BYTES, REGION_BYTES);
    const down = await until('A\'s slink to be down', () => a.site(1), (s) => s.stateChar === 'D' && s.link?.connection === 'down', 60_000);
    expect(down.link!.lastError).toMatch(/ECONNREFUSED/);
    for (const text of [down.lastError!, down.link!.lastError!, await infoLine(a, 1)]) {
      expect(text.match(/repl slink 1: 127\.0\.0\.1:\d+: /g) ?? []).toHaveLength(1);
    }
    expect(await infoLine(a, 1)).toMatch(/^Slink 1: +down, down to 127\.0\.0\.1:\d+, .*last error: repl slink 1: 127\.0\.0\.1:\d+: .*ECONNREFUSED/);

    // a write while B is known to be away starts a new generation
    const gen0 = (await a.group()).generation;
    await put(a, ref, 6 * REGION_BYTES, REGION_BYTES);
    expect((await a.group()).generation).not.toBe(gen0);

    await b.d.restart();
    await sameAs(b, ref, 'B to get the writes it missed');
    const up = await until('A\'s slink to be back', () => a.site(1), (s) => s.stateChar === 'A' && s.lag.ios === 0);
    // B took A's new generation in order (through the retest that found it back): both record it
    const g = await until('A to record B at its generation', () => a.group(), (x) => x.peers['1'] === x.generation);
    await until('B to hold A\'s generation', () => b.group(), (x) => x.generation === g.generation && x.consistent);
    expect(up.link!.lastError).toBeNull();
    const line = await infoLine(a, 1);
    expect(line).toMatch(/^Slink 1: +asynchronous, connected to/);
    expect(line).not.toMatch(/last error: /);
  }, 180_000);
});
