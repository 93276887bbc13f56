/**
 * Helpers for replication tests: a two-site group over image files in one engine, where
 * each remote device is `dm:<name>` over a linear table (so a test can fail a site by
 * loading the engine's own `error` or `delay` target under it), and a reference model of
 * what was written.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach } from 'vitest';
import { DeviceMapper } from '../../src/index.ts';

export const SECTOR = 512;

export async function waitFor(cond: () => boolean | Promise<boolean>, what: string, ms = 20_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export function tmpDir(prefix = 'dmkit-repl-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

export function image(dir: string, name: string, sectors: number): string {
  const p = path.join(dir, name);
  fs.writeFileSync(p, '');
  fs.truncateSync(p, sectors * SECTOR);
  return p;
}

export interface GroupSpec {
  dir: string;
  /** devices in the group */
  devices: number;
  /** sectors per device */
  sectors: number;
  /** ring size in sectors */
  ring?: number;
  /** slink 1 policy words (`async`, `sync`, `async ios=10`, …) */
  policy?: string;
  /** slink 1 options (retest=1 by default) */
  options?: string[];
  /** dirty log region size */
  region?: number;
}

export interface Group {
  dm: DeviceMapper;
  dir: string;
  spec: Required<GroupSpec>;
  local(i: number): string;
  remote(i: number): string;
  /** the replicator table line */
  replTable: string;
  devTable(i: number): string;
  /** fail the site (error under every remote), heal it (linear again) */
  breakSite(): Promise<void>;
  healSite(): Promise<void>;
  /** put a delay target under every remote: writes take `ms` */
  slowSite(ms: number): Promise<void>;
  status(): string;
}

/** Build the group: repl (ringbuffer over dir/rlog, blockdev slinks 0 and 1) and vol0…volN-1. */
export async function makeGroup(s: GroupSpec, dm = new DeviceMapper()): Promise<Group> {
  const spec: Required<GroupSpec> = { ring: 8192, policy: 'async', options: ['retest=1'], region: 64, ...s };
  const dir = spec.dir;
  const rlog = image(dir, 'rlog', spec.ring + 64);
  for (let i = 0; i < spec.devices; i++) {
    image(dir, `local${i}.img`, spec.sectors);
    image(dir, `remote${i}.img`, spec.sectors);
    await dm.create(`site${i}`, { table: `0 ${spec.sectors} linear ${path.join(dir, `remote${i}.img`)} 0` });
  }
  const slink1 = ['1', ...spec.policy.split(' '), ...spec.options];
  const replTable = `0 1 replicator ringbuffer 4 ${rlog} 0 auto ${spec.ring} blockdev 1 0 blockdev ${slink1.length} ${slink1.join(' ')}`;
  await dm.create('repl', { table: replTable });
  const devTable = (i: number): string =>
    `0 ${spec.sectors} replicator-dev dm:repl ${i} 0 1 ${path.join(dir, `local${i}.img`)} nolog 0 1 1 dm:site${i} disk 3 ${path.join(dir, `dlog${i}`)} ${spec.region} nosync`;
  for (let i = 0; i < spec.devices; i++) {
    image(dir, `dlog${i}`, 64);
    await dm.create(`vol${i}`, { table: devTable(i) });
  }
  const swap = async (table: (i: number) => string): Promise<void> => {
    for (let i = 0; i < spec.devices; i++) {
      await dm.load(`site${i}`, table(i));
      await dm.resume(`site${i}`);
    }
  };
  return {
    dm, dir, spec, replTable, devTable,
    local: (i) => path.join(dir, `local${i}.img`),
    remote: (i) => path.join(dir, `remote${i}.img`),
    breakSite: () => swap(() => `0 ${spec.sectors} error`),
    healSite: () => swap((i) => `0 ${spec.sectors} linear ${path.join(dir, `remote${i}.img`)} 0`),
    slowSite: (ms) => swap((i) => `0 ${spec.sectors} delay ${path.join(dir, `remote${i}.img`)} 0 0 ${path.join(dir, `remote${i}.img`)} 0 ${ms}`),
    status: () => dm.status('repl')[0]!.params,
  };
}

