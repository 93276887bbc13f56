/**
 * The receiving site of R1-tcp, R2 and RC, a process of its own (protocol: child.ts) so its
 * CPU and peak RSS are its own. It hosts, as the spec asks:
 *
 *   dmkit  a DeviceMapper with one `linear` device per receiving image and a
 *          ReplicationReceiver on 127.0.0.1 (what `dmkit daemon --replication-listen` runs,
 *          without the control socket and NBD server)
 *   ref    the plain-Node reference receiver of r-tcp-reference.ts (net.Server, fs.write per
 *          write, fdatasync of the file and of a position file per flush, an ack per frame)
 *
 *   node --import tsx tools/bench/r-tcp-rx.ts '<RxSpec as JSON>'
 *
 * Replies `{ready, dmkitPort, refPort}`; then per command line: `begin` (fdatasync every
 * image, untimed, and start counting), `end` (CPU seconds, fdatasync calls, peak RSS
 * sampled every 20 ms since `begin`, and the process's maxRSS).
 */
import { createInterface } from 'node:readline';
import { syncAll } from './r-probe.ts';
import { countFdatasyncs, patchNoDelay, startRefReceiver } from './r-tcp-reference.ts';

export interface RxDevice {
  name: string;
  file: string;
  sectors: number;
}

export interface RxSpec {
  dmkit: { devices: RxDevice[]; secretFile: string; stateDir: string } | null;
  ref: { file: string; posFile: string; crc: boolean; noDelay: boolean } | null;
  /** experiment: TCP_NODELAY on the engine's sockets (patchNoDelay) */
  engineNoDelay?: boolean;
}

export type RxCommand = { cmd: 'begin' } | { cmd: 'end' };

export interface RxReady {
  ready: true;
  dmkitPort: number;
  refPort: number;
}

export interface RxStats {
  cpuSeconds: number;
  /** fdatasync calls made by this process (engine and reference) since `begin` */
  fdatasyncs: number;
  /** peak of process.memoryUsage.rss() sampled every 20 ms since `begin` (KiB) */
  rssPeakKiB: number;
  /** the process's peak RSS since it started (KiB) */
  maxRssKiB: number;
  /** flush requests the reference receiver answered since `begin` */
  refFlushes: number;
  /** `begin` to `end` on the monotonic clock in µs (a --cpu-prof profile's time base) */
  windowUs: [number, number];
}

async function main(): Promise<void> {
  const spec = JSON.parse(process.argv[2] ?? '') as RxSpec;
  const syncs = countFdatasyncs();
  if (spec.engineNoDelay) patchNoDelay();
  const files: string[] = [];
  let dmkitPort = 0;
  let refPort = 0;
  if (spec.dmkit) {
    const { DeviceMapper } = await import('../../src/index.ts');
    const { ReplicationReceiver } = await import('../../src/replication/receiver.ts');
    const { loadSecret } = await import('../../src/replication/handshake.ts');
    const { log } = await import('../../src/core/log.ts');
    const dm = new DeviceMapper();
    for (const d of spec.dmkit.devices) {
      await dm.create(d.name, { table: `0 ${d.sectors} linear ${d.file} 0` });
      files.push(d.file);
    }
    const rx = new ReplicationReceiver(dm, {
      host: '127.0.0.1', port: 0, secret: loadSecret(spec.dmkit.secretFile), stateDir: spec.dmkit.stateDir,
    }, log('rx'));
    dmkitPort = (await rx.listen()).port;
  }
  let ref: Awaited<ReturnType<typeof startRefReceiver>> | null = null;
  if (spec.ref) {
    ref = await startRefReceiver(spec.ref);
    refPort = ref.port;
    files.push(spec.ref.file);
  }
  const reply = (x: unknown): void => void process.stdout.write(`${JSON.stringify(x)}\n`);
  reply({ ready: true, dmkitPort, refPort } satisfies RxReady);

  let cpu0 = process.cpuUsage();
  let sync0 = syncs.count();
  let flush0 = ref?.flushes ?? 0;
  let peak = process.memoryUsage.rss();
  const nowUs = (): number => Number(process.hrtime.bigint() / 1000n);
  let w0 = nowUs();
  const timer = setInterval(() => (peak = Math.max(peak, process.memoryUsage.rss())), 20);
  timer.unref();
  for await (const line of createInterface({ input: process.stdin })) {
    if (!line.trim()) continue;
    const c = JSON.parse(line) as RxCommand;
    if (c.cmd === 'begin') {
      syncAll(files);
      cpu0 = process.cpuUsage();
      sync0 = syncs.count();
      flush0 = ref?.flushes ?? 0;
      peak = process.memoryUsage.rss();
      w0 = nowUs();
      reply({ ok: true });
    } else {
      peak = Math.max(peak, process.memoryUsage.rss());
      const cpu = process.cpuUsage(cpu0);
      reply({
        cpuSeconds: (cpu.user + cpu.system) / 1e6, fdatasyncs: syncs.count() - sync0, rssPeakKiB: Math.round(peak / 1024),
        maxRssKiB: process.resourceUsage().maxRSS, refFlushes: (ref?.flushes ?? 0) - flush0, windowUs: [w0, nowUs()],
      } satisfies RxStats);
    }
  }
  process.exit(0); // without closing the engine (a close would flush)
}

main().catch((err: unknown) => {
  process.stderr.write(`${err instanceof Error ? err.stack : String(err)}\n`);
  process.exit(1);
});
