/**
 * Dirty log compliance: one suite run against every built-in log type (created through
 * the registry, as targets do), then what only a persistent log must do (disk: survive a
 * restart, order data flushes before clears, grow, fail its device visibly), and the
 * registry itself. The disk log's bytes are read back with the documented layout.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { FileDev } from '../../src/core/file-dev.ts';
import { log } from '../../src/core/log.ts';
import type { BlockDev } from '../../src/core/types.ts';
import { createDirtyLog, listDirtyLogs, registerDirtyLog, unregisterDirtyLog } from '../../src/dirtylog/registry.ts';
import type { DirtyLog, DirtyLogContext, DirtyLogType, SyncMode } from '../../src/dirtylog/types.ts';
import { DeviceMapper } from '../../src/index.ts';
import { makeTempDir } from './helpers.ts';

const LENGTH = 1000; // sectors: 16 regions of 64, the last one short
const REGION = 64;
const REGIONS = 16;

interface Fixture {
  dir: string;
  dm: DeviceMapper;
  files: FileDev[];
  events: number;
  dataFlushes: number;
  /** set to make flushData fail */
  failDataFlush: boolean;
  /** called inside flushData (to look at the log file at that moment) */
  onDataFlush: (() => void) | null;
}

let fx: Fixture;

beforeEach(() => {
  fx = { dir: makeTempDir('dmkit-dirtylog-'), dm: new DeviceMapper(), files: [], events: 0, dataFlushes: 0, failDataFlush: false, onDataFlush: null };
});

afterEach(async () => {
  closeFiles();
  await fx.dm.close();
  fs.rmSync(fx.dir, { recursive: true, force: true });
});

function closeFiles(): void {
  for (const f of fx.files.splice(0)) f.close();
}

function ctx(): DirtyLogContext {
  return {
    device: 'dl',
    open: async (ref: string): Promise<BlockDev> => {
      if (ref.startsWith('dm:')) return fx.dm.get(ref.slice(3));
      const open = fx.files.find((f) => f.path === ref); // shared, as the engine shares devices
      if (open) return open;
      const f = FileDev.open(ref, ref);
      fx.files.push(f);
      return f;
    },
    event: () => void fx.events++,
    log: log('dirtylog-test'),
    flushData: async () => {
      fx.dataFlushes++;
      fx.onDataFlush?.();
      if (fx.failDataFlush) throw new Error('data flush failed');
    },
  };
}

function logFile(bytes = 4096): string {
  const f = path.join(fx.dir, `log-${fx.files.length}-${Math.random().toString(36).slice(2)}`);
  fs.writeFileSync(f, Buffer.alloc(bytes));
  return f;
}

interface Impl {
  type: string;
  persistent: boolean;
  /** the log's arguments for a fresh log */
  args(mode?: SyncMode, regionSize?: number): string[];
}

const IMPLS: Impl[] = [
  { type: 'core', persistent: false, args: (mode = 'default', rs = REGION) => [String(rs), ...(mode === 'default' ? [] : [mode])] },
  { type: 'disk', persistent: true, args: (mode = 'default', rs = REGION) => [logFile(), String(rs), ...(mode === 'default' ? [] : [mode])] },
];

async function open(impl: Impl, mode: SyncMode = 'default'): Promise<DirtyLog> {
  const dl = await createDirtyLog(impl.type, ctx(), impl.args(mode), LENGTH);
  await dl.resume();
  return dl;
}

function drainWork(dl: DirtyLog): number[] {
  const out: number[] = [];
  for (let r = dl.getResyncWork(); r !== null; r = dl.getResyncWork()) out.push(r);
  return out;
}

async function argError(type: string, args: string[], code = 'EINVAL'): Promise<string> {
  const err = await createDirtyLog(type, ctx(), args, LENGTH).then(() => null, (e: Error) => e);
  expect(err, `expected ${type} ${args.join(' ')} to be refused`).not.toBeNull();
  expect((err as { code?: string }).code).toBe(code);
  return err!.message;
}

