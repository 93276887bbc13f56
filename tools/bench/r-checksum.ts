/**
 * R4: checksum resync of an image that differs in 1 % of its 4 KiB blocks, against a plain
 * (full) resync of the same images, in one run: bytes (goal ≤ 0.05×) and time (goal ≤ 1.0×).
 *
 * Both transports, each with its own pair of images and its own group, set up once (the
 * replicator and replicator-dev in this process, through the library, as RS):
 *
 *   blockdev  slink 1 `blockdev` to a `linear` device over the remote image (the site's
 *             blocks are read and hashed here: no remote digests)
 *   tcp       slink 1 `tcp … async` to a receiver process on loopback (r-tcp-rx.ts: a
 *             DeviceMapper with a `linear` device over the remote image and a
 *             ReplicationReceiver, what `dmkit daemon --replication-listen` runs), which
 *             computes the site's digests itself (DIGEST frames)
 *
 * The group starts in sync (`core … nosync`: a seeded site). Before every run the remote
 * image is rewritten behind dmkit's back (in place: the devices keep their open files) as
 * the local image with `r4pct` % of its 4 KiB blocks, spread at random (seeded per pair, the
 * same for both runs of a pair), replaced by other random bytes, then fdatasync-ed. A run is
 * `message <group> 0 resync 1 full` (plain: copies every region) or `resync 1 full checksum`
 * (compares every region by 4 KiB block digests, copies the blocks that differ), timed from
 * the message to the site back in order with nothing in flight (status --json: mode
 * in-order, resync null, lag 0). Both under `resync-rate 0` (fixed, unlimited, 4 regions in
 * flight), so the comparison is of the work, not of the pacing. After every run the remote
 * image must equal the local one (sha256; the local one must still be what was written): a
 * run whose copy is wrong fails the bench, naming the blocks that differ.
 *
 * Bytes: tcp, the bytes the sender's connection carried both ways (socket bytesWritten +
 * bytesRead: frame headers, IO payloads, DIGEST requests and their 16-byte-per-block
 * replies, acks); blockdev, the site's resyncedBytes plus 16 bytes per 4 KiB block compared
 * (what the digests would cost on a link: over blockdev the site's blocks are read back
 * whole, comparedBytes, in `extra`). Per pair, order A B B A: blockdev plain, checksum, tcp
 * checksum, plain; then the reverse.
 *
 *   --opt r4size=256m  r4pct=1  r4region=1024  r4transports=blockdev,tcp  r4diag=1|0  r4rate=0
 *
 * r4rate: the `resync-rate` of both modes (default 0: fixed, unlimited); e.g. 100m to see
 * the comparison when the copy is paced as by a link of that speed (the pace counts the
 * bytes sent, so a checksum resync is barely slowed by it).
 *
 * r4diag (default on unless --quick): per pair, the local image read in regions, 4 in
 * flight, once without and once with its digests (the checksum resync's local half), the
 * latter also one region at a time (as a tcp receiver answers DIGEST requests), and the
 * hashing alone on this thread (xxh3-128 per block as the digest threads, xxh64 for
 * comparison), to show where a checksum resync's time goes.
 */
import crypto from 'node:crypto';
import dc from 'node:diagnostics_channel';
import fs from 'node:fs';
import type net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { DIGEST_IDLE_MS, digestBlocks } from '../../src/core/digest.ts';
import { DeviceMapper } from '../../src/index.ts';
import { startWorker } from './child.ts';
import { flag, int, row, side, size, zeroFile } from './r-common.ts';
import { sleep } from './r-probe.ts';
import type { RxCommand, RxSpec, RxStats } from './r-tcp-rx.ts';
import { secretFile } from './r-tcp-pair.ts';
import { formatSize } from './size.ts';
import { median } from './stats.ts';
import type { BenchContext, Row, Sample, Suite } from './suite.ts';

const BLOCK = 4096;
const DIGEST_BYTES = 16;
const RX = path.join(path.dirname(fileURLToPath(import.meta.url)), 'r-tcp-rx.ts');
/** suite.ts's units have none for an amount of bytes; 'bytes' shows the value as it is (fmtValue) */
const BYTES_UNIT = 'bytes' as Row['unit'];

type Transport = 'blockdev' | 'tcp';
type Mode = 'plain' | 'checksum';

