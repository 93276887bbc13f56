/**
 * The device manager: the set of mapped devices of one engine, table construction in the
 * kernel's check order, shared opening of backing devices (files, block devices, `dm:NAME`,
 * and whatever resolvers are registered, e.g. NBD URIs), and the dmsetup-level operations.
 * This is also the library entry point (`DeviceMapper`).
 */
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import type { BioFlags } from './bio.ts';
import { EMPTY } from './bio.ts';
import { makeEvent, type DeviceEvent, type EventKind, type LifecycleOp } from './device-events.ts';
import { DeviceError, DmError, TableError } from './errors.ts';
import { FileDev } from './file-dev.ts';
import type { IoStatsSnapshot } from './io-stats.ts';
import { log } from './log.ts';
import { MappedDevice } from './mapped-device.ts';
import { ProgressSampler } from './progress-meter.ts';
import { Registry } from './registry.ts';
import { Table, type TableEntry } from './table.ts';
import { parseTable } from './table-parse.ts';
import type { BlockDev, EventDetail, Progress, ProgressReport, StatusType, TargetContext, TargetType } from './types.ts';

/** Opens references the core does not know (e.g. `nbd://…`). */
export interface DeviceResolver {
  matches(ref: string): boolean;
  open(ref: string): Promise<BlockDev & { close(): void | Promise<void> }>;
}

interface Backing {
  dev: BlockDev;
  refs: number;
  close: () => void | Promise<void>;
}

export interface TableLineOut {
  start: number;
  length: number;
  type: string;
  params: string;
  /** status only: the target's `statusJson()` where it has one */
  detail?: unknown;
}

export interface DeviceInfo {
  name: string;
  uuid: string;
  minor: number;
  state: 'ACTIVE' | 'SUSPENDED';
  readOnly: boolean;
  live: boolean;
  inactive: boolean;
  openCount: number;
  eventNr: number;
  targets: number;
  sectors: number;
  deferredRemove: boolean;
  /** present while the device is secondary: who it receives replication from (writes fail with EROFS) */
  secondary?: string;
}

const NAME_RE = /^[^/\0]{1,127}$/;

export class DeviceMapper extends EventEmitter {
  readonly targets = new Registry<TargetType>('target type');
  readonly #devices = new Map<string, MappedDevice>();
  readonly #backing = new Map<string, Backing>();
  readonly #resolvers: DeviceResolver[] = [];
  readonly #log = log('dm');
  /** close() is tearing everything down */
  #closing = false;
  /** the last event's number (DeviceEvent.seq) */
  #seq = 0;
  readonly #progress = new ProgressSampler<MappedDevice>((d) => targetProgress(d), () => this.#devices.values());

  /** where targets keep state across restarts (TargetContext.stateDir) */
  readonly stateDir: string | undefined;

  constructor(opts: { targets?: readonly TargetType[]; stateDir?: string } = {}) {
    super();
    this.stateDir = opts.stateDir;
    for (const t of opts.targets ?? []) this.targets.register(t);
  }

  /** Add a resolver; one added later takes precedence over earlier ones (and the defaults). */
  addResolver(r: DeviceResolver): void {
    this.#resolvers.push(r);
  }

  // ---- lookup ----

  get(name: string): MappedDevice {
    const d = this.#devices.get(name);
    if (!d) throw new DeviceError('ENXIO', `${name}: no such device`);
    return d;
  }

  has(name: string): boolean {
    return this.#devices.has(name);
  }

