/**
 * A power loss of the source with a `tcp` site that had applied entries the source's log
 * then lost (docs/targets/replicator.md, "Power loss"; docs/formats/replog.md, "cut off";
 * src/targets/replicator-lost.ts).
 *
 * A real primary daemon A (a replicator, a replicator-dev `vol` over local.img with a disk
 * dirty log, a tcp slink to B) and a real receiving daemon B (`vol`: a linear device over
 * its image). The power loss is made as the disks would show it after a reboot: A's log and
 * local image are copied while the group is suspended (everything flushed and
 * checkpointed), A writes more (B applies it), A is SIGKILLed and its log and image are put
 * back to the copies, whose checkpoints are made to carry another boot id (the copy was
 * written before the "reboot"). A restarts and recovers the older head: its next entries
 * take the lost entries' seqs.
 *
 * Before the fix, B skipped those new entries as already applied (its position was past
 * them), and kept the lost writes: both images differed for good, silently. Now A finds its
 * log cut off and verifies B whole (checksums), and judges B's position at connect and sets
 * it back (REWIND), so that later entries are not skipped: B ends equal to A, and A equals
 * the independent reference (the copy plus the writes made after the restart).
 *
 *  - B away while A writes after the restart (more entries than were lost: A's head passes
 *    B's position; B's slink on its dirty logs meanwhile);
 *  - B connected at once, and writes after A verified B whose seqs B had had from the lost
 *    tail: only the REWIND keeps them from being skipped;
 *  - the lost entries were one epoch B had begun (one write split into many entries) and B
 *    restarted since: its position tells nothing, the cut-off log does;
 *  - A SIGKILLed while it verifies B (the resync slowed to a crawl): same boot, B's position
 *    agrees with A's log now; the verification goes on from what A recorded (dirty logs,
 *    checkpoint) until B equals A;
 *  - a device whose table does not load after the power loss (its image away): the other is
 *    verified, and the pending verification stays in the checkpoints until the device binds
 *    after a later restart, and is verified then;
 *  - the local image lost writes that the log's checkpoint says it has and B applied
 *    (checkpoints do not flush the local devices): B verified whole, equal to A's image;
 *  - a SIGKILL alone (same boot, nothing lost): no verification, no REWIND.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { ok } from '../helpers/daemon.ts';
import { BYTES, REGION_BYTES, SECTORS, Site, blank, closeAll, primaryAndReceiver, put, sameAs, until } from './failover-sites.ts';
import { fromAnotherBoot } from '../helpers/power-loss.ts';
import { SiteDaemon } from '../helpers/site-daemon.ts';

const extra: SiteDaemon[] = [];
afterAll(async () => {
  for (const d of extra.splice(0)) await d.close();
  await closeAll();
});

const CUT_OFF = /the replication log was not closed cleanly in an earlier boot/g;
const VERDICT = /slink 1: the site applied entries this log no longer has/g;
const SET_BACK = /position set from \d+ to \d+/;
const count = (text: string, re: RegExp): number => (text.match(re) ?? []).length;

/** A (primary, ref written whole and at B) and B (a plain receiving device `vol`) */
async function setUp(): Promise<{ a: Site; b: SiteDaemon; bImg: string; ref: Buffer }> {
  const sites = await primaryAndReceiver();
  await inOrder(sites.a);
  return sites;
}

async function inOrder(a: Site): Promise<void> {
  await until('the site to be in order with nothing to ship', () => a.site(1), (s) => s.mode === 'in-order' && s.lag.ios === 0 && (s as unknown as { resync: unknown }).resync === null);
}


/**
 * The power loss: copy A's log and image with the group suspended (flushed, checkpointed),
 * make the `lost` writes at A (B applies them), SIGKILL A and put the copies back, the
 * log's as of another boot.
 */