const ALL = Array.from({ length: REGIONS }, (_, i) => i);

describe.each(IMPLS)('dirty log compliance: $type', (impl) => {
  it('divides the target into regions of region_size sectors', async () => {
    const dl = await open(impl);
    expect(dl.type).toBe(impl.type);
    expect(dl.regionSize).toBe(REGION);
    expect(dl.regionCount).toBe(REGIONS);
    await dl.destroy();
  });

  it.each([
    ['default', 0], ['sync', 0], ['nosync', REGIONS],
  ] as const)('starts a new log under %s with %i regions in sync', async (mode, count) => {
    const dl = await open(impl, mode);
    expect(dl.getSyncCount()).toBe(count);
    for (const r of ALL) expect(dl.inSync(r)).toBe(count === REGIONS);
    await dl.destroy();
  });

  it('hands out each out-of-sync region once, ascending, until resume', async () => {
    const dl = await open(impl);
    expect(drainWork(dl)).toEqual(ALL);
    expect(dl.getResyncWork()).toBeNull();
    for (const r of ALL) if (r % 3 !== 0) dl.setRegionSync(r, true);
    dl.setRegionSync(0, false);
    expect(dl.getSyncCount()).toBe(REGIONS - 6);
    expect(dl.getResyncWork()).toBeNull(); // failed regions wait for the next resume
    await dl.presuspend();
    await dl.postsuspend();
    if (!impl.persistent) {
      await dl.resume();
      expect(drainWork(dl)).toEqual([0, 3, 6, 9, 12, 15]);
    }
    await dl.destroy();
  });

  it('does not hand out a region being recovered again, and counts sync changes once', async () => {
    const dl = await open(impl);
    expect(dl.getResyncWork()).toBe(0);
    expect(dl.getResyncWork()).toBe(1);
    dl.setRegionSync(1, true);
    dl.setRegionSync(1, true);
    expect(dl.getSyncCount()).toBe(1);
    dl.setRegionSync(1, false);
    dl.setRegionSync(1, false);
    expect(dl.getSyncCount()).toBe(0);
    expect(dl.inSync(1)).toBe(false);
    await dl.destroy();
  });

  it('marks and clears regions', async () => {
    const dl = await open(impl, 'nosync');
    expect(dl.isClean(5)).toBe(true);
    dl.markRegion(5);
    expect(dl.isClean(5)).toBe(false);
    expect(dl.isClean(6)).toBe(true);
    await dl.flush();
    dl.clearRegion(5);
    expect(dl.isClean(5)).toBe(true);
    await dl.flush();
    await Promise.all([dl.flush(), dl.flush(), dl.flush()]);
    await dl.destroy();
  });

  it('prints a table its type accepts back, and its info', async () => {
    for (const mode of ['default', 'sync', 'nosync'] as const) {
      const args = impl.args(mode, 128);
      const dl = await createDirtyLog(impl.type, ctx(), args, LENGTH);
      const words = dl.status('table').split(' ');
      expect(words[0]).toBe(impl.type);
      expect(Number(words[1])).toBe(args.length);
      expect(words.slice(2)).toEqual(args);
      const again = await createDirtyLog(words[0]!, ctx(), words.slice(2), LENGTH);
      expect(again.status('table')).toBe(dl.status('table'));
      await again.destroy();
      await dl.destroy();
      closeFiles();
    }
    const dl = await open(impl);
    expect(dl.status('info')).toBe(impl.persistent ? `3 disk ${dl.status('table').split(' ')[2]} A` : '1 core');
    await dl.destroy();
  });

  it('refuses bad region sizes and sync arguments', async () => {
    const lead = impl.persistent ? [logFile()] : [];
    expect(await argError(impl.type, [...lead, '1000'])).toBe('invalid region size 1000 (must be a power of 2, ≥ 8 sectors)');
    expect(await argError(impl.type, [...lead, '4'])).toBe('invalid region size 4 (must be a power of 2, ≥ 8 sectors)');
    expect(await argError(impl.type, [...lead, '0x40'])).toBe("invalid region size '0x40' (expected a non-negative integer)");
    expect(await argError(impl.type, [...lead, '1024'])).toBe('invalid region size 1024 (must not exceed the target length of 1000 sectors)');
    expect(await argError(impl.type, [...lead, '64', 'maybe'])).toBe("invalid sync argument 'maybe' (expected sync or nosync)");
    const usage = impl.persistent ? '2 or 3: <log_dev> <region_size> [sync|nosync]' : '1 or 2: <region_size> [sync|nosync]';
    expect(await argError(impl.type, [])).toBe(`invalid ${impl.type} log argument count 0 (expected ${usage})`);
    expect(await argError(impl.type, [...lead, '64', 'sync', 'x'])).toBe(`invalid ${impl.type} log argument count ${lead.length + 3} (expected ${usage})`);
  });
});

