/**
 * The persisted device set: every device's name, uuid, mode, suspended flag and its live
 * and inactive tables as table text, written atomically (tmp file, fsync, rename, fsync of
 * the directory) after every change, and re-created in dependency order at start.
 *
 *   {"version": 1, "devices": [{"name", "uuid", "minor", "readOnly", "suspended",
 *                               "table": "0 2048 linear /img 0" | null,
 *                               "inactive"?: "...", "inactiveReadOnly"?: true}]}
 */
import fs from 'node:fs';
import { writeAtomic } from '../core/atomic-file.ts';
import path from 'node:path';
import type { DeviceMapper } from '../core/device-manager.ts';
import type { Logger } from '../core/log.ts';
import type { MappedDevice } from '../core/mapped-device.ts';
import { formatTableLine, parseTable } from '../core/table-parse.ts';

export const STATE_VERSION = 1;

export interface DeviceRecord {
  name: string;
  uuid: string;
  /** the engine's device number when saved: restore creates devices in this order where dependencies allow */
  minor?: number;
  readOnly: boolean;
  suspended: boolean;
  /** live table as `start len type params` lines, null when the device has none */
  table: string | null;
  inactive?: string;
  inactiveReadOnly?: boolean;
}

export interface StateDoc {
  version: typeof STATE_VERSION;
  devices: DeviceRecord[];
}

/** Tables that could not be restored, kept so the next save does not lose them. */
interface Unrestored {
  /** the live table (undefined once the device has a live table again) */
  table?: string | null;
  inactive?: string;
}

export class StateStore {
  readonly file: string;
  readonly #dm: DeviceMapper;
  readonly #log: Logger;
  readonly #unrestored = new WeakMap<MappedDevice, Unrestored>();
  #gen = 0;
  #savedGen = 0;
  #writing: Promise<void> | null = null;
  #timer: NodeJS.Immediate | null = null;
  readonly #onChange = (): void => this.markDirty();

  constructor(file: string, dm: DeviceMapper, log: Logger) {
    this.file = file;
    this.#dm = dm;
    this.#log = log;
  }

  /** Read the state file. Missing → empty; unreadable → moved aside, logged, empty. */
  read(): StateDoc {
    let text: string;
    try {
      text = fs.readFileSync(this.file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { version: STATE_VERSION, devices: [] };
      throw err;
    }
    try {
      return validate(JSON.parse(text));
    } catch (err) {
      const aside = `${this.file}.corrupt-${Date.now()}`;
      fs.renameSync(this.file, aside);
      this.#log.error(`state file ${this.file} is unreadable (${(err as Error).message}); moved to ${aside}, starting with no devices`);
      return { version: STATE_VERSION, devices: [] };
    }
  }

  /** Start saving on every engine change. */
  attach(): void {
    this.#dm.on('change', this.#onChange);
  }

  /** Stop following the engine (before shutdown tears devices down). */
  detach(): void {
    this.#dm.off('change', this.#onChange);
    if (this.#timer) clearImmediate(this.#timer);
    this.#timer = null;
  }

  markDirty(): void {
    this.#gen++;
    if (this.#timer) return;
    this.#timer = setImmediate(() => {
      this.#timer = null;
      this.save().catch((err: Error) => this.#log.error(`saving state: ${err.message}`));
    });
  }

  /** Resolves once every change made before the call is on disk. */
  async save(): Promise<void> {
    while (this.#savedGen < this.#gen) {
      if (!this.#writing) this.#writing = this.#writeOnce().finally(() => (this.#writing = null));
      await this.#writing;
    }
  }

  /** Keep the tables of a device restored without them. */
  keepUnrestored(dev: MappedDevice, tables: Unrestored): void {
    this.#unrestored.set(dev, tables);
  }

  /** The inactive slot was changed by the user: a kept inactive table no longer applies. */
  dropUnrestoredInactive(dev: MappedDevice): void {
    const u = this.#unrestored.get(dev);
    if (u) delete u.inactive;
  }

  snapshot(): StateDoc {
    const devices = this.#dm.list().map((dev): DeviceRecord => {
      const kept = this.#unrestored.get(dev);
      const rec: DeviceRecord = {
        name: dev.name, uuid: dev.uuid, minor: dev.minor, readOnly: dev.readOnly, suspended: dev.suspended,
        table: dev.live ? this.#text(dev.name, false) : (kept?.table ?? null),
      };
      if (dev.inactive) {
        rec.inactive = this.#text(dev.name, true);
        if (dev.inactive.readOnly !== dev.readOnly) rec.inactiveReadOnly = dev.inactive.readOnly;
      } else if (kept?.inactive !== undefined) rec.inactive = kept.inactive;
      if (kept && dev.live) delete kept.table;
      if (kept && kept.table === undefined && kept.inactive === undefined) this.#unrestored.delete(dev);
      return rec;
    });
    return { version: STATE_VERSION, devices };
  }

  #text(name: string, inactive: boolean): string {
    return this.#dm.table(name, { inactive }).map(formatTableLine).join('\n');
  }

