/**
 * Network fault rounds over the `tcp` slink (test/helpers/tcp-rounds.ts): two real daemons,
 * a fault-injecting proxy between them, a writer child over NBD and the independent
 * write-order checker. 10 rounds, one of each kind and two more, with the seed printed so
 * a failure reproduces (`DMKIT_TCP_SEED=… npx vitest run test/e2e/replication-tcp-rounds`);
 * `npm run soak -- --tcp` runs 100. Then 3 rounds of big writes (TCP_BIG_RIG: log entries over
 * 64 KiB, whose memory the log reuses) through a reset, a corruption and a receiver kill,
 * and 3 rounds with the site synchronous.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { roundSeed } from '../helpers/replication-rounds.ts';
import { TCP_BIG_RIG, TCP_KINDS, TCP_RIG, TcpRig, planTcpRound, runTcpRound, type TcpKind, type TcpRoundResult } from '../helpers/tcp-rounds.ts';

const ROUNDS = 10;
const SEED = Number(process.env.DMKIT_TCP_SEED ?? Date.now() % 1_000_000_007);

describe(`tcp slink: ${ROUNDS} partition / corruption / crash rounds (seed ${SEED})`, () => {
  let t: TcpRig;
  const results: TcpRoundResult[] = [];
  beforeAll(async () => {
    t = await TcpRig.open();
  }, 120_000);
  afterAll(async () => {
    await t?.close();
  }, 60_000);

  for (let i = 0; i < ROUNDS; i++) {
    const kind = TCP_KINDS[i % TCP_KINDS.length]!;
    it(`round ${i}: ${kind}`, async () => {
      if (!t.rig.healthy) t = await reopen(t);
      const r = await runTcpRound(t, planTcpRound(i, roundSeed(SEED, i)));
      results.push(r);
      expect(r.failures, `seed ${SEED}, round ${i}; evidence ${r.evidence ?? '-'}`).toEqual([]);
      expect(r.remoteAtCut.ok || r.resyncedBytes > 0).toBe(true);
      if (kind.startsWith('corrupt')) expect(r.corrupted).toBeGreaterThan(0);
    }, 180_000);
  }

  it('the flipped bits were caught on the wire: RESENDs, replies the sender could not read, ERRORs from the receiver', () => {
    // per round a flip may land where only a log line tells (a handshake, a connection already
    // going away) or in the log buffer of the receiver SIGKILLed at the cut; over the rounds the
    // link's own counters must show them (that no damaged byte was applied, the images show)
    const corrupt = results.filter((r) => r.kind.startsWith('corrupt'));
    expect(corrupt.length).toBeGreaterThan(0);
    expect(corrupt.reduce((n, r) => n + r.linkDetected, 0)).toBeGreaterThan(0);
  });

  it('never a full copy: whatever a round resynced stayed within the regions it wrote', () => {
    for (const r of results) expect(r.resyncedBytes).toBeLessThanOrEqual(r.writtenRegionBytes);
  });
});

describe(`tcp slink: rounds with big writes (seed ${SEED})`, () => {
  const opts = TCP_BIG_RIG;
  const kinds: readonly TcpKind[] = ['reset', 'corrupt-down', 'receiver-kill'];
  let t: TcpRig;
  beforeAll(async () => {
    t = await TcpRig.open(opts);
  }, 120_000);
  afterAll(async () => {
    await t?.close();
  }, 60_000);

  for (let i = 0; i < kinds.length; i++) {
    it(`round ${i}: ${kinds[i]}, writes up to ${opts.maxBlocks} blocks`, async () => {
      if (!t.rig.healthy) t = await reopen(t, opts);
      const r = await runTcpRound(t, planTcpRound(i, roundSeed(SEED + 1, i), opts, kinds));
      expect(r.failures, `seed ${SEED + 1}, round ${i}; evidence ${r.evidence ?? '-'}`).toEqual([]);
      expect(r.remoteAtCut.ok || r.resyncedBytes > 0).toBe(true);
    }, 180_000);
  }
});

describe(`tcp slink: rounds with a synchronous site (seed ${SEED})`, () => {
  // a write waiting for a synchronous site across a network sends its entry before its own
  // local write (replicator-group.ts): a reset, a corruption and a receiver kill under it
  const kinds: readonly TcpKind[] = ['reset', 'corrupt-down', 'receiver-kill'];
  const words = ['sync', 'retest=1', 'io-timeout=2'];
  let t: TcpRig;
  beforeAll(async () => {
    t = await TcpRig.open(TCP_RIG, words);
  }, 120_000);
  afterAll(async () => {
    await t?.close();
  }, 60_000);

  for (let i = 0; i < kinds.length; i++) {
    it(`round ${i}: ${kinds[i]}, sync`, async () => {
      if (!t.rig.healthy) t = await reopen(t, TCP_RIG, words);
      const r = await runTcpRound(t, planTcpRound(i, roundSeed(SEED + 2, i), TCP_RIG, kinds));
      expect(r.failures, `seed ${SEED + 2}, round ${i}; evidence ${r.evidence ?? '-'}`).toEqual([]);
      expect(r.remoteAtCut.ok || r.resyncedBytes > 0).toBe(true);
    }, 180_000);
  }
});

async function reopen(old: TcpRig, opts = TCP_RIG, words?: string[]): Promise<TcpRig> {
  await old.close();
  return TcpRig.open(opts, words);
}
