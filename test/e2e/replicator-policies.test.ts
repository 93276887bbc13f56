/**
 * The replicator's policies with a site made slow or dead by the engine's own targets
 * (`delay` and `error` under the site's `dm:` device), through the library:
 *
 *  - fall-behind by `ios`, `size` and `timeout`: state F while behind, and then a write
 *    completes only once the site's file has it; back to A once under;
 *  - `+stall`: writers wait while the slink is over its threshold (a suspended slink, then
 *    a slow one); `+pull-ahead`: state P, nothing shipped, regions marked, a resync makes
 *    the site identical once it recovers;
 *  - ring overflow with a slow site and with a dead one: no write fails, the site falls
 *    back to its dirty logs and ends identical;
 *  - resync converging under a writer that never stops;
 *  - write-order fidelity across the devices of the group at `slink suspend` cut points.
 *
 * Every scenario ends with the site's images compared with the local ones and a model.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { expectSameBytes } from '../compliance/helpers.ts'; // also quiets the engine's warnings
import {
  caughtUp, makeGroup, Model, readFileRange, replJson, SECTOR, siteJson, slinkState, tmpDir, waitFor, type Group,
} from '../helpers/replication.ts';

let g: Group | null = null;
afterEach(async () => {
  await g?.dm.close();
  if (g) fs.rmSync(g.dir, { recursive: true, force: true });
  g = null;
});

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function expectIdentical(grp: Group, models: Model[], what: string): void {
  for (let i = 0; i < grp.spec.devices; i++) {
    expectSameBytes(fs.readFileSync(grp.local(i)), models[i]!.bytes, `${what}: local image ${i}`);
    expectSameBytes(fs.readFileSync(grp.remote(i)), models[i]!.bytes, `${what}: site image ${i}`);
  }
}

/** resolves to true if `p` is still pending after `ms` */
async function pendingAfter(p: Promise<unknown>, ms: number): Promise<boolean> {
  let settled = false;
  void p.then(() => (settled = true), () => (settled = true));
  await sleep(ms);
  return !settled;
}

interface SyncCheck {
  /** writes issued in F that stayed F (no state change) until they completed: the site had each at completion */
  whileF: number;
  sawF: boolean;
}

/**
 * `lanes` writers, each write to a block never written before, `writes` in all. For each
 * write: the slink's state and event counter at issue and at completion; a write that
 * was in F with no state change in between must be in the site's file at completion.
 */
async function writeAndCheckSync(grp: Group, models: Model[], o: { lanes: number; writes: number; bytes: number; gapMs: number }): Promise<SyncCheck> {
  const blocks = grp.spec.sectors * SECTOR / o.bytes;
  expect(o.writes).toBeLessThan(blocks);
  const order = shuffled(blocks).filter((b) => b !== 0); // block 0: the first write's
  const out: SyncCheck = { whileF: 0, sawF: false };
  let next = 0;
  const lane = async (): Promise<void> => {
    while (next < o.writes) {
      if (o.gapMs) await sleep(o.gapMs);
      const off = order[next++]! * o.bytes;
      const data = crypto.randomBytes(o.bytes);
      const ev = grp.dm.get('repl').eventNr;
      const before = slinkState(grp.dm);
      await grp.dm.write('vol0', off, data);
      const after = slinkState(grp.dm);
      const same = grp.dm.get('repl').eventNr === ev;
      const onSite = readFileRange(grp.remote(0), off, o.bytes).equals(data);
      models[0]!.write(off, data);
      if (before === 'F' || after === 'F') out.sawF = true;
      if (same && before === 'F' && after === 'F') {
        expect(onSite, `a write acknowledged in state F is on the site (offset ${off})`).toBe(true);
        out.whileF++;
      }
    }
  };
  await Promise.all(Array.from({ length: o.lanes }, lane));
  return out;
}

function shuffled(n: number): number[] {
  const a = Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = crypto.randomInt(i + 1);
    [a[i], a[j]] = [a[j]!, a[i]!];
  }
  return a;
}