  async #writeOnce(): Promise<void> {
    const gen = this.#gen;
    const body = `${JSON.stringify(this.snapshot(), null, 2)}\n`;
    await writeAtomic(this.file, body);
    this.#savedGen = Math.max(this.#savedGen, gen);
  }
}

function validate(doc: unknown): StateDoc {
  const d = doc as Partial<StateDoc>;
  if (!d || d.version !== STATE_VERSION || !Array.isArray(d.devices)) {
    throw new Error(`expected {"version": ${STATE_VERSION}, "devices": [...]}`);
  }
  for (const r of d.devices) {
    if (typeof r?.name !== 'string' || (r.table !== null && typeof r.table !== 'string')) {
      throw new Error(`bad device record ${JSON.stringify(r)}`);
    }
  }
  return d as StateDoc;
}

/** `dm:NAME` references of a table text (none when it does not parse). */
function dmRefs(name: string, text: string | null | undefined): string[] {
  if (!text) return [];
  try {
    return parseTable(name, text).flatMap((l) => l.args.filter((a) => a.startsWith('dm:')).map((a) => a.slice(3)));
  } catch {
    return [];
  }
}

/** records ordered so that a device comes after the devices its tables reference */
function dependencyOrder(records: DeviceRecord[]): DeviceRecord[] {
  const byName = new Map(records.map((r) => [r.name, r]));
  const out: DeviceRecord[] = [];
  const seen = new Set<string>();
  const visit = (r: DeviceRecord): void => {
    if (seen.has(r.name)) return;
    seen.add(r.name);
    for (const ref of [...dmRefs(r.name, r.table), ...dmRefs(r.name, r.inactive)]) {
      const dep = byName.get(ref);
      if (dep) visit(dep);
    }
    out.push(r);
  };
  const byMinor = [...records].sort((a, b) => (a.minor ?? Infinity) - (b.minor ?? Infinity));
  for (const r of byMinor) visit(r);
  return out;
}

/** Run `step` over `items` in passes until every item succeeded or a pass made no progress. */
async function inPasses<T>(items: T[], step: (item: T) => Promise<void>): Promise<Map<T, Error>> {
  let left = items;
  let failed = new Map<T, Error>();
  while (left.length) {
    failed = new Map();
    for (const item of left) {
      try {
        await step(item);
      } catch (err) {
        failed.set(item, err as Error);
      }
    }
    if (failed.size === left.length) break;
    left = [...failed.keys()];
  }
  return failed;
}

/**
 * Re-create the devices of `doc`. A device whose table fails (after every other device had
 * its chance) is created without it and its table text is kept in the state. Never throws.
 */
export async function restore(dm: DeviceMapper, store: StateStore, doc: StateDoc, log: Logger): Promise<Array<{ name: string; error: string }>> {
  const errors: Array<{ name: string; error: string }> = [];
  const records = dependencyOrder(doc.devices);
  const opts = (r: DeviceRecord) => ({ uuid: r.uuid || undefined, readOnly: !!r.readOnly });
  const liveFailed = await inPasses(records, async (r) => {
    await dm.create(r.name, { ...opts(r), table: r.table ?? undefined });
  });
  const failedNames = new Set([...liveFailed.keys()].map((r) => r.name));
  for (const [r, err] of liveFailed) {
    const blocked = dmRefs(r.name, r.table).filter((n) => failedNames.has(n)).map((n) => `dm:${n}`);
    const error = blocked.length ? `${err.message} (it uses ${blocked.join(', ')}, which could not be restored)` : err.message;
    errors.push({ name: r.name, error });
    log.error(`restore: ${r.name}: ${error}; created without a table (its table is kept in the state)`);
    try {
      const dev = await dm.create(r.name, opts(r));
      store.keepUnrestored(dev, { table: r.table, inactive: r.inactive });
    } catch (err2) {
      log.error(`restore: ${r.name}: cannot create the device at all: ${(err2 as Error).message}`);
    }
  }
  const withInactive = records.filter((r) => r.inactive && dm.has(r.name) && !liveFailed.has(r));
  const inactiveFailed = await inPasses(withInactive, (r) =>
    dm.load(r.name, r.inactive!, { readOnly: r.inactiveReadOnly ?? !!r.readOnly }));
  for (const [r, err] of inactiveFailed) {
    errors.push({ name: r.name, error: `inactive table: ${err.message}` });
    log.error(`restore: ${r.name}: inactive table: ${err.message} (kept in the state)`);
    store.keepUnrestored(dm.get(r.name), { inactive: r.inactive });
  }
  for (const r of records) {
    if (r.suspended && dm.has(r.name)) await dm.suspend(r.name).catch((err: Error) => log.error(`restore: ${r.name}: suspend: ${err.message}`));
  }
  return errors;
}
