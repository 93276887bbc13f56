/**
 * Network fault rounds for the `tcp` slink, shared by test/e2e/replication-tcp-rounds.test.ts
 * (10 rounds in CI) and `npm run soak -- --tcp` (100): a sender daemon (the rig of
 * replication-rig.ts, its slink 1 `tcp`), a receiving daemon (site-daemon.ts) holding the
 * remote devices, and a fault-injecting proxy (test/support/fault-proxy.ts) between them.
 *
 * A round: the writer writes to the group over NBD; once some writes are acknowledged one
 * fault strikes (kind below); once more are, the cut: the receiving daemon is SIGKILLed and
 * its images — frozen, its process gone — must be a valid prefix state of the group's
 * writes (the independent checker, replication-checker.ts); then it restarts, the faults
 * are healed, and the site must catch up to byte identity with the local images, without a
 * full copy (nothing resynced unless the status says the site went to its dirty logs).
 *
 * Kinds: `partition` (both ways, 100–1500 ms), `partition-up` and `partition-down` (one
 * way: the sender's frames or the receiver's acks vanish), `corrupt-up` / `corrupt-down`
 * (bits flipped in frames either way: re-sent, never applied), `reset` (every connection
 * RST), `receiver-kill` (the receiver SIGKILLed mid-stream and restarted at once: it
 * resumes from its persisted position), `sender-kill` (the sender SIGKILLed mid-stream and
 * restarted: it re-ships from its checkpoint, the receiver skips what it has).
 */
import fs from 'node:fs';
import path from 'node:path';
import { FaultProxy } from '../support/fault-proxy.ts';
import { prng } from './nbd-tools.ts';
import { type History, type WriterRound } from './repl-writer.ts';
import { BIG_WRITES, Rig, SECTOR, hotBlocks, type RigOptions, type Status } from './replication-rig.ts';
import { differences, judge, keepEvidence, writtenRegionBytes } from './replication-rounds.ts';
import { SiteDaemon } from './site-daemon.ts';

export type TcpKind = 'partition' | 'partition-up' | 'partition-down' | 'corrupt-up' | 'corrupt-down' | 'reset' | 'receiver-kill' | 'sender-kill';
export const TCP_KINDS: readonly TcpKind[] = ['partition', 'corrupt-up', 'receiver-kill', 'partition-up', 'sender-kill', 'corrupt-down', 'reset', 'partition-down'];

/** the tcp rig: a bigger ring than the blockdev rounds, so a partition does not overflow it */
export const TCP_RIG: RigOptions = { devices: 2, devBytes: 2 << 20, regionSectors: 64, ringSectors: 32768 };

/**
 * BIG_WRITES over tcp: a round writes ~20 MiB, so the ring is 64 MiB (the tail still moves,
 * and images are reused, at every checkpoint). In a 16 MiB ring a receiver down for 0.5 s
 * let it overflow, and the resync of the 2 MiB devices, under writes that rewrite them
 * whole, copied every region twice: past the rounds' bound on resync bytes, which is right
 * for small writes, but not a fault.
 */
export const TCP_BIG_RIG: RigOptions = { ...TCP_RIG, ...BIG_WRITES, ringSectors: 131072 };

export interface TcpPlan {
  index: number;
  seed: number;
  kind: TcpKind;
  writer: Omit<WriterRound, 'uris' | 'round'>;
  faultAtAcks: number;
  cutAtAcks: number;
  /** partitions: how long; kills: how long until the restart */
  faultMs: number;
  corruptCount: number;
}

export function planTcpRound(index: number, seed: number, opts: RigOptions = TCP_RIG, kinds: readonly TcpKind[] = TCP_KINDS): TcpPlan {
  const rnd = prng(seed);
  const int = (lo: number, hi: number): number => lo + Math.floor(rnd() * (hi - lo + 1));
  const kind = kinds[index % kinds.length]!;
  const maxWrites = int(200, 400);
  const faultAtAcks = int(20, Math.floor(maxWrites / 3));
  return {
    index, seed, kind,
    writer: {
      seed, lanes: int(4, 12), span: opts.devBytes / 4096, maxBlocks: int(1, opts.maxBlocks ?? 4), hot: hotBlocks(opts), hotShare: 0.5,
      maxWrites, flushShare: 0.03, fuaShare: 0.05,
    },
    faultAtAcks,
    cutAtAcks: int(faultAtAcks + 10, maxWrites),
    faultMs: kind.startsWith('partition') ? int(100, 1500) : int(0, 500),
    corruptCount: int(1, 5),
  };
}

