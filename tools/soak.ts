/**
 * `npm run soak -- [options]`: the replication SIGKILL rounds of
 * test/e2e/replicator-crash.test.ts (test/helpers/replication-rounds.ts), many of them,
 * outside vitest. Prints one line per round and a summary (rounds, kills, failures with
 * their seeds, time), and writes a JSON report.
 *
 *   --rounds N      rounds to run (default 1000)
 *   --seed S        base seed (default: from the clock); round i's seed is derived from it
 *   --start I       index of the first round (its kind cycles with the index; default 0)
 *   --kinds a,b     only these kinds of round, in turn (default: all; see KINDS in replication-rounds.ts)
 *   --out FILE      report path (default bench/results/soak-<date>.json)
 *   --quiet         no line per round
 *   --tcp           the network fault rounds of the tcp slink instead (tools/soak-tcp.ts; default 100 rounds)
 *   --big           writes of 4–256 KiB in 256 KiB regions (BIG_WRITES: log entries whose memory
 *                   the replication log reuses) instead of 4–16 KiB; with or without --tcp
 *
 * A failed round keeps its sandbox (its path and the evidence file are in the report);
 * the next round starts on a new rig. Exit status 1 when any round failed.
 * Rerun one round: `npm run soak -- --seed S --start I --rounds 1` (and the same --kinds).
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { soakTcp } from './soak-tcp.ts';
import { BIG_WRITES, DEFAULT_RIG, KINDS, planRound, Rig, roundSeed, runRound, type RoundKind, type RoundResult } from '../test/helpers/replication-rounds.ts';

const ROOT = fileURLToPath(new URL('..', import.meta.url));

function num(text: string | undefined, fallback: number, what: string): number {
  if (text === undefined) return fallback;
  const n = Number(text);
  if (!Number.isInteger(n) || n < 0) throw new Error(`--${what} must be a whole number >= 0, got '${text}'`);
  return n;
}

function percentile(xs: number[], p: number): number {
  if (xs.length === 0) return 0;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]!;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      rounds: { type: 'string' },
      seed: { type: 'string' },
      start: { type: 'string' },
      out: { type: 'string' },
      quiet: { type: 'boolean', default: false },
      kinds: { type: 'string' },
      tcp: { type: 'boolean', default: false },
      big: { type: 'boolean', default: false },
    },
  });
  if (values.tcp) {
    const date = new Date().toISOString().slice(0, 19).replace(/:/g, '-');
    process.exitCode = await soakTcp({
      rounds: num(values.rounds, 100, 'rounds'), base: num(values.seed, Date.now() % 1_000_000_007, 'seed'), start: num(values.start, 0, 'start'),
      kinds: values.kinds ? values.kinds.split(',') : null, quiet: values.quiet, root: ROOT, big: values.big,
      out: values.out ?? path.join(ROOT, 'bench', 'results', `soak-tcp-${date}.json`),
    });
    return;
  }
  const rounds = num(values.rounds, 1000, 'rounds');
  const only = values.kinds ? values.kinds.split(',') as RoundKind[] : KINDS;
  for (const k of only) if (!KINDS.includes(k)) throw new Error(`--kinds: unknown kind '${k}' (kinds: ${KINDS.join(', ')})`);
  const base = num(values.seed, Date.now() % 1_000_000_007, 'seed');
  const start = num(values.start, 0, 'start');
  const date = new Date().toISOString().slice(0, 19).replace(/:/g, '-');
  const out = values.out ?? path.join(ROOT, 'bench', 'results', `soak-${date}.json`);
  const say = (line: string): void => void process.stdout.write(`${line}\n`);
  const opts = { ...DEFAULT_RIG, ...(values.big ? BIG_WRITES : {}), log: values.quiet ? undefined : say };

  say(`soak: ${rounds} rounds from index ${start}, base seed ${base}, ${opts.devices} devices × ${opts.devBytes >> 20} MiB, ring ${opts.ringSectors} sectors, writes of up to ${opts.maxBlocks ?? 4} blocks in ${opts.regionSectors}-sector regions, report ${path.relative(ROOT, out)}`);
  const t0 = Date.now();
  const results: RoundResult[] = [];
  const sandboxes: string[] = [];
  let rig = await Rig.open(opts);
  let stop = false;
  process.once('SIGINT', () => {
    stop = true;
    say('soak: SIGINT, stopping after this round');
  });
  try {
    for (let i = start; i < start + rounds && !stop; i++) {
      const plan = planRound(i, roundSeed(base, i), opts, only);
      let r: RoundResult;
      try {
        r = await runRound(rig, plan);
      } catch (err) {
        // the rig itself broke (daemon would not start, writer died): a failed round
        rig.healthy = false;
        r = {
          index: i, seed: plan.seed, kind: plan.kind, ok: false, notes: [], failures: [`round aborted: ${(err as Error).stack ?? err}`],
          submitted: 0, acked: 0, kills: 0, remoteAtKill: [], afterRestart: [], resyncedBytes: 0, overflows: null, consistentAtKill: true, writtenRegionBytes: 0,
          ms: { write: 0, restart: 0, catchUp: 0, check: 0, total: 0 },
        };
      }
      results.push(r);
      if (!r.ok) {
        say(`soak: round ${i} FAILED (kind ${r.kind}, seed ${r.seed}); sandbox kept at ${rig.sb.dir}\n  ${r.failures.join('\n  ')}`);
        sandboxes.push(rig.sb.dir);
        await rig.close();
        rig = await Rig.open(opts);
      }
    }
  } finally {
    await rig.close();
  }

  const seconds = (Date.now() - t0) / 1000;
  const failed = results.filter((r) => !r.ok);
  const kills = results.reduce((n, r) => n + r.kills, 0);
  const totals = results.map((r) => r.ms.total);
  const kinds: Record<string, { rounds: number; failed: number; kills: number }> = {};
  for (const r of results) {
    const k = (kinds[r.kind] ??= { rounds: 0, failed: 0, kills: 0 });
    k.rounds++;
    k.kills += r.kills;
    if (!r.ok) k.failed++;
  }
  const summary = {
    rounds: results.length,
    kills,
    failed: failed.length,
    failures: failed.map((r) => ({ index: r.index, seed: r.seed, kind: r.kind, failures: r.failures, evidence: r.evidence ?? null })),
    seconds: Math.round(seconds),
    roundMs: { mean: Math.round(totals.reduce((a, b) => a + b, 0) / Math.max(1, totals.length)), p50: percentile(totals, 50), p95: percentile(totals, 95), max: percentile(totals, 100) },
    restartMs: { p50: percentile(results.map((r) => r.ms.restart / Math.max(1, r.kills)), 50) },
    writes: { submitted: results.reduce((n, r) => n + r.submitted, 0), acknowledged: results.reduce((n, r) => n + r.acked, 0) },
    remoteAtKill: {
      judged: results.reduce((n, r) => n + r.remoteAtKill.length, 0),
      invalid: results.reduce((n, r) => n + r.remoteAtKill.filter((v) => !v.ok).length, 0),
    },
    resyncs: results.filter((r) => r.resyncedBytes > 0).length,
    kinds,
  };
  fs.mkdirSync(path.dirname(out), { recursive: true });
  fs.writeFileSync(out, `${JSON.stringify({ date: new Date().toISOString(), base, start, rig: { ...opts, log: undefined }, summary, sandboxes, results }, null, 1)}\n`);

  say('');
  say(`soak: ${summary.rounds} rounds, ${kills} SIGKILLs, ${summary.failed} failed, ${summary.seconds} s (round p50 ${summary.roundMs.p50} ms, p95 ${summary.roundMs.p95} ms; restart p50 ${summary.restartMs.p50} ms)`);
  say(`      ${summary.writes.acknowledged} of ${summary.writes.submitted} writes acknowledged; remote images judged at ${summary.remoteAtKill.judged} kills (${summary.remoteAtKill.invalid} not order-consistent, declared so by the status after the restart unless a failure below says otherwise); ${summary.resyncs} round(s) resynced`);
  for (const [k, v] of Object.entries(kinds)) say(`      ${k.padEnd(12)} ${v.rounds} rounds, ${v.kills} kills, ${v.failed} failed`);
  for (const f of summary.failures) say(`  FAILED round ${f.index} (kind ${f.kind}, seed ${f.seed}): ${f.failures[0]?.split('\n')[0]}`);
  say(`report: ${path.relative(ROOT, out)}`);
  process.exitCode = failed.length > 0 ? 1 : 0;
}

main().catch((err: unknown) => {
  process.stderr.write(`soak: ${(err as Error).stack ?? String(err)}\n`);
  process.exit(2);
});
