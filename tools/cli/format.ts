/**
 * dmsetup's output formats, byte for byte (libdm/dm-tools/dmsetup.c and libdm-report.c),
 * with one adaptation: devices a table uses print as the reference the table gave
 * (`/img`, `dm:NAME`, an NBD URI) where dmsetup prints `major, minor`.
 * Pure functions: data in, text out.
 */
import type { TableLineOut } from '../../src/core/device-manager.ts';
import type { DeviceEvent } from '../../src/core/device-events.ts';
import type { DeviceSummary, ProgressItem } from '../../src/daemon/protocol.ts';

/** the block major dmsetup shows for device-mapper devices */
export const DM_MAJOR = 253;

export const NO_DEVICES = 'No devices found\n';

/** `dmsetup info` long form, with its trailing blank line; `Read Ahead:` is left out. */
export function infoLong(d: DeviceSummary): string {
  const state = `${d.state}${d.readOnly ? ' (READ-ONLY)' : ''}${d.deferredRemove ? ' (DEFERRED REMOVE)' : ''}`;
  const tables = !d.live && !d.inactive
    ? 'None'
    : `${d.live ? 'LIVE' : ''}${d.live && d.inactive ? ' & ' : ''}${d.inactive ? 'INACTIVE' : ''}`;
  let s = `Name:              ${d.name}\n`
    + `State:             ${state}\n`
    + `Tables present:    ${tables}\n`
    + `Open count:        ${d.openCount}\n`
    + `Event number:      ${d.eventNr}\n`
    + `Major, minor:      ${DM_MAJOR}, ${d.minor}\n`
    + `Number of targets: ${d.targets}\n`;
  if (d.uuid) s += `UUID: ${d.uuid}\n`;
  if (d.secondary) s += `Role:              secondary, receiving ${d.secondary} (writes refused: EROFS)\n`;
  if (d.replication) s += replicationLines(d.replication as ReplicationJson);
  if (d.progress) s += `Progress:          ${progressText(d.progress)}\n`;
  return `${s}\n`;
}

