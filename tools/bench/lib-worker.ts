/**
 * Worker process for library benchmarks (see child.ts for the protocol): sets up one or two
 * targets, each a dmkit table (the library, in-process) or plain Node `fs` on a file, runs
 * the pattern untimed on each (JIT), then runs it timed on the target a `LibRunCommand`
 * names and answers with one `LibWorkerResult` line. The parent keeps the page cache warm.
 *
 *   node --import tsx tools/bench/lib-worker.ts '<LibWorkerSpec as JSON>'
 *
 * Nothing is flushed: writes land in the page cache on both sides. The worker exits without
 * closing the engine (a close would fdatasync, which the reference does not do).
 */
import { createInterface } from 'node:readline';
import type { LibTarget } from './lib-sides.ts';
import { dmkitFactory, nodeFactory, openDmkit } from './lib-sides.ts';
import type { Pattern, Slot } from './workload.ts';
import { drive, makeSlots } from './workload.ts';

export type { LibTarget, NodeApi } from './lib-sides.ts';

export interface LibWorkerSpec {
  /** one target per side hosted by this process (one for a side of its own, two to share) */
  targets: LibTarget[];
  pattern: Pattern;
  /** bytes of the device/file the offsets range over */
  span: number;
  /** untimed run of the pattern per target at start-up (JIT, allocations), before `ready` */
  warmupSeconds: number;
}

export interface LibRunCommand {
  /** index into `targets` */
  target: number;
  seconds: number;
  seed: number;
}

export interface LibWorkerResult {
  ops: number;
  bytes: number;
  seconds: number;
  /** peak RSS of this process so far (KiB) */
  maxRssKiB: number;
  /** user + system CPU seconds of the process during the timed part */
  cpuSeconds: number;
}

async function main(): Promise<void> {
  const spec = JSON.parse(process.argv[2] ?? '') as LibWorkerSpec;
  const p = spec.pattern;
  const sides: Slot[][] = [];
  for (const t of spec.targets) {
    const factory = t.kind === 'dmkit' ? dmkitFactory(await openDmkit(t.table), p) : await nodeFactory(t, p);
    sides.push(makeSlots(factory, p));
  }
  if (spec.warmupSeconds > 0) {
    for (let i = 0; i < 4; i++) {
      for (const slots of sides) await drive(slots, p, spec.span, spec.warmupSeconds / 4, 0x5a5a5a5a + i);
    }
  }
  const reply = (x: unknown): void => void process.stdout.write(`${JSON.stringify(x)}\n`);
  reply({ ready: true });
  for await (const line of createInterface({ input: process.stdin })) {
    if (!line.trim()) continue;
    const cmd = JSON.parse(line) as LibRunCommand;
    const slots = sides[cmd.target];
    if (!slots) throw new Error(`no target ${cmd.target}`);
    const cpu0 = process.cpuUsage();
    const r = await drive(slots, p, spec.span, cmd.seconds, cmd.seed);
    const cpu = process.cpuUsage(cpu0);
    reply({
      ...r,
      maxRssKiB: process.resourceUsage().maxRSS,
      cpuSeconds: (cpu.user + cpu.system) / 1e6,
    } satisfies LibWorkerResult);
  }
  process.exit(0);
}

main().catch((err: unknown) => {
  process.stderr.write(`${err instanceof Error ? err.stack : String(err)}\n`);
  process.exit(1);
});