describe('fall-behind switches an async slink to synchronous while over', () => {
  const CASES = [
    { kind: 'ios', policy: 'async ios 4', delay: 25, bytes: 4096, lanes: 8, writes: 60, gapMs: 0 },
    { kind: 'size', policy: 'async size 64k', delay: 25, bytes: 16384, lanes: 8, writes: 60, gapMs: 0 },
    { kind: 'timeout', policy: 'async timeout 150', delay: 50, bytes: 4096, lanes: 4, writes: 60, gapMs: 40 },
  ];
  it.each(CASES)('$kind ($policy, site writes take $delay ms)', async (c) => {
    g = await makeGroup({ dir: tmpDir(), devices: 1, sectors: 4096, policy: c.policy });
    const models = [new Model(4096)];
    // under the threshold the slink is asynchronous: a write is acknowledged before the site has it
    await g.slowSite(500);
    const first = crypto.randomBytes(c.bytes);
    await g.dm.write('vol0', 0, first);
    expect(readFileRange(g.remote(0), 0, c.bytes).equals(first), 'a write under the threshold waited for the site').toBe(false);
    expect(slinkState(g.dm)).toBe('A');
    models[0]!.write(0, first);
    await waitFor(() => caughtUp(g!), 'first write shipped');

    await g.slowSite(c.delay);
    const r = await writeAndCheckSync(g, models, c);
    expect(r.sawF).toBe(true);
    expect(r.whileF, 'writes acknowledged in F with no state change').toBeGreaterThan(3);
    await waitFor(() => caughtUp(g!), 'back under: A with no backlog');
    expect(g.status()).toMatch(/^0:S,0,0 1:A,0,0 /);
    expectIdentical(g, models, c.kind);
  });
});

describe('+stall blocks writers while the slink is over its threshold', () => {
  it('a suspended slink over `ios 3`: the next write stays pending until `slink resume`', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 1, sectors: 2048, policy: 'async+stall ios 3' });
    const models = [new Model(2048)];
    await g.dm.message('repl', 0, ['slink', 'suspend', '1']);
    const blocks: Buffer[] = [];
    for (let k = 0; k < 4; k++) { // the 4th goes over the threshold as it is logged
      blocks.push(crypto.randomBytes(4096));
      await g.dm.write('vol0', k * 4096, blocks[k]!);
      models[0]!.write(k * 4096, blocks[k]!);
    }
    expect(g.status()).toMatch(/^0:S,0,0 1:D,4,32 /);
    const fifth = crypto.randomBytes(4096);
    const w = g.dm.write('vol0', 4 * 4096, fifth);
    expect(await pendingAfter(w, 1000), 'a write while a +stall slink is over its threshold').toBe(true);
    expect(readFileRange(g.local(0), 4 * 4096, 4096).equals(Buffer.alloc(4096))).toBe(true); // not even local
    await g.dm.message('repl', 0, ['slink', 'resume', '1']);
    await w;
    models[0]!.write(4 * 4096, fifth);
    // admitted only once back under: at least the first write was on the site by then
    expectSameBytes(readFileRange(g.remote(0), 0, 4096), blocks[0]!, 'first write on the site when the stalled one completes');
    await waitFor(() => caughtUp(g!), 'caught up');
    expectIdentical(g, models, 'after the stall');
  });

  it('a slow site: the backlog stays bounded by the threshold (plus writes admitted together); without +stall it grows', async () => {
    const LANES = 8;
    const run = async (policy: string): Promise<number> => {
      g = await makeGroup({ dir: tmpDir(), devices: 1, sectors: 4096, policy });
      const models = [new Model(4096)];
      await g.slowSite(20);
      let maxIos = 0;
      let done = false;
      const watch = (async () => {
        while (!done) {
          maxIos = Math.max(maxIos, siteJson(g!.dm).lag.ios);
          await sleep(2);
        }
      })();
      let n = 0;
      await Promise.all(Array.from({ length: LANES }, async () => {
        while (n < 100) {
          const off = n++ * 4096;
          const data = crypto.randomBytes(4096);
          await g!.dm.write('vol0', off, data);
          models[0]!.write(off, data);
        }
      }));
      done = true;
      await watch;
      // the writes may all complete within one turn of the event loop (synchronous file I/O,
      // up to a burst per device), before the watcher's timer: the backlog they left counts too
      maxIos = Math.max(maxIos, siteJson(g!.dm).lag.ios);
      await waitFor(() => caughtUp(g!), 'caught up');
      expectIdentical(g, models, policy);
      await g.dm.close();
      fs.rmSync(g.dir, { recursive: true, force: true });
      g = null;
      return maxIos;
    };
    const stalled = await run('async+stall ios 4');
    expect(stalled).toBeLessThanOrEqual(4 + LANES);
    const free = await run('async');
    expect(free).toBeGreaterThan(4 + LANES);
  });
});