export interface TcpRoundResult {
  index: number;
  seed: number;
  kind: TcpKind;
  ok: boolean;
  failures: string[];
  notes: string[];
  submitted: number;
  acked: number;
  remoteAtCut: { check: string; ok: boolean };
  resyncedBytes: number;
  writtenRegionBytes: number;
  link: { resends: number; reconnects: number } | null;
  corrupted: number;
  /** damaged frames either side reported in its log during the round (CRC or framing; log lines, rate-limited, lost with a SIGKILLed daemon's buffer) */
  detected: number;
  /** damaged frames in the sender's link counters this round: RESENDs asked for, replies it could not read, connections the receiver closed with an ERROR */
  linkDetected: number;
  ms: number;
  evidence?: string;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** a damaged frame as either daemon logs it: a payload CRC (RESEND) or a header that broke the framing */
const DAMAGE = /failed its CRC|CRC mismatch|bad frame magic|reserved bytes|over the limit of|unknown op|unknown codec|unexpected frame type|arrived damaged/g;

/** damage reports in both daemons' logs so far */
function damageReports(t: TcpRig): number {
  return (t.rig.logTail(1 << 24).match(DAMAGE)?.length ?? 0) + (t.site.log().match(DAMAGE)?.length ?? 0);
}

/** the sender's count of damaged frames on slink 1 (its lifetime: rounds take differences) */
function linkDamage(s: Status): number {
  const l = s.detail.sites.find((x) => x.slink === 1)?.link;
  return l ? l.resends + l.badReplies + l.peerErrors : 0;
}

/** The sender rig, the receiving daemon and the proxy between them. */
export class TcpRig {
  readonly rig: Rig;
  readonly site: SiteDaemon;
  readonly proxy: FaultProxy;

  private constructor(rig: Rig, site: SiteDaemon, proxy: FaultProxy) {
    this.rig = rig;
    this.site = site;
    this.proxy = proxy;
  }

  static async open(opts: RigOptions = TCP_RIG, slinkWords: string[] = ['async', 'retest=1', 'io-timeout=2']): Promise<TcpRig> {
    const site = await SiteDaemon.start();
    let proxy: FaultProxy | null = null;
    try {
      proxy = await FaultProxy.start({ target: { host: '127.0.0.1', port: site.port } });
      const p = proxy;
      const rig = await Rig.open({
        ...opts,
        remote: async (r) => {
          for (let i = 0; i < opts.devices; i++) {
            await site.request('create', { name: `site${i}`, table: `0 ${opts.devBytes / SECTOR} linear ${r.file(`remote${i}.img`)} 0` });
          }
          return { slink: ['tcp', ...slinkWords, `peer=${p.address}`, `secret=${site.secretFile}`], devParam: (i) => `site${i}` };
        },
      });
      return new TcpRig(rig, site, p);
    } catch (err) {
      await proxy?.close();
      await site.close();
      throw err;
    }
  }

