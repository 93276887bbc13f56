/**
 * Sending worker of R1-tcp, R2 and RC (protocol: child.ts). It hosts the sides the spec
 * names, taking turns in this one process (as r-worker.ts does for R1):
 *
 *   dmkit  a group `replicator ringbuffer` over a log file with slink 0 local and slink 1
 *          `tcp … peer=127.0.0.1:<port of the receiving process> secret=…` (async or sync,
 *          compress= as given), and one `replicator-dev` over a local image whose slink 1
 *          tuple names the receiving device (`1 1 <name> core 2 <region> nosync`)
 *   ref    the plain-Node TcpReplica of r-tcp-reference.ts, to the reference receiver
 *
 *   node --import tsx tools/bench/r-tcp-worker.ts '<TcpSpec as JSON>'
 *
 * A command writes `ops` requests of the pattern on one side. Before every run the side's
 * files are fdatasync-ed (untimed). dmkit's async samples then go on until the group's
 * status shows slink 1 caught up (`1:A,0,0`); `latency: true` runs one request at a time and
 * returns every request's latency (R2). `data` picks the payloads: 'slot' (each slot's own
 * pseudo-random buffer, as R1), 'text' or 'random' (the bytes of an in-memory source image
 * at the write's position modulo its size: RC's compressible and incompressible images).
 */
import fs from 'node:fs';
import { createInterface } from 'node:readline';
import type { DeviceMapper, MappedDevice } from '../../src/index.ts';
import { DATA_SECTOR, decodeEntryHeader, decodeHeader } from '../../src/replog/ring-format.ts';
import { dmkitFactory } from './lib-sides.ts';
import { gcWatch, type RunResult, sampler, slink1, syncAll, waitCaughtUp } from './r-probe.ts';
import { driveOps, offsets } from './r-reference.ts';
import { countFdatasyncs, patchNoDelay, TcpReplica, type TcpReplicaSpec } from './r-tcp-reference.ts';
import type { IoFactory, Pattern, Slot } from './workload.ts';
import { makeSlots, rng } from './workload.ts';

export interface DmkitSideSpec {
  kind: 'dmkit';
  name: string;
  /** the group's device name (its volume is `<group>-vol`) */
  group: string;
  rlog: string;
  logSectors: number;
  local: string;
  /** the receiving device's name at the site */
  remote: string;
  policy: 'async' | 'sync';
  /** extra tcp slink options (compress=zstd, integrity=none, …) */
  options: string[];
  /** `resync-rate` of the group (default: the engine's, auto) */
  resyncRate?: string;
}

/** a TcpReplica (its spec, but for the receiver's port) and the steps of a request */
export interface RefSideSpec extends Omit<TcpReplicaSpec, 'port'> {
  kind: 'ref';
  name: string;
  /** a request's steps: the log append first, then the local write ‖ the send (TcpReplica.factory) */
  steps: { log: boolean; local: boolean; send: boolean; serial?: boolean };
}

export type TcpSideSpec = DmkitSideSpec | RefSideSpec;

export interface TcpSpec {
  sides: TcpSideSpec[];
  pattern: Pattern;
  sectors: number;
  region: number;
  secretFile: string;
  dmkitPort: number;
  refPort: number;
  warmupOps: number;
  /** the payloads of the warm-up */
  warmupData: TcpData;
  /** experiment: TCP_NODELAY on the engine's sockets (patchNoDelay) */
  engineNoDelay?: boolean;
  /** bytes of each in-memory source image ('text', 'random'); 0 when no command uses them */
  sourceBytes: number;
}

export type TcpData = 'slot' | 'text' | 'random';

export interface TcpCommand {
  side: string;
  ops: number;
  seed: number;
  data: TcpData;
  latency?: boolean;
  /**
   * dmkit diagnostic: slink 1 is suspended while the requests run (the writers alone: log
   * append + local write), then resumed and timed until caught up (the shipper alone); the
   * entries written are read back from the log to count their epochs
   */
  suspend?: boolean;
}