interface SiteJson {
  slink: number;
  stateChar: string;
  mode: string;
  lag: { ios: number };
  resyncedBytes: number;
  comparedBytes: number;
  resync: unknown;
  errors: number;
  lastError: string | null;
  link: { connection: string; bytesOnWire: number; payloadBytes: number; digests: number; reconnects: number } | null;
}

interface R4Result {
  transport: Transport;
  mode: Mode;
  seconds: number;
  /** the compared bytes: tcp the connection's both ways, blockdev resyncedBytes + digests */
  bytes: number;
  resyncedBytes: number;
  comparedBytes: number;
  /** tcp: socket bytes sender → receiver and back */
  sentBytes: number;
  receivedBytes: number;
  /** tcp: the link's bytesOnWire (every frame sent: writes, DIGEST requests) and digests (DIGEST requests answered) counters */
  bytesOnWire: number;
  digests: number;
  reconnects: number;
  /** CPU seconds of this process (engine + digest threads) and of the receiver (tcp) */
  cpuSeconds: number;
  rxCpuSeconds: number | null;
  damagedBlocks: number;
  /** counters that were not what the work asks for (the copy itself was right: checked) */
  anomalies: string[];
  /** seconds since this process's / the receiver's digest threads last worked (they leave after DIGEST_IDLE_MS idle) */
  senderPoolIdle?: number;
  receiverPoolIdle?: number;
  /** message to in sync on the monotonic clock in µs (a --cpu-prof profile's time base; DMKIT_BENCH_NODE_ARGS profiles the receiver) */
  windowUs: [number, number];
}

interface Diag {
  /** the local image read in regions, 4 in flight */
  readSeconds: number;
  /** the same with digestBlocks (the engine's: copy to a digest thread, xxh3-128 per block) */
  readDigestSeconds: number;
  /** the same one piece at a time (how a tcp receiver answers DIGEST requests: one after the other) */
  readDigestSerialSeconds: number;
  /** hashing alone on this thread: the digest threads' function, and xxh64 per block */
  xxh3Seconds: number;
  xxh64Seconds: number;
}

/** xorshift32, never 0 */
function rng(seed: number): () => number {
  let x = (seed * 2654435761) >>> 0 || 1;
  return () => {
    x ^= x << 13; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    return x;
  };
}

/** `n` distinct block indexes of `blocks`, seeded, ascending */
function pickBlocks(blocks: number, n: number, seed: number): number[] {
  const next = rng(seed);
  const chosen = new Set<number>();
  while (chosen.size < n) chosen.add(next() % blocks);
  return [...chosen].sort((a, b) => a - b);
}

/** a seeded pseudo-random stream (AES-128-CTR of zeroes) */
function stream(seed: string): crypto.Cipher {
  const key = crypto.createHash('sha256').update(`r4-${seed}`).digest();
  return crypto.createCipheriv('aes-128-ctr', key.subarray(0, 16), key.subarray(16, 32));
}

const CHUNK = 1 << 20;

/**
 * Write `file` in place (it may be open elsewhere): the local image's bytes (seed), the
 * `damaged` blocks replaced by other random bytes; fdatasync. Returns the sha256 of what
 * was written.
 */
function writeImage(file: string, bytes: number, seed: number, damaged: readonly number[], damageSeed: number): string {
  const fd = fs.openSync(file, fs.existsSync(file) ? 'r+' : 'w');
  const h = crypto.createHash('sha256');
  try {
    const s = stream(`local-${seed}`);
    const other = stream(`damage-${seed}-${damageSeed}`);
    const zero = Buffer.alloc(CHUNK);
    let d = 0;
    for (let pos = 0; pos < bytes; pos += CHUNK) {
      const n = Math.min(CHUNK, bytes - pos);
      const buf = s.update(zero.subarray(0, n));
      for (; d < damaged.length && damaged[d]! * BLOCK < pos + n; d++) {
        const at = damaged[d]! * BLOCK - pos;
        const repl = other.update(zero.subarray(0, BLOCK));
        if (repl.equals(buf.subarray(at, at + BLOCK))) repl[0]! ^= 0xff;
        repl.copy(buf, at);
      }
      fs.writeSync(fd, buf, 0, n, pos);
      h.update(buf);
    }
    if (fs.fstatSync(fd).size !== bytes) fs.ftruncateSync(fd, bytes);
    fs.fdatasyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  return h.digest('hex');
}

function shaFile(file: string): string {
  const h = crypto.createHash('sha256');
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.allocUnsafe(CHUNK);
    for (let n; (n = fs.readSync(fd, buf, 0, CHUNK, null)) > 0;) h.update(buf.subarray(0, n));
  } finally {
    fs.closeSync(fd);
  }
  return h.digest('hex');
}