/** bytes per second as `512 B/s`, `1.5 MiB/s` */
export function rateText(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${u === 0 ? Math.round(v) : v.toFixed(1)} ${units[u]}/s`;
}

/** seconds as `m:ss` or `h:mm:ss`; `-` when unknown */
export function etaText(eta: number | null): string {
  if (eta === null) return '-';
  const t = Math.ceil(eta);
  const two = (n: number): string => String(n).padStart(2, '0');
  const h = Math.floor(t / 3600);
  const m = Math.floor((t % 3600) / 60);
  return h ? `${h}:${two(m)}:${two(t % 60)}` : `${m}:${two(t % 60)}`;
}

/** `resync 1024/16384 sectors (6%), 2.0 MiB/s, ETA 0:07` (`wait --progress` lines, `info`) */
export function progressText(p: ProgressItem): string {
  return `${p.work} ${p.doneSectors}/${p.totalSectors} sectors (${p.percent}%), ${rateText(p.rate)}, ETA ${etaText(p.eta)}`;
}

/** an event's value: a bare word, or a JSON string when it has blanks, quotes, `=` or nothing */
function eventValue(v: string | number | boolean): string {
  const t = String(v);
  return typeof v !== 'string' || /^[\w.:/@+,%-]+$/.test(t) ? t : JSON.stringify(t);
}

const LEADING = ['seq', 'name', 'eventNr', 'slink', 'state', 'op'] as const;
const SKIP = new Set<string>(['time', 'kind', 'object', 'text', ...LEADING]);

/**
 * `dmkit events` plain line (docs/cli.md): `TIME KIND OBJECT seq=N name=NAME event=N
 * [slink=N] state=S [op=OP] [key=value …] text="…"`. Values are bare words or JSON strings.
 */
export function eventLine(ev: DeviceEvent): string {
  const words = [ev.time, ev.kind, ev.object];
  for (const k of LEADING) {
    const v = ev[k];
    if (v !== undefined) words.push(`${k === 'eventNr' ? 'event' : k}=${eventValue(v)}`);
  }
  for (const [k, v] of Object.entries(ev)) if (!SKIP.has(k) && v !== undefined) words.push(`${k}=${eventValue(v)}`);
  words.push(`text=${JSON.stringify(ev.text)}`);
  return `${words.join(' ')}\n`;
}

/** the replicator's and replicator-dev's `statusJson` as `info` shows it */
interface ReplicationJson {
  replog?: { type: string; usedSectors: number; sizeSectors: number; head: number };
  replicator?: string;
  devNr?: number;
  sites: Array<{
    slink: number; type?: string; state: string; device?: string; policy?: string; fallBehind?: string | null;
    lag?: { ios: number; sectors: number; ageMs: number };
    resync?: { work: string; done: number; total: number } | null;
    inSyncRegions?: number; regions?: number; lastError?: string | null;
    link?: LinkJson | null;
  }>;
}

/** a network transport's `statusJson` (tcp: connection, peer, bytes; nbd: state) */
interface LinkJson {
  connection?: string; peer?: string; state?: string; bytesOnWire?: number; compress?: string; compressionRatio?: number | null;
  refusal?: string | null;
}

function linkText(l: LinkJson): string {
  const parts: string[] = [];
  if (l.connection) parts.push(`${l.connection}${l.peer ? ` to ${l.peer}` : ''}`);
  else if (l.state) parts.push(l.state);
  if (l.refusal) parts.push(`refused: ${l.refusal}`);
  if (l.bytesOnWire !== undefined) parts.push(`${l.bytesOnWire} bytes on the wire`);
  if (l.compress && l.compress !== 'none' && l.compressionRatio) parts.push(`${l.compress} ratio ${l.compressionRatio}`);
  return parts.join(', ');
}

function replicationLines(r: ReplicationJson): string {
  const row = (label: string, text: string): string => `${label.padEnd(19)}${text}\n`;
  let s = '';
  if (r.replog) s += row('Replication log:', `${r.replog.type}, ${r.replog.usedSectors}/${r.replog.sizeSectors} sectors used, last entry ${r.replog.head}`);
  if (r.replicator !== undefined) s += row('Replicator:', `${r.replicator}, device number ${r.devNr}`);
  for (const x of r.sites) {
    const parts = [x.state];
    if (x.device) parts.push(x.device);
    if (x.link) parts.push(linkText(x.link));
    if (x.policy) parts.push(x.fallBehind ? `${x.policy} (fall-behind ${x.fallBehind})` : x.policy);
    if (x.lag) parts.push(`lag ${x.lag.ios} ios, ${x.lag.sectors} sectors, ${(x.lag.ageMs / 1000).toFixed(1)} s`);
    if (x.regions !== undefined) parts.push(`${x.inSyncRegions}/${x.regions} regions in sync`);
    if (x.resync) parts.push(`${x.resync.work} ${x.resync.done}/${x.resync.total} sectors`);
    if (x.lastError) parts.push(`last error: ${x.lastError}`);
    s += row(`Slink ${x.slink}:`, parts.join(', '));
  }
  return s;
}

/** dmsetup's `attr` field: (L)ive, (I)nactive, (s)uspended, (r)ead-only / read-(w)rite */
export function attr(d: DeviceSummary): string {
  return `${d.live ? 'L' : '-'}${d.inactive ? 'I' : '-'}${d.state === 'SUSPENDED' ? 's' : '-'}${d.readOnly ? 'r' : 'w'}`;
}

interface Column {
  heading: string;
  width: number;
  right: boolean;
  value(d: DeviceSummary): string;
}

/** `dmsetup info -c` default fields: name,major,minor,attr,open,segments,events,uuid */
const INFO_COLUMNS: readonly Column[] = [
  { heading: 'Name', width: 16, right: false, value: (d) => d.name },
  { heading: 'Maj', width: 3, right: true, value: () => String(DM_MAJOR) },
  { heading: 'Min', width: 3, right: true, value: (d) => String(d.minor) },
  { heading: 'Stat', width: 4, right: false, value: attr },
  { heading: 'Open', width: 4, right: true, value: (d) => String(d.openCount) },
  { heading: 'Targ', width: 4, right: true, value: (d) => String(d.targets) },
  { heading: 'Event', width: 6, right: true, value: (d) => String(d.eventNr) },
  { heading: 'UUID', width: 32, right: false, value: (d) => d.uuid },
];

/**
 * libdm's aligned report: every column as wide as its widest value (at least its default
 * width), separated by one space, every column padded (the last one too); headings
 * left-aligned, numbers right-aligned, strings left-aligned.
 */
export function infoColumns(devices: DeviceSummary[], opts: { headings?: boolean } = {}): string {
  if (devices.length === 0) return NO_DEVICES;
  const rows = devices.map((d) => INFO_COLUMNS.map((c) => c.value(d)));
  const widths = INFO_COLUMNS.map((c, i) => Math.max(c.width, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[], heading: boolean): string =>
    cells.map((v, i) => (INFO_COLUMNS[i]!.right && !heading ? v.padStart(widths[i]!) : v.padEnd(widths[i]!))).join(' ');
  const out = opts.headings === false ? [] : [line(INFO_COLUMNS.map((c) => c.heading), true)];
  for (const r of rows) out.push(line(r, false));
  return `${out.join('\n')}\n`;
}

/** `dmsetup ls`: `NAME\t(MAJ:MIN)` */
export function lsLine(d: DeviceSummary): string {
  return `${d.name}\t(${DM_MAJOR}:${d.minor})\n`;
}

/** `dmsetup ls --target T` goes through dmsetup's `_display_dev`: `NAME\t(MAJ, MIN)` */
export function lsTargetLine(d: DeviceSummary): string {
  return `${d.name}\t(${DM_MAJOR}, ${d.minor})\n`;
}

/** `<start> <len> <type> <params>`: dmsetup prints the blank after the type even when params are empty */
export function tableLine(l: TableLineOut): string {
  return `${l.start} ${l.length} ${l.type} ${l.params}`;
}

/**
 * The lines of one device for `table`/`status`. A device without a table prints one
 * empty line (dmsetup does); with `target` only matching lines, and nothing else.
 */
export function tableLines(name: string, lines: TableLineOut[], opts: { prefix: boolean; target?: string }): string {
  const prefix = opts.prefix ? `${name}: ` : '';
  if (lines.length === 0) return opts.target ? '' : `${prefix}\n`;
  return lines.filter((l) => !opts.target || l.type === opts.target).map((l) => `${prefix}${tableLine(l)}\n`).join('');
}

/** `dmsetup deps`: `N dependencies\t: (dev) (dev)` */
export function depsLine(name: string, deps: string[], prefix: boolean): string {
  return `${prefix ? `${name}: ` : ''}${deps.length} dependencies\t:${deps.map((d) => ` (${d})`).join('')}\n`;
}

/** `dmsetup targets`: `%-16s v%d.%d.%d` */
export function targetLine(t: { name: string; version: number[] }): string {
  return `${t.name.padEnd(16)} v${t.version.join('.')}\n`;
}

export function versionLines(library: string, driver: string): string {
  return `Library version:   ${library}\nDriver version:    ${driver}\n`;
}

/** the reply of `message`, with a newline added when it has none (dmsetup's puts) */
export function messageReply(reply: string): string {
  return reply === '' || reply.endsWith('\n') ? reply : `${reply}\n`;
}

interface TreeSymbols {
  empty: string;
  branch: string;
  vert: string;
  last: string;
}

const UTF_TREE: TreeSymbols = { empty: '  ', branch: '├─', vert: '│ ', last: '└─' };
const ASCII_TREE: TreeSymbols = { empty: '  ', branch: '|-', vert: '| ', last: '`-' };

/** dmsetup picks its tree symbols from the locale's codeset */
export function localeIsUtf8(env: Record<string, string | undefined> = process.env): boolean {
  const loc = env.LC_ALL || env.LC_CTYPE || env.LANG || '';
  return /utf-?8/i.test(loc);
}

/**
 * `dmsetup ls --tree` (default options: device numbers, no truncation): devices nobody
 * stacks on at the top, each followed by the devices its live table uses. A device of the
 * engine prints `NAME (253:MIN)`; any other reference prints ` (REF)` like dmsetup's
 * nameless `(MAJ:MIN)` leaves.
 */
export function tree(devices: DeviceSummary[], utf8: boolean): string {
  if (devices.length === 0) return NO_DEVICES;
  const sym = utf8 ? UTF_TREE : ASCII_TREE;
  const byName = new Map(devices.map((d) => [d.name, d]));
  const held = new Set(devices.flatMap((d) => d.deps.filter((r) => r.startsWith('dm:') && byName.has(r.slice(3))).map((r) => r.slice(3))));
  const more: boolean[] = [];
  let out = '';
  const children = (d: DeviceSummary): string[] => d.deps;
  const label = (ref: string): string => {
    const d = ref.startsWith('dm:') ? byName.get(ref.slice(3)) : undefined;
    return d ? `${d.name} (${DM_MAJOR}:${d.minor})` : ` (${ref})`;
  };
  const prefix = (depth: number): string => {
    let p = '';
    for (let i = 0; i < depth; i++) {
      p += ' ';
      p += i === depth - 1 ? (more[depth] ? sym.branch : sym.last) : (more[i + 1] ? sym.vert : sym.empty);
    }
    return p;
  };
  const walk = (refs: string[], depth: number, path: Set<string>): void => {
    refs.forEach((ref, i) => {
      more[depth] = i < refs.length - 1;
      out += `${prefix(depth)}${label(ref)}\n`;
      const d = ref.startsWith('dm:') ? byName.get(ref.slice(3)) : undefined;
      if (d && !path.has(d.name) && children(d).length) walk(children(d), depth + 1, new Set([...path, d.name]));
    });
  };
  walk(devices.filter((d) => !held.has(d.name)).map((d) => `dm:${d.name}`), 0, new Set());
  return out;
}