export interface SuspendTrace {
  /** resume → `1:A,0,0` */
  shipSeconds: number;
  /** log entries the run appended, and how many distinct epochs they carry */
  entries: number;
  epochs: number;
}

export interface TcpSiteTrace {
  states: string;
  maxLagIos: number;
  maxRingUsedSectors: number;
  overflows: number;
  resyncedBytes: number;
  /** change of the link's sites[].link counters over the run */
  payloadBytes: number;
  compressedBytes: number;
  resends: number;
  reconnects: number;
}

export interface TcpResult extends RunResult {
  fdatasyncs: number;
  /** reference checkpoints during the run */
  checkpoints: number;
  site: TcpSiteTrace | null;
  /** the run's start and end on the monotonic clock in µs (a --cpu-prof profile's time base) */
  windowUs: [number, number];
  /** latency runs: every request's latency in µs */
  latenciesUs?: number[];
  suspended?: SuspendTrace;
}

interface LinkJson { payloadBytes: number; compressedBytes: number; resends: number; reconnects: number; connection: string }

function counters(dm: DeviceMapper, group: string): { overflows: number; resyncedBytes: number; link: LinkJson } {
  const { overflows, site: s } = slink1<{ slink: number; resyncedBytes?: number; link?: LinkJson | null }>(dm, group);
  return { overflows, resyncedBytes: s.resyncedBytes ?? 0, link: s.link! };
}

/**
 * Compressible source bytes: log-like text lines (timestamps, levels, words, numbers), with
 * one 4 KiB block in four all zeroes; zstd makes about a fifth of it, lz4 about a third.
 */
export function textImage(bytes: number, seed = 7): Buffer {
  const out = Buffer.alloc(bytes);
  const r = rng(seed);
  const words = ['replication', 'device', 'sector', 'write', 'flush', 'region', 'checkpoint', 'shipped', 'bytes', 'ok',
    'connection', 'receiver', 'stream', 'applied', 'entry', 'ring', 'epoch', 'site', 'local', 'remote', 'latency', 'queue'];
  const levels = ['INFO', 'INFO', 'INFO', 'DEBUG', 'WARN'];
  let off = 0;
  let t = 1_780_000_000_000;
  while (off < bytes) {
    if (off % 4096 === 0 && r() % 4 === 0) {
      off += 4096; // a block of zeroes
      continue;
    }
    t += r() % 50;
    let line = `${new Date(t).toISOString()} ${levels[r() % levels.length]} dmkit[${1000 + (r() % 64)}]:`;
    const n = 4 + (r() % 8);
    for (let i = 0; i < n; i++) line += r() % 3 === 0 ? ` ${r() % 100000}` : ` ${words[r() % words.length]}`;
    line += '\n';
    off += out.write(line, off, 'latin1');
  }
  return out;
}

/** the entries of the log file `file` written at or after `sinceMs` (wall clock), and their distinct epochs */
function epochsSince(file: string, sinceMs: number): { entries: number; epochs: number } {
  const b = fs.readFileSync(file);
  const h = decodeHeader(b.subarray(0, 4096));
  if (h.kind !== 'ok') throw new Error(`${file}: no log header (${h.kind})`);
  const uuid = h.header.uuid;
  const epochs = new Set<number>();
  const seqs = new Set<number>();
  for (let at = DATA_SECTOR * 512; at + 512 <= b.length; at += 512) {
    const e = decodeEntryHeader(b, at, uuid);
    if (!e || e.kind !== 'entry' || e.time < sinceMs) continue;
    seqs.add(e.seq);
    epochs.add(e.epoch);
  }
  return { entries: seqs.size, epochs: epochs.size };
}

