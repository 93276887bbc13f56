/**
 * Worker process of R1 and R3 (protocol: child.ts): the replication group in-process (the
 * library, as L1's dmkit side), the plain-Node references (r-reference.ts) and, for R1,
 * `linear` over a file like the local one, all in this one process taking turns.
 *
 *   node --import tsx tools/bench/r-worker.ts '<R1Spec | R3Spec as JSON>'
 *
 * R1 command: one side writes `ops` requests of the pattern; for dmkit the sample then goes
 * on until the replicator's status shows slink 1 caught up (`1:A,0,0`). Before every run all
 * files are fdatasync-ed (untimed), so no run pays for the previous run's dirty pages.
 * R3 command: one outage and its resync (dmkit), or the plain copy of the same regions (ref).
 */
import { createInterface } from 'node:readline';
import type { DeviceMapper, MappedDevice } from '../../src/index.ts';
import { dmkitFactory } from './lib-sides.ts';
import { gcWatch, type RunResult, sampler, sleep, slink1, syncAll, waitCaughtUp } from './r-probe.ts';
import { copyRegions, driveOps, offsets, replicaFactory, type Replica } from './r-reference.ts';
import type { Pattern, Slot } from './workload.ts';
import { makeSlots } from './workload.ts';

/** `ref-nocp`: the reference without checkpoints (the reported reference before the ninth session) */
export type R1SideName = 'dmkit' | 'ref' | 'ref-nocp' | 'linear';

export interface R1Files {
  rlog: string; local: string; remote: string; dlog: string;
  refLog: string; refLocal: string; refRemote: string; linear: string;
}

export interface R1Spec {
  mode: 'r1';
  sides: R1SideName[];
  pattern: Pattern;
  sectors: number;
  /** replication log size in sectors (header and checkpoint slots included) */
  logSectors: number;
  region: number;
  files: R1Files;
  warmupOps: number;
  refCrc: boolean;
  refFlushMs: number;
  /** the reference checkpoints as the engine does (r-ref-checkpoints.ts) */
  refCp: boolean;
  /** slink 0's al-extents (null: the default) */
  alExtents: number | null;
}

export interface R1Command { side: R1SideName; ops: number; seed: number }

export interface SiteTrace {
  /** site state characters seen by the sampler (A, R, D, …) */
  states: string;
  maxLagIos: number;
  maxLagSectors: number;
  maxRingUsedSectors: number;
  overflows: number;
  resyncedBytes: number;
  shippedBytes: number;
  /** the activity log during the sample: writes that waited for a checkpoint naming their extent, full flushes run for room, writes outside */
  activity: { misses: number; flushes: number; outside: number };
}

export interface R1Result extends RunResult<R1SideName> {
  /** minor page faults of the process during the run (fresh memory, page-cache mappings) */
  minorFaults: number;
  site: SiteTrace | null;
  /** the reference's checkpoints during the run (0 for the other sides) */
  checkpoints: number;
}

export interface R3Files { rlog: string; local: string; remote: string; dlog: string; refLocal: string; refRemote: string }

export interface R3Spec {
  mode: 'r3';
  sectors: number;
  logSectors: number;
  region: number;
  files: R3Files;
  dirtyBytes: number;
  qd: number;
}

export interface R3Command { side: 'dmkit' | 'ref'; seed: number }

export interface R3Result {
  side: 'dmkit' | 'ref';
  seconds: number;
  dirtyBytes: number;
  regions: number;
  roundedBytes: number;
  resyncedBytes: number;
  /** out-of-sync regions the site's dirty log held when the site was healed */
  loggedRegions: number;
  overflows: number;
  writeSeconds: number;
  cpuSeconds: number;
  maxRssKiB: number;
}

function siteCounters(dm: DeviceMapper): { overflows: number; resyncedBytes: number; shippedBytes: number; activity: { misses: number; flushes: number; outside: number } } {
  const { overflows, site: s } = slink1<{ slink: number; resyncedBytes?: number; shipped?: { bytes: number } }>(dm, 'repl');
  const a = (dm.status('repl')[0]!.detail as { activityLog?: { misses: number; flushes: number; outside: number } }).activityLog;
  return { overflows, resyncedBytes: s.resyncedBytes ?? 0, shippedBytes: s.shipped?.bytes ?? 0, activity: { misses: a?.misses ?? 0, flushes: a?.flushes ?? 0, outside: a?.outside ?? 0 } };
}

async function newEngine(): Promise<DeviceMapper> {
  const { DeviceMapper: DM } = await import('../../src/index.ts');
  return new DM();
}

// ---- R1 ----

