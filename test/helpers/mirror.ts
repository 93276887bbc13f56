/**
 * Mirror helpers for the library and daemon tests: the status line parsed (TARGETS.md's
 * format), read from an engine or polled through the control protocol, the leg failure
 * cases the e2e tests share, an independent decoder of the kernel's disk
 * log layout (written from the documented format, not from src/dirtylog), a leg that
 * holds writes, and reading a whole export through NBD.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { ControlClient } from '../../src/daemon/client.ts';
import type { TablesResult } from '../../src/daemon/protocol.ts';
import type { DeviceMapper } from '../../src/index.ts';
import { ok as okTool, unixUri } from './nbd-tools.ts';

export interface MirrorStatus {
  legs: string[];
  inSync: number;
  regions: number;
  health: string;
  /** `1 core` or `3 disk <log_dev> <A|D|F>` */
  log: string;
}

/** `<#legs> <dev>… <in_sync>/<nr_regions> 1 <health chars> <log info>` */
export function parseMirrorStatus(params: string): MirrorStatus {
  const w = params.trim().split(' ');
  const n = Number(w[0]);
  const [inSync, regions] = w[n + 1]!.split('/').map(Number) as [number, number];
  if (w[n + 2] !== '1') throw new Error(`unexpected mirror status: ${params}`);
  return { legs: w.slice(1, n + 1), inSync, regions, health: w[n + 3]!, log: w.slice(n + 4).join(' ') };
}

/** the status of the mirror `name` of a library engine */
export function engineMirrorStatus(dm: DeviceMapper, name: string): MirrorStatus {
  return parseMirrorStatus(dm.status(name)[0]!.params);
}

/** until every region of `name` is in sync (event-driven: re-checks after each device event) */
export async function waitEngineInSync(dm: DeviceMapper, name: string): Promise<void> {
  for (;;) {
    const ev = dm.get(name).eventNr;
    const s = engineMirrorStatus(dm, name);
    if (s.inSync === s.regions) return;
    await dm.wait(name, ev);
  }
}

export async function mirrorStatus(cl: ControlClient, name: string): Promise<MirrorStatus> {
  const { lines } = await cl.request<TablesResult>('status', { name });
  if (lines[0]?.type !== 'mirror') throw new Error(`${name} is not a mirror: ${JSON.stringify(lines)}`);
  return parseMirrorStatus(lines[0].params);
}

/** poll the status until `ok` holds (no timing assumption: only a generous limit) */
export async function waitMirror(cl: ControlClient, name: string, ok: (s: MirrorStatus) => boolean, what: string, limitMs = 30_000): Promise<MirrorStatus> {
  let s = await mirrorStatus(cl, name);
  for (const end = Date.now() + limitMs; !ok(s); s = await mirrorStatus(cl, name)) {
    if (Date.now() > end) throw new Error(`${name}: not ${what} within ${limitMs} ms: ${JSON.stringify(s)}`);
    await new Promise((r) => setTimeout(r, 25));
  }
  return s;
}

export const inSync = (s: MirrorStatus): boolean => s.inSync === s.regions;

/** a leg failing under a 2-leg mirror whose legs are `dm:` devices */
export interface LegFailCase {
  name: string;
  /** which leg fails: 0 is the default leg */
  leg: 0 | 1;
  /** the leg reloaded as `error`, or as an always-down `flakey` (`0 1`: up 0 s, down 1 s) */
  fault: 'error' | 'flakey';
  handleErrors: boolean;
}

/** either leg, either fault, with and without handle_errors */
export const LEG_FAIL_CASES: readonly LegFailCase[] = [
  { name: 'leg 1 error', leg: 1, fault: 'error', handleErrors: false },
  { name: 'leg 1 error, handle_errors', leg: 1, fault: 'error', handleErrors: true },
  { name: 'leg 1 flakey always down', leg: 1, fault: 'flakey', handleErrors: false },
  { name: 'leg 1 flakey always down, handle_errors', leg: 1, fault: 'flakey', handleErrors: true },
  { name: 'default leg error', leg: 0, fault: 'error', handleErrors: false },
  { name: 'default leg error, handle_errors', leg: 0, fault: 'error', handleErrors: true },
];

export interface KernelMirrorLog {
  magic: number;
  version: number;
  nrRegions: number;
  /** regions whose clean bit is 0 */
  dirty: number[];
}

/**
 * dm-log.c's on-disk log: u32 LE magic 0x4D695272 at byte 0, u32 LE version, u64 LE
 * nr_regions; clean bits from byte 1024, region i = bit i of the LE 32-bit word stream.
 */
export function readKernelMirrorLog(file: string): KernelMirrorLog {
  const b = fs.readFileSync(file);
  const magic = b.readUInt32LE(0);
  const version = b.readUInt32LE(4);
  const nrRegions = Number(b.readBigUInt64LE(8));
  const dirty: number[] = [];
  for (let i = 0; i < nrRegions; i++) {
    const word = b.readUInt32LE(1024 + 4 * Math.floor(i / 32));
    if (((word >>> (i % 32)) & 1) === 0) dirty.push(i);
  }
  return { magic, version, nrRegions, dirty };
}

/** a write delay longer than any test: a `delay` device with it holds writes until reloaded */
export const HOLD_MS = 2147483647;

/** a `delay` table over `img` that holds writes (reads and flushes pass): a leg not taking data yet */
export function heldTable(len: number, img: string): string {
  return `0 ${len} delay ${img} 0 0 ${img} 0 ${HOLD_MS} ${img} 0 0`;
}

/** a sparse image of `bytes` zeroes */
export function blankImage(dir: string, name: string, bytes: number): string {
  const f = path.join(dir, name);
  fs.writeFileSync(f, Buffer.alloc(0));
  fs.truncateSync(f, bytes);
  return f;
}

/** the whole export `name` of the daemon whose runtime dir is `runtimeDir`, read with nbdcopy */
export async function readThroughNbd(runtimeDir: string, name: string, scratchDir: string): Promise<Buffer> {
  const out = path.join(scratchDir, `${name}.nbdcopy`);
  await okTool('nbdcopy', [unixUri(path.join(runtimeDir, 'nbd.sock'), name), out]);
  const data = fs.readFileSync(out);
  fs.rmSync(out);
  return data;
}

/** poll the disk log file until `ok(dirty regions)` holds */
export async function waitKernelLog(file: string, ok: (dirty: number[]) => boolean, what: string, limitMs = 30_000): Promise<number[]> {
  for (const end = Date.now() + limitMs; ; ) {
    const log = readKernelMirrorLog(file);
    if (log.magic === 0x4d695272 && ok(log.dirty)) return log.dirty;
    if (Date.now() > end) throw new Error(`log ${file}: not ${what}: dirty ${JSON.stringify(log.dirty)}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