describe('+pull-ahead', () => {
  it('over its threshold the slink goes P: nothing shipped, regions marked; the recovered site is resynced identical', async () => {
    const LEN = 4096;
    const REGION = 64;
    g = await makeGroup({ dir: tmpDir(), devices: 1, sectors: LEN, region: REGION, policy: 'async+pull-ahead ios 4' });
    const models = [new Model(LEN)];
    await g.slowSite(300);
    await g.dm.message('repl', 0, ['resync-rate', '1']); // a congested site: the resync cannot get anywhere yet
    const ev = g.dm.get('repl').eventNr;
    for (let r = 0; r < 6; r++) { // one write per region
      const data = crypto.randomBytes(4096);
      await g.dm.write('vol0', r * REGION * SECTOR, data);
      models[0]!.write(r * REGION * SECTOR, data);
    }
    expect(slinkState(g.dm)).toBe('P');
    expect(g.dm.get('repl').eventNr).toBeGreaterThan(ev);
    expect(siteJson(g.dm)).toMatchObject({ state: 'pulled-ahead', mode: 'dirty-log', consistent: false });
    const shipped = siteJson(g.dm).shipped.ios;
    // 20 more writes, each to a region of its own: marked, not shipped
    for (let r = 10; r < 30; r++) {
      const data = crypto.randomBytes(4096);
      await g.dm.write('vol0', r * REGION * SECTOR + 512, data);
      models[0]!.write(r * REGION * SECTOR + 512, data);
    }
    await sleep(400); // a checkpoint tick or two, and any ship that was in flight
    expect(slinkState(g.dm)).toBe('P');
    expect(siteJson(g.dm).shipped.ios).toBe(shipped);
    const m = /^A,1\/1 R,(\d+)\+?\/64$/.exec(g.dm.status('vol0')[0]!.params);
    expect(m, g.dm.status('vol0')[0]!.params).not.toBeNull();
    expect(Number(m![1])).toBeLessThanOrEqual(64 - 20); // at least the 20 regions written in P are out of sync
    for (let r = 10; r < 30; r++) {
      expect(readFileRange(g.remote(0), r * REGION * SECTOR + 512, 4096).equals(Buffer.alloc(4096)), `region ${r} not on the site`).toBe(true);
    }
    // the site recovers
    await g.healSite();
    await g.dm.message('repl', 0, ['resync-rate', '0']);
    await waitFor(() => caughtUp(g!) && g!.dm.status('vol0')[0]!.params === 'A,1/1 A,64/64', 'resynced and shipping in order');
    expect(siteJson(g.dm)).toMatchObject({ state: 'asynchronous', mode: 'in-order', consistent: true });
    expectIdentical(g, models, 'after pull-ahead');
  });
});

describe('ring overflow', () => {
  async function overflow(grp: Group, models: Model[]): Promise<void> {
    // ~6 MiB through a ring of 2 MiB; no write may fail
    for (let k = 0; k < 96; k++) {
      const data = crypto.randomBytes(64 * 1024);
      const off = crypto.randomInt(grp.spec.sectors * SECTOR / 65536) * 65536;
      await grp.dm.write(`vol${k % 2}`, off, data);
      models[k % 2]!.write(off, data);
    }
  }

  it('with a slow site: the site falls back to its dirty logs (R), then resyncs identical', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 2, sectors: 8192, ring: 4096 });
    const models = [new Model(8192), new Model(8192)];
    await g.slowSite(100); // 64 KiB entries, 10 a second: far slower than the writer
    await overflow(g, models);
    expect(replJson(g.dm).statistics.overflows).toBeGreaterThan(0);
    expect(['R', 'A']).toContain(slinkState(g.dm));
    const used = replJson(g.dm).replog;
    expect(used.usedSectors).toBeLessThanOrEqual(used.sizeSectors);
    await g.healSite();
    await waitFor(() => caughtUp(g!) && g!.dm.status('vol1')[0]!.params === 'A,1/1 A,128/128', 'resynced', 30_000);
    expectIdentical(g, models, 'slow site after overflow');
  });

  // REPLICATION.md guarantee 4: a site slower than the writers is dropped to its dirty logs
  // when the ring is full (a checkpoint that leaves the ring over half full only freed what it
  // shipped since the last one); only +stall holds the writers to a site's pace.
  it('with a site slower than the writer but never stuck: it goes to its dirty logs, the writer is not held to its pace', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 1, sectors: 8192, ring: 4096 });
    const models = [new Model(8192)];
    await g.slowSite(5); // 200 entries a second, each one shipped: a checkpoint always frees a little
    for (let k = 0; k < 1000; k++) { // 4 KiB writes: twice what the 2 MiB ring holds
      const data = crypto.randomBytes(4096);
      const off = crypto.randomInt(1024) * 4096;
      await g.dm.write('vol0', off, data);
      models[0]!.write(off, data);
    }
    expect(replJson(g.dm).statistics.overflows, 'the ring overflowed onto the slow slink\'s dirty logs').toBeGreaterThan(0);
    expect(siteJson(g.dm).shipped.ios).toBeLessThan(1000);
    await g.healSite();
    await waitFor(() => caughtUp(g!) && g!.dm.status('vol0')[0]!.params === 'A,1/1 A,128/128', 'resynced', 30_000);
    expectIdentical(g, models, 'slow site after overflow');
  });

  it('with a dead site: D, writes go on, dirty logs mark everything written; healed, it resyncs identical', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 2, sectors: 8192, ring: 4096 });
    const models = [new Model(8192), new Model(8192)];
    await g.breakSite();
    await overflow(g, models);
    expect(slinkState(g.dm)).toBe('D');
    expect(replJson(g.dm).statistics.overflows).toBeGreaterThan(0);
    expect(g.dm.status('vol0')[0]!.params).toMatch(/^A,1\/1 D,\d+\/128$/);
    await g.healSite();
    await waitFor(() => caughtUp(g!) && g!.dm.status('vol0')[0]!.params === 'A,1/1 A,128/128', 'resynced', 30_000);
    expectIdentical(g, models, 'dead site after overflow');
  });
});

