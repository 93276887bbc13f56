/**
 * What each verb does: read its input, ask the daemon, print in dmsetup's format (format.ts).
 * Verbs taking several devices go on after a failing one and exit 1 at the end, like dmsetup.
 */
import fs from 'node:fs';
import type { SingleBar } from 'cli-progress';
import { DmError } from '../../src/core/errors.ts';
import type { ControlClient } from '../../src/daemon/client.ts';
import type { DeviceSummary, HelloResult, ProgressItem, TablesResult } from '../../src/daemon/protocol.ts';
import * as F from './format.ts';

import { VERSION } from '../../src/version.ts';

export interface Session {
  client: ControlClient;
  out(s: string | Buffer): void;
  err(s: string): void;
  /** set when a per-device step failed (exit status 1) */
  failed: boolean;
}

type Opts = Record<string, unknown>;

function json(s: Session, v: unknown): void {
  s.out(`${JSON.stringify(v, null, 2)}\n`);
}

function withMajor(d: DeviceSummary): DeviceSummary & { major: number } {
  return { ...d, major: F.DM_MAJOR };
}

/** run `f` for each device; a failure is reported and the others still run */
async function each<T>(s: Session, names: string[], f: (name: string) => Promise<T>): Promise<T[]> {
  const out: T[] = [];
  for (const n of names) {
    try {
      out.push(await f(n));
    } catch (err) {
      s.err(`dmkit: ${(err as Error).message}\n`);
      s.failed = true;
    }
  }
  return out;
}

async function readStdin(): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of process.stdin) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