async function powerLoss(a: Site, bImg: string, lost: Array<[number, number]>): Promise<void> {
  const log = `${a.d.sb.dir}/rlog`;
  await ok(a.d.sb, ['suspend', 'vol']);
  await ok(a.d.sb, ['suspend', 'repl']);
  const logCopy = fs.readFileSync(log);
  const imgCopy = fs.readFileSync(a.img);
  await ok(a.d.sb, ['resume', 'repl']);
  await ok(a.d.sb, ['resume', 'vol']);
  const atB = Buffer.from(fs.readFileSync(bImg));
  for (const [offset, bytes] of lost) await put(a, atB, offset, bytes);
  await until('B to apply the writes the source will lose', async () => fs.readFileSync(bImg).equals(atB), (v) => v);
  await a.d.kill();
  fromAnotherBoot(logCopy);
  fs.writeFileSync(log, logCopy);
  fs.writeFileSync(a.img, imgCopy);
}

/** B verified and equal to A, which equals `ref`; returns the site's bytes compared by checksum */
async function converged(a: Site, bImg: string, ref: Buffer): Promise<number> {
  await sameAs(a, ref, 'A to hold the reference');
  await until('B to equal A', async () => fs.readFileSync(bImg).equals(ref), (v) => v, 60_000);
  await inOrder(a);
  return ((await a.site(1)) as unknown as { comparedBytes: number }).comparedBytes;
}

/** run `fn`; a failure carries both daemons' log tails */
async function logged(a: Site, b: SiteDaemon, fn: () => Promise<void>): Promise<void> {
  try {
    await fn();
  } catch (err) {
    throw new Error(`${(err as Error).message}\nA's log: ${a.d.logTail(6000)}\nB's log: ${b.logTail(3000)}`, { cause: err });
  }
}

/** `n` 4 KiB writes in regions first, first + 5 … */
const smallWrites = (n: number, first = 3): Array<[number, number]> => Array.from({ length: n }, (_, i) => [(first + 5 * i) * REGION_BYTES + 4096, 4096]);

