/**
 * `ringbuffer` replication log: entries in a ring on a log device, positions in
 * checkpoints (docs/formats/replog.md). This file is the type: its arguments, opening the
 * device, and what each open mode does with what it finds there. The log's work is in
 * ring-log.ts, its format in ring-format.ts.
 *
 *   <dev> <dev_start> [auto|create|open [<size>]]
 *
 * `size` is in sectors, the whole log (header, checkpoint slots, ring) from `dev_start`,
 * at least 4096 (2 MiB). When a log is created without one: 64 MiB, or what the device has
 * from `dev_start` on when that is less. An existing log's header wins over `size`.
 */
import { randomBytes } from 'node:crypto';
import { ArgReader } from '../core/args.ts';
import { TargetArgError, toBlockError } from '../core/errors.ts';
import type { BlockDev } from '../core/types.ts';
import { FORMAT_VERSION, MIN_LOG_SECTORS, decodeHeader, newHeader } from './ring-format.ts';
import type { HeaderRead, LogHeader } from './ring-format.ts';
import { LogDevice } from './ring-io.ts';
import { RingLog } from './ring-log.ts';
import type { Replog, ReplogContext, ReplogType } from './types.ts';

export type OpenMode = 'auto' | 'create' | 'open';
const MODES: readonly OpenMode[] = ['auto', 'create', 'open'];
/** 64 MiB */
export const DEFAULT_LOG_SECTORS = 131072;
const USAGE = '<dev> <dev_start> [auto|create|open [<size>]]';

interface Args {
  readonly ref: string;
  readonly devStart: number;
  readonly mode: OpenMode;
  readonly size: number | null;
}

/**
 * Logs open in this process, per device and dev_start: `create` refuses to overwrite one.
 * The only module state: it describes the devices, not any one log.
 */
const inUse = new WeakMap<BlockDev, Map<number, number>>();

function isInUse(dev: BlockDev, devStart: number): boolean {
  return (inUse.get(dev)?.get(devStart) ?? 0) > 0;
}

/** count a live log at (dev, devStart); returns its release (idempotent) */
function markInUse(dev: BlockDev, devStart: number): () => void {
  let starts = inUse.get(dev);
  if (!starts) inUse.set(dev, (starts = new Map()));
  starts.set(devStart, (starts.get(devStart) ?? 0) + 1);
  let released = false;
  return () => {
    if (released) return;
    released = true;
    const n = (starts.get(devStart) ?? 1) - 1;
    if (n > 0) starts.set(devStart, n);
    else starts.delete(devStart);
  };
}

/** `<dev> <dev_start> [auto|create|open [<size>]]`; throws TargetArgError naming the argument */
function parseArgs(args: readonly string[]): Args {
  try {
    return readArgs(args);
  } catch (err) {
    throw err instanceof TargetArgError ? argError(err.message, err.code) : err;
  }
}

function readArgs(args: readonly string[]): Args {
  const r = new ArgReader(args, 'ringbuffer');
  if (args.length < 2 || args.length > 4) r.fail(`invalid argument count ${args.length} (expected ${USAGE})`);
  const ref = r.next('replog device');
  const devStart = r.uint('dev_start');
  const mode = r.atEnd() ? 'auto' : r.oneOf('open mode', MODES);
  let size: number | null = null;
  if (!r.atEnd()) {
    size = r.uint('size');
    if (size < MIN_LOG_SECTORS) r.fail(`invalid size ${size} (at least ${MIN_LOG_SECTORS} sectors: 2 MiB)`);
  }
  r.expectEnd();
  return { ref, devStart, mode, size };
}

/** A TargetArgError prefixed with the type's name (the replicator adds device and line). */
function argError(message: string, code = 'EINVAL'): TargetArgError {
  return new TargetArgError(`ringbuffer: ${message}`, code);
}

function tooSmall(dev: BlockDev, devStart: number, size: number, what: string): TargetArgError {
  return argError(`device too small for replog: ${dev.ref} has ${dev.sectors} sectors, needs ${devStart + size} (dev_start ${devStart} + ${what} ${size})`);
}