/**
 * One group per test, closed and its files removed after the test:
 * `const group = groupPerTest({ devices: 1, sectors: LEN, region })`, then
 * `await group('sync')` (optionally in a given engine) in a test.
 */
export function groupPerTest(base: Omit<GroupSpec, 'dir' | 'policy'>): (policy?: string, dm?: DeviceMapper) => Promise<Group> {
  let g: Group | null = null;
  afterEach(async () => {
    await g?.dm.close();
    if (g) fs.rmSync(g.dir, { recursive: true, force: true });
    g = null;
  });
  return async (policy = 'async', dm?: DeviceMapper) => (g = await makeGroup({ ...base, dir: tmpDir(), policy }, dm));
}

/** true once slink 1 shows no backlog in state A or S */
export function caughtUp(g: Group): boolean {
  return /(^| )1:[AS],0,0( |$)/.test(g.status());
}

export function sha(buf: Buffer): string {
  return crypto.createHash('sha256').update(buf).digest('hex');
}

/** A reference model of a device: what every acknowledged write put there. */
export class Model {
  readonly bytes: Buffer;
  constructor(sectors: number) {
    this.bytes = Buffer.alloc(sectors * SECTOR);
  }
  write(offset: number, data: Buffer): void {
    data.copy(this.bytes, offset);
  }
}

/** One remote site in the replicator's `--json` status (replicator-status.ts). */
export interface SiteJson {
  slink: number;
  state: string;
  stateChar: string;
  policy: string;
  fallBehind: string | null;
  mode: 'in-order' | 'dirty-log';
  consistent: boolean;
  lag: { ios: number; sectors: number; bytes: number; ageMs: number };
  shipped: { ios: number; bytes: number };
  resyncedBytes: number;
  lastVerify: { differing: number; regions: number } | null;
  errors: number;
  lastError: string | null;
}

export interface ReplJson {
  replog: { type: string; usedSectors: number; sizeSectors: number; head: number; tail: number };
  statistics: { enabled: boolean; writes: number; writeBytes: number; flushes: number; overflows: number };
  sites: Array<SiteJson | { slink: 0; state: 'local' }>;
}

/** the replicator `name`'s `--json` status (the detail of its status line) */
export function replJson(dm: DeviceMapper, name = 'repl'): ReplJson {
  return dm.status(name)[0]!.detail as ReplJson;
}

/** remote slink `slink` in the replicator's `--json` status */
export function siteJson(dm: DeviceMapper, slink = 1, name = 'repl'): SiteJson {
  const s = replJson(dm, name).sites.find((x) => x.slink === slink);
  if (!s || s.slink === 0) throw new Error(`no remote slink ${slink} in ${name}'s status`);
  return s as SiteJson;
}

/** the state character of slink `slink` in the replicator's status line (`S A F P R D`) */
export function slinkState(dm: DeviceMapper, slink = 1, name = 'repl'): string {
  const m = new RegExp(`(?:^| )${slink}:([A-Z]),`).exec(dm.status(name)[0]!.params);
  if (!m) throw new Error(`no slink ${slink} in ${name}'s status: ${dm.status(name)[0]!.params}`);
  return m[1]!;
}

/** write `data` into `file` at byte `offset` behind the engine's back */
export function pokeFile(file: string, offset: number, data: Buffer): void {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.writeSync(fd, data, 0, data.length, offset);
  } finally {
    fs.closeSync(fd);
  }
}

/** `length` bytes of `file` from byte `offset` */
export function readFileRange(file: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.alloc(length);
    fs.readSync(fd, buf, 0, length, offset);
    return buf;
  } finally {
    fs.closeSync(fd);
  }
}

/** the rejection of `p`; throws if it resolves */
export async function rejectionOf(p: Promise<unknown>): Promise<Error & { code?: string }> {
  const err = await p.then(() => null, (e: unknown) => e as Error & { code?: string });
  if (!err) throw new Error('expected a rejection, got success');
  return err;
}