describe('resync under a writer that never stops', () => {
  it('the site reaches A while the writer runs; once it stops, the images are identical', async () => {
    const LEN = 8192;
    g = await makeGroup({ dir: tmpDir(), devices: 1, sectors: LEN, region: 64 });
    const models = [new Model(LEN)];
    await g.slowSite(5);
    await g.dm.message('repl', 0, ['resync', '1', 'full']); // 128 regions to copy, 5 ms each at the site
    expect(slinkState(g.dm)).toBe('R');
    let stop = false;
    let writes = 0;
    const writer = (async () => {
      while (!stop) {
        const data = crypto.randomBytes(4096);
        const off = crypto.randomInt(LEN / 8) * 4096;
        await g!.dm.write('vol0', off, data);
        models[0]!.write(off, data);
        writes++;
      }
    })();
    let inSyncWhileWriting = false;
    try {
      await waitFor(() => slinkState(g!.dm) === 'A', 'A while the writer runs', 30_000);
      inSyncWhileWriting = !stop && writes > 0;
      const w0 = writes;
      await waitFor(() => writes > w0 + 20, 'the writer goes on after the resync');
    } finally {
      stop = true;
      await writer;
    }
    expect(inSyncWhileWriting).toBe(true);
    await waitFor(() => caughtUp(g!), 'caught up');
    expect(g.dm.status('vol0')[0]!.params).toBe('A,1/1 A,128/128');
    expectIdentical(g, models, 'after resync under writes');
  });
});

describe('a resync stopped by a suspend', () => {
  it('`slink suspend` then `slink resume` at once: a new resync starts once the stopped one ends, and the site ends in order and identical', async () => {
    const LEN = 8192;
    g = await makeGroup({ dir: tmpDir(), devices: 1, sectors: LEN, region: 64 });
    const models = [new Model(LEN)];
    const data = crypto.randomBytes(LEN * 512);
    await g.dm.write('vol0', 0, data);
    models[0]!.write(0, data);
    await waitFor(() => caughtUp(g!), 'caught up');
    await g.slowSite(20); // the copies in flight keep the stopped resync alive past the resume
    await g.dm.message('repl', 0, ['resync', '1', 'full']); // 128 regions to copy, 20 ms each at the site
    await new Promise((r) => setTimeout(r, 100));
    await g.dm.message('repl', 0, ['slink', 'suspend', '1']);
    await g.dm.message('repl', 0, ['slink', 'resume', '1']);
    await waitFor(() => caughtUp(g!), 'the resync to go on and end', 30_000);
    expect(g.dm.status('vol0')[0]!.params).toBe('A,1/1 A,128/128');
    expectIdentical(g, models, 'after a resync stopped and started again');
  });
});

