/**
 * R2: sync write latency over the replicator's `tcp` slink (4 KiB, one at a time), the
 * sender and the receiver in two processes as R1-tcp's (r-tcp.ts, r-tcp-pair.ts). Its
 * options (`--opt key=value`) are listed in r-tcp.ts.
 */
import fs from 'node:fs';
import os from 'node:os';
import { createImage, warmPageCache } from './l1-library.ts';
import { flag, int, row, side, size, zeroFile } from './r-common.ts';
import { measure, pairFiles, pairRx, secretFile, startPair } from './r-tcp-pair.ts';
import type { RxStats } from './r-tcp-rx.ts';
import type { TcpResult, TcpSideSpec } from './r-tcp-worker.ts';
import { formatSize } from './size.ts';
import { median } from './stats.ts';
import type { BenchContext, Row, Sample, Suite } from './suite.ts';
import type { Pattern } from './workload.ts';

const R2_METHOD =
  'Two processes as R1-tcp\'s (sender worker, receiver process). dmkit: a group like R1-tcp\'s with slink 1 `tcp 5 1 ' +
  'sync retest=1 peer=… secret=…` (a write is acknowledged once the site has it: log append, then the local write and ' +
  'the ship to the site, which writes it and answers), log 16 MiB, `replicator-dev` with `1 1 <site device> core 2 ' +
  '<region> nosync`. Reference (BENCH.md\'s, done in parallel: the stricter reading): plain Node, per request fs.write ' +
  'to the local file and, in parallel, the payload over the loopback TCP connection to the plain-Node receiver, which ' +
  'fs.writes it and answers; done when both are. `ref-serial` is BENCH.md\'s wording read literally ("local write + one ' +
  'loopback round trip + remote write"): the local fs.write, then the send. A third reference adds the log append first (fs.writev of a 512-byte header + payload into ' +
  'a ring file, then as above, with engine-like checkpoints every 200 ms): the engine\'s own steps, no engine. One ' +
  'request at a time, 4 KiB at random offsets; each pair is `r2slices` slices of `r2ops` requests per side, the ' +
  'sides taking turns (the starting side rotates every slice and pair), every request\'s latency kept; a sample is ' +
  'the median (or p99) of one side\'s latencies over the pair. Ratio = dmkit / reference per pair (lower is better). ' +
  'Both references use TCP_NODELAY (noDelay=0: not), no CRC (refCrc=1: CRC32C on both ends). Diagnostics (diag=1, ' +
  'in the same rotation; the row\'s `diag`): dmkit with slink 1 suspended (log append + local write), the ' +
  'reference\'s send alone (round trip + remote fs.write) and its local fs.write alone. CPU per request of both ' +
  'processes in every sample.';

function pct(xs: readonly number[], q: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))]!;
}