/** the 4 KiB blocks where two images differ (the first `limit`), and how many in all */
function differingBlocks(a: string, b: string, bytes: number, limit = 10): { count: number; first: number[] } {
  const fa = fs.openSync(a, 'r');
  const fb = fs.openSync(b, 'r');
  const first: number[] = [];
  let count = 0;
  try {
    const ba = Buffer.allocUnsafe(CHUNK);
    const bb = Buffer.allocUnsafe(CHUNK);
    for (let pos = 0; pos < bytes; pos += CHUNK) {
      const n = Math.min(CHUNK, bytes - pos);
      const na = fs.readSync(fa, ba, 0, n, pos);
      const nb = fs.readSync(fb, bb, 0, n, pos);
      for (let o = 0; o < n; o += BLOCK) {
        const e = Math.min(n, o + BLOCK);
        if (o >= na || o >= nb || ba.compare(bb, o, Math.min(e, nb), o, Math.min(e, na)) !== 0) {
          count++;
          if (first.length < limit) first.push((pos + o) / BLOCK);
        }
      }
    }
  } finally {
    fs.closeSync(fa);
    fs.closeSync(fb);
  }
  return { count, first };
}

/** read `file` in `chunk`-byte pieces, `lanes` in flight, with or without their block digests on the digest threads (diag) */
async function scan(file: string, bytes: number, chunk: number, digest: boolean, lanes = 4): Promise<number> {
  const fh = await fs.promises.open(file, 'r');
  try {
    const t0 = performance.now();
    let next = 0;
    const lane = async (): Promise<void> => {
      const buf = Buffer.allocUnsafe(chunk);
      while (next < bytes) {
        const pos = next;
        next += chunk;
        const n = Math.min(chunk, bytes - pos);
        await fh.read(buf, 0, n, pos);
        if (digest) await digestBlocks(buf.subarray(0, n), BLOCK);
      }
    };
    await Promise.all(Array.from({ length: lanes }, lane));
    return (performance.now() - t0) / 1000;
  } finally {
    await fh.close();
  }
}

type DigestFn = (job: { data: Uint8Array; blockBytes: number }) => Uint8Array;
interface Xxhash { xxh64(input: Uint8Array, seed?: bigint): bigint }

/**
 * diag: the hashing alone, on this thread, over the image read `chunk` bytes at a time
 * (reads not timed): the digest threads' function (xxh3-128 per 4 KiB block), and for
 * comparison xxh64 per 4 KiB block from the same library; seconds for the whole image.
 */
async function hashOnly(file: string, bytes: number, chunk: number): Promise<{ xxh3Seconds: number; xxh64Seconds: number }> {
  const digest = ((await import('../../src/core/digest-worker.mjs' as string)) as { default: DigestFn }).default;
  const xxhash = ((await import('@node-rs/xxhash' as string)) as { default: Xxhash }).default;
  const fd = fs.openSync(file, 'r');
  let xxh3Seconds = 0;
  let xxh64Seconds = 0;
  try {
    const buf = Buffer.allocUnsafe(chunk);
    for (let pos = 0; pos < bytes; pos += chunk) {
      const n = fs.readSync(fd, buf, 0, Math.min(chunk, bytes - pos), pos);
      const data = buf.subarray(0, n);
      const t0 = performance.now();
      digest({ data, blockBytes: BLOCK });
      const t1 = performance.now();
      for (let o = 0; o < n; o += BLOCK) xxhash.xxh64(data.subarray(o, Math.min(n, o + BLOCK)));
      const t2 = performance.now();
      xxh3Seconds += (t1 - t0) / 1000;
      xxh64Seconds += (t2 - t1) / 1000;
    }
  } finally {
    fs.closeSync(fd);
  }
  return { xxh3Seconds, xxh64Seconds };
}

/** every TCP connection this process makes from now on (the tcp slink's: it uses net.connect), by the port it went to */
function watchSockets(): { total(port: number): { sent: number; received: number }; stop(): void } {
  const socks = new Map<net.Socket, number>();
  const onSocket = (m: unknown): void => {
    const sock = (m as { socket: net.Socket }).socket;
    sock.once('connect', () => socks.set(sock, sock.remotePort ?? 0));
  };
  dc.subscribe('net.client.socket', onSocket);
  return {
    total(port) {
      let sent = 0;
      let received = 0;
      for (const [s, p] of socks) {
        if (p !== port) continue;
        sent += s.bytesWritten;
        received += s.bytesRead;
      }
      return { sent, received };
    },
    stop: () => dc.unsubscribe('net.client.socket', onSocket),
  };
}