/** the table from --table, a TABLE_FILE, or stdin (when it is not a terminal) */
export async function readTable(verb: string, o: Opts, file: string | undefined): Promise<string | undefined> {
  const inline = o.table as string | undefined;
  if (o.notable) {
    if (inline !== undefined || file) throw new DmError('EINVAL', `${verb}: --notable cannot be combined with a table`);
    return undefined;
  }
  if (inline !== undefined && file) throw new DmError('EINVAL', `${verb}: give the table either with --table or as TABLE_FILE, not both`);
  if (inline !== undefined) return inline;
  if (file) {
    try {
      return fs.readFileSync(file, 'utf8');
    } catch (err) {
      throw new DmError('ENOENT', `${verb}: cannot read table file ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    }
  }
  if (!process.stdin.isTTY) return (await readStdin()).toString('utf8');
  throw new DmError('EINVAL', `${verb}: no table given: use --table, a TABLE_FILE or stdin${verb === 'create' ? ' (or --notable)' : ''}`);
}

export async function create(s: Session, name: string, file: string | undefined, o: Opts): Promise<void> {
  const table = await readTable('create', o, file);
  const d = await s.client.request<DeviceSummary>('create', { name, table, uuid: o.uuid, readOnly: !!o.readonly });
  if (o.verbose) s.out(F.infoLong(d));
}

export async function load(s: Session, name: string, file: string | undefined, o: Opts): Promise<void> {
  if (o.notable) throw new DmError('EINVAL', '--notable only available when creating new device.');
  const table = await readTable('load', o, file);
  await s.client.request('load', { name, table, readOnly: !!o.readonly });
  if (o.verbose) s.out(F.infoLong(await s.client.request<DeviceSummary>('info', { name })));
}

/** suspend / resume / clear / remove: one request per device */
export function simple(op: string, argsOf: (o: Opts) => Record<string, unknown> = () => ({})) {
  return async (s: Session, names: string[], o: Opts): Promise<void> => {
    await each(s, names, (name) => s.client.request(op, { name, ...argsOf(o) }));
  };
}

export async function removeAll(s: Session, o: Opts): Promise<void> {
  const r = await s.client.request<{ remaining: string[] }>('remove_all', { force: !!o.force, deferred: !!o.deferred });
  if (o.force && !o.deferred && r.remaining.length) throw new DmError('EBUSY', `Unable to remove ${r.remaining.length} device(s).`);
}

export async function rename(s: Session, name: string, target: string, o: Opts): Promise<void> {
  if (o.setuuid) await s.client.request('setuuid', { name, uuid: target });
  else await s.client.request('rename', { name, newName: target });
}

async function allNames(s: Session): Promise<string[]> {
  return (await s.client.request<{ devices: DeviceSummary[] }>('list')).devices.map((d) => d.name);
}

/** table / status: `NAME: ` before each line with no DEV (all devices) or several */
export function tables(op: 'table' | 'status') {
  return async (s: Session, names: string[], o: Opts): Promise<void> => {
    const all = names.length === 0;
    const list = all ? await allNames(s) : names;
    if (all && list.length === 0 && !o.json) {
      s.out(F.NO_DEVICES);
      return;
    }
    const results = await each(s, list, async (name) => ({
      name, ...(await s.client.request<TablesResult>(op, { name, inactive: !!o.inactive })),
    }));
    const target = o.target as string | undefined;
    if (o.json) {
      json(s, results.map((r) => ({
        name: r.name, lines: r.lines.filter((l) => !target || l.type === target), ...(r.progress ? { progress: r.progress } : {}),
      })));
      return;
    }
    for (const r of results) s.out(F.tableLines(r.name, r.lines, { prefix: all || list.length > 1, target }));
  };
}

export async function info(s: Session, names: string[], o: Opts): Promise<void> {
  const devices = names.length === 0
    ? (await s.client.request<{ devices: DeviceSummary[] }>('list')).devices
    : await each(s, names, (name) => s.client.request<DeviceSummary>('info', { name }));
  if (o.json) return json(s, devices.map(withMajor));
  if (o.columns || o.C) {
    if (devices.length || names.length === 0) s.out(F.infoColumns(devices, { headings: !o.noheadings }));
    return;
  }
  if (names.length === 0 && devices.length === 0) s.out(F.NO_DEVICES);
  for (const d of devices) s.out(F.infoLong(d));
}

export async function ls(s: Session, o: Opts): Promise<void> {
  const { devices } = await s.client.request<{ devices: DeviceSummary[] }>('list');
  const target = o.target as string | undefined;
  const shown = target ? devices.filter((d) => d.types.includes(target)) : devices;
  if (o.json) return json(s, shown.map(withMajor));
  if (o.tree) return s.out(F.tree(devices, F.localeIsUtf8()));
  if (devices.length === 0) return s.out(F.NO_DEVICES);
  for (const d of shown) s.out(target ? F.lsTargetLine(d) : F.lsLine(d));
}

export async function deps(s: Session, names: string[], o: Opts): Promise<void> {
  const all = names.length === 0;
  const list = all ? await allNames(s) : names;
  if (all && list.length === 0 && !o.json) return s.out(F.NO_DEVICES);
  const results = await each(s, list, async (name) => ({
    name, deps: (await s.client.request<{ deps: string[] }>('deps', { name, inactive: !!o.inactive })).deps,
  }));
  if (o.json) return json(s, results);
  for (const r of results) s.out(F.depsLine(r.name, r.deps, all || list.length > 1));
}

export async function targets(s: Session, o: Opts): Promise<void> {
  const r = await s.client.request<{ targets: Array<{ name: string; version: number[] }> }>('targets');
  if (o.json) return json(s, r.targets);
  for (const t of r.targets) s.out(F.targetLine(t));
}

function uintArg(what: string, v: string): number {
  if (!/^[0-9]+$/.test(v) || !Number.isSafeInteger(Number(v))) throw new DmError('EINVAL', `invalid ${what} '${v}' (expected a non-negative integer)`);
  return Number(v);
}

export async function message(s: Session, name: string, sector: string, words: string[]): Promise<void> {
  const r = await s.client.request<{ reply: string }>('message', { name, sector: uintArg('sector', sector), args: words });
  s.out(F.messageReply(r.reply));
}

export async function wait(s: Session, name: string, eventNr: string | undefined, o: Opts): Promise<void> {
  if (o.progress) {
    await waitProgress(s, name);
  } else {
    await s.client.request('wait', { name, eventNr: eventNr === undefined ? 0 : uintArg('event number', eventNr) });
  }
  if (o.verbose) s.out(F.infoLong(await s.client.request<DeviceSummary>('info', { name })));
}

/**
 * `wait --progress`: follow the daemon's `progress` stream (the device's background work:
 * mirror resync, verify) until none is left. On a terminal a bar on stderr; otherwise one
 * line on stderr per change, `NAME: WORK DONE/TOTAL sectors (P%), RATE, ETA T`
 * (format.ts progressText). The bar is drawn from the daemon's percentage, which never
 * goes back within a run (docs/cli.md).
 */
export async function waitProgress(s: Session, name: string): Promise<void> {
  // cli-progress only for a terminal (and loaded only then)
  const cliProgress = process.stderr.isTTY ? (await import('cli-progress')).default : null;
  let bar: SingleBar | null = null;
  let last = '';
  const show = (p: ProgressItem): void => {
    if (cliProgress) {
      if (!bar) {
        bar = new cliProgress.SingleBar({
          format: `${name} ${p.work} [{bar}] {percentage}% | {done}/{sum} sectors | {speed} | ETA {left}`,
          stream: process.stderr,
          hideCursor: true,
        }, cliProgress.Presets.shades_classic);
        bar.start(100, p.percent, payload(p));
      } else {
        bar.update(p.percent, payload(p));
      }
      return;
    }
    const line = `${name}: ${F.progressText(p)}\n`;
    if (line !== last) s.err(line);
    last = line;
  };
  const stream = s.client.stream<ProgressItem, ProgressItem | null>('progress', { name }, show);
  const onSigint = (): void => stream.cancel();
  process.once('SIGINT', onSigint);
  try {
    const final = await stream.done;
    if (final) show(final);
    else s.err(`${name}: no background work; nothing to wait for\n`);
  } finally {
    process.off('SIGINT', onSigint);
    // stop() draws the last state and ends the line
    (bar as SingleBar | null)?.stop();
  }
}

function payload(p: ProgressItem): Record<string, string | number> {
  return { done: p.doneSectors, sum: p.totalSectors, speed: F.rateText(p.rate), left: F.etaText(p.eta) };
}

export async function version(s: Session): Promise<void> {
  const h = await s.client.request<HelloResult>('hello');
  s.out(F.versionLines(VERSION, h.version));
}

export async function io(s: Session, kind: string, name: string, rest: string[], o: Opts): Promise<void> {
  if (kind === 'flush') {
    await s.client.request('io', { op: 'flush', name });
    return;
  }
  const offset = uintArg('offset', rest[0] ?? '');
  if (kind === 'read') {
    const r = await s.client.request<{ data: string }>('io', { op: 'read', name, offset, length: uintArg('length', rest[1] ?? '') });
    s.out(Buffer.from(r.data, 'base64'));
    return;
  }
  const data = rest[1] ? fs.readFileSync(rest[1]) : await readStdin();
  await s.client.request('io', { op: 'write', name, offset, data: data.toString('base64'), fua: !!o.fua });
}