async function main(): Promise<void> {
  const spec = JSON.parse(process.argv[2] ?? '') as TcpSpec;
  const syncs = countFdatasyncs();
  if (spec.engineNoDelay) patchNoDelay();
  const p = spec.pattern;
  const span = spec.sectors * 512;
  const { DeviceMapper: DM } = await import('../../src/index.ts');
  const dm = new DM();
  const sources: Record<'text' | 'random', Buffer | null> = { text: null, random: null };
  if (spec.sourceBytes > 0) {
    sources.text = textImage(spec.sourceBytes);
    const rnd = Buffer.allocUnsafe(spec.sourceBytes);
    const r = rng(99);
    for (let i = 0; i + 4 <= rnd.length; i += 4) rnd.writeUInt32LE(r(), i);
    sources.random = rnd;
  }
  interface Host { spec: TcpSideSpec; files: string[]; slots: Slot[]; bySource: Partial<Record<'text' | 'random', Slot[]>>; replica: TcpReplica | null }
  const hosts = new Map<string, Host>();
  for (const s of spec.sides) {
    if (s.kind === 'dmkit') {
      const words = ['1', s.policy, 'retest=1', `peer=127.0.0.1:${spec.dmkitPort}`, `secret=${spec.secretFile}`, ...s.options];
      await dm.create(s.group, {
        table: `0 1 replicator ringbuffer 4 ${s.rlog} 0 auto ${s.logSectors} blockdev 1 0 tcp ${words.length} ${words.join(' ')}`,
      });
      if (s.resyncRate) await dm.message(s.group, 0, ['resync-rate', s.resyncRate]);
      const vol: MappedDevice = await dm.create(`${s.group}-vol`, {
        table: `0 ${spec.sectors} replicator-dev dm:${s.group} 0 0 1 ${s.local} nolog 0 1 1 ${s.remote} core 2 ${spec.region} nosync`,
      });
      const bySource: Host['bySource'] = {};
      for (const k of ['text', 'random'] as const) {
        const src = sources[k];
        if (!src) continue;
        const sectors = p.bs / 512;
        const factory: IoFactory = () => (pos, done) => {
          const at = pos % src.length;
          const data = at + p.bs <= src.length ? src.subarray(at, at + p.bs) : src.subarray(0, p.bs);
          vol.submit({ op: 'write', sector: pos / 512, sectors, data, flags: {} }).then(done, done);
        };
        bySource[k] = makeSlots(factory, p);
      }
      hosts.set(s.name, { spec: s, files: [s.rlog, s.local], slots: makeSlots(dmkitFactory(vol, p), p), bySource, replica: null });
    } else {
      const replica = await TcpReplica.connect({
        port: spec.refPort, log: s.steps.log ? s.log : '', logBytes: s.logBytes, local: s.local, crc: s.crc, noDelay: s.noDelay,
        checkpoints: s.checkpoints,
      });
      const factory = replica.factory(s.steps);
      hosts.set(s.name, { spec: s, files: replica.files, slots: makeSlots(factory, p), bySource: {}, replica });
    }
  }

  const latencyRun = async (slot: Slot, ops: number, seed: number): Promise<number[]> => {
    const next = offsets(p, span, seed);
    const lat: number[] = [];
    for (let i = 0; i < ops; i++) {
      const pos = next();
      const t0 = performance.now();
      await new Promise<void>((res, rej) => slot.io(pos, (err) => (err ? rej(err) : res())));
      lat.push(Math.round((performance.now() - t0) * 1000));
    }
    return lat;
  };

  const run = async (cmd: TcpCommand): Promise<TcpResult> => {
    const h = hosts.get(cmd.side);
    if (!h) throw new Error(`side ${cmd.side} is not set up in this worker`);
    const slots = cmd.data === 'slot' ? h.slots : h.bySource[cmd.data];
    if (!slots) throw new Error(`side ${cmd.side}: no '${cmd.data}' payloads`);
    const dmGroup = h.spec.kind === 'dmkit' ? h.spec.group : null;
    const syncSeconds = syncAll(h.files);
    if (dmGroup) await waitCaughtUp(dm, dmGroup, 60_000);
    const before = dmGroup ? counters(dm, dmGroup) : null;
    const sam = sampler(dmGroup ? dm : null, dmGroup ?? '');
    const gcw = gcWatch();
    const cpu0 = process.cpuUsage();
    const sync0 = syncs.count();
    const cp0 = h.replica?.checkpoints ?? 0;
    h.replica?.startRun();
    const w0 = Number(process.hrtime.bigint() / 1000n);
    if (cmd.suspend) {
      if (!dmGroup) throw new Error('suspend: dmkit sides only');
      await dm.message(dmGroup, 0, ['slink', 'suspend', '1']);
    }
    const wallStart = Date.now();
    const t0 = performance.now();
    let latenciesUs: number[] | undefined;
    let ops = cmd.ops;
    if (cmd.latency) latenciesUs = await latencyRun(slots[0]!, cmd.ops, cmd.seed);
    else ops = (await driveOps(slots, p, span, cmd.ops, cmd.seed)).ops;
    const ackSeconds = (performance.now() - t0) / 1000;
    let suspended: SuspendTrace | undefined;
    if (cmd.suspend) {
      const { entries, epochs } = epochsSince((h.spec as DmkitSideSpec).rlog, wallStart);
      const r0 = performance.now();
      await dm.message(dmGroup!, 0, ['slink', 'resume', '1']);
      await waitCaughtUp(dm, dmGroup!, 300_000);
      suspended = { shipSeconds: (performance.now() - r0) / 1000, entries, epochs };
    }
    if (dmGroup) await waitCaughtUp(dm, dmGroup, 300_000);
    const replSeconds = (performance.now() - t0) / 1000;
    await h.replica?.stopRun();
    const cpu = process.cpuUsage(cpu0);
    const fdatasyncs = syncs.count() - sync0;
    const gc = gcw.stop();
    const sm = sam.stop();
    let site: TcpSiteTrace | null = null;
    if (dmGroup) {
      const after = counters(dm, dmGroup);
      site = {
        states: sm.states, maxLagIos: sm.maxLagIos, maxRingUsedSectors: sm.maxRing,
        overflows: after.overflows - before!.overflows,
        resyncedBytes: after.resyncedBytes - before!.resyncedBytes,
        payloadBytes: after.link.payloadBytes - before!.link.payloadBytes,
        compressedBytes: after.link.compressedBytes - before!.link.compressedBytes,
        resends: after.link.resends - before!.link.resends,
        reconnects: after.link.reconnects - before!.link.reconnects,
      };
    }
    return {
      side: cmd.side, ops, bytes: ops * p.bs, ackSeconds, replSeconds,
      cpuSeconds: (cpu.user + cpu.system) / 1e6, maxRssKiB: process.resourceUsage().maxRSS, rssPeakKiB: sm.rssPeakKiB,
      syncSeconds, fdatasyncs, checkpoints: (h.replica?.checkpoints ?? 0) - cp0, gc, site, windowUs: [w0, Number(process.hrtime.bigint() / 1000n)],
      ...(latenciesUs ? { latenciesUs } : {}), ...(suspended ? { suspended } : {}),
    };
  };

  for (const s of spec.sides) if (spec.warmupOps > 0) await run({ side: s.name, ops: spec.warmupOps, seed: 0x5a5a5a5a, data: spec.warmupData });
  const reply = (x: unknown): void => void process.stdout.write(`${JSON.stringify(x)}\n`);
  reply({ ready: true });
  for await (const line of createInterface({ input: process.stdin })) {
    if (!line.trim()) continue;
    reply(await run(JSON.parse(line) as TcpCommand));
  }
  process.exit(0); // without closing the engine: a close would fdatasync, which the references do not do
}

main().catch((err: unknown) => {
  process.stderr.write(`${err instanceof Error ? err.stack : String(err)}\n`);
  process.exit(1);
});