/** Why a header found at `where` cannot be opened. */
function refusal(found: Exclude<HeaderRead, { kind: 'ok' }>, where: string, mode: OpenMode): TargetArgError {
  const auto = mode === 'auto' ? '; auto never overwrites it (create does)' : '';
  switch (found.kind) {
    case 'empty':
      return argError(`${where}: no replication log (all zeroes, no magic); create or auto makes one`);
    case 'foreign':
      return argError(`${where}: not a replication log (foreign data, magic ${found.magic.toString('hex')})${auto}`);
    case 'version':
      return argError(`${where}: unsupported replication log version ${found.version} (this dmkit reads version ${FORMAT_VERSION})${auto}`);
    case 'crc':
      return argError(`${where}: header CRC mismatch (corrupted log)${auto}`);
    case 'invalid':
      return argError(`${where}: invalid header: ${found.why} (corrupted log)${auto}`);
  }
}

async function openDevice(ctx: ReplogContext, ref: string): Promise<BlockDev> {
  try {
    return await ctx.open(ref);
  } catch (err) {
    throw argError((err as Error).message, (err as { code?: string }).code ?? 'EINVAL');
  }
}

/** Run a device read or write of opening; a failure becomes a TargetArgError (EIO) saying what. */
async function deviceStep<T>(where: string, what: string, step: () => Promise<T>): Promise<T> {
  try {
    return await step();
  } catch (err) {
    const e = toBlockError(err);
    throw argError(`${where}: cannot ${what}: ${e.message}`, e.code);
  }
}

/** Where a log goes: the opened device and the log's place on it. */
interface Place {
  readonly ctx: ReplogContext;
  readonly io: LogDevice;
  /** `<dev> at sector <dev_start>`, for messages */
  readonly where: string;
}

/** Write a new, empty log of `size` (or the default) sectors, unless a live log is there. */
async function makeLog(p: Place, size: number | null): Promise<Replog> {
  const { dev, devStart } = p.io;
  if (isInUse(dev, devStart)) {
    throw argError(`${p.where}: the log there is in use by another ringbuffer; refusing to overwrite it`, 'EBUSY');
  }
  const sectors = size ?? Math.min(DEFAULT_LOG_SECTORS, dev.sectors - devStart);
  if (devStart + sectors > dev.sectors) throw tooSmall(dev, devStart, sectors, 'size');
  const header = newHeader(randomBytes(16), sectors, Date.now());
  const initial = await deviceStep(p.where, 'write a new log', () => p.io.createLog(header));
  p.ctx.log.info(`${p.ctx.device}: ringbuffer: created a log of ${sectors} sectors at ${p.where}`);
  return new RingLog(p.ctx, p.io, header, initial, markInUse(dev, devStart));
}

/** Open the valid log whose header is `header` (its size wins over the table's `size`). */
function openLog(p: Place, header: LogHeader, size: number | null): Replog {
  const { dev, devStart } = p.io;
  if (devStart + header.size > dev.sectors) throw tooSmall(dev, devStart, header.size, 'the header\'s size');
  if (size !== null && size !== header.size) {
    p.ctx.log.info(`${p.ctx.device}: ringbuffer: ${p.where}: size ${size} given, the log's header says ${header.size}: the header wins`);
  }
  return new RingLog(p.ctx, p.io, header, null, markInUse(dev, devStart));
}

export const ringbufferLog: ReplogType = {
  name: 'ringbuffer',
  /**
   * `<dev> <dev_start> [auto|create|open [<size>]]` (default `auto`):
   *   - `open`: a valid log must be there;
   *   - `create`: write a new, empty log, unless a log at the same place is open in this
   *     process (EBUSY);
   *   - `auto`: open a valid log, or create one where there is none (all-zero magic);
   *     foreign data, a corrupted header or another version is refused, never overwritten.
   */
  async create(ctx, args): Promise<Replog> {
    const a = parseArgs(args);
    const dev = await openDevice(ctx, a.ref);
    if (a.devStart + MIN_LOG_SECTORS > dev.sectors) throw tooSmall(dev, a.devStart, a.size ?? MIN_LOG_SECTORS, 'size');
    const place: Place = { ctx, io: new LogDevice(dev, a.devStart), where: `${a.ref} at sector ${a.devStart}` };
    if (a.mode === 'create') return makeLog(place, a.size);
    const found = decodeHeader(await deviceStep(place.where, 'read the log header', () => place.io.readHeader()));
    if (found.kind === 'ok') return openLog(place, found.header, a.size);
    if (found.kind === 'empty' && a.mode === 'auto') return makeLog(place, a.size);
    throw refusal(found, place.where, a.mode);
  },
};