interface Rig {
  transport: Transport;
  group: string;
  local: string;
  remote: string;
  /** tcp: the receiver's port */
  port: number;
  rx: Awaited<ReturnType<typeof startWorker<RxCommand, unknown>>> | null;
}

function site(dm: DeviceMapper, group: string): SiteJson {
  const d = dm.status(group)[0]!.detail as { sites: SiteJson[] };
  return d.sites.find((s) => s.slink === 1)!;
}

const settled = (s: SiteJson): boolean => s.mode === 'in-order' && s.resync === null && s.lag.ios === 0 && s.stateChar === 'A';

async function waitSettled(dm: DeviceMapper, group: string, ms: number, what: string): Promise<void> {
  const end = Date.now() + ms;
  for (;;) {
    const s = site(dm, group);
    if (settled(s) && (s.link === null || s.link.connection === 'connected')) return;
    if (s.errors > 0) throw new Error(`R4 ${group}: ${what}: the site has I/O errors: ${s.lastError}`);
    if (Date.now() > end) throw new Error(`R4 ${group}: ${what}: not settled after ${ms / 1000} s: ${JSON.stringify(s)}`);
    await sleep(5);
  }
}

async function runOne(
  dm: DeviceMapper, rig: Rig, mode: Mode, bytes: number, localSha: string, damaged: readonly number[], damageSeed: number, seed: number,
  sockets: ReturnType<typeof watchSockets>, log: (m: string) => void,
): Promise<R4Result> {
  // the remote image: the local one with the damaged blocks, behind dmkit's back
  writeImage(rig.remote, bytes, seed, damaged, damageSeed);
  const before = differingBlocks(rig.local, rig.remote, bytes, 0).count;
  if (before !== damaged.length) throw new Error(`R4 ${rig.transport}: the remote image differs in ${before} blocks before the run, expected ${damaged.length}`);
  if (rig.rx) await rig.rx.run({ cmd: 'begin' });
  const s0 = site(dm, rig.group);
  const k0 = sockets.total(rig.port);
  const cpu0 = process.cpuUsage();
  const us0 = Number(process.hrtime.bigint() / 1000n);
  const t0 = performance.now();
  await dm.message(rig.group, 0, mode === 'plain' ? ['resync', '1', 'full'] : ['resync', '1', 'full', 'checksum']);
  if (site(dm, rig.group).mode !== 'dirty-log') throw new Error(`R4 ${rig.group}: not on the dirty logs after the resync message`);
  const end = Date.now() + 600_000;
  for (;;) {
    const s = site(dm, rig.group);
    if (settled(s)) break;
    if (s.errors > s0.errors) throw new Error(`R4 ${rig.group} ${mode}: the site has I/O errors: ${s.lastError}`);
    if (Date.now() > end) throw new Error(`R4 ${rig.group} ${mode}: not in sync after 600 s: ${JSON.stringify(s)}`);
    await sleep(2);
  }
  const seconds = (performance.now() - t0) / 1000;
  const windowUs: [number, number] = [us0, Number(process.hrtime.bigint() / 1000n)];
  const cpu = process.cpuUsage(cpu0);
  const k1 = sockets.total(rig.port);
  const s1 = site(dm, rig.group);
  const rxs = rig.rx ? ((await rig.rx.run({ cmd: 'end' })) as RxStats) : null;

  // the copy must be right
  const localNow = shaFile(rig.local);
  const remoteNow = shaFile(rig.remote);
  if (localNow !== localSha) throw new Error(`R4 ${rig.transport} ${mode}: the LOCAL image changed during the run (sha256 ${localNow}, written ${localSha})`);
  if (remoteNow !== localSha) {
    const d = differingBlocks(rig.local, rig.remote, bytes, 20);
    const stillDamaged = d.first.filter((b) => damaged.includes(b)).length;
    throw new Error(`R4 ${rig.transport} ${mode}: the site's image is WRONG after the resync reported in sync: ${d.count} of ` +
      `${bytes / BLOCK} 4 KiB blocks differ from the local image (first: ${d.first.join(', ')}; ${stillDamaged} of those among the ` +
      `${damaged.length} damaged ones); status ${JSON.stringify(s1)}`);
  }

  const resyncedBytes = s1.resyncedBytes - s0.resyncedBytes;
  const comparedBytes = s1.comparedBytes - s0.comparedBytes;
  const anomalies: string[] = [];
  const wantResynced = mode === 'plain' ? bytes : damaged.length * BLOCK;
  const wantCompared = mode === 'plain' ? 0 : bytes;
  if (resyncedBytes !== wantResynced) anomalies.push(`resyncedBytes +${resyncedBytes}, expected +${wantResynced}`);
  if (comparedBytes !== wantCompared) anomalies.push(`comparedBytes +${comparedBytes}, expected +${wantCompared}`);
  const link0 = s0.link;
  const link1 = s1.link;
  const reconnects = link0 && link1 ? link1.reconnects - link0.reconnects : 0;
  if (reconnects) anomalies.push(`${reconnects} reconnect(s) during the run`);
  const digests = link0 && link1 ? link1.digests - link0.digests : 0;
  if (rig.transport === 'tcp' && mode === 'checksum' && digests === 0) anomalies.push('no DIGEST answered by the receiver: the site\'s blocks were read back and hashed here');
  for (const a of anomalies) log(`  R4 ANOMALY ${rig.transport} ${mode}: ${a}`);
  const sentBytes = k1.sent - k0.sent;
  const receivedBytes = k1.received - k0.received;
  return {
    transport: rig.transport, mode, seconds,
    bytes: rig.transport === 'tcp' ? sentBytes + receivedBytes : resyncedBytes + (comparedBytes / BLOCK) * DIGEST_BYTES,
    resyncedBytes, comparedBytes, sentBytes, receivedBytes,
    bytesOnWire: link0 && link1 ? link1.bytesOnWire - link0.bytesOnWire : 0,
    digests, reconnects,
    cpuSeconds: (cpu.user + cpu.system) / 1e6, rxCpuSeconds: rxs?.cpuSeconds ?? null,
    damagedBlocks: damaged.length, anomalies, windowUs,
  };
}