async function r1Worker(spec: R1Spec, reply: (x: unknown) => void, commands: () => AsyncIterable<string>): Promise<void> {
  const p = spec.pattern;
  const f = spec.files;
  const span = spec.sectors * 512;
  const dm = await newEngine();
  const slots = new Map<R1SideName, Slot[]>();
  const files: string[] = [];
  const replicas = new Map<R1SideName, Replica>();
  if (spec.sides.includes('dmkit')) {
    const slink0 = spec.alExtents === null ? 'blockdev 1 0' : `blockdev 2 0 al-extents=${spec.alExtents}`;
    await dm.create('repl', { table: `0 1 replicator ringbuffer 4 ${f.rlog} 0 auto ${spec.logSectors} ${slink0} blockdev 3 1 async retest=1` });
    const vol: MappedDevice = await dm.create('vol0', {
      table: `0 ${spec.sectors} replicator-dev dm:repl 0 0 1 ${f.local} nolog 0 1 1 ${f.remote} disk 3 ${f.dlog} ${spec.region} nosync`,
    });
    slots.set('dmkit', makeSlots(dmkitFactory(vol, p), p));
    files.push(f.rlog, f.local, f.remote, f.dlog);
  }
  for (const side of ['ref', 'ref-nocp'] as const) {
    if (!spec.sides.includes(side)) continue;
    const replica = replicaFactory({
      log: f.refLog, logBytes: (spec.logSectors - 24) * 512, local: f.refLocal, remote: f.refRemote, crc: spec.refCrc, flushMs: spec.refFlushMs,
      checkpoints: side === 'ref' && spec.refCp,
    });
    replicas.set(side, replica);
    slots.set(side, makeSlots(replica.factory, p));
    if (!files.includes(f.refLog)) files.push(f.refLog, f.refLocal, f.refRemote);
  }
  if (spec.sides.includes('linear')) {
    const lin = await dm.create('lin', { table: `0 ${spec.sectors} linear ${f.linear} 0` });
    slots.set('linear', makeSlots(dmkitFactory(lin, p), p));
    files.push(f.linear);
  }
  const run = async (cmd: R1Command): Promise<R1Result> => {
    const s = slots.get(cmd.side);
    if (!s) throw new Error(`side ${cmd.side} is not set up in this worker`);
    const syncSeconds = syncAll(files);
    const isDm = cmd.side === 'dmkit';
    if (isDm) await waitCaughtUp(dm, 'repl', 60_000, 'vol0');
    const before = isDm ? siteCounters(dm) : null;
    const sam = sampler(isDm ? dm : null, 'repl');
    const gcw = gcWatch();
    const faults0 = process.resourceUsage().minorPageFault;
    const cpu0 = process.cpuUsage();
    const replica = replicas.get(cmd.side);
    const cp0 = replica?.checkpoints ?? 0;
    replica?.startRun();
    const t0 = performance.now();
    const r = await driveOps(s, p, span, cmd.ops, cmd.seed);
    const ackSeconds = (performance.now() - t0) / 1000;
    await replica?.stopRun();
    if (isDm) await waitCaughtUp(dm, 'repl', 300_000, 'vol0');
    const replSeconds = isDm ? (performance.now() - t0) / 1000 : ackSeconds;
    const cpu = process.cpuUsage(cpu0);
    const usage = process.resourceUsage();
    const gc = gcw.stop();
    const sm = sam.stop();
    let site: SiteTrace | null = null;
    if (isDm) {
      const after = siteCounters(dm);
      site = {
        states: sm.states, maxLagIos: sm.maxLagIos, maxLagSectors: sm.maxLagSectors, maxRingUsedSectors: sm.maxRing,
        overflows: after.overflows - before!.overflows,
        resyncedBytes: after.resyncedBytes - before!.resyncedBytes,
        shippedBytes: after.shippedBytes - before!.shippedBytes,
        activity: {
          misses: after.activity.misses - before!.activity.misses,
          flushes: after.activity.flushes - before!.activity.flushes,
          outside: after.activity.outside - before!.activity.outside,
        },
      };
    }
    return {
      side: cmd.side, ops: r.ops, bytes: r.bytes, ackSeconds, replSeconds,
      cpuSeconds: (cpu.user + cpu.system) / 1e6, maxRssKiB: usage.maxRSS, rssPeakKiB: sm.rssPeakKiB, syncSeconds, gc,
      minorFaults: usage.minorPageFault - faults0, site, checkpoints: (replica?.checkpoints ?? 0) - cp0,
    };
  };
  for (const side of spec.sides) if (spec.warmupOps > 0) await run({ side, ops: spec.warmupOps, seed: 0x5a5a5a5a });
  reply({ ready: true });
  for await (const line of commands()) {
    if (!line.trim()) continue;
    reply(await run(JSON.parse(line) as R1Command));
  }
}

// ---- R3 ----

/** the distinct regions that random `bs`-byte writes from `seed` touch */
function touchedRegions(p: Pattern, span: number, ops: number, seed: number, regionBytes: number): number[] {
  const next = offsets(p, span, seed);
  const set = new Set<number>();
  for (let i = 0; i < ops; i++) {
    const pos = next();
    for (let r = Math.floor(pos / regionBytes); r <= Math.floor((pos + p.bs - 1) / regionBytes); r++) set.add(r);
  }
  return [...set].sort((a, b) => a - b);
}