  list(): MappedDevice[] {
    return [...this.#devices.values()].sort((a, b) => a.name.localeCompare(b.name));
  }

  info(name: string): DeviceInfo {
    const d = this.get(name);
    return {
      name: d.name, uuid: d.uuid, minor: d.minor,
      state: d.suspended ? 'SUSPENDED' : 'ACTIVE', readOnly: d.readOnly,
      live: !!d.live, inactive: !!d.inactive, openCount: d.openCount, eventNr: d.eventNr,
      targets: d.live?.entries.length ?? 0, sectors: d.sectors, deferredRemove: d.deferredRemove,
      ...(d.secondary !== null ? { secondary: d.secondary } : {}),
    };
  }

  // ---- dmsetup operations ----

  /** create [+ load + resume], rolled back whole on failure */
  async create(name: string, opts: { table?: string; uuid?: string; readOnly?: boolean } = {}): Promise<MappedDevice> {
    if (!NAME_RE.test(name)) throw new DeviceError('EINVAL', `invalid device name '${name}' (1–127 characters, no '/')`);
    if (this.#devices.has(name)) throw new DeviceError('EEXIST', `${name}: device already exists`);
    if (opts.uuid) this.#checkUuid(opts.uuid);
    const dev = new MappedDevice(name, this.#freeMinor(), { uuid: opts.uuid, readOnly: opts.readOnly });
    dev.on('event', (_nr: number, text: string, detail?: EventDetail) => this.#raise('change', dev, text, detail));
    this.#devices.set(name, dev);
    this.#lifecycle('create', dev, 'created');
    if (opts.table !== undefined) {
      try {
        await this.load(name, opts.table);
        await this.resume(name);
      } catch (err) {
        await this.#destroyDevice(dev);
        throw err;
      }
    }
    this.emit('change');
    return dev;
  }

  /** `readOnly` marks the table read-only (dmsetup `load -r`); it applies at resume. Default: the device's mode. */
  async load(name: string, text: string, opts: { readOnly?: boolean } = {}): Promise<void> {
    const dev = this.get(name);
    const table = await this.#buildTable(dev, text, opts.readOnly ?? dev.readOnly);
    const old = dev.setInactive(table);
    await old?.destroy();
    this.#lifecycle('load', dev, `table loaded (${table.entries.map((e) => e.type.name).join(', ')})`);
    this.emit('change');
  }

  async clear(name: string): Promise<void> {
    const dev = this.get(name);
    const old = dev.setInactive(null);
    await old?.destroy();
    this.#lifecycle('clear', dev, 'inactive table cleared');
    this.emit('change');
  }

  async suspend(name: string, _opts: { noflush?: boolean } = {}): Promise<void> {
    const dev = this.get(name);
    await dev.suspend();
    this.#lifecycle('suspend', dev, 'suspended');
    this.emit('change');
  }

  async resume(name: string): Promise<void> {
    const dev = this.get(name);
    const old = await dev.resume();
    await old?.destroy();
    this.#lifecycle('resume', dev, old ? 'resumed with the new table' : 'resumed');
    this.emit('change');
  }

  /**
   * remove: EBUSY while open unless `deferred` (removed at last close) or `force` (an
   * error table is swapped in first so in-flight and queued I/O fails, then the device goes
   * away and its openers — NBD connections, stacked tables — get ENXIO/ESHUTDOWN).
   */
  async remove(name: string, opts: { force?: boolean; deferred?: boolean } = {}): Promise<'removed' | 'deferred'> {
    const dev = this.get(name);
    if (opts.force && dev.live) {
      await this.load(name, `0 ${dev.sectors} error`);
      await this.resume(name);
    }
    if (dev.openCount > 0 && !opts.force) {
      if (opts.deferred) {
        dev.markDeferredRemove();
        this.#lifecycle('remove', dev, 'removal deferred to the last close');
        this.emit('change');
        return 'deferred';
      }
      throw new DeviceError('EBUSY', `${name}: device is busy (open count ${dev.describeOpeners()})`);
    }
    await this.#destroyDevice(dev);
    this.emit('change');
    return 'removed';
  }

  /** Remove every closed device, repeating so stacks unwind. Returns the names removed. */
  async removeAll(): Promise<string[]> {
    const removed: string[] = [];
    for (let progress = true; progress; ) {
      progress = false;
      for (const d of this.list()) {
        if (d.openCount === 0) {
          await this.#destroyDevice(d);
          removed.push(d.name);
          progress = true;
        }
      }
    }
    if (removed.length) this.emit('change');
    return removed;
  }

  rename(name: string, newName: string): void {
    const dev = this.get(name);
    if (!NAME_RE.test(newName)) throw new DeviceError('EINVAL', `invalid device name '${newName}' (1–127 characters, no '/')`);
    if (this.#devices.has(newName)) throw new DeviceError('EEXIST', `${newName}: device already exists`);
    this.#devices.delete(name);
    dev.name = newName;
    this.#devices.set(newName, dev);
    const b = this.#backing.get(`dm:${name}`);
    if (b) {
      this.#backing.delete(`dm:${name}`);
      this.#backing.set(`dm:${newName}`, b);
    }
    this.#lifecycle('rename', dev, `renamed from ${name}`, { from: name });
    this.emit('change');
  }

  setUuid(name: string, uuid: string): void {
    const dev = this.get(name);
    if (dev.uuid) throw new DeviceError('EINVAL', `${name}: uuid is already set (${dev.uuid}) and cannot change`);
    this.#checkUuid(uuid);
    dev.uuid = uuid;
    this.emit('change');
  }

  /** the lowest device number no device uses (the kernel's idr allocation) */
  #freeMinor(): number {
    const used = new Set([...this.#devices.values()].map((d) => d.minor));
    let m = 0;
    while (used.has(m)) m++;
    return m;
  }

  #checkUuid(uuid: string): void {
    if (!/^[\x21-\x7e]{1,128}$/.test(uuid)) throw new DeviceError('EINVAL', `invalid uuid '${uuid}' (1–128 printable characters)`);
    for (const d of this.#devices.values()) {
      if (d.uuid === uuid) throw new DeviceError('EEXIST', `uuid ${uuid} is already used by ${d.name}`);
    }
  }

  table(name: string, opts: { inactive?: boolean } = {}): TableLineOut[] {
    const dev = this.get(name);
    return lines(opts.inactive ? dev.inactive : dev.live, 'table');
  }

  status(name: string): TableLineOut[] {
    return lines(this.get(name).live, 'info');
  }

  deps(name: string): string[] {
    return [...(this.get(name).live?.deps ?? [])];
  }

  async message(name: string, sector: number, args: string[]): Promise<string> {
    const dev = this.get(name);
    const table = dev.live;
    if (!table) throw new DeviceError('EINVAL', `${name}: no live table to send a message to`);
    if (!Number.isSafeInteger(sector) || sector < 0 || sector >= table.sectors) {
      throw new DeviceError('EINVAL', `${name}: message sector ${sector} is outside the device (0–${table.sectors - 1})`);
    }
    if (args.length === 0) throw new DeviceError('EINVAL', `${name}: empty message`);
    const e = table.entries[table.find(sector)]!;
    if (!e.target.message) throw new DeviceError('EINVAL', `${name}: ${e.type.name} target does not accept messages`);
    const reply = await e.target.message(args);
    return reply ?? '';
  }

  /** the device's I/O statistics (src/core/io-stats.ts) */
  ioStats(name: string): IoStatsSnapshot {
    return this.get(name).ioStats();
  }

  /**
   * Background work of the live table's targets, summed and measured (progress-meter.ts:
   * rate, ETA, never backwards within a run); null when nothing runs.
   */
  progress(name: string): ProgressReport | null {
    return this.#progress.sample(this.get(name));
  }

  // ---- events ----

  /** the number of the last event raised (DeviceEvent.seq) */
  get eventSeq(): number {
    return this.#seq;
  }

  /** `exists` lines: every device as it is now, numbered with the last event's seq (sites: see the daemon's events op) */
  existing(): DeviceEvent[] {
    return this.list().map((d) => makeEvent({ seq: this.#seq, kind: 'exists', name: d.name, eventNr: d.eventNr, state: deviceState(d) }, existsDetail(d)));
  }

  #raise(kind: EventKind, dev: MappedDevice, text: string, detail?: EventDetail): void {
    const ev = makeEvent({ seq: ++this.#seq, kind, name: dev.name, eventNr: dev.eventNr, state: deviceState(dev), text }, detail);
    this.emit('device-event', ev);
    this.#progress.wake();
  }

  #lifecycle(op: LifecycleOp, dev: MappedDevice, text: string, detail?: EventDetail): void {
    this.#raise(op === 'create' ? 'create' : 'change', dev, text, { op, ...detail });
  }

  wait(name: string, eventNr: number, signal?: AbortSignal): Promise<number> {
    return this.get(name).wait(eventNr, signal);
  }

  // ---- byte-level I/O for library users ----

  async read(name: string, offset: number, length: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(length);
    await this.get(name).submit({ op: 'read', sector: toSector(offset, 'offset'), sectors: toSector(length, 'length'), data: buf, flags: {} });
    return buf;
  }

  write(name: string, offset: number, data: Buffer, flags: BioFlags = {}): Promise<void> {
    return this.get(name).submit({ op: 'write', sector: toSector(offset, 'offset'), sectors: toSector(data.length, 'length'), data, flags });
  }

  flush(name: string): Promise<void> {
    return this.get(name).submit({ op: 'flush', sector: 0, sectors: 0, data: EMPTY, flags: {} });
  }

  discard(name: string, offset: number, length: number): Promise<void> {
    return this.get(name).submit({ op: 'discard', sector: toSector(offset, 'offset'), sectors: toSector(length, 'length'), data: EMPTY, flags: {} });
  }

  writeZeroes(name: string, offset: number, length: number, flags: BioFlags = {}): Promise<void> {
    return this.get(name).submit({ op: 'write-zeroes', sector: toSector(offset, 'offset'), sectors: toSector(length, 'length'), data: EMPTY, flags });
  }

  /**
   * Flush every device that can be flushed, then tear everything down. A device that is
   * suspended, or stacked (`dm:`) on one that is, is not flushed: its flush would wait for
   * a resume that never comes. Its queued I/O fails with ENXIO, as at remove.
   */
  async close(): Promise<void> {
    this.#closing = true;
    this.#progress.stop();
    for (const d of this.list()) {
      if (!d.live || this.onSuspended(d.name)) continue;
      await this.flush(d.name).catch((e) => this.#log.warn(`${d.name}: flush at close failed: ${e.message}`));
    }
    for (let progress = true; progress && this.#devices.size; ) {
      progress = false;
      for (const d of this.list()) {
        if (d.openCount === 0) {
          await this.#destroyDevice(d);
          progress = true;
        }
      }
    }
    for (const d of this.list()) await this.#destroyDevice(d);
  }

  // ---- internals ----

  async #destroyDevice(dev: MappedDevice): Promise<void> {
    this.#devices.delete(dev.name);
    for (const t of dev.markRemoved()) await t.destroy();
    this.#raise('destroy', dev, 'removed', { op: 'remove' });
  }

  async #buildTable(dev: MappedDevice, text: string, readOnly: boolean): Promise<Table> {
    const name = dev.name;
    const parsed = parseTable(name, text);
    if (parsed.length === 0) throw new TableError(name, 0, undefined, 'table has no targets');
    const entries: TableEntry[] = [];
    const release: Array<() => void> = [];
    const deps: string[] = [];
    const opened = new Map<string, Promise<BlockDev>>();
    const engine = this; // eslint-disable-line @typescript-eslint/no-this-alias -- for the ctx getter
    let next = 0;
    try {
      for (const line of parsed) {
        if (line.length === 0) throw new TableError(name, line.line, line.type, 'zero-length target');
        const type = this.targets.get(line.type);
        if (!type) throw new TableError(name, line.line, line.type, `unknown target type '${line.type}'`);
        if (line.start !== next) {
          throw new TableError(name, line.line, line.type, `gap in table: target starts at ${line.start}, expected ${next}`);
        }
        release.push(this.targets.use(type.name));
        const ctx: TargetContext = {
          device: name,
          begin: line.start,
          length: line.length,
          log: log(`${name}:${type.name}`),
          event: (what, detail) => dev.event(what, detail),
          get closing() {
            return engine.#closing;
          },
          stateDir: this.stateDir,
          // a table opens each device once, however many of its targets use it (dm's open count)
          open: (ref: string) => {
            let p = opened.get(ref);
            if (!p) {
              p = this.#open(ref, dev).then(({ dev: bd, release: rel }) => {
                release.push(rel);
                if (!deps.includes(ref)) deps.push(ref);
                return bd;
              });
              opened.set(ref, p);
            }
            return p;
          },
        };
        let target;
        try {
          target = await type.create(ctx, line.args);
        } catch (err) {
          if (err instanceof TableError) throw err;
          throw new TableError(name, line.line, type.name, (err as Error).message);
        }
        const maxIo = target.maxIoSectors ?? 0;
        entries.push({ begin: line.start, length: line.length, end: line.start + line.length, type, target, line: line.line, maxIo });
        next = line.start + line.length;
      }
    } catch (err) {
      await new Table(entries, deps, release, false).destroy();
      throw err;
    }
    return new Table(entries, deps, release, readOnly);
  }

  /** Open a reference once per engine; returns the shared device and its release. */
  async #open(ref: string, holder: MappedDevice): Promise<{ dev: BlockDev; release: () => void }> {
    if (ref.startsWith('dm:')) return this.#openDm(ref.slice(3), holder);
    const resolver = this.#resolvers.findLast((r) => r.matches(ref)); // the latest added wins
    let key = ref;
    if (!resolver) {
      try {
        key = fs.realpathSync(ref);
      } catch (err) {
        throw new DmError('ENOENT', `device lookup failed: ${ref}: ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file or device' : (err as Error).message}`);
      }
    }
    let b = this.#backing.get(key);
    if (!b) {
      try {
        if (resolver) {
          const d = await resolver.open(ref);
          b = { dev: d, refs: 0, close: () => d.close() };
        } else {
          const d = FileDev.open(ref, key);
          b = { dev: d, refs: 0, close: () => d.close() };
        }
      } catch (err) {
        throw new DmError((err as DmError).code ?? 'EIO', `device lookup failed: ${(err as Error).message}`);
      }
      this.#backing.set(key, b);
    }
    b.refs++;
    const entry = b;
    let done = false;
    return {
      dev: entry.dev,
      release: () => {
        if (done) return;
        done = true;
        if (--entry.refs === 0) {
          this.#backing.delete(key);
          void Promise.resolve(entry.close()).catch((e) => this.#log.warn(`closing ${ref}: ${(e as Error).message}`));
        }
      },
    };
  }

  #openDm(target: string, holder: MappedDevice): { dev: BlockDev; release: () => void } {
    const lower = this.#devices.get(target);
    if (!lower) throw new DmError('ENXIO', `device lookup failed: dm:${target}: no such device`);
    if (lower === holder || this.#dependsOn(lower, holder)) {
      throw new DmError('ELOOP', `device lookup failed: dm:${target} would make a loop through ${holder.name}`);
    }
    const by = (): string => `used by dm:${holder.name}`; // its name when asked: the holder may be renamed
    lower.open(by);
    let done = false;
    return {
      dev: lower,
      release: () => {
        if (done) return;
        done = true;
        if (lower.close(by)) void this.#destroyDevice(lower).then(() => this.emit('change'));
      },
    };
  }

  /** is device `name`, or any device below it (through `dm:` references), suspended? */
  onSuspended(name: string): boolean {
    const dev = this.get(name);
    return dev.suspended || this.#anyBelow(dev, (d) => d.suspended);
  }

  /** does `dev` (through its tables) use `other`? */
  #dependsOn(dev: MappedDevice, other: MappedDevice): boolean {
    return this.#anyBelow(dev, (d) => d === other);
  }

  /** does any device below `dev` (its tables' `dm:` references, transitively) match? */
  #anyBelow(dev: MappedDevice, match: (d: MappedDevice) => boolean, seen = new Set<MappedDevice>()): boolean {
    seen.add(dev);
    for (const t of [dev.live, dev.inactive]) {
      for (const ref of t?.deps ?? []) {
        const d = ref.startsWith('dm:') ? this.#devices.get(ref.slice(3)) : undefined;
        if (!d || seen.has(d)) continue;
        if (match(d) || this.#anyBelow(d, match, seen)) return true;
      }
    }
    return false;
  }
}

/** background work of the live table's targets, summed (null when nothing runs) */
function targetProgress(dev: MappedDevice): Progress | null {
  let work = '';
  let done = 0;
  let total = 0;
  for (const e of dev.live?.entries ?? []) {
    const p = e.target.progress?.();
    if (!p) continue;
    work ||= p.work;
    done += p.doneSectors;
    total += p.totalSectors;
  }
  return total > 0 ? { work, doneSectors: done, totalSectors: total } : null;
}

function deviceState(d: MappedDevice): string {
  return d.removed ? 'removed' : d.suspended ? 'suspended' : 'active';
}

function existsDetail(d: MappedDevice): EventDetail {
  const out: Record<string, string> = { tables: d.live ? (d.inactive ? 'live+inactive' : 'live') : d.inactive ? 'inactive' : 'none' };
  if (d.secondary !== null) Object.assign(out, { role: 'secondary', from: d.secondary });
  return out;
}

function lines(table: Table | null, type: StatusType): TableLineOut[] {
  if (!table) return [];
  return table.entries.map((e) => {
    const line: TableLineOut = { start: e.begin, length: e.length, type: e.type.name, params: e.target.status(type) };
    if (type === 'info' && e.target.statusJson) line.detail = e.target.statusJson();
    return line;
  });
}

function toSector(bytes: number, what: string): number {
  if (!Number.isSafeInteger(bytes) || bytes < 0 || bytes % 512 !== 0) {
    throw new DmError('EINVAL', `${what} ${bytes} is not a non-negative multiple of 512 bytes`);
  }
  return bytes / 512;
}