const METHOD =
  'In the bench process (tools/bench/r-checksum.ts), through the library, as RS; for tcp a receiver process ' +
  '(tools/bench/r-tcp-rx.ts: DeviceMapper + `linear` over the remote image + ReplicationReceiver on 127.0.0.1, which ' +
  'answers DIGEST frames itself). Per transport one group set up once: `replicator ringbuffer` (4 MiB log), slink 1 ' +
  '`blockdev` to a `linear` device over the remote image, or `tcp 5 1 async retest=1 peer=127.0.0.1:PORT secret=FILE` ' +
  '(crc32c, no compression); a replicator-dev over the local image with `core 2 <region> nosync` (a seeded site); ' +
  '`resync-rate 0` (fixed, unlimited, 4 regions in flight; r4rate sets another) for both modes. The local image: seeded AES-CTR bytes. ' +
  'Before every run the remote image is rewritten in place as the local one with r4pct % of its 4 KiB blocks (random, ' +
  'seeded per pair, the same for both runs of the pair) replaced, then fdatasync-ed. plain = `resync 1 full`, checksum = ' +
  '`resync 1 full checksum`, timed from the message to the site in order with nothing in flight (status JSON mode ' +
  'in-order, resync null, lag 0; polled every 2 ms). After every run: sha256 of both images must equal what was written ' +
  '(else the bench fails), and resyncedBytes / comparedBytes are checked against the damage (anomalies logged). Bytes: ' +
  'tcp = the sender connection\'s socket bytesWritten + bytesRead over the run (headers, payloads, DIGEST requests and ' +
  'replies, acks); blockdev = resyncedBytes + 16 bytes per 4 KiB block compared. Per pair the order is blockdev plain, ' +
  'checksum, tcp checksum, plain, then reversed the next pair. Images in the page cache (just written).';