  async close(): Promise<void> {
    await this.rig.close();
    await this.proxy.close();
    if (this.rig.healthy) await this.site.close();
    else await this.site.kill();
  }
}

/** One round; throws when it cannot run (with both daemons' log tails). */
export async function runTcpRound(t: TcpRig, plan: TcpPlan): Promise<TcpRoundResult> {
  try {
    const r = await tcpRound(t, plan);
    if (!r.ok) t.rig.healthy = false;
    return r;
  } catch (err) {
    t.rig.healthy = false;
    throw new Error(`tcp round ${plan.index} (${plan.kind}, seed ${plan.seed}) aborted in ${t.rig.sb.dir}: ${(err as Error).message}\nsender log: ${t.rig.logTail(1500)}\nreceiver log: ${t.site.logTail(1500)}`, { cause: err });
  }
}

async function tcpRound(t: TcpRig, plan: TcpPlan): Promise<TcpRoundResult> {
  const { rig, site, proxy } = t;
  const t0 = Date.now();
  const log = rig.opts.log ?? (() => undefined);
  const failures: string[] = [];
  const notes: string[] = [];
  const res: TcpRoundResult = {
    index: plan.index, seed: plan.seed, kind: plan.kind, ok: false, failures, notes, submitted: 0, acked: 0,
    remoteAtCut: { check: '', ok: false }, resyncedBytes: 0, writtenRegionBytes: 0, link: null, corrupted: 0, detected: 0, linkDetected: 0, ms: 0,
  };
  const logFrom = rig.logSize();
  const corruptedBefore = proxy.stats.corrupted;
  const detectedBefore = damageReports(t);
  const linkBefore = linkDamage(await rig.status('repl'));
  const h: History = await rig.writer.start({ ...plan.writer, uris: rig.uris(), round: plan.index + 1 });
  const until = async (acks: number): Promise<void> => {
    if (!(await rig.writer.until((x) => x.acked >= acks, 30_000))) {
      failures.push(`the writer acknowledged only ${h.acked} of ${acks} writes in 30 s (errors: ${h.errors.join('; ')})`);
    }
  };

  // ---- the fault ----
  await until(plan.faultAtAcks);
  let senderKilled = false;
  switch (plan.kind) {
    case 'partition': case 'partition-up': case 'partition-down':
      proxy.partition(plan.kind === 'partition' ? 'both' : plan.kind === 'partition-up' ? 'up' : 'down');
      await sleep(plan.faultMs);
      proxy.heal();
      break;
    case 'corrupt-up': case 'corrupt-down':
      proxy.corrupt(plan.kind === 'corrupt-up' ? 'up' : 'down', { afterBytes: 64, count: plan.corruptCount });
      break;
    case 'reset':
      proxy.reset();
      break;
    case 'receiver-kill':
      await site.kill();
      await sleep(plan.faultMs);
      await site.restart();
      break;
    case 'sender-kill':
      await rig.kill();
      senderKilled = true;
      break;
  }

  // ---- the cut: the receiver dies, its images are judged as they are ----
  if (!senderKilled) await until(plan.cutAtAcks);
  await site.kill();
  const hist = senderKilled ? await rig.writer.stop() : h;
  const records = hist.records(); // the writes up to the cut (the writer goes on unless the sender died)
  const remote = judge(rig, records, rig.images('remote'), false);
  res.remoteAtCut = { check: remote.text, ok: !!remote.result?.ok };

  // ---- heal, restart, catch up ----
  await site.restart();
  if (senderKilled) await rig.startDaemon();
  else await rig.writer.stop();
  res.submitted = hist.writes.size;
  res.acked = hist.acked;
  res.writtenRegionBytes = writtenRegionBytes(rig, rig.opts, hist);
  let caught: Status | null = null;
  try {
    caught = await rig.caughtUp();
  } catch (err) {
    failures.push(`${(err as Error).message}; receiver log: ${site.logTail(800)}`);
  }
  const s1 = caught?.detail.sites.find((x) => x.slink === 1);
  res.resyncedBytes = s1?.resyncedBytes ?? 0;
  res.link = s1?.link ? { resends: s1.link.resends, reconnects: s1.link.reconnects } : null;
  res.corrupted = proxy.stats.corrupted - corruptedBefore;
  res.detected = damageReports(t) - detectedBefore;
  if (caught && !senderKilled) res.linkDetected = linkDamage(caught) - linkBefore;
  const wentToDirtyLog = res.resyncedBytes > 0;
  if (!res.remoteAtCut.ok) {
    if (wentToDirtyLog) notes.push(`remote at the cut not order-consistent, and the site resynced from its dirty logs: ${remote.text.split('\n')[0]}`);
    else failures.push(`remote images at the cut are not a valid prefix state of the group's writes: ${remote.text}`);
  }
  if (caught) {
    const local = rig.images('local');
    const lc = judge(rig, hist.records(), local, true); // every write, those after the cut too
    if (!lc.result?.ok) failures.push(`local images lost an acknowledged write: ${lc.text}`);
    const diffs = differences(local, rig.images('remote'));
    if (diffs.length) failures.push(`after catch-up the remote differs from local: ${diffs.join('; ')}`);
    if (res.resyncedBytes > res.writtenRegionBytes) failures.push(`resync copied ${res.resyncedBytes} bytes, more than the ${res.writtenRegionBytes} the rounds wrote (a full copy?)`);
    else if (wentToDirtyLog) notes.push(`resynced ${res.resyncedBytes} B from the dirty logs`);
    rig.initial = local;
  }
  // no power loss in a round: the sender never finds the site holding entries its log lost
  // (a false verdict would set the site back and verify it whole: src/targets/replicator-lost.ts)
  const said = rig.logTail(Math.max(1, rig.logSize() - logFrom));
  if (/no longer has/.test(said)) failures.push('the sender judged the site to hold entries its log lost, with no power loss in the round');
  if (/not closed cleanly/.test(said)) failures.push('after a SIGKILL the log was taken for cut off by a power loss (every site verified whole)');
  res.ms = Date.now() - t0;
  res.ok = failures.length === 0;
  if (!res.ok) {
    res.evidence = keepEvidence(rig, plan, res, hist);
    fs.writeFileSync(path.join(rig.sb.dir, `receiver-log-round-${plan.index}.txt`), site.log());
  }
  log(`tcp round ${plan.index} (${plan.kind}) ${res.ok ? 'ok' : 'FAILED'} in ${res.ms} ms: ${res.acked}/${res.submitted} acked, cut ${res.remoteAtCut.ok ? 'valid' : 'INVALID'}, resends ${res.link?.resends ?? '?'}, reconnects ${res.link?.reconnects ?? '?'}, corrupted ${res.corrupted}, damage reported ${res.detected} (logs) ${res.linkDetected} (link), resynced ${res.resyncedBytes} B${notes.length ? `; ${notes.join('; ')}` : ''}`);
  return res;
}
