/**
 * The two processes of R1-tcp, R2 and RC (r-tcp.ts, r-tcp-r2.ts): the sending worker
 * (r-tcp-worker.ts) and the receiving site (r-tcp-rx.ts), started as a pair, a run of one
 * side measured with the receiver counting around it, and their files.
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { startWorker, type Worker } from './child.ts';
import { flag } from './r-common.ts';
import type { RxCommand, RxSpec, RxStats } from './r-tcp-rx.ts';
import type { TcpCommand, TcpResult, TcpSpec } from './r-tcp-worker.ts';
import type { BenchContext } from './suite.ts';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const WORKER = path.join(HERE, 'r-tcp-worker.ts');
const RX = path.join(HERE, 'r-tcp-rx.ts');

export type Sender = Worker<TcpCommand, TcpResult>;
export type Receiver = Worker<RxCommand, unknown>;

export interface Run {
  r: TcpResult;
  rx: RxStats;
  pair: number;
  order: number;
  load1: number;
}

export function secretFile(ctx: BenchContext): string {
  const f = path.join(ctx.tmpdir, 'tcp-bench.key');
  if (!fs.existsSync(f)) fs.writeFileSync(f, 'dmkit-bench-secret-0123456789abcdef\n', { mode: 0o600 });
  return f;
}

export interface PairFiles {
  rlog: string; local: string; remote: string;
  refLog: string; refLocal: string; refRemote: string; refPos: string;
  state: string;
}

/** the files of one dmkit side and one reference side, `<prefix>-…` in the bench's tmpdir; images: the four images */
export function pairFiles(ctx: BenchContext, prefix: string): { files: PairFiles; images: string[] } {
  const t = (n: string): string => path.join(ctx.tmpdir, `${prefix}-${n}`);
  const files: PairFiles = {
    rlog: t('rlog'), local: t('local.img'), remote: t('remote.img'),
    refLog: t('ref-log'), refLocal: t('ref-local.img'), refRemote: t('ref-remote.img'), refPos: t('ref.pos'),
    state: t('rx-state'),
  };
  return { files, images: [files.local, files.remote, files.refLocal, files.refRemote] };
}

/** the receiver of PairFiles: `site0` over the remote image (dmkit), the reference receiver over its own */
export function pairRx(files: PairFiles, sectors: number, secret: string, o: { dmkit: boolean; ref: boolean; crc: boolean; noDelay: boolean }): RxSpec {
  return {
    dmkit: o.dmkit ? { devices: [{ name: 'site0', file: files.remote, sectors }], secretFile: secret, stateDir: files.state } : null,
    ref: o.ref ? { file: files.refRemote, posFile: files.refPos, crc: o.crc, noDelay: o.noDelay } : null,
  };
}

/** one run of one side, the receiver counting around it */
export async function measure(rx: Receiver, w: Sender, cmd: TcpCommand): Promise<{ r: TcpResult; rx: RxStats }> {
  await rx.run({ cmd: 'begin' });
  const r = await w.run(cmd);
  const s = (await rx.run({ cmd: 'end' })) as RxStats;
  return { r, rx: s };
}

export async function startPair(ctx: BenchContext, rxSpec: RxSpec, spec: Omit<TcpSpec, 'dmkitPort' | 'refPort'>): Promise<{ rx: Receiver; w: Sender }> {
  const engineNoDelay = flag(ctx, 'engineNoDelay', false);
  const rx = await startWorker<RxCommand, unknown>(RX, { ...rxSpec, engineNoDelay }, ctx.env);
  try {
    const w = await startWorker<TcpCommand, TcpResult>(WORKER, {
      ...spec, engineNoDelay, dmkitPort: Number(rx.ready.dmkitPort), refPort: Number(rx.ready.refPort),
    } satisfies TcpSpec, ctx.env);
    return { rx, w };
  } catch (err) {
    await rx.close();
    throw err;
  }
}

export const mib = (kib: number | null | undefined): string => (kib == null ? '–' : (kib / 1024).toFixed(0));
