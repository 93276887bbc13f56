/**
 * SIGKILL rounds for replication (REPLICATION.md guarantees 1–3, 5, 6), shared by
 * test/e2e/replicator-crash.test.ts and `npm run soak` (tools/soak.ts), on the rig of
 * replication-rig.ts (a real daemon, a group of devices, a writer child).
 *
 * A round (`runRound`): set the round's kind (below); write; SIGKILL the daemon at a
 * random instant (a random count of acknowledged writes plus 0–15 ms; sometimes after the
 * writer went idle); then judge the image files with the independent checker
 * (replication-checker.ts):
 *  - the local images hold every acknowledged write (a valid state including all of them);
 *  - the remote images are a valid prefix state (with every acknowledged write too when
 *    the slink was synchronous throughout), unless the status as soon as the restarted
 *    daemon answers declares otherwise: the site on its dirty logs (it resynced), or, for
 *    a kill during recovery, re-shipping entries it may already have had (JSON
 *    `consistent: false`); then only the final identity is asked for, and the round notes it;
 * then restart, wait until slink 1 is caught up (`1:A,0,0`) and every region is in sync,
 * and check that the local images hold every acknowledged write, remote = local byte for
 * byte, and that a resync copied no more than the regions this round and the one before wrote (no full copy).
 *
 * Kinds: `async`; `sync` (policy message); `suspended` (slink suspended before the writes:
 * a backlog); `suspend-mid` (suspended once some writes are acknowledged); `slow` and
 * `slow-sync` (a `delay` target under the remote devices); `overflow` (suspended, about
 * twice the ring written into a quarter of each device: the site goes to its dirty logs,
 * resyncs those regions after the restart); `double` (suspended, slow site: SIGKILL again
 * 0–400 ms after the restarted daemon recovered its ring, while it replays and catches up);
 * `double-ship` (the same without suspension: the second kill lands while the site
 * re-ships entries after its last checkpoint). After a kill during recovery the local
 * files may be mid-replay (the ring re-applies entries after the last checkpoint): they are
 * noted, and judged after the next recovery completes.
 */
import fs from 'node:fs';
import { prng } from './nbd-tools.ts';
import { BLOCK, describeBlock, type History, type WriterRound } from './repl-writer.ts';
import { checkSite, HistoryError, summarize, type CheckResult, type WriteRecord } from './replication-checker.ts';
import { DEFAULT_RIG, SECTOR, hotBlocks, type Rig, type RigOptions, type Status } from './replication-rig.ts';

export { BIG_WRITES, DEFAULT_RIG, Rig, type RigOptions } from './replication-rig.ts';

export type RoundKind = 'async' | 'sync' | 'suspended' | 'suspend-mid' | 'slow' | 'slow-sync' | 'double' | 'double-ship' | 'overflow';
/** the kinds in the order rounds cycle through them */
export const KINDS: readonly RoundKind[] = ['async', 'suspended', 'sync', 'slow', 'suspend-mid', 'slow-sync', 'double', 'overflow', 'double-ship'];

export interface RoundPlan {
  index: number;
  seed: number;
  kind: RoundKind;
  writer: Omit<WriterRound, 'uris' | 'round'>;
  /** SIGKILL once this many writes are acknowledged (then after `killJitterMs`) */
  killAtAcks: number;
  killJitterMs: number;
  /** suspend-mid: suspend slink 1 once this many writes are acknowledged */
  suspendAtAcks: number;
  /** slow kinds: ms per write at the site */
  siteDelayMs: number;
  /** double: the second SIGKILL this long after the restarted daemon recovered its log */
  secondKillMs: number;
}

/** round `index`'s seed from a base seed (reproducible: the same base gives the same rounds) */
export function roundSeed(base: number, index: number): number {
  let x = (Math.imul(base ^ 0x5bd1e995, 0x9e3779b1) + Math.imul(index + 1, 0x85ebca6b)) >>> 0;
  x ^= x >>> 15;
  x = Math.imul(x, 0x2c1b3c6d) >>> 0;
  return ((x ^ (x >>> 12)) >>> 0) % 1_000_000_007;
}