describe('a tcp site that applied entries the source lost in a power loss', { timeout: 180_000 }, () => {
  it('B away while A writes more than was lost: B is verified whole and ends equal to A and the reference', async () => {
    const { a, b, bImg, ref } = await setUp();
    await logged(a, b, async () => {
      await powerLoss(a, bImg, smallWrites(3));
      await b.kill();
      await a.d.restart();
      expect(count(a.d.log(), CUT_OFF)).toBe(1);
      // more entries than were lost, the first over a lost write's block, the rest elsewhere
      await put(a, ref, 3 * REGION_BYTES + 4096, 4096);
      for (let i = 0; i < 6; i++) await put(a, ref, (40 + i) * REGION_BYTES, 8192);
      await b.restart();
      // every region copied or compared (the writes while B was away put its slink on its dirty
      // logs, past B's position: it ships from later entries, and its position is not judged)
      const compared = await converged(a, bImg, ref);
      const s = (await a.site(1)) as unknown as { resyncedBytes: number };
      expect(compared + s.resyncedBytes).toBeGreaterThanOrEqual(BYTES);
    });
  });

  it('B connected at once: writes after the verification, numbered as lost entries B had, reach B (REWIND)', async () => {
    const { a, b, bImg, ref } = await setUp();
    await logged(a, b, async () => {
      await powerLoss(a, bImg, smallWrites(6));
      await a.d.restart();
      await until('A to see the site ahead', async () => a.d.log(), (l) => count(l, VERDICT) === 1);
      expect(await converged(a, bImg, ref)).toBeGreaterThanOrEqual(BYTES);
      // seqs 1 and 2 past the recovered head: B had applied entries with these numbers
      await put(a, ref, 8 * REGION_BYTES, 4096);
      await put(a, ref, 50 * REGION_BYTES, 4096);
      await converged(a, bImg, ref);
      expect(b.log()).toMatch(SET_BACK);
    });
  });

  it('the lost entries were one epoch B had begun, and B restarted since: the cut-off log alone has A verify B whole', async () => {
    const { a, b, bImg, ref } = await setUp();
    await logged(a, b, async () => {
      await powerLoss(a, bImg, [[0, 1 << 20]]); // one write: 32 entries (a region each) in flight together
      await b.kill();
      await a.d.restart();
      for (let i = 0; i < 4; i++) await put(a, ref, (2 + 9 * i) * REGION_BYTES, 4096);
      await b.restart();
      expect(await converged(a, bImg, ref)).toBeGreaterThanOrEqual(BYTES);
      expect(count(a.d.log(), CUT_OFF)).toBe(1);
    });
  });

  it('A killed while it verifies B: after its restart (the same boot: not cut off) A goes on verifying B until B equals A', async () => {
    const { a, b, bImg, ref } = await setUp();
    await logged(a, b, async () => {
      await powerLoss(a, bImg, smallWrites(3, 40)); // far from region 0, where the verification starts
      await b.kill();
      await a.d.restart();
      await ok(a.d.sb, ['message', 'repl', '0', 'resync-rate', '4k']); // a crawl: 2 MiB would take minutes
      await b.restart();
      await until('B to be set back', async () => b.log(), (l) => SET_BACK.test(l));
      await until('A to verify B', () => a.site(1), (s) => s.mode === 'dirty-log');
      expect(fs.readFileSync(bImg).equals(ref)).toBe(false); // B still holds the lost writes
      await a.d.kill();
      await a.d.restart(); // the same boot: not cut off; a new table: resync-rate auto again
      await converged(a, bImg, ref);
      // B's position agrees with A's log now (no second verdict), and the log was not cut off again
      expect([count(a.d.log(), VERDICT), count(a.d.log(), CUT_OFF)]).toEqual([1, 1]);
    });
  });

  it('a device whose table does not load after the power loss keeps the verification pending: verified when it binds after a later restart', async () => {
    const { a, b, bImg, ref } = await setUp();
    // a second device in the group: vol1 (device 1) at A, shipped to vol1 at B
    const b1Img = blank(b.sb.dir, 'site1.img', BYTES);
    await ok(b.sb, ['create', 'vol1', '--table', `0 ${SECTORS} linear ${b1Img} 0`]);
    const a1Img = blank(a.d.sb.dir, 'local1.img', BYTES);
    const dlog1 = blank(a.d.sb.dir, 'vol1.1.log', 1 << 20);
    await ok(a.d.sb, ['create', 'vol1', '--table', `0 ${SECTORS} replicator-dev dm:repl 1 0 1 ${a1Img} nolog 0 1 1 vol1 disk 3 ${dlog1} 64 nosync`]);
    const ref1 = crypto.randomBytes(BYTES);
    const f = `${a.d.sb.dir}/ref1`;
    fs.writeFileSync(f, ref1);
    await ok(a.d.sb, ['io', 'write', 'vol1', '0', f]);
    await until('B to hold vol1', async () => fs.readFileSync(b1Img).equals(ref1), (v) => v);
    await logged(a, b, async () => {
      // the power loss, with lost writes on vol1 only
      const log = `${a.d.sb.dir}/rlog`;
      for (const dev of ['vol', 'vol1', 'repl']) await ok(a.d.sb, ['suspend', dev]);
      const copies = [log, a.img, a1Img].map((file) => fs.readFileSync(file));
      for (const dev of ['repl', 'vol', 'vol1']) await ok(a.d.sb, ['resume', dev]);
      const atB = Buffer.from(ref1);
      for (const [offset, bytes] of smallWrites(3, 20)) {
        const data = crypto.randomBytes(bytes);
        fs.writeFileSync(f, data);
        await ok(a.d.sb, ['io', 'write', 'vol1', String(offset), f]);
        data.copy(atB, offset);
      }
      await until('B to apply the writes the source will lose', async () => fs.readFileSync(b1Img).equals(atB), (v) => v);
      await a.d.kill();
      fromAnotherBoot(copies[0]!);
      [log, a.img, a1Img].forEach((file, i) => fs.writeFileSync(file, copies[i]!));
      // vol1's image is away at the restart: its table does not load, vol1 does not bind
      fs.renameSync(a1Img, `${a1Img}.away`);
      await a.d.restart();
      expect(count(a.d.log(), CUT_OFF)).toBe(1);
      // vol verified (B's vol equals A's), but the site is not declared in order while vol1,
      // not loaded, is still to be verified: it stays on its dirty logs, not consistent
      await sameAs(a, ref, 'A to hold the reference');
      await until('B\'s vol to equal A\'s', async () => fs.readFileSync(bImg).equals(ref), (v) => v, 60_000);
      await until('the resync of the devices bound to be done', () => a.site(1), (st) => {
        const r = (st as unknown as { resync: { done: number; total: number } | null }).resync;
        return r !== null && r.total > 0 && r.done === r.total;
      });
      await new Promise((r) => setTimeout(r, 1000)); // a few checkpoints: the pending verification must stay in them
      const held = await a.site(1);
      expect([held.mode, (held as unknown as { consistent: boolean }).consistent], 'the site with vol1 unverified').toEqual(['dirty-log', false]);
      await a.d.kill();
      fs.renameSync(`${a1Img}.away`, a1Img);
      await a.d.restart(); // the same boot: not cut off again; vol1 binds now
      await until('B\'s vol1 to equal A\'s', async () => fs.readFileSync(b1Img).equals(ref1), (v) => v, 60_000);
      expect(fs.readFileSync(a1Img).equals(ref1)).toBe(true);
      await inOrder(a); // every device verified: in order again
      expect(count(a.d.log(), CUT_OFF)).toBe(1);
    });
  });

  it('the local image lost writes the log says it has and B applied (checkpoints do not flush it): B is verified to equal A', async () => {
    const { a, b, bImg, ref } = await setUp();
    await logged(a, b, async () => {
      const log = `${a.d.sb.dir}/rlog`;
      const durable = async (): Promise<void> => {
        await ok(a.d.sb, ['suspend', 'vol']);
        await ok(a.d.sb, ['suspend', 'repl']);
      };
      const resume = async (): Promise<void> => {
        await ok(a.d.sb, ['resume', 'repl']);
        await ok(a.d.sb, ['resume', 'vol']);
      };
      await durable();
      const imgCopy = fs.readFileSync(a.img); // the image as the disk kept it: without the writes below
      await resume();
      const atB = Buffer.from(ref);
      for (const [offset, bytes] of smallWrites(4)) await put(a, atB, offset, bytes);
      await until('B to apply them', async () => fs.readFileSync(bImg).equals(atB), (v) => v);
      await durable(); // the log's checkpoint: A's local device and B both have them (localDone, B's position)
      const logCopy = fs.readFileSync(log);
      await resume();
      await a.d.kill();
      fromAnotherBoot(logCopy);
      fs.writeFileSync(log, logCopy);
      fs.writeFileSync(a.img, imgCopy);
      await a.d.restart();
      expect(count(a.d.log(), CUT_OFF)).toBe(1);
      // lost at A (never flushed), so lost at B too: both end as the image the disk kept
      expect(await converged(a, bImg, ref)).toBeGreaterThanOrEqual(BYTES);
      await put(a, ref, 30 * REGION_BYTES, 4096);
      await converged(a, bImg, ref);
    });
  });

  it('a SIGKILL alone (same boot, nothing lost): no verification, no REWIND, and later writes reach B', async () => {
    const { a, b, bImg, ref } = await setUp();
    await logged(a, b, async () => {
      for (const [offset, bytes] of smallWrites(3)) await put(a, ref, offset, bytes);
      await until('B to apply them', async () => fs.readFileSync(bImg).equals(ref), (v) => v);
      await a.d.kill();
      await a.d.restart();
      await put(a, ref, 20 * REGION_BYTES, 4096);
      expect(await converged(a, bImg, ref)).toBe(0);
      expect([count(a.d.log(), VERDICT), count(a.d.log(), CUT_OFF)]).toEqual([0, 0]);
      expect(b.log()).not.toMatch(SET_BACK);
    });
  });
});
