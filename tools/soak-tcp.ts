/**
 * `npm run soak -- --tcp [--rounds N] [--seed S] [--start I] [--kinds a,b] [--big] [--out FILE]`:
 * the network fault rounds of test/e2e/replication-tcp-rounds.test.ts
 * (test/helpers/tcp-rounds.ts) — partitions, corruption, resets, receiver and sender
 * SIGKILLs between two real daemons through a fault proxy — many of them (default 100),
 * with a line per round, a summary and a JSON report. A failed round keeps its sandboxes
 * and the next one starts on a new pair of daemons. Exit status 1 when any round failed.
 */
import fs from 'node:fs';
import path from 'node:path';
import { roundSeed } from '../test/helpers/replication-rounds.ts';
import { TCP_BIG_RIG, TCP_KINDS, TCP_RIG, TcpRig, planTcpRound, runTcpRound, type TcpKind, type TcpRoundResult } from '../test/helpers/tcp-rounds.ts';

export interface TcpSoakOptions {
  rounds: number;
  base: number;
  start: number;
  kinds: readonly string[] | null;
  out: string;
  quiet: boolean;
  root: string;
  /** big writes (TCP_BIG_RIG, test/helpers/tcp-rounds.ts) */
  big: boolean;
}

export async function soakTcp(o: TcpSoakOptions): Promise<number> {
  const kinds = (o.kinds ?? TCP_KINDS) as TcpKind[];
  for (const k of kinds) if (!TCP_KINDS.includes(k)) throw new Error(`--kinds: unknown tcp kind '${k}' (kinds: ${TCP_KINDS.join(', ')})`);
  const say = (line: string): void => void process.stdout.write(`${line}\n`);
  const opts = { ...(o.big ? TCP_BIG_RIG : TCP_RIG), log: o.quiet ? undefined : say };
  say(`soak --tcp: ${o.rounds} rounds from index ${o.start}, base seed ${o.base}, ${opts.devices} devices × ${opts.devBytes >> 20} MiB, writes of up to ${opts.maxBlocks ?? 4} blocks in ${opts.regionSectors}-sector regions, report ${path.relative(o.root, o.out)}`);
  const t0 = Date.now();
  const results: TcpRoundResult[] = [];
  const kept: string[] = [];
  let t = await TcpRig.open(opts);
  try {
    for (let i = o.start; i < o.start + o.rounds; i++) {
      const plan = planTcpRound(i, roundSeed(o.base, i), opts, kinds);
      let r: TcpRoundResult;
      try {
        r = await runTcpRound(t, plan);
      } catch (err) {
        r = {
          index: i, seed: plan.seed, kind: plan.kind, ok: false, failures: [`round aborted: ${(err as Error).message}`], notes: [],
          submitted: 0, acked: 0, remoteAtCut: { check: '', ok: false }, resyncedBytes: 0, writtenRegionBytes: 0, link: null, corrupted: 0, detected: 0, linkDetected: 0, ms: 0,
        };
      }
      results.push(r);
      if (!r.ok) {
        say(`soak --tcp: round ${i} FAILED (kind ${r.kind}, seed ${r.seed}); sandboxes kept at ${t.rig.sb.dir} and ${t.site.sb.dir}\n  ${r.failures.join('\n  ')}`);
        kept.push(t.rig.sb.dir, t.site.sb.dir);
        t.rig.healthy = false;
        await t.close();
        t = await TcpRig.open(opts);
      }
    }
  } finally {
    await t.close();
  }
  const failed = results.filter((r) => !r.ok);
  // per kind: bits flipped on the wire, and damaged frames the receiving side reported (both per round)
  const byKind: Record<string, { rounds: number; failed: number; corrupted: number; detected: number; linkDetected: number; undetected: number; cutsValid: number }> = {};
  for (const r of results) {
    const k = (byKind[r.kind] ??= { rounds: 0, failed: 0, corrupted: 0, detected: 0, linkDetected: 0, undetected: 0, cutsValid: 0 });
    k.linkDetected += r.linkDetected;
    if (r.corrupted > 0 && r.linkDetected === 0) k.undetected++;
    k.rounds++;
    if (!r.ok) k.failed++;
    if (r.remoteAtCut.ok) k.cutsValid++;
    k.corrupted += r.corrupted;
    k.detected += r.detected;
  }
  const summary = {
    rounds: results.length, failed: failed.length, seconds: Math.round((Date.now() - t0) / 1000),
    writes: { submitted: results.reduce((n, r) => n + r.submitted, 0), acknowledged: results.reduce((n, r) => n + r.acked, 0) },
    cutsValid: results.filter((r) => r.remoteAtCut.ok).length, resyncs: results.filter((r) => r.resyncedBytes > 0).length,
    corruptedBytes: results.reduce((n, r) => n + r.corrupted, 0), kinds: byKind,
    failures: failed.map((r) => ({ index: r.index, seed: r.seed, kind: r.kind, failures: r.failures, evidence: r.evidence ?? null })),
  };
  fs.mkdirSync(path.dirname(o.out), { recursive: true });
  fs.writeFileSync(o.out, `${JSON.stringify({ date: new Date().toISOString(), base: o.base, start: o.start, rig: { ...opts, log: undefined }, summary, kept, results }, null, 1)}\n`);
  say('');
  say(`soak --tcp: ${summary.rounds} rounds, ${summary.failed} failed, ${summary.seconds} s; ${summary.writes.acknowledged} of ${summary.writes.submitted} writes acknowledged; site a valid prefix at ${summary.cutsValid} of ${summary.rounds} cuts; ${summary.resyncs} round(s) resynced; ${summary.corruptedBytes} bytes corrupted on the wire`);
  for (const [k, v] of Object.entries(byKind)) say(`      ${k.padEnd(15)} ${v.rounds} rounds, ${v.failed} failed, ${v.cutsValid} valid cuts, ${v.corrupted} bits flipped, ${v.linkDetected} damaged frames counted by the link (${v.detected} log reports), ${v.undetected} round(s) with flips and none counted`);
  for (const f of summary.failures) say(`  FAILED round ${f.index} (kind ${f.kind}, seed ${f.seed}): ${f.failures[0]?.split('\n')[0]}`);
  say(`report: ${path.relative(o.root, o.out)}`);
  return failed.length > 0 ? 1 : 0;
}