export const r2: Suite = {
  id: 'R2',
  description: 'library: sync replication write latency (4 KiB, one at a time) over the tcp slink vs plain Node local write + loopback round trip + remote write',
  method: R2_METHOD,
  async run(ctx: BenchContext): Promise<Row[]> {
    if (ctx.patterns.length > 0 && !ctx.patterns.some((f) => 'sync-write-4k-qd1'.includes(f))) return [];
    const span = Math.floor(size(ctx, 'tsize', ctx.quick ? 64 << 20 : 256 << 20) / 512) * 512;
    const sectors = span / 512;
    const region = int(ctx, 'region', 1024);
    const refCrc = flag(ctx, 'refCrc', false);
    const noDelay = flag(ctx, 'noDelay', true);
    const perSlice = Math.max(1, int(ctx, 'r2ops', ctx.quick ? 50 : 200));
    const diag = flag(ctx, 'diag', !ctx.quick);
    const slices = Math.max(1, int(ctx, 'r2slices', ctx.quick ? 3 : 10));
    const ringBytes = 16 << 20;
    const logSectors = ringBytes / 512;
    const secret = secretFile(ctx);
    const { files, images } = pairFiles(ctx, 'r2');
    ctx.log(`R2: creating 4 images of ${formatSize(span)}; ${ctx.pairs} pairs of ${slices} slices x ${perSlice} requests per side`);
    for (const f of images) createImage(f, span);
    zeroFile(files.rlog, ringBytes);
    zeroFile(files.refLog, ringBytes);
    const p: Pattern = { id: 'sync-write-4k-qd1', op: 'write', bs: 4096, qd: 1, access: 'random' };
    const sides: TcpSideSpec[] = [
      { kind: 'dmkit', name: 'dmkit', group: 'repl', rlog: files.rlog, logSectors, local: files.local, remote: 'site0', policy: 'sync', options: [] },
      { kind: 'ref', name: 'ref', steps: { log: false, local: true, send: true }, log: '', logBytes: 0, local: files.refLocal, crc: refCrc, noDelay, checkpoints: false },
      { kind: 'ref', name: 'ref-log', steps: { log: true, local: true, send: true }, log: files.refLog, logBytes: ringBytes, local: files.refLocal, crc: refCrc, noDelay, checkpoints: true },
      { kind: 'ref', name: 'ref-serial', steps: { log: false, local: true, send: true, serial: true }, log: '', logBytes: 0, local: files.refLocal, crc: refCrc, noDelay, checkpoints: false },
    ];
    if (diag) {
      sides.push(
        { kind: 'ref', name: 'ref-send', steps: { log: false, local: false, send: true }, log: '', logBytes: 0, local: files.refLocal, crc: refCrc, noDelay, checkpoints: false },
        { kind: 'ref', name: 'ref-local', steps: { log: false, local: true, send: false }, log: '', logBytes: 0, local: files.refLocal, crc: refCrc, noDelay, checkpoints: false },
      );
    }
    const all = ['dmkit', 'ref', 'ref-log', 'ref-serial', 'dmkit-suspended', 'ref-send', 'ref-local'] as const;
    type Name = (typeof all)[number];
    const names: readonly Name[] = diag ? all : all.slice(0, 4);
    const per = Object.fromEntries(all.map((n) => [n, []])) as unknown as Record<Name, Array<{ lat: number[]; runs: Array<{ r: TcpResult; rx: RxStats }>; pair: number; load1: number }>>;
    const { rx, w } = await startPair(ctx, pairRx(files, sectors, secret, { dmkit: true, ref: true, crc: refCrc, noDelay }), { sides, pattern: p, sectors, region, secretFile: secret, warmupOps: ctx.quick ? 300 : 3000, warmupData: 'slot', sourceBytes: 0 });
    try {
      for (let pair = 0; pair < ctx.pairs; pair++) {
        for (const f of images) warmPageCache(f, span);
        const load1 = os.loadavg()[0]!;
        for (const n of names) per[n].push({ lat: [], runs: [], pair, load1 });
        for (let slice = 0; slice < slices; slice++) {
          const k = (pair * slices + slice) % names.length;
          const order = [...names.slice(k), ...names.slice(0, k)];
          const seed = ctx.seed + 7919 * pair + slice;
          for (const n of order) {
            const m = await measure(rx, w, n === 'dmkit-suspended'
              ? { side: 'dmkit', ops: perSlice, seed, data: 'slot', latency: true, suspend: true }
              : { side: n, ops: perSlice, seed, data: 'slot', latency: true });
            const cur = per[n][pair]!;
            cur.lat.push(...m.r.latenciesUs!);
            cur.runs.push({ r: { ...m.r, latenciesUs: undefined }, rx: m.rx });
          }
        }
        const cpuUs = (n: Name, which: 'r' | 'rx'): number => Math.round((per[n][pair]!.runs.reduce((a, x) => a + x[which].cpuSeconds, 0) * 1e6) / per[n][pair]!.lat.length);
        const line = names.map((n) => `${n} p50 ${pct(per[n][pair]!.lat, 0.5)} p99 ${pct(per[n][pair]!.lat, 0.99)} (cpu ${cpuUs(n, 'r')}+${cpuUs(n, 'rx')})`).join(', ');
        ctx.log(`  R2 pair ${pair + 1}/${ctx.pairs}: ${line} µs (cpu: sender+receiver µs per request; p50 ratio ${(pct(per.dmkit[pair]!.lat, 0.5) / pct(per.ref[pair]!.lat, 0.5)).toFixed(3)})`);
      }
    } finally {
      await w.close();
      await rx.close();
      for (const f of Object.values(files)) fs.rmSync(f, { recursive: true, force: true });
    }
    const samples = (n: Name, q: number): Sample[] => per[n].map(({ lat, runs, pair, load1 }) => {
      const sum = (f: (x: { r: TcpResult; rx: RxStats }) => number): number => runs.reduce((a, x) => a + f(x), 0);
      return {
        value: pct(lat, q), ops: lat.length, bytes: lat.length * p.bs, seconds: sum((x) => x.r.ackSeconds),
        maxRssKiB: Math.max(...runs.map((x) => x.r.maxRssKiB)), cpuSeconds: sum((x) => x.r.cpuSeconds),
        receiverCpuSeconds: sum((x) => x.rx.cpuSeconds), fdatasyncs: sum((x) => x.r.fdatasyncs), receiverFdatasyncs: sum((x) => x.rx.fdatasyncs),
        p50Us: pct(lat, 0.5), p90Us: pct(lat, 0.9), p99Us: pct(lat, 0.99), p999Us: pct(lat, 0.999), maxUs: Math.max(...lat),
        meanUs: Math.round(lat.reduce((a, b) => a + b, 0) / lat.length), pair, position: 0, load1,
        // each slice's run on the monotonic clock (µs), sender and receiver: to cut --cpu-prof profiles
        windowsUs: runs.map((x) => x.r.windowUs), receiverWindowsUs: runs.map((x) => x.rx.windowUs),
      };
    });
    const detail: Record<Name, string> = {
      dmkit: 'replicator-dev, slink 1 tcp sync to a ReplicationReceiver in another process: log append, local write, ship, remote write, answer',
      ref: 'plain Node: fs.write(local) in parallel with the payload over TCP to a plain-Node receiver that fs.writes it and answers',
      'ref-log': 'plain Node: fs.writev(log ring: 512-byte header + payload), then as `ref`; engine-like checkpoints every 200 ms',
      'ref-serial': 'plain Node: fs.write to the local file, then the payload over the socket (round trip + remote fs.write): BENCH.md\'s R2 reference read literally',
      'dmkit-suspended': 'diagnostic: dmkit with slink 1 suspended (log append + local write only)',
      'ref-send': 'diagnostic: plain Node, the payload over TCP only (round trip + remote fs.write)',
      'ref-local': 'diagnostic: plain Node, fs.write(local) only',
    };
    const notes = `${ctx.pairs} pairs x ${slices} slices x ${perSlice} requests per side; device ${formatSize(span)}, log 16 MiB`;
    const rows: Row[] = [];
    const diagTrace = diag ? {
      diag: Object.fromEntries(names.map((n) => [n, {
        detail: detail[n],
        p50Us: per[n].map((x) => pct(x.lat, 0.5)), p99Us: per[n].map((x) => pct(x.lat, 0.99)),
        medianP50Us: median(per[n].map((x) => pct(x.lat, 0.5))), medianP99Us: median(per[n].map((x) => pct(x.lat, 0.99))),
        cpuUsPerRequest: {
          sender: median(per[n].map((x) => (x.runs.reduce((a, y) => a + y.r.cpuSeconds, 0) * 1e6) / x.lat.length)),
          receiver: median(per[n].map((x) => (x.runs.reduce((a, y) => a + y.rx.cpuSeconds, 0) * 1e6) / x.lat.length)),
        },
      }])),
    } : {};
    for (const [q, label] of [[0.5, 'p50'], [0.99, 'p99']] as const) {
      rows.push(Object.assign(row({
        suite: 'R2', id: `sync-write-4k-qd1-${label}`, unit: 'µs', lowerIsBetter: true, goal: 1.2, slices,
        description: `sync write latency ${label}, 4 KiB, 1 in flight: dmkit / plain Node (local write ‖ round trip + remote write)`,
        a: side('dmkit-tcp-sync', detail.dmkit, samples('dmkit', q), null), b: side('node-local-tcp', detail.ref, samples('ref', q), null), notes,
      }), diagTrace));
    }
    for (const [q, label] of [[0.5, 'p50'], [0.99, 'p99']] as const) {
      rows.push(row({
        suite: 'R2', id: `sync-write-4k-qd1-${label}-vs-log-ref`, unit: 'µs', lowerIsBetter: true, goal: 0, slices,
        description: `sync write latency ${label}: dmkit / plain Node with the log append first (no goal)`,
        a: side('dmkit-tcp-sync', detail.dmkit, samples('dmkit', q), null), b: side('node-log-local-tcp', detail['ref-log'], samples('ref-log', q), null), notes,
      }));
    }
    for (const [q, label] of [[0.5, 'p50'], [0.99, 'p99']] as const) {
      rows.push(row({
        suite: 'R2', id: `sync-write-4k-qd1-${label}-vs-serial-ref`, unit: 'µs', lowerIsBetter: true, goal: 1.2, slices,
        description: `sync write latency ${label}: dmkit / plain Node, local write then round trip + remote write (BENCH.md's wording read literally)`,
        a: side('dmkit-tcp-sync', detail.dmkit, samples('dmkit', q), null), b: side('node-local-then-tcp', detail['ref-serial'], samples('ref-serial', q), null), notes,
      }));
    }
    return rows;
  },
};