describe('dirty log compliance: disk persistence', () => {
  async function reopen(file: string, mode: SyncMode = 'default', length = LENGTH): Promise<DirtyLog> {
    closeFiles();
    const dl = await createDirtyLog('disk', ctx(), [file, String(REGION), ...(mode === 'default' ? [] : [mode])], length);
    await dl.resume();
    return dl;
  }

  it('keeps flushed marks across a restart (the crash case)', async () => {
    const file = logFile();
    const dl = await reopen(file, 'nosync');
    dl.markRegion(3);
    dl.markRegion(9);
    await dl.flush();
    // no clear, no destroy: the process "dies" here
    const after = await reopen(file);
    expect(after.getSyncCount()).toBe(REGIONS - 2);
    expect(drainWork(after)).toEqual([3, 9]);
    await after.destroy();
  });

  it('persists clears only after flushData made the data durable', async () => {
    const file = logFile();
    const dl = await reopen(file, 'nosync');
    dl.markRegion(4);
    await dl.flush();
    const before = fx.dataFlushes;
    let seenAtDataFlush: number | null = null;
    fx.onDataFlush = () => {
      seenAtDataFlush = fs.readFileSync(file)[1024]! & (1 << 4);
    };
    dl.clearRegion(4);
    await dl.flush();
    expect(fx.dataFlushes).toBe(before + 1);
    expect(seenAtDataFlush).toBe(0); // still dirty on disk while the data was being flushed
    expect(fs.readFileSync(file)[1024]! & (1 << 4)).not.toBe(0);
    const after = await reopen(file);
    expect(after.getSyncCount()).toBe(REGIONS);
    await after.destroy();
  });

  it('treats every region as dirty when flushData fails, until resume', async () => {
    const file = logFile();
    const dl = await reopen(file, 'nosync');
    dl.markRegion(1);
    await dl.flush();
    fx.failDataFlush = true;
    dl.clearRegion(1);
    await dl.flush();
    expect(dl.isClean(1)).toBe(false);
    expect(dl.isClean(2)).toBe(false);
    dl.clearRegion(2);
    expect(dl.isClean(2)).toBe(false);
    fx.failDataFlush = false;
    const after = await reopen(file);
    expect(after.getSyncCount()).toBe(0);
    await after.destroy();
  });

  it('starts a new log for sync/nosync only at the first resume', async () => {
    const file = logFile();
    const dl = await reopen(file, 'sync');
    expect(dl.getSyncCount()).toBe(0);
    for (const r of drainWork(dl)) dl.setRegionSync(r, true);
    for (const r of ALL) dl.clearRegion(r);
    await dl.flush();
    await dl.presuspend();
    await dl.postsuspend();
    await dl.resume(); // same table: keeps what it wrote
    expect(dl.getSyncCount()).toBe(REGIONS);
    const again = await reopen(file, 'sync'); // a new table with `sync`: a new log
    expect(again.getSyncCount()).toBe(0);
    await again.destroy();
  });

  it('grows: known regions keep their state, new ones are dirty (clean under nosync)', async () => {
    const file = logFile();
    const dl = await reopen(file, 'nosync', 10 * REGION);
    expect(dl.regionCount).toBe(10);
    dl.markRegion(2);
    await dl.flush();
    const grown = await reopen(file, 'default', LENGTH);
    expect(grown.regionCount).toBe(REGIONS);
    expect(drainWork(grown)).toEqual([2, 10, 11, 12, 13, 14, 15]);
    const header = fs.readFileSync(file);
    expect(header.readUInt32LE(8)).toBe(REGIONS);
    const nosync = await reopen(file, 'nosync', 20 * REGION);
    expect(nosync.getSyncCount()).toBe(20);
    const shrunk = await reopen(file, 'default', 8 * REGION);
    expect(shrunk.getSyncCount()).toBe(8);
    expect(fs.readFileSync(file)[1025]).toBe(0); // bits past region 7 are cleared
    await shrunk.destroy();
  });

  it('starts a new log on a bad magic, and refuses a device too small', async () => {
    const file = logFile();
    fs.writeFileSync(file, Buffer.alloc(4096, 0xff));
    const dl = await reopen(file);
    expect(dl.getSyncCount()).toBe(0);
    expect(fs.readFileSync(file).readUInt32LE(0)).toBe(0x4d695272);
    const small = path.join(fx.dir, 'small');
    fs.writeFileSync(small, Buffer.alloc(1024));
    expect(await argError('disk', [small, String(REGION)])).toBe(`log device too small: ${small} has 2 sectors, needs 3 for ${REGIONS} regions`);
    const missing = path.join(fx.dir, 'missing');
    expect(await argError('disk', [missing, String(REGION)], 'ENOENT')).toContain(missing);
  });

  it('fails visibly when its device fails: D, one event, every region out of sync', async () => {
    await fx.dm.create('logdev', { table: '0 8 error' });
    const dl = await createDirtyLog('disk', ctx(), ['dm:logdev', String(REGION), 'nosync'], LENGTH);
    expect(dl.status('info')).toBe('3 disk dm:logdev A');
    await dl.resume();
    expect(dl.status('info')).toBe('3 disk dm:logdev D');
    expect(fx.events).toBe(1);
    dl.markRegion(0);
    await expect(dl.flush()).rejects.toMatchObject({ code: 'EIO' });
    expect(fx.events).toBe(1);
    expect(dl.status('table')).toBe(`disk 3 dm:logdev ${REGION} nosync`);
    await dl.destroy();
  });
});

describe('dirty log registry', () => {
  const wrapped: DirtyLogType = {
    name: 'test-wrapped-core',
    create: (c, args, length) => createDirtyLog('core', c, args, length),
  };

  it('lists the built-in types and refuses unknown and duplicate ones', async () => {
    expect(listDirtyLogs()).toEqual(expect.arrayContaining(['core', 'disk']));
    expect(await argError('nolog', ['64'])).toBe('unknown dirty log type \'nolog\' (expected one of core, disk)');
    expect(() => registerDirtyLog({ name: 'core', create: wrapped.create })).toThrow(expect.objectContaining({ code: 'EEXIST' }));
  });

  it('refuses to unregister a type while a log of it exists', async () => {
    registerDirtyLog(wrapped);
    try {
      const dl = await createDirtyLog(wrapped.name, ctx(), ['64'], LENGTH);
      expect(() => unregisterDirtyLog(wrapped.name)).toThrow(expect.objectContaining({ code: 'EBUSY' }));
      await dl.destroy();
      // a constructor failure releases its use as well
      await argError(wrapped.name, ['63']);
    } finally {
      unregisterDirtyLog(wrapped.name);
    }
    expect(listDirtyLogs()).not.toContain(wrapped.name);
  });
});