async function r3Worker(spec: R3Spec, reply: (x: unknown) => void, commands: () => AsyncIterable<string>): Promise<void> {
  const f = spec.files;
  const span = spec.sectors * 512;
  const regionBytes = spec.region * 512;
  const p: Pattern = { id: 'r3-dirty', op: 'write', bs: 4096, qd: spec.qd, access: 'random' };
  const ops = Math.ceil(spec.dirtyBytes / p.bs);
  const dm = await newEngine();
  await dm.create('site0', { table: `0 ${spec.sectors} linear ${f.remote} 0` });
  await dm.create('repl', { table: `0 1 replicator ringbuffer 4 ${f.rlog} 0 auto ${spec.logSectors} blockdev 1 0 blockdev 3 1 async retest=1` });
  const vol = await dm.create('vol0', {
    table: `0 ${spec.sectors} replicator-dev dm:repl 0 0 1 ${f.local} nolog 0 1 1 dm:site0 disk 3 ${f.dlog} ${spec.region} nosync`,
  });
  const slots = makeSlots(dmkitFactory(vol, p), p);
  const swap = async (table: string): Promise<void> => {
    await dm.load('site0', table);
    await dm.resume('site0');
  };
  reply({ ready: true });
  for await (const line of commands()) {
    if (!line.trim()) continue;
    const cmd = JSON.parse(line) as R3Command;
    const regions = touchedRegions(p, span, ops, cmd.seed, regionBytes);
    const roundedBytes = regions.length * regionBytes;
    const base = { dirtyBytes: ops * p.bs, regions: regions.length, roundedBytes };
    const cpu0 = process.cpuUsage();
    if (cmd.side === 'ref') {
      syncAll([f.refLocal, f.refRemote]);
      const seconds = await copyRegions(f.refLocal, f.refRemote, regions, regionBytes, Math.min(regionBytes, 1 << 20), 4);
      const cpu = process.cpuUsage(cpu0);
      reply({
        side: 'ref', seconds, ...base, resyncedBytes: roundedBytes, loggedRegions: 0, overflows: 0, writeSeconds: 0,
        cpuSeconds: (cpu.user + cpu.system) / 1e6, maxRssKiB: process.resourceUsage().maxRSS,
      } satisfies R3Result);
      continue;
    }
    await waitCaughtUp(dm, 'repl', 60_000, 'vol0');
    syncAll([f.rlog, f.local, f.remote, f.dlog]);
    const before = siteCounters(dm);
    await swap(`0 ${spec.sectors} error`);
    const w = await driveOps(slots, p, span, ops, cmd.seed);
    const end = Date.now() + 30_000;
    while (!/(^| )1:D,/.test(dm.status('repl')[0]!.params)) {
      if (Date.now() > end) throw new Error(`slink 1 not down after the outage's writes: '${dm.status('repl')[0]!.params}'`);
      await sleep(5);
    }
    const m = /D,(\d+)\/(\d+)$/.exec(dm.status('vol0')[0]!.params);
    const loggedRegions = m ? Number(m[2]) - Number(m[1]) : -1;
    await swap(`0 ${spec.sectors} linear ${f.remote} 0`);
    const cpuHeal = process.cpuUsage();
    const t0 = performance.now();
    await dm.message('repl', 0, ['resync', '1']);
    await waitCaughtUp(dm, 'repl', 300_000, 'vol0');
    const seconds = (performance.now() - t0) / 1000;
    const cpu = process.cpuUsage(cpuHeal);
    const after = siteCounters(dm);
    reply({
      side: 'dmkit', seconds, ...base, resyncedBytes: after.resyncedBytes - before.resyncedBytes, loggedRegions,
      overflows: after.overflows - before.overflows, writeSeconds: w.seconds,
      cpuSeconds: (cpu.user + cpu.system) / 1e6, maxRssKiB: process.resourceUsage().maxRSS,
    } satisfies R3Result);
  }
}

async function main(): Promise<void> {
  const spec = JSON.parse(process.argv[2] ?? '') as R1Spec | R3Spec;
  const reply = (x: unknown): void => void process.stdout.write(`${JSON.stringify(x)}\n`);
  // made once `ready` is sent: lines that arrive before the async iterator exists are lost
  const commands = (): AsyncIterable<string> => createInterface({ input: process.stdin });
  if (spec.mode === 'r1') await r1Worker(spec, reply, commands);
  else await r3Worker(spec, reply, commands);
  process.exit(0); // without closing the engine: a close would fdatasync, which the references do not do
}

main().catch((err: unknown) => {
  process.stderr.write(`${err instanceof Error ? err.stack : String(err)}\n`);
  process.exit(1);
});
