/**
 * A power loss of the source with a `tcp` site that had applied entries the source's log
 * then lost (docs/targets/replicator.md, "Power loss"; src/targets/replicator-lost.ts).
 *
 * A real primary daemon A (a replicator, a replicator-dev `vol` over local.img with a disk
 * dirty log, a tcp slink to B) and a real receiving daemon B (`vol`: a linear device over
 * its image). The power loss is made as the disks would show it: A's log and local image
 * are copied while the group is suspended (everything flushed and checkpointed), A writes
 * more (B applies it), A is SIGKILLed and its log and image are put back to the copies, so
 * the writes after the copy exist only at B. A restarts and recovers the older head: its
 * next entries take the lost entries' seqs.
 *
 * Before the fix, B skipped those new entries as already applied (its position was past
 * them), and kept the lost writes: both images differed for good, silently. Now A judges
 * B's position at connect, sets it back (REWIND), and verifies every region by checksum:
 * B ends equal to A, and A equals the independent reference (the copy plus the writes
 * made after the restart).
 *
 *  - B away while A writes after the restart (more entries than were lost: A's head passes
 *    B's position, which only the epochs tell apart);
 *  - B connected at once (B's position beyond A's head).
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { ok } from '../helpers/daemon.ts';
import { BYTES, REGION_BYTES, SECTORS, Site, blank, closeAll, newSecret, put, sameAs, until } from './failover-sites.ts';
import { SiteDaemon } from '../helpers/site-daemon.ts';

const extra: SiteDaemon[] = [];
afterAll(async () => {
  for (const d of extra.splice(0)) await d.close();
  await closeAll();
});

/** A (primary, ref written whole and at B) and B (a plain receiving device `vol`) */
async function setUp(): Promise<{ a: Site; b: SiteDaemon; bImg: string; ref: Buffer }> {
  const secret = newSecret();
  const b = await SiteDaemon.start({ secretFile: secret });
  extra.push(b);
  const bImg = blank(b.sb.dir, 'site.img', BYTES);
  await ok(b.sb, ['create', 'vol', '--table', `0 ${SECTORS} linear ${bImg} 0`]);
  const a = new Site(await SiteDaemon.start({ secretFile: secret }));
  extra.push(a.d);
  await a.stack([[1, b.address]], secret);
  const ref = crypto.randomBytes(BYTES);
  await a.write(0, ref);
  await until('B to hold A\'s data', async () => fs.readFileSync(bImg).equals(ref), (v) => v);
  await until('the site to be in order with nothing to ship', () => a.site(1), (s) => s.mode === 'in-order' && s.lag.ios === 0);
  return { a, b, bImg, ref };
}

/**
 * The power loss: copy A's log and image with the group suspended (flushed, checkpointed),
 * write `lost` 4 KiB blocks at A that reach B, SIGKILL A and put the copies back.
 */
async function powerLoss(a: Site, bImg: string, lost: number): Promise<void> {
  const log = `${a.d.sb.dir}/rlog`;
  await ok(a.d.sb, ['suspend', 'vol']);
  await ok(a.d.sb, ['suspend', 'repl']);
  const logCopy = fs.readFileSync(log);
  const imgCopy = fs.readFileSync(a.img);
  await ok(a.d.sb, ['resume', 'repl']);
  await ok(a.d.sb, ['resume', 'vol']);
  const atB = Buffer.from(fs.readFileSync(bImg));
  for (let i = 0; i < lost; i++) await put(a, atB, (3 + 5 * i) * REGION_BYTES + 4096, 4096);
  await until('B to apply the writes the source will lose', async () => fs.readFileSync(bImg).equals(atB), (v) => v);
  await a.d.kill();
  fs.writeFileSync(log, logCopy);
  fs.writeFileSync(a.img, imgCopy);
}

/** after the restart: B verified whole and equal to A, which equals `ref` */
async function converged(a: Site, bImg: string, ref: Buffer): Promise<void> {
  await sameAs(a, ref, 'A to hold the reference');
  await until('B to equal A', async () => fs.readFileSync(bImg).equals(ref), (v) => v, 60_000);
  const s = await until('the site verified and back in order', () => a.site(1), (x) => x.mode === 'in-order' && x.lag.ios === 0);
  const full = s as unknown as { comparedBytes: number };
  expect(full.comparedBytes).toBeGreaterThanOrEqual(BYTES); // every region compared by checksum
  expect(a.d.log()).toMatch(/slink 1: the site applied entries this log no longer has/);
}

describe('a tcp site that applied entries the source lost in a power loss', { timeout: 180_000 }, () => {
  it('B away while A writes more than was lost: B is set back, verified, and ends equal to A and the reference', async () => {
    const { a, b, bImg, ref } = await setUp();
    await powerLoss(a, bImg, 3);
    await b.kill();
    await a.d.restart();
    // more entries than were lost, the first over a lost write's block, the rest elsewhere
    await put(a, ref, 3 * REGION_BYTES + 4096, 4096);
    for (let i = 0; i < 6; i++) await put(a, ref, (40 + i) * REGION_BYTES, 8192);
    await b.restart();
    await converged(a, bImg, ref);
    expect(b.log()).toMatch(/position set back to/);
  });

  it('B connected at once (its position beyond the recovered head): the same', async () => {
    const { a, b, bImg, ref } = await setUp();
    await powerLoss(a, bImg, 4);
    await a.d.restart();
    await until('A to see the site ahead', async () => a.d.log(), (l) => /this log no longer has/.test(l));
    await put(a, ref, 8 * REGION_BYTES, 4096);
    await put(a, ref, 50 * REGION_BYTES, 4096);
    await converged(a, bImg, ref);
    expect(b.log()).toMatch(/position set back to/);
  });
});