/** the round's parameters, all drawn from its seed */
export function planRound(index: number, seed: number, opts: RigOptions = DEFAULT_RIG, kinds: readonly RoundKind[] = KINDS): RoundPlan {
  const rnd = prng(seed);
  const int = (lo: number, hi: number): number => lo + Math.floor(rnd() * (hi - lo + 1));
  const kind = kinds[index % kinds.length]!;
  const blocks = opts.devBytes / BLOCK;
  const backlog = kind === 'suspended' || kind === 'suspend-mid' || kind === 'double';
  // overflow: about twice the ring in writes of 2.5 blocks on average, killed in the last tenth of them
  const overflow = kind === 'overflow';
  const maxWrites = overflow ? ((opts.ringSectors * SECTOR) / BLOCK) * int(75, 90) / 100 : backlog ? int(100, 250) : int(150, 400);
  const idleKill = rnd() < 0.15;
  return {
    index, seed, kind,
    writer: {
      seed, lanes: int(4, 12), span: overflow ? blocks / 4 : blocks, maxBlocks: overflow ? 4 : int(1, opts.maxBlocks ?? 4),
      hot: hotBlocks(opts), hotShare: 0.5, maxWrites: Math.round(maxWrites), flushShare: 0.03, fuaShare: 0.05,
    },
    killAtAcks: idleKill || overflow ? Math.round(maxWrites * (idleKill ? 1 : 0.9)) : int(1, maxWrites - 1),
    killJitterMs: int(0, 15),
    suspendAtAcks: int(1, Math.floor(maxWrites / 2)),
    siteDelayMs: kind === 'slow' || kind === 'slow-sync' || kind === 'double' || kind === 'double-ship' ? int(2, 12) : 0,
    secondKillMs: int(0, 400),
  };
}

export interface SiteVerdict {
  /** what the checker said (summary line and problems) */
  check: string;
  ok: boolean;
  ackedPresent: number;
  acked: number;
}

export interface RoundResult {
  index: number;
  seed: number;
  kind: RoundKind;
  ok: boolean;
  failures: string[];
  submitted: number;
  acked: number;
  kills: number;
  /** the remote images right after each SIGKILL */
  remoteAtKill: SiteVerdict[];
  /** slink 1 as soon as each restarted daemon answers: state character, mode (in-order, dirty-log), consistent */
  afterRestart: Array<{ state: string; mode: string; consistent: boolean; inSync: string }>;
  resyncedBytes: number;
  /** the group's ring-overflow count just before the SIGKILL */
  overflows: number | null;
  /**
   * the status read just before the first SIGKILL said the site was order-consistent (false:
   * on its dirty logs after an overflow, or resyncing: its images need not be a prefix)
   */
  consistentAtKill: boolean;
  /** bytes of the regions the round wrote: the most a resync may copy */
  writtenRegionBytes: number;
  ms: { write: number; restart: number; catchUp: number; check: number; total: number };
  /** observations that are not failures */
  notes: string[];
  /** where the evidence of a failed round is kept */
  evidence?: string;
}

