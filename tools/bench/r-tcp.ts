/**
 * R1-tcp, R2 and RC: the replicator's `tcp` slink to a receiver in another process on
 * loopback. The sending side runs through the library in a worker (r-tcp-worker.ts, which
 * hosts dmkit and the reference taking turns, as R1's worker); the receiving side is a
 * second process (r-tcp-rx.ts: a DeviceMapper with `linear` devices and a
 * ReplicationReceiver, and the plain-Node reference receiver). References: r-tcp-reference.ts;
 * starting the pair and measuring a run: r-tcp-pair.ts. R2's suite is in r-tcp-r2.ts.
 *
 *   R1-tcp  R1's workloads, slink 1 `tcp … async`, against plain Node doing log append +
 *           local write + the payload over a loopback socket to a plain-Node receiver that
 *           writes it and answers, with engine-like checkpoints (flushes) on both sides.
 *           Also the peak RSS of the sender and of the receiver (solo processes).
 *   R2      sync write latency, 4 KiB one at a time, slink 1 `tcp … sync`, against plain
 *           Node: local write ‖ (send, remote write, answer); medians and p99 per pair.
 *   RC      compress=zstd, lz4, none: throughput (1 MiB sequential writes, until the site
 *           has everything) and the link's compression ratio, on a compressible and a
 *           random source image.
 *
 * Options (`--opt key=value`):
 *   tsize=256m        R1-tcp / R2 device size (RC: rcsize=128m)
 *   ring1m=64m  ring4k=16m   R1-tcp log size for the 1 MiB and 4 KiB patterns
 *   tbytes=<4×ring>   R1-tcp bytes per sample
 *   region=1024       dirty-log region in sectors (also the largest log entry)
 *   refCrc=0|1        the references compute CRC32C of each payload on both ends
 *   refCp=1|0         the R1-tcp reference's engine-like checkpoints (flushes)
 *   noDelay=1|0       the references' sockets setNoDelay(true) (default; the engine's do not)
 *   compress=none     R1-tcp's compress= for dmkit
 *   resyncRate=auto   R1-tcp's resync-rate for dmkit (the samples end in a resync after an
 *                     overflow: `0` = fixed and unlimited, as before the controller)
 *   engineNoDelay=0|1 experiment: TCP_NODELAY on the engine's sockets too (net wrapped in the bench processes)
 *   solo=1|0          R1-tcp peak RSS from solo processes
 *   diag=1|0          R1-tcp / R2 diagnostics (default on unless --quick): the writers alone (site
 *                     suspended), the shipper alone (resume to caught up), epochs per entry,
 *                     and the references' single steps (send only, log + local, local only)
 *   r2ops=200  r2slices=10   R2 requests per slice, slices per pair
 *   rcbytes=128m  rcring=64m  rcpatterns=seq   RC bytes per sample, log size, patterns (seq,4k)
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createImage, warmPageCache } from './l1-library.ts';
import { flag, int, row, side, size, zeroFile } from './r-common.ts';
import { R1_PATTERNS } from './r-replication.ts';
import type { RxSpec } from './r-tcp-rx.ts';
import { measure, mib, pairFiles, pairRx, type Run, secretFile, startPair } from './r-tcp-pair.ts';
import type { DmkitSideSpec, RefSideSpec, TcpData, TcpResult, TcpSideSpec, TcpSpec } from './r-tcp-worker.ts';
import { formatSize } from './size.ts';
import { median } from './stats.ts';
import type { BenchContext, Row, Sample, Side, Suite } from './suite.ts';
import { fmtValue } from './suite.ts';
import type { Pattern } from './workload.ts';

// ---- R1-tcp ----

const R1_TCP_METHOD =
  'Two processes per pattern: the sender (tools/bench/r-tcp-worker.ts) hosts dmkit and the reference taking turns ' +
  '(as R1), the receiver (tools/bench/r-tcp-rx.ts) hosts a DeviceMapper with a `linear` device over the remote image ' +
  'and a ReplicationReceiver on 127.0.0.1 (what `dmkit daemon --replication-listen` runs), and the plain-Node ' +
  'reference receiver. dmkit: a group `replicator ringbuffer` over a log file, slink 0 local, slink 1 `tcp 5 1 async ' +
  'retest=1 peer=127.0.0.1:PORT secret=FILE` (integrity crc32c, the default); one `replicator-dev` over the local ' +
  'image with the tuple `1 1 <site device> core 2 <region> nosync`. Reference (r-tcp-reference.ts): per request one ' +
  'fs.writev of a 512-byte header and the payload into a log file used as a ring of the same size, then in parallel ' +
  'fs.write to the local file and the payload sent on one loopback TCP connection (32-byte header, corked with the ' +
  'payload; TCP_NODELAY on both ends unless noDelay=0, no CRC unless refCrc=1); the plain-Node receiver writes it with ' +
  'one fs.write at its position and answers 16 bytes; the request ' +
  'completes when the local write is done and the answer is in. Both have the same flushes: the engine checkpoints ' +
  'every 200 ms when something changed and at once when the ring is half full (its log and local image are files ' +
  'of this machine, so a checkpoint is a FLUSH to the site: device fdatasync + position-file pwrite + fdatasync, ' +
  'then a checkpoint slot written with FUA = an O_DSYNC pwrite); the reference does the same steps on the same ' +
  'triggers (every 200 ms when written to, and when half the ring was appended since the last one), and its appends ' +
  'wait for ring space a finished checkpoint covers, as the engine\'s writers do (' +
  'tools/bench/r-ref-checkpoints.ts, shared with R1; before the ninth session it also fdatasync-ed its local file ' +
  'and its whole log, which the engine stopped doing in the sixth, and never waited for ring space). Every sample writes `bytes` (default 4x the ring) at the pattern; ' +
  'dmkit\'s sample ends when the status shows slink 1 caught up (`1:A,0,0`), its acked time at the last ' +
  'acknowledgement; the reference acknowledges after the remote answer, so its one time is both. Before every run ' +
  'each side\'s files on both ends are fdatasync-ed (untimed); images are re-read into the page cache before every ' +
  'pair; sides alternate dmkit, ref / ref, dmkit. fdatasync calls are counted on both ends (fs.fdatasync wrapped). ' +
  'RSS: peak (getrusage maxRSS) of a sender and of a receiver process running one side alone (warm-up + one sample), ' +
  'and the peak of process.memoryUsage.rss() sampled every 20 ms in every run. Diagnostics (diag=1, the row\'s ' +
  '`diag`): per pattern 3 rounds of 40 % of the ring: dmkit with slink 1 suspended (`slink suspend 1`: the writers ' +
  'alone), then `slink resume 1` timed to `1:A,0,0` (the shipper alone), the epochs of those entries read back from ' +
  'the log; the reference\'s log + local steps alone and its send alone (same requests in flight).';

export const r1tcp: Suite = {
  id: 'R1-tcp',
  description: 'library: replicator-dev async over the tcp slink to a receiver process on loopback vs plain Node log + local + socket to a plain-Node receiver',
  method: R1_TCP_METHOD,
  async run(ctx: BenchContext): Promise<Row[]> {
    const patterns = R1_PATTERNS.filter((p) => ctx.patterns.length === 0 || ctx.patterns.some((f) => p.id.includes(f)));
    if (patterns.length === 0) return [];
    const span = Math.floor(size(ctx, 'tsize', ctx.quick ? 64 << 20 : 256 << 20) / 512) * 512;
    const sectors = span / 512;
    const region = int(ctx, 'region', 1024);
    const refCrc = flag(ctx, 'refCrc', false);
    const refCp = flag(ctx, 'refCp', true);
    const noDelay = flag(ctx, 'noDelay', true);
    const solo = flag(ctx, 'solo', true);
    const compress = ctx.opts.compress ?? 'none';
    const diag = flag(ctx, 'diag', !ctx.quick);
    const secret = secretFile(ctx);
    const { files, images } = pairFiles(ctx, 'rt');
    ctx.log(`R1-tcp: creating 4 images of ${formatSize(span)}`);
    for (const f of images) createImage(f, span);
    const rows: Row[] = [];
    try {
      for (const p of patterns) {
        const unit: Row['unit'] = p.access === 'seq' ? 'MB/s' : 'IOPS';
        const ringBytes = p.bs >= 1 << 20 ? size(ctx, 'ring1m', ctx.quick ? 16 << 20 : 64 << 20) : size(ctx, 'ring4k', ctx.quick ? 8 << 20 : 16 << 20);
        const logSectors = Math.floor(ringBytes / 512);
        const perSample = size(ctx, 'tbytes', 4 * ringBytes);
        const ops = Math.max(p.qd, Math.floor(perSample / p.bs));
        const warmupOps = Math.max(p.qd, Math.floor(ringBytes / p.bs));
        zeroFile(files.refLog, logSectors * 512);
        const dmSide: DmkitSideSpec = {
          kind: 'dmkit', name: 'dmkit', group: 'repl', rlog: files.rlog, logSectors, local: files.local, remote: 'site0', policy: 'async',
          options: compress === 'none' ? [] : [`compress=${compress}`],
          ...(ctx.opts.resyncRate ? { resyncRate: ctx.opts.resyncRate } : {}),
        };
        const refSide: RefSideSpec = {
          kind: 'ref', name: 'ref', steps: { log: true, local: true, send: true }, log: files.refLog, logBytes: logSectors * 512, local: files.refLocal, crc: refCrc, noDelay, checkpoints: refCp,
        };
        // diagnostics (diag=1): the writers alone and the network alone, for each side
        const diagSides: RefSideSpec[] = diag ? [
          { ...refSide, name: 'ref-log-local', steps: { log: true, local: true, send: false }, checkpoints: false },
          { ...refSide, name: 'ref-send', steps: { log: false, local: false, send: true }, checkpoints: false },
        ] : [];
        const rxSpec = (sides: TcpSideSpec[]): RxSpec => pairRx(files, sectors, secret, {
          dmkit: sides.some((s) => s.kind === 'dmkit'), ref: sides.some((s) => s.kind === 'ref'), crc: refCrc, noDelay,
        });
        const spec = (sides: TcpSideSpec[]): Omit<TcpSpec, 'dmkitPort' | 'refPort'> => ({
          sides, pattern: p, sectors, region, secretFile: secret, warmupOps, warmupData: 'slot', sourceBytes: 0,
        });
        ctx.log(`R1-tcp ${p.id}: log ${formatSize(ringBytes)}, ${formatSize(ops * p.bs)} per sample (${ops} requests)`);
        zeroFile(files.rlog, logSectors * 512);
        const got: Record<'dmkit' | 'ref', Run[]> = { dmkit: [], ref: [] };
        const { rx, w } = await startPair(ctx, rxSpec([dmSide, refSide]), spec([dmSide, refSide, ...diagSides]));
        const diagRuns: Array<Record<string, unknown>> = [];
        try {
          for (let pair = 0; pair < ctx.pairs; pair++) {
            for (const f of images) warmPageCache(f, span);
            const load1 = os.loadavg()[0]!;
            const order = pair % 2 === 0 ? (['dmkit', 'ref'] as const) : (['ref', 'dmkit'] as const);
            for (const [i, s] of order.entries()) {
              const m = await measure(rx, w, { side: s, ops, seed: ctx.seed + pair, data: 'slot' });
              got[s].push({ ...m, pair, order: i, load1 });
            }
            const d = got.dmkit[pair]!;
            const rf = got.ref[pair]!;
            const v = (x: TcpResult, secs: number): string => fmtValue(unit === 'MB/s' ? x.bytes / secs : x.ops / secs, unit);
            ctx.log(`  R1-tcp ${p.id} pair ${pair + 1}/${ctx.pairs}: dmkit acked ${v(d.r, d.r.ackSeconds)}, replicated ${v(d.r, d.r.replSeconds)}, ` +
              `ref ${v(rf.r, rf.r.replSeconds)} ${unit} (ratio ${(rf.r.replSeconds / d.r.replSeconds).toFixed(3)}; site ${d.r.site!.states}, ` +
              `max lag ${d.r.site!.maxLagIos}, overflows ${d.r.site!.overflows}; cpu s dmkit ${d.r.cpuSeconds.toFixed(2)}+rx ${d.rx.cpuSeconds.toFixed(2)}, ` +
              `ref ${rf.r.cpuSeconds.toFixed(2)}+rx ${rf.rx.cpuSeconds.toFixed(2)}; fdatasyncs dmkit ${d.r.fdatasyncs}+rx ${d.rx.fdatasyncs}, ` +
              `ref ${rf.r.fdatasyncs}+rx ${rf.rx.fdatasyncs}; rss sampled dmkit ${mib(d.r.rssPeakKiB)}/rx ${mib(d.rx.rssPeakKiB)} MiB)`);
          }
          if (diag) {
            // as many requests as fill 40 % of the ring: a suspended site keeps them all in the log
            const dOps = Math.max(p.qd, Math.floor((0.4 * ringBytes) / (p.bs + 512)));
            for (let rep = 0; rep < Math.max(3, Math.min(ctx.pairs, 5)); rep++) {
              const sm = await measure(rx, w, { side: 'dmkit', ops: dOps, seed: ctx.seed + 500 + rep, data: 'slot', suspend: true });
              const ll = await measure(rx, w, { side: 'ref-log-local', ops: dOps, seed: ctx.seed + 500 + rep, data: 'slot' });
              const sd = await measure(rx, w, { side: 'ref-send', ops: dOps, seed: ctx.seed + 500 + rep, data: 'slot' });
              const rate = (n: number, secs: number): number => Math.round(unit === 'MB/s' ? (n * p.bs) / secs / 1e6 : n / secs);
              const x = {
                ops: dOps, dmkitWritersAlone: rate(dOps, sm.r.ackSeconds), dmkitShipperAlone: rate(dOps, sm.r.suspended!.shipSeconds),
                refLogLocal: rate(dOps, ll.r.ackSeconds), refSendOnly: rate(dOps, sd.r.ackSeconds),
                entries: sm.r.suspended!.entries, epochs: sm.r.suspended!.epochs,
                shipperCpuSeconds: sm.r.cpuSeconds, receiverCpuSeconds: { dmkit: sm.rx.cpuSeconds, refSend: sd.rx.cpuSeconds },
              };
              diagRuns.push(x);
              ctx.log(`  R1-tcp ${p.id} diag ${rep + 1}: ${dOps} requests; dmkit writers alone (site suspended) ${x.dmkitWritersAlone}, ` +
                `shipper alone (resume to caught up) ${x.dmkitShipperAlone} ${unit}, ${x.entries} entries in ${x.epochs} epochs; ` +
                `ref log+local ${x.refLogLocal}, ref send only (${p.qd} in flight) ${x.refSendOnly} ${unit}`);
            }
          }
        } finally {
          await w.close();
          await rx.close();
        }
        // peak RSS of each side alone, sender and receiver processes
        const soloRss: Record<'dmkit' | 'ref', { sender: number; receiver: number } | null> = { dmkit: null, ref: null };
        if (solo) {
          for (const s of [dmSide, refSide]) {
            if (s.kind === 'dmkit') zeroFile(files.rlog, logSectors * 512);
            const one = await startPair(ctx, rxSpec([s]), spec([s]));
            try {
              const m = await measure(one.rx, one.w, { side: s.name, ops, seed: ctx.seed, data: 'slot' });
              soloRss[s.name as 'dmkit' | 'ref'] = { sender: m.r.maxRssKiB, receiver: m.rx.maxRssKiB };
            } finally {
              await one.w.close();
              await one.rx.close();
            }
          }
          ctx.log(`  R1-tcp ${p.id} peak RSS alone: dmkit sender ${mib(soloRss.dmkit?.sender)} MiB, receiver ${mib(soloRss.dmkit?.receiver)} MiB; ` +
            `reference sender ${mib(soloRss.ref?.sender)} MiB, receiver ${mib(soloRss.ref?.receiver)} MiB`);
        }
        const samples = (s: 'dmkit' | 'ref', which: 'ack' | 'repl'): Sample[] => got[s].map(({ r, rx: rxs, pair, order, load1 }) => {
          const seconds = which === 'ack' ? r.ackSeconds : r.replSeconds;
          const other = got[s === 'dmkit' ? 'ref' : 'dmkit'].find((x) => x.pair === pair)!.order;
          return {
            ...r, value: unit === 'MB/s' ? r.bytes / seconds : r.ops / seconds, seconds, maxRssKiB: r.maxRssKiB,
            receiver: rxs, pair, position: order < other ? 0 : 1, load1,
          };
        });
        const rssFrom = 'solo sender process (warm-up + one sample)';
        const what = `${p.access === 'seq' ? 'sequential' : 'random'} write ${formatSize(p.bs)}, ${p.qd} in flight, ${formatSize(ops * p.bs)} per sample, log ${formatSize(ringBytes)}`;
        const refDetail = `fs.writev(log: 512-byte header + payload), then fs.write(local) and the payload over TCP to a plain-Node receiver (fs.write, 16-byte answer) in parallel, callbacks` +
          `${refCp ? '; engine-like checkpoints (remote flush = 2 fdatasyncs, then a log slot written O_DSYNC; every 200 ms and at half ring)' : ''}` +
          `${refCrc ? '; CRC32C of each payload on both ends' : ''}${noDelay ? '; TCP_NODELAY' : ''}`;
        const refS = side('node-log-local-tcp', refDetail, samples('ref', 'repl'), soloRss.ref?.sender ?? null, solo ? rssFrom : undefined);
        const dm = (which: 'ack' | 'repl'): Side => side(which === 'ack' ? 'dmkit-tcp-acked' : 'dmkit-tcp-replicated',
          `replicator-dev async, slink 1 tcp to a ReplicationReceiver in another process${compress !== 'none' ? `, compress=${compress}` : ''}; ` +
          `${which === 'ack' ? 'first request to last acknowledgement' : 'first request to `1:A,0,0` (the site has everything)'}`,
          samples('dmkit', which), soloRss.dmkit?.sender ?? null, solo ? rssFrom : undefined);
        const trace = {
          rss: {
            soloPeakKiB: soloRss,
            sampledSenderPeakKiB: { dmkit: median(got.dmkit.map((x) => x.r.rssPeakKiB)), ref: median(got.ref.map((x) => x.r.rssPeakKiB)) },
            sampledReceiverPeakKiB: { dmkit: median(got.dmkit.map((x) => x.rx.rssPeakKiB)), ref: median(got.ref.map((x) => x.rx.rssPeakKiB)) },
          },
          cpuSecondsPerGB: {
            dmkit: { sender: median(got.dmkit.map((x) => x.r.cpuSeconds / (x.r.bytes / 1e9))), receiver: median(got.dmkit.map((x) => x.rx.cpuSeconds / (x.r.bytes / 1e9))) },
            ref: { sender: median(got.ref.map((x) => x.r.cpuSeconds / (x.r.bytes / 1e9))), receiver: median(got.ref.map((x) => x.rx.cpuSeconds / (x.r.bytes / 1e9))) },
          },
          fdatasyncs: {
            dmkit: { sender: median(got.dmkit.map((x) => x.r.fdatasyncs)), receiver: median(got.dmkit.map((x) => x.rx.fdatasyncs)) },
            ref: { sender: median(got.ref.map((x) => x.r.fdatasyncs)), receiver: median(got.ref.map((x) => x.rx.fdatasyncs)) },
          },
          site: got.dmkit.map((x) => x.r.site),
          ...(diag ? { diag: diagRuns } : {}),
          settings: { logSectors, region, bytesPerSample: ops * p.bs, refCrc, refCp, noDelay, compress, sizeBytes: span },
        };
        const notes = `log ${logSectors} sectors, region ${region} sectors, ${ops} requests per sample`;
        rows.push(Object.assign(row({
          suite: 'R1-tcp', id: p.id, unit, goal: 0.9, description: `${what}: replicated over tcp (until the site has it) vs the reference`,
          a: dm('repl'), b: refS, notes,
        }), trace));
        rows.push(row({
          suite: 'R1-tcp', id: `${p.id}-acked`, unit, goal: 0.9, description: `${what}: acknowledged vs the reference`,
          a: dm('ack'), b: refS, notes,
        }));
      }
    } finally {
      for (const f of Object.values(files)) fs.rmSync(f, { recursive: true, force: true });
    }
    return rows;
  },
};

// ---- RC ----

const RC_METHOD =
  'Two processes as R1-tcp\'s. The sender hosts three groups like R1-tcp\'s (each its own log, local image and site ' +
  'device), slink 1 `tcp … async` with compress=zstd, compress=lz4 and compress=none (zstd level 3 on libuv\'s pool, ' +
  'lz4-napi; a payload that does not shrink is sent raw). The payloads are the bytes of an in-memory source image at ' +
  'the write\'s position (modulo its size): `text`, log-like lines with one 4 KiB block in four zero (compressible), ' +
  'or `random` (xorshift32, incompressible). A sample writes `rcbytes` in 1 MiB sequential writes, 8 in flight ' +
  '(`rcpatterns=seq,4k` adds 4 KiB random, 32 in flight), timed until the site has everything (`1:A,0,0`); the ' +
  'compression ratio is the change of the status JSON `sites[].link.payloadBytes / compressedBytes` over the sample. The ' +
  'six (codec, data) runs take turns in each pair, the order rotating. Ratio: throughput with a codec / with ' +
  'compress=none on the same data in the same pair. Loopback is far faster than any WAN: this measures what ' +
  'compression costs in CPU, not what it saves on a slow link.';

export const rc: Suite = {
  id: 'RC',
  description: 'library: tcp slink compress=zstd|lz4|none, throughput and compression ratio on compressible and random data',
  method: RC_METHOD,
  async run(ctx: BenchContext): Promise<Row[]> {
    const all: Pattern[] = [
      { id: 'seq-write-1m-qd8', op: 'write', bs: 1 << 20, qd: 8, access: 'seq' },
      { id: 'rand-write-4k-qd32', op: 'write', bs: 4096, qd: 32, access: 'random' },
    ];
    const wanted = (ctx.opts.rcpatterns ?? 'seq').split(',').map((s) => s.trim());
    const patterns = all.filter((p) => wanted.some((w) => p.id.includes(w)) && (ctx.patterns.length === 0 || ctx.patterns.some((f) => p.id.includes(f))));
    if (patterns.length === 0) return [];
    const span = Math.floor(size(ctx, 'rcsize', ctx.quick ? 64 << 20 : 128 << 20) / 512) * 512;
    const sectors = span / 512;
    const region = int(ctx, 'region', 1024);
    const ringBytes = size(ctx, 'rcring', ctx.quick ? 16 << 20 : 64 << 20);
    const logSectors = Math.floor(ringBytes / 512);
    const secret = secretFile(ctx);
    const codecs = ['zstd', 'lz4', 'none'] as const;
    const datas = ['text', 'random'] as const;
    const t = (n: string): string => path.join(ctx.tmpdir, n);
    const state = t('rc-rx-state');
    const img = (c: string, what: string): string => t(`rc-${c}-${what}`);
    const images = codecs.flatMap((c) => [img(c, 'local.img'), img(c, 'remote.img')]);
    ctx.log(`RC: creating ${images.length} images of ${formatSize(span)}`);
    for (const f of images) createImage(f, span);
    const rows: Row[] = [];
    try {
      for (const p of patterns) {
        const unit: Row['unit'] = p.access === 'seq' ? 'MB/s' : 'IOPS';
        const perSample = size(ctx, 'rcbytes', p.bs >= 1 << 20 ? (ctx.quick ? 32 << 20 : 128 << 20) : (ctx.quick ? 8 << 20 : 32 << 20));
        const ops = Math.max(p.qd, Math.floor(perSample / p.bs));
        const sides: TcpSideSpec[] = codecs.map((c) => {
          zeroFile(img(c, 'rlog'), logSectors * 512);
          return {
            kind: 'dmkit', name: c, group: `repl-${c}`, rlog: img(c, 'rlog'), logSectors, local: img(c, 'local.img'), remote: `site-${c}`, policy: 'async',
            options: c === 'none' ? [] : [`compress=${c}`],
          };
        });
        ctx.log(`RC ${p.id}: ${formatSize(ops * p.bs)} per sample, log ${formatSize(ringBytes)}`);
        const { rx, w } = await startPair(ctx, {
          dmkit: { devices: codecs.map((c) => ({ name: `site-${c}`, file: img(c, 'remote.img'), sectors })), secretFile: secret, stateDir: state },
          ref: null,
        }, { sides, pattern: p, sectors, region, secretFile: secret, warmupOps: Math.max(p.qd, Math.floor((16 << 20) / p.bs)), warmupData: 'text', sourceBytes: 64 << 20 });
        type Key = `${(typeof datas)[number]}-${(typeof codecs)[number]}`;
        const got = new Map<Key, Run[]>();
        const runs = datas.flatMap((d) => codecs.map((c) => ({ d, c, key: `${d}-${c}` as Key })));
        try {
          for (let pair = 0; pair < ctx.pairs; pair++) {
            for (const f of images) warmPageCache(f, span);
            const load1 = os.loadavg()[0]!;
            const k = pair % runs.length;
            const order = pair % 2 === 0 ? [...runs.slice(k), ...runs.slice(0, k)] : [...runs.slice(k), ...runs.slice(0, k)].reverse();
            for (const [i, x] of order.entries()) {
              const m = await measure(rx, w, { side: x.c, ops, seed: ctx.seed + pair, data: x.d as TcpData });
              if (!got.has(x.key)) got.set(x.key, []);
              got.get(x.key)!.push({ ...m, pair, order: i, load1 });
            }
            const v = (key: Key): string => {
              const r = got.get(key)![pair]!;
              const ratio = r.r.site!.compressedBytes > 0 ? r.r.site!.payloadBytes / r.r.site!.compressedBytes : NaN;
              return `${key} ${fmtValue(unit === 'MB/s' ? r.r.bytes / r.r.replSeconds : r.r.ops / r.r.replSeconds, unit)} (x${ratio.toFixed(2)})`;
            };
            ctx.log(`  RC ${p.id} pair ${pair + 1}/${ctx.pairs}: ${runs.map((x) => v(x.key)).join(', ')} ${unit}; cpu s per GB sender+receiver ` +
              runs.map((x) => {
                const r = got.get(x.key)![pair]!;
                return `${x.key} ${(r.r.cpuSeconds / (r.r.bytes / 1e9)).toFixed(1)}+${(r.rx.cpuSeconds / (r.r.bytes / 1e9)).toFixed(1)}`;
              }).join(', '));
          }
        } finally {
          await w.close();
          await rx.close();
        }
        const samples = (key: Key, other: Key): Sample[] => got.get(key)!.map(({ r, rx: rxs, pair, order, load1 }) => {
          const o = got.get(other)!.find((x) => x.pair === pair)!.order;
          return {
            ...r, value: unit === 'MB/s' ? r.bytes / r.replSeconds : r.ops / r.replSeconds, seconds: r.replSeconds, maxRssKiB: r.maxRssKiB,
            compressionRatio: r.site!.compressedBytes > 0 ? r.site!.payloadBytes / r.site!.compressedBytes : null,
            receiver: rxs, pair, position: order < o ? 0 : 1, load1,
          };
        });
        const ratioOf = (key: Key): number => median(got.get(key)!.map((x) => x.r.site!.payloadBytes / x.r.site!.compressedBytes));
        const cpuPerGB = (key: Key): { sender: number; receiver: number } => ({
          sender: median(got.get(key)!.map((x) => x.r.cpuSeconds / (x.r.bytes / 1e9))),
          receiver: median(got.get(key)!.map((x) => x.rx.cpuSeconds / (x.r.bytes / 1e9))),
        });
        for (const d of datas) {
          for (const c of ['zstd', 'lz4'] as const) {
            const a = `${d}-${c}` as Key;
            const b = `${d}-none` as Key;
            rows.push(Object.assign(row({
              suite: 'RC', id: `${p.id}-${d}-${c}`, unit, goal: 0,
              description: `${d} data, ${p.id}: replicated throughput with compress=${c} / compress=none (no goal); compression ratio x${ratioOf(a).toFixed(2)}`,
              a: side(`dmkit-tcp-${c}`, `compress=${c}, ${d} payloads`, samples(a, b), null),
              b: side('dmkit-tcp-none', `compress=none, ${d} payloads`, samples(b, a), null),
              notes: `${formatSize(ops * p.bs)} per sample, log ${formatSize(ringBytes)}`,
            }), {
              compression: {
                ratio: ratioOf(a), ratioNone: ratioOf(b),
                payloadBytes: got.get(a)!.map((x) => x.r.site!.payloadBytes), compressedBytes: got.get(a)!.map((x) => x.r.site!.compressedBytes),
                cpuSecondsPerGB: { [c]: cpuPerGB(a), none: cpuPerGB(b) },
              },
            }));
          }
        }
      }
    } finally {
      for (const f of [...images, ...codecs.map((c) => img(c, 'rlog')), state]) fs.rmSync(f, { recursive: true, force: true });
    }
    return rows;
  },
};