export const r4: Suite = {
  id: 'R4',
  description: 'library: checksum resync (`resync 1 full checksum`) of an image differing in 1 % of its 4 KiB blocks vs a plain full resync of the same images, blockdev and tcp: bytes and time',
  method: METHOD,
  async run(ctx: BenchContext): Promise<Row[]> {
    const bytes = Math.floor(size(ctx, 'r4size', ctx.quick ? 32 << 20 : 256 << 20) / (1 << 20)) * (1 << 20);
    if (bytes < 1 << 20) throw new Error('--opt r4size must be at least 1m');
    const sectors = bytes / 512;
    const region = int(ctx, 'r4region', 1024);
    const pct = Number(ctx.opts.r4pct ?? '1');
    if (!(pct > 0 && pct <= 100)) throw new Error(`--opt r4pct must be in (0, 100], got '${ctx.opts.r4pct}'`);
    const transports = (ctx.opts.r4transports ?? 'blockdev,tcp').split(',').map((s) => s.trim()) as Transport[];
    for (const tr of transports) if (tr !== 'blockdev' && tr !== 'tcp') throw new Error(`--opt r4transports: unknown '${tr}' (blockdev, tcp)`);
    const diag = flag(ctx, 'r4diag', !ctx.quick);
    const rate = ctx.opts.r4rate ?? '0';
    const blocks = bytes / BLOCK;
    const nDamaged = Math.max(1, Math.round((blocks * pct) / 100));
    const t = (n: string): string => path.join(ctx.tmpdir, `r4-${n}`);
    ctx.log(`R4: ${formatSize(bytes)} images, ${nDamaged} of ${blocks} 4 KiB blocks differing (${pct} %), region ${region} sectors, ` +
      `transports ${transports.join(', ')}, resync-rate ${rate}`);

    const rigs: Rig[] = [];
    const dm = new DeviceMapper();
    const sockets = watchSockets();
    const localSha = new Map<Transport, string>();
    const got: Array<{ r: R4Result; pair: number; order: number; load1: number }> = [];
    const diags: Array<Diag & { pair: number }> = [];
    const warmups: Array<{ transport: Transport; seconds: number; resyncedBytes: number; comparedBytes: number; anomalies: string[] }> = [];
    /** when the digest threads last worked (performance.now()), this process's and the receiver's */
    const lastDigest = { sender: 0, receiver: 0 };
    try {
      for (const tr of transports) {
        const local = t(`${tr}-local.img`);
        const remote = t(`${tr}-remote.img`);
        localSha.set(tr, writeImage(local, bytes, ctx.seed, [], 0));
        writeImage(remote, bytes, ctx.seed, [], 0); // in sync to begin with
        const rlog = t(`${tr}-rlog`);
        zeroFile(rlog, (8192 + 64) * 512);
        const group = `r4-${tr}`;
        let port = 0;
        let rx: Rig['rx'] = null;
        let slink: string;
        let siteDev: string;
        if (tr === 'blockdev') {
          siteDev = 'dm:r4-site';
          await dm.create('r4-site', { table: `0 ${sectors} linear ${remote} 0` });
          slink = 'blockdev 2 1 async';
        } else {
          const secret = secretFile(ctx);
          const spec: RxSpec = { dmkit: { devices: [{ name: 'r4-site', file: remote, sectors }], secretFile: secret, stateDir: t('rx-state') }, ref: null };
          rx = await startWorker<RxCommand, unknown>(RX, spec, ctx.env);
          port = Number(rx.ready.dmkitPort);
          siteDev = 'r4-site';
          const words = ['1', 'async', 'retest=1', `peer=127.0.0.1:${port}`, `secret=${secret}`];
          slink = `tcp ${words.length} ${words.join(' ')}`;
        }
        rigs.push({ transport: tr, group, local, remote, port, rx });
        await dm.create(group, { table: `0 1 replicator ringbuffer 4 ${rlog} 0 auto 8192 blockdev 1 0 ${slink}` });
        await dm.message(group, 0, ['resync-rate', rate]);
        await dm.create(`r4-vol-${tr}`, { table: `0 ${sectors} replicator-dev dm:${group} 0 0 1 ${local} nolog 0 1 1 ${siteDev} core 2 ${region} nosync` });
        await waitSettled(dm, group, 30_000, 'set-up');
        // untimed: a checksum resync of identical images (starts the digest threads; must send nothing)
        const w = await runOne(dm, rigs[rigs.length - 1]!, 'checksum', bytes, localSha.get(tr)!, [], 0, ctx.seed, sockets, ctx.log);
        ctx.log(`  R4 ${tr} warm-up: checksum resync of identical images ${w.seconds.toFixed(3)} s (digest threads started), ` +
          `resynced ${w.resyncedBytes} bytes, compared ${(w.comparedBytes / 1e6).toFixed(0)} MB${w.anomalies.length ? `; ANOMALIES: ${w.anomalies.join('; ')}` : ''}`);
        warmups.push({ transport: tr, seconds: w.seconds, resyncedBytes: w.resyncedBytes, comparedBytes: w.comparedBytes, anomalies: w.anomalies });
        lastDigest.sender = performance.now();
        if (tr === 'tcp') lastDigest.receiver = performance.now();
      }

      for (let pair = 0; pair < ctx.pairs; pair++) {
        const damageSeed = ctx.seed * 1000 + pair;
        const damaged = pickBlocks(blocks, nDamaged, damageSeed);
        const runs: Array<[Transport, Mode]> = [];
        for (const tr of ['blockdev', 'tcp'] as const) {
          if (!transports.includes(tr)) continue;
          runs.push(...(tr === 'blockdev' ? [[tr, 'plain'], [tr, 'checksum']] : [[tr, 'checksum'], [tr, 'plain']]) as Array<[Transport, Mode]>);
        }
        if (pair % 2 === 1) runs.reverse();
        const load1 = os.loadavg()[0]!;
        for (const [i, [tr, mode]] of runs.entries()) {
          const rig = rigs.find((x) => x.transport === tr)!;
          const idle = { sender: (performance.now() - lastDigest.sender) / 1000, receiver: (performance.now() - lastDigest.receiver) / 1000 };
          const r = await runOne(dm, rig, mode, bytes, localSha.get(tr)!, damaged, damageSeed, ctx.seed, sockets, ctx.log);
          if (mode === 'checksum') {
            r.senderPoolIdle = idle.sender;
            lastDigest.sender = performance.now();
            if (tr === 'tcp') {
              r.receiverPoolIdle = idle.receiver;
              lastDigest.receiver = performance.now();
            }
            const idleS = DIGEST_IDLE_MS / 1000;
            const cold = [idle.sender > idleS ? 'this process\'s' : '', tr === 'tcp' && idle.receiver > idleS ? 'the receiver\'s' : ''].filter(Boolean);
            if (cold.length) ctx.log(`  R4 note: ${cold.join(' and ')} digest threads idle > ${idleS} s before this run: they started again in it`);
          }
          got.push({ r, pair, order: i, load1 });
          ctx.log(`  R4 pair ${pair + 1}/${ctx.pairs} ${tr} ${mode}: ${r.seconds.toFixed(3)} s (${(bytes / r.seconds / 1e6).toFixed(0)} MB/s of image), ` +
            `${(r.bytes / 1e6).toFixed(2)} MB (resynced ${(r.resyncedBytes / 1e6).toFixed(2)} MB, compared ${(r.comparedBytes / 1e6).toFixed(0)} MB` +
            (tr === 'tcp' ? `; socket out ${(r.sentBytes / 1e6).toFixed(2)} MB, in ${(r.receivedBytes / 1e6).toFixed(2)} MB, bytesOnWire ${(r.bytesOnWire / 1e6).toFixed(2)} MB, ${r.digests} digests` : '') +
            `); cpu s ${r.cpuSeconds.toFixed(2)}${r.rxCpuSeconds !== null ? ` + rx ${r.rxCpuSeconds.toFixed(2)}` : ''}; copy verified; load ${load1.toFixed(2)}`);
        }
        if (diag) {
          const local = rigs[0]!.local;
          const readSeconds = await scan(local, bytes, region * 512, false);
          const readDigestSeconds = await scan(local, bytes, region * 512, true);
          const readDigestSerialSeconds = await scan(local, bytes, region * 512, true, 1);
          const h = await hashOnly(local, bytes, region * 512);
          lastDigest.sender = performance.now();
          diags.push({ pair, readSeconds, readDigestSeconds, readDigestSerialSeconds, ...h });
          const mbps = (secs: number): string => `${secs.toFixed(3)} s, ${(bytes / secs / 1e6).toFixed(0)} MB/s`;
          ctx.log(`  R4 pair ${pair + 1} diag (local image, ${formatSize(region * 512)} pieces): read, 4 in flight ${mbps(readSeconds)}; ` +
            `read + digestBlocks, 4 in flight ${mbps(readDigestSeconds)}, 1 at a time ${mbps(readDigestSerialSeconds)}; hashing alone on one thread: xxh3-128 per 4 KiB (the digest ` +
            `threads' function) ${mbps(h.xxh3Seconds)}, xxh64 per 4 KiB ${mbps(h.xxh64Seconds)}`);
        }
      }
    } finally {
      sockets.stop();
      await dm.close();
      for (const r of rigs) await r.rx?.close();
      for (const f of fs.readdirSync(ctx.tmpdir)) if (f.startsWith('r4-')) fs.rmSync(path.join(ctx.tmpdir, f), { recursive: true, force: true });
    }

    const rows: Row[] = [];
    for (const tr of transports) {
      const of = (mode: Mode): typeof got => got.filter((x) => x.r.transport === tr && x.r.mode === mode);
      const mk = (mode: Mode, value: (r: R4Result) => number): Sample[] => of(mode).map(({ r, pair, order, load1 }) => {
        const other = got.find((x) => x.pair === pair && x.r.transport === tr && x.r.mode !== mode)!.order;
        return {
          value: value(r), ops: 0, bytes: r.bytes, seconds: r.seconds, maxRssKiB: null, pair, position: (order < other ? 0 : 1) as 0 | 1, load1,
          imageMBps: bytes / r.seconds / 1e6, resyncedBytes: r.resyncedBytes, comparedBytes: r.comparedBytes,
          ...(tr === 'tcp' ? { socketSentBytes: r.sentBytes, socketReceivedBytes: r.receivedBytes, bytesOnWire: r.bytesOnWire, digests: r.digests, reconnects: r.reconnects } : {}),
          cpuSeconds: r.cpuSeconds, ...(r.rxCpuSeconds !== null ? { receiverCpuSeconds: r.rxCpuSeconds } : {}),
          damagedBlocks: r.damagedBlocks, anomalies: r.anomalies, windowUs: r.windowUs,
          ...(r.senderPoolIdle !== undefined ? { senderPoolIdleSeconds: r.senderPoolIdle } : {}),
          ...(r.receiverPoolIdle !== undefined ? { receiverPoolIdleSeconds: r.receiverPoolIdle } : {}),
        };
      });
      const anomalies = got.filter((x) => x.r.transport === tr).flatMap((x) => x.r.anomalies.map((a) => `pair ${x.pair + 1} ${x.r.mode}: ${a}`));
      const med = (mode: Mode, f: (r: R4Result) => number): number => median(of(mode).map((x) => f(x.r)));
      const notes = `image ${formatSize(bytes)}, ${nDamaged} damaged 4 KiB blocks (${pct} %), region ${region} sectors, resync-rate ${rate}; ` +
        `median image MB/s plain ${med('plain', (r) => bytes / r.seconds / 1e6).toFixed(0)}, checksum ${med('checksum', (r) => bytes / r.seconds / 1e6).toFixed(0)}; ` +
        `median cpu s plain ${med('plain', (r) => r.cpuSeconds).toFixed(2)}, checksum ${med('checksum', (r) => r.cpuSeconds).toFixed(2)}` +
        (tr === 'tcp' ? ` (+ receiver ${med('plain', (r) => r.rxCpuSeconds ?? 0).toFixed(2)}, ${med('checksum', (r) => r.rxCpuSeconds ?? 0).toFixed(2)})` : '') +
        (anomalies.length ? `; ANOMALIES: ${anomalies.join('; ')}` : '');
      const bytesWhat = tr === 'tcp'
        ? 'bytes the sender\'s connection carried both ways (socket bytesWritten + bytesRead)'
        : 'site resyncedBytes + 16 bytes per 4 KiB block compared';
      rows.push(Object.assign(row({
        suite: 'R4', id: `${tr}-bytes`, unit: BYTES_UNIT, lowerIsBetter: true, goal: 0.05, notes,
        description: `${tr}: bytes of the checksum resync / the plain full resync of the same images (${bytesWhat})`,
        a: side('checksum', `resync 1 full checksum: ${bytesWhat}`, mk('checksum', (r) => r.bytes), null),
        b: side('plain', `resync 1 full: ${bytesWhat}`, mk('plain', (r) => r.bytes), null),
      }), { anomalies }));
      rows.push(Object.assign(row({
        suite: 'R4', id: `${tr}-time`, unit: 'µs', lowerIsBetter: true, goal: 1.0, notes,
        description: `${tr}: time of the checksum resync / the plain full resync (message → site in order, nothing in flight)`,
        a: side('checksum', 'resync 1 full checksum, µs to in sync', mk('checksum', (r) => r.seconds * 1e6), null),
        b: side('plain', 'resync 1 full, µs to in sync', mk('plain', (r) => r.seconds * 1e6), null),
      }), { anomalies, warmup: warmups.find((w) => w.transport === tr), ...(diag ? { diag: diags } : {}) }));
    }
    return rows;
  },
};