export interface Judged {
  result: CheckResult | null;
  text: string;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export function judge(rig: Rig, records: WriteRecord[], image: Buffer[], requireAcked: boolean): Judged {
  try {
    const result = checkSite({ blockBytes: BLOCK, writes: records, initial: rig.initial, image, requireAcked });
    return { result, text: summarize(result) };
  } catch (err) {
    if (err instanceof HistoryError) return { result: null, text: `history refused: ${err.message}` };
    throw err;
  }
}

/** the regions (dirty-log regions, per device) each rig's previous round touched */
const previousRegions = new WeakMap<object, Set<string>>();

/**
 * Bytes of the regions (dirty-log regions, per device) the round's writes touched, and
 * those of the round before on the same rig: a site's position is checkpointed at most
 * every 200 ms (a suspended or down site's not at all until it ships again), so the
 * entries a crash makes it take again, or mark for a resync, may reach back before this
 * round began. The bound still fails a full copy and any resync of regions nobody wrote.
 */
export function writtenRegionBytes(rig: object, opts: RigOptions, h: History): number {
  const regionBytes = opts.regionSectors * SECTOR;
  const regions = new Set<string>();
  for (const w of h.writes.values()) {
    for (let r = Math.floor(w.offset / regionBytes); r <= Math.floor((w.offset + w.blocks * BLOCK - 1) / regionBytes); r++) regions.add(`${w.dev}:${r}`);
  }
  const allowed = new Set([...regions, ...(previousRegions.get(rig) ?? [])]);
  previousRegions.set(rig, regions);
  return allowed.size * regionBytes;
}

/** per device that differs: how many blocks, and what each side holds at the first */
export function differences(a: Buffer[], b: Buffer[]): string[] {
  const out: string[] = [];
  for (let d = 0; d < a.length; d++) {
    let n = 0;
    let first = -1;
    for (let o = 0; o < a[d]!.length; o += BLOCK) {
      if (a[d]!.subarray(o, o + BLOCK).equals(b[d]!.subarray(o, o + BLOCK))) continue;
      if (first < 0) first = o / BLOCK;
      n++;
    }
    if (n > 0) {
      const at = first * BLOCK;
      out.push(`device ${d}: ${n} block(s) differ, first block ${first}: local ${describeBlock(a[d]!.subarray(at, at + BLOCK))}, remote ${describeBlock(b[d]!.subarray(at, at + BLOCK))}`);
    }
  }
  return out;
}

/** the round's history and verdicts next to the images (the sandbox is kept) */
export function keepEvidence(rig: Rig, plan: { index: number }, res: unknown, h: History): string {
  const file = rig.file(`failure-round-${plan.index}.json`);
  fs.writeFileSync(file, JSON.stringify({ plan, result: res, writes: [...h.writes.values()], daemonLog: rig.logTail(20_000) }, null, 1));
  return file;
}

/**
 * One round on `rig`. A round that cannot run (the daemon would not start, the writer
 * died) throws, with the daemon log's tail; a failed or aborted round leaves the rig
 * unhealthy (close it, which keeps its sandbox, and open a new one).
 */
export async function runRound(rig: Rig, plan: RoundPlan): Promise<RoundResult> {
  try {
    const r = await round(rig, plan);
    if (!r.ok) rig.healthy = false;
    return r;
  } catch (err) {
    rig.healthy = false;
    throw new Error(`round ${plan.index} (${plan.kind}, seed ${plan.seed}) aborted in ${rig.sb.dir}: ${(err as Error).message}\ndaemon log: ${rig.logTail(2000)}`, { cause: err });
  }
}

async function round(rig: Rig, plan: RoundPlan): Promise<RoundResult> {
  const t0 = Date.now();
  const log = rig.opts.log ?? (() => undefined);
  const failures: string[] = [];
  const res: RoundResult = {
    index: plan.index, seed: plan.seed, kind: plan.kind, ok: false, failures, notes: [], submitted: 0, acked: 0, kills: 0,
    remoteAtKill: [], afterRestart: [], resyncedBytes: 0, overflows: null, consistentAtKill: true, writtenRegionBytes: 0, ms: { write: 0, restart: 0, catchUp: 0, check: 0, total: 0 },
  };
  const logFrom = rig.logSize();
  const sync = plan.kind === 'sync' || plan.kind === 'slow-sync';
  const suspended = plan.kind === 'suspended' || plan.kind === 'double' || plan.kind === 'overflow';

  // ---- the round's setting, the writes, the SIGKILL ----
  await rig.setSiteDelay(plan.siteDelayMs);
  if (sync) await rig.message('policy', '1', 'sync');
  if (suspended) await rig.message('slink', 'suspend', '1');
  const h = await rig.writer.start({ ...plan.writer, uris: rig.uris(), round: plan.index + 1 });
  let suspendedAt = -1;
  if (plan.kind === 'suspend-mid') {
    await rig.writer.until((x) => x.acked >= plan.suspendAtAcks, 30_000);
    await rig.message('slink', 'suspend', '1');
    suspendedAt = h.acked;
  }
  const reached = await rig.writer.until((x) => x.acked >= plan.killAtAcks, 30_000);
  if (!reached) failures.push(`the writer acknowledged only ${h.acked} of ${plan.killAtAcks} writes in 30 s (errors: ${h.errors.join('; ')})`);
  const beforeKill = await rig.status('repl');
  res.overflows = beforeKill.detail.statistics?.overflows ?? null;
  res.consistentAtKill = beforeKill.detail.sites.find((x) => x.slink === 1)?.consistent ?? true;
  await sleep(plan.killJitterMs);
  await rig.kill();
  res.kills++;
  await rig.writer.stop();
  res.ms.write = Date.now() - t0;
  res.submitted = h.writes.size;
  res.acked = h.acked;
  res.writtenRegionBytes = writtenRegionBytes(rig, rig.opts, h);
  const records = h.records();
  const unexpected = [...h.writes.values()].filter((w) => w.error && w.ackTime === null).length;
  log(`round ${plan.index} (${plan.kind}, seed ${plan.seed}): killed after ${h.acked}/${h.writes.size} acknowledged (${unexpected} failed in flight)${suspendedAt >= 0 ? `, suspended at ${suspendedAt}` : ''}`);

  /** local: strict after a kill while the group ran; after a kill during recovery the raw files may be mid-replay (judged after the next recovery) */
  const judgeKill = (label: string, remoteAllAcked: boolean, localStrict: boolean): { remote: Judged } => {
    const local = judge(rig, records, rig.images('local'), true);
    if (!local.result?.ok) {
      if (localStrict) failures.push(`${label}: local images lost an acknowledged write or are not a valid state: ${local.text}`);
      else res.notes.push(`${label}: local images mid-replay (${local.result ? `${local.result.ackedPresent}/${local.result.acked} acknowledged writes present` : local.text})`);
    }
    const remote = judge(rig, records, rig.images('remote'), remoteAllAcked);
    res.remoteAtKill.push({ check: remote.text, ok: !!remote.result?.ok, ackedPresent: remote.result?.ackedPresent ?? 0, acked: remote.result?.acked ?? 0 });
    return { remote };
  };
  const tc = Date.now();
  const kills = [judgeKill('after SIGKILL', sync && !suspended, true)];
  res.ms.check += Date.now() - tc;

  // ---- restart (and, for `double`, SIGKILL again while the site catches up) ----
  const restart = async (): Promise<void> => {
    const tr = Date.now();
    await rig.startDaemon();
    res.ms.restart += Date.now() - tr;
    const s = await rig.status('repl');
    const site = s.detail.sites.find((x) => x.slink === 1)!;
    res.afterRestart.push({ state: site.stateChar, mode: site.mode ?? '?', consistent: site.consistent ?? false, inSync: await rig.inSync() });
  };
  if (plan.kind === 'double' || plan.kind === 'double-ship') {
    const from = rig.logSize();
    const tr = Date.now();
    rig.spawnDaemon();
    await rig.killDuringRecovery(from, plan.secondKillMs);
    res.ms.restart += Date.now() - tr;
    res.kills++;
    const t2 = Date.now();
    kills.push(judgeKill('after the second SIGKILL (during recovery and catch-up)', false, false));
    res.ms.check += Date.now() - t2;
  }
  await restart();
  const tu = Date.now();
  let caught: Status | null = null;
  try {
    caught = await rig.caughtUp();
  } catch (err) {
    failures.push((err as Error).message);
  }
  res.ms.catchUp = Date.now() - tu;
  const site = caught?.detail.sites.find((x) => x.slink === 1);
  res.resyncedBytes = site?.resyncedBytes ?? 0;

  // ---- judge: the remote at each kill, then local and remote after catch-up ----
  const t3 = Date.now();
  // An image that is not a valid prefix state is allowed only where the engine says so: after a kill
  // while the group ran, only if the site was on its dirty logs (it resynced after the restart, or the
  // status just before the kill said it was not consistent: with a second kill during recovery, the
  // daemon in between may have done the resync); after a kill during recovery also if the site was
  // re-shipping entries it may already have had (consistent false after the restart)
  const after = res.afterRestart[res.afterRestart.length - 1]!;
  const onDirtyLogs = after.mode === 'dirty-log' || res.resyncedBytes > 0;
  kills.forEach((k, n) => {
    if (k.remote.result?.ok) return;
    const duringRecovery = n > 0;
    if (!duringRecovery && !res.consistentAtKill) {
      res.notes.push(`remote images after SIGKILL 1 not order-consistent, as the status before the kill declared: ${k.remote.text.split('\n')[0]}`);
      return;
    }
    if (onDirtyLogs || (duringRecovery && !after.consistent)) {
      res.notes.push(`remote images after SIGKILL ${n + 1} not order-consistent, as the status after the restart declared (${JSON.stringify(after)}): ${k.remote.text.split('\n')[0]}`);
      return;
    }
    failures.push(`remote images after SIGKILL ${n + 1}${duringRecovery ? ' (during recovery)' : ''} are not a valid prefix state, and the status after the restart did not declare it (${JSON.stringify(after)}): ${k.remote.text}`);
  });
  if (caught) {
    const local = rig.images('local');
    const remote = rig.images('remote');
    const lc = judge(rig, records, local, true);
    if (!lc.result?.ok) failures.push(`after catch-up: local images lost an acknowledged write or are not a valid state: ${lc.text}`);
    const diffs = differences(local, remote);
    if (diffs.length) failures.push(`after catch-up: remote differs from local: ${diffs.join('; ')}`);
    if (res.resyncedBytes > res.writtenRegionBytes) {
      failures.push(`resync copied ${res.resyncedBytes} bytes, more than the ${res.writtenRegionBytes} bytes of the regions this round and the one before wrote (full copy would be ${rig.opts.devices * rig.opts.devBytes})`);
    }
    rig.initial = local;
  }
  // a SIGKILL is not a power loss: the log was never found cut off (every site verified whole)
  if (/not closed cleanly/.test(rig.logTail(Math.max(1, rig.logSize() - logFrom)))) failures.push('after a SIGKILL the log was taken for cut off by a power loss (every site verified whole)');
  res.ms.check += Date.now() - t3;
  res.ms.total = Date.now() - t0;
  res.ok = failures.length === 0;
  if (!res.ok) {
    res.evidence = keepEvidence(rig, plan, res, h);
  }
  log(`round ${plan.index} ${res.ok ? 'ok' : 'FAILED'} in ${res.ms.total} ms: remote at kill ${res.remoteAtKill.map((r) => `${r.ackedPresent}/${r.acked}${r.ok ? '' : ' invalid'}`).join(', ')}; after restart ${res.afterRestart.map((a) => `${a.state}${a.consistent ? '' : ' (not consistent)'}`).join(',')}; resynced ${res.resyncedBytes} B${res.notes.length ? `; notes: ${res.notes.join('; ')}` : ''}`);
  return res;
}
