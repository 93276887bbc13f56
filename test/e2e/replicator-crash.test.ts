/**
 * Replication under SIGKILL (REPLICATION.md guarantees 1–3, 5, 6): a real daemon with a
 * group of three devices replicated to a second site over blockdev slinks, a writer child
 * with several writes in flight across the devices, and the daemon SIGKILLed at a random
 * instant, round after round in one sandbox (test/helpers/replication-rounds.ts). After
 * each kill the image files are judged by the independent checker
 * (test/helpers/replication-checker.ts): the local images hold every acknowledged write,
 * the remote images are the source after some prefix (all of it when the slink was
 * synchronous); after the restart slink 1 catches up without a full copy and remote =
 * local byte for byte. The kinds of round take turns: async, suspended slink (a
 * backlog), sync, slow site (`delay` under the remote), suspended mid-stream, slow sync,
 * a second SIGKILL during recovery of a suspended backlog, and a ring overflow (dirty-log
 * fallback, resync of the written regions only).
 *
 * Left out here (`npm run soak` runs it): `double-ship`, a second SIGKILL while the
 * restarted site re-ships the entries since its last checkpoint. The re-ship puts older
 * writes back over newer ones, so a kill in that window can leave the remote images out of
 * order; the engine declares that only after the next restart (JSON `consistent: false`
 * until the re-ship passes the recovered head), and when that re-ship ends before the
 * daemon answers, the declaration cannot be observed: a false failure, rarely.
 *
 * Then 8 rounds of big writes (BIG_WRITES: 4–256 KiB, most log entries over 64 KiB, whose
 * memory the log reuses once no ship reads it), most with a slow site, where ships are in
 * flight while the ring wraps: reusing an image too early shows as a remote image
 * that is not a prefix (measured: with the reuse rule broken, 2 of 8 such rounds failed).
 *
 * DMKIT_CRASH_ROUNDS (default 32) and DMKIT_CRASH_SEED (default fixed) vary the run.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { BIG_WRITES, DEFAULT_RIG, KINDS, planRound, Rig, roundSeed, runRound, type RigOptions, type RoundKind, type RoundResult } from '../helpers/replication-rounds.ts';

const ROUNDS = Number(process.env.DMKIT_CRASH_ROUNDS ?? 32);
const SEED = Number(process.env.DMKIT_CRASH_SEED ?? 20261206);
const CI_KINDS: readonly RoundKind[] = KINDS.filter((k) => k !== 'double-ship');

let rig: Rig | null = null;
const results: RoundResult[] = [];

beforeAll(async () => {
  rig = await Rig.open(DEFAULT_RIG);
});

afterAll(async () => {
  await rig?.close();
});

describe(`replicator: SIGKILL rounds (seed ${SEED})`, () => {
  for (let i = 0; i < ROUNDS; i++) {
    const plan = planRound(i, roundSeed(SEED, i), DEFAULT_RIG, CI_KINDS);
    test(`round ${i}: ${plan.kind} (seed ${plan.seed})`, { timeout: 120_000 }, async () => {
      if (!rig!.healthy) {
        await rig!.close(); // keeps the failed round's sandbox
        rig = await Rig.open(DEFAULT_RIG);
      }
      const r = await runRound(rig!, plan);
      results.push(r);
      expect(r.failures, `evidence: ${r.evidence ?? '-'}`).toEqual([]);
    });
  }

  test('the rounds covered what they are for', () => {
    const of = (k: RoundKind): RoundResult[] => results.filter((r) => r.kind === k);
    expect(results.reduce((n, r) => n + r.kills, 0)).toBeGreaterThanOrEqual(Math.min(30, ROUNDS));
    for (const k of CI_KINDS) expect(of(k).length, k).toBeGreaterThan(0);
    // a synchronous slink had every acknowledged write at each kill
    for (const r of [...of('sync'), ...of('slow-sync')]) expect(r.remoteAtKill[0]!.ackedPresent).toBe(r.remoteAtKill[0]!.acked);
    // a suspended slink had a backlog to ship after the restart
    for (const r of of('suspended')) expect(r.remoteAtKill[0]!.ackedPresent).toBeLessThan(r.acked || 1);
    // the ring overflowed: the site went to its dirty logs and was resynced, only where the round wrote
    for (const r of of('overflow')) {
      expect(r.overflows, `round ${r.index}`).toBeGreaterThan(0);
      expect(r.resyncedBytes, `round ${r.index}`).toBeGreaterThan(0);
      expect(r.resyncedBytes).toBeLessThanOrEqual(r.writtenRegionBytes);
    }
    // nothing but an overflow made a resync
    for (const r of results) if (r.resyncedBytes > 0) expect(r.overflows, `round ${r.index} (${r.kind}) resynced`).toBeGreaterThan(0);
  });
});

const BIG_RIG: RigOptions = { ...DEFAULT_RIG, ...BIG_WRITES };
// not suspend-mid: with big writes over these 2 MiB devices its resync may copy a region twice (the
// backlog is marked while the first pass runs), past the rounds' bound on resync bytes (1 of 22
// such rounds in a 200-round `soak --big`): a cost, not a fault, and not what these rounds test
const BIG_KINDS: readonly RoundKind[] = ['slow', 'slow-sync', 'async', 'double'];

describe(`replicator: SIGKILL rounds with big writes (seed ${SEED})`, () => {
  let big: Rig | null = null;
  beforeAll(async () => {
    big = await Rig.open(BIG_RIG);
  });
  afterAll(async () => {
    await big?.close();
  });
  for (let i = 0; i < 8; i++) {
    const plan = planRound(i, roundSeed(SEED + 1, i), BIG_RIG, BIG_KINDS);
    test(`round ${i}: ${plan.kind}, writes up to ${BIG_RIG.maxBlocks} blocks (seed ${plan.seed})`, { timeout: 120_000 }, async () => {
      if (!big!.healthy) {
        await big!.close();
        big = await Rig.open(BIG_RIG);
      }
      const r = await runRound(big!, plan);
      expect(r.failures, `evidence: ${r.evidence ?? '-'}`).toEqual([]);
    });
  }
});