describe('a device leaves the group', () => {
  it('removing a replicator-dev while its site resyncs it neither fails the site nor stops the resync of the others', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 2, sectors: 4096 });
    const models = [new Model(4096), new Model(4096)];
    for (let k = 0; k < 40; k++) {
      const data = crypto.randomBytes(8192);
      const off = crypto.randomInt(4096 / 16) * 8192;
      await g.dm.write(`vol${k % 2}`, off, data);
      models[k % 2]!.write(off, data);
    }
    await waitFor(() => caughtUp(g!), 'caught up');
    await g.slowSite(20);
    await g.dm.message('repl', 0, ['resync', '1', 'full']); // 2 × 64 regions, 20 ms each at the site
    await waitFor(() => siteJson(g!.dm).resyncedBytes > 0, 'the resync copying');
    expect(slinkState(g.dm)).toBe('R');
    expect(g.dm.status('vol0')[0]!.params).toMatch(/^A,1\/1 R,\d+\+\/64$/); // vol0's regions being copied
    await g.dm.remove('vol0');
    await g.healSite();
    await waitFor(() => caughtUp(g!), 'vol1 resynced and shipping in order', 15_000);
    expect(siteJson(g.dm)).toMatchObject({ errors: 0, lastError: null });
    expect(g.dm.status('vol1')[0]!.params).toBe('A,1/1 A,64/64');
    expectSameBytes(fs.readFileSync(g.remote(1)), models[1]!.bytes, 'site image of the device that stayed');
    expectSameBytes(fs.readFileSync(g.local(1)), models[1]!.bytes, 'local image of the device that stayed');
  });
});

describe('write-order fidelity across the devices of a group', () => {
  /**
   * Two writers, one per device, each write to a block never written before (so the site's
   * image says exactly which writes it has). At a random moment the slink is suspended.
   * The site's image must hold, per device, a prefix of that device's writes, and across
   * devices no write without every write that had completed before it was issued.
   */
  it('at random `slink suspend` cut points the site holds a dependency-closed prefix', async () => {
    const LEN = 4096;
    const BLOCK = 4096;
    g = await makeGroup({ dir: tmpDir(), devices: 2, sectors: LEN });
    await g.slowSite(3); // keeps a backlog, so the cut falls inside it
    const free = [shuffled(LEN * SECTOR / BLOCK), shuffled(LEN * SECTOR / BLOCK)];
    const models = [new Model(LEN), new Model(LEN)];
    for (let round = 0; round < 3; round++) {
      interface W { dev: number; off: number; data: Buffer; completedBefore: number; done: number }
      const log: W[] = [];
      let completions = 0;
      let stop = false;
      const lane = async (dev: number): Promise<void> => {
        // about 500 writes a second per lane (the site takes about 300): a backlog builds up
        for (let k = 0; k < 170 && !stop; k++) {
          const w: W = { dev, off: free[dev]!.pop()! * BLOCK, data: crypto.randomBytes(BLOCK), completedBefore: completions, done: -1 };
          log.push(w);
          await g!.dm.write(`vol${dev}`, w.off, w.data);
          w.done = completions++;
          models[dev]!.write(w.off, w.data);
          await sleep(1);
        }
      };
      const lanes = Promise.all([lane(0), lane(1)]);
      await sleep(20 + crypto.randomInt(100));
      await g.dm.message('repl', 0, ['slink', 'suspend', '1']);
      await sleep(50); // writes after the cut: in the ring, never on the site
      stop = true;
      await lanes;
      // ships already handed to the site drain: suspend and resume the site's devices
      for (const d of ['site0', 'site1']) {
        await g.dm.suspend(d);
        await g.dm.resume(d);
      }
      const remote = [fs.readFileSync(g.remote(0)), fs.readFileSync(g.remote(1))];
      const applied = log.map((w) => {
        const got = remote[w.dev]!.subarray(w.off, w.off + BLOCK);
        if (got.equals(w.data)) return true;
        expect(got.equals(Buffer.alloc(BLOCK)), `block at ${w.off} of device ${w.dev}: neither zero nor its write`).toBe(true);
        return false;
      });
      for (const dev of [0, 1]) {
        const mine = log.map((w, i) => (w.dev === dev ? applied[i] : null)).filter((x) => x !== null);
        const firstMissing = mine.indexOf(false);
        if (firstMissing >= 0) expect(mine.slice(firstMissing).every((x) => !x), `device ${dev}: a later write without an earlier one`).toBe(true);
      }
      const doneOrder = log.filter((w) => w.done >= 0).sort((a, b) => a.done - b.done);
      log.forEach((w, i) => {
        if (!applied[i]) return;
        for (const dep of doneOrder.slice(0, w.completedBefore)) {
          expect(applied[log.indexOf(dep)], `write to device ${w.dev} at ${w.off} is on the site without one completed before it was issued`).toBe(true);
        }
      });
      expect(applied.filter((x) => !x).length, 'the cut left a backlog off the site').toBeGreaterThan(0);
      await g.dm.message('repl', 0, ['slink', 'resume', '1']);
      await waitFor(() => caughtUp(g!), `caught up after round ${round}`);
      expectIdentical(g, models, `round ${round}`);
    }
  });
});
