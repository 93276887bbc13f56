/**
 * Prometheus metrics of a daemon (docs/metrics.md): prom-client's registry and text format,
 * its process and Node.js metrics, and dmkit's own metrics read from the engine at scrape
 * time. Nothing is counted for metrics on the I/O path: a scrape reads the counters the
 * devices keep anyway (io-stats), and the same JSON that `dmkit status --json` shows for
 * replication, so the two never disagree.
 *
 * One snapshot per scrape: `scrape()` reads every device once, then the registry formats
 * it. A device or site that is gone is gone from the next scrape (no stale series).
 */
import { collectDefaultMetrics, Registry, type Metric } from 'prom-client';
import type { DeviceMapper } from '../core/device-manager.ts';
import { IO_OPS, LATENCY_BOUNDS_S, type IoStatsSnapshot } from '../core/io-stats.ts';
import type { MappedDevice } from '../core/mapped-device.ts';

type Labels = Record<string, string | number>;
interface Sample { labels: Labels; value: number; metricName?: string }
type Kind = 'counter' | 'gauge' | 'histogram';

/** the site states a replicator reports (replicator-site.ts stateName) */
export const SITE_STATES = ['synchronous', 'asynchronous', 'forced-synchronous', 'pulled-ahead', 'resyncing', 'down', 'suspended'] as const;

// ---- the JSON shapes read (replicator-status.ts groupStatusJson, replicator-dev.ts statusJson, slink statusJson) ----

interface LinkJson { connection?: string; state?: string; bytesOnWire?: number; bytesReceived?: number; payloadBytes?: number; compressedBytes?: number; compressionRatio?: number | null; reconnects?: number; resends?: number }
interface SiteJson {
  slink: number; type: string; state: string; consistent?: boolean; mode?: string;
  lag?: { ios: number; bytes: number; ageMs: number };
  shipped?: { ios: number; bytes: number };
  resyncedBytes?: number; comparedBytes?: number; errors?: number;
  resync?: { work: string; done: number; total: number } | null;
  lastVerify?: { differing: number; regions: number } | null;
  link?: LinkJson | null;
}
interface GroupJson {
  replog: { usedSectors: number; sizeSectors: number };
  role: string; consistent: boolean; splitBrain: string | null;
  sites: SiteJson[];
}
interface DevJson { replicator: string; sites: Array<{ slink: number; state: string; inSyncRegions?: number; regions?: number; regionSectors?: number }> }

/** one scrape's samples, by metric name */
class Scrape {
  readonly samples = new Map<string, Sample[]>();
  add(name: string, labels: Labels, value: number, metricName?: string): void {
    let list = this.samples.get(name);
    if (!list) this.samples.set(name, (list = []));
    list.push(metricName ? { labels, value, metricName } : { labels, value });
  }
}

interface Def { name: string; help: string; type: Kind }

const DEFS: Def[] = [
  { name: 'dmkit_device_info', type: 'gauge', help: 'A mapped device (always 1), with its uuid and the target types of its live table' },
  { name: 'dmkit_device_size_bytes', type: 'gauge', help: 'Size of the live table in bytes' },
  { name: 'dmkit_device_openers', type: 'gauge', help: 'Openers of the device: NBD exports, tables stacked on it, library users' },
  { name: 'dmkit_device_suspended', type: 'gauge', help: '1 while the device is suspended (I/O queued)' },
  { name: 'dmkit_device_secondary', type: 'gauge', help: '1 while the device is secondary: it receives replication and refuses other writers' },
  { name: 'dmkit_device_inflight_ios', type: 'gauge', help: 'I/Os submitted to the device and not yet completed' },
  { name: 'dmkit_device_events_total', type: 'counter', help: 'Events raised by the device (dmsetup event_nr)' },
  { name: 'dmkit_device_io_total', type: 'counter', help: 'Completed I/Os by operation (successful and failed)' },
  { name: 'dmkit_device_io_errors_total', type: 'counter', help: 'Failed I/Os by operation' },
  { name: 'dmkit_device_io_bytes_total', type: 'counter', help: 'Bytes of completed I/Os by operation' },
  { name: 'dmkit_device_io_duration_seconds', type: 'histogram', help: 'I/O latency from submission to completion by operation' },
  { name: 'dmkit_replication_primary', type: 'gauge', help: '1 when the replication group is primary (writable), 0 when secondary' },
  { name: 'dmkit_replication_consistent', type: 'gauge', help: '1 when this side holds a consistent image (a secondary may be promoted)' },
  { name: 'dmkit_replication_split_brain', type: 'gauge', help: '1 while a split brain is detected: both sides written while apart; the operator must discard one side' },
  { name: 'dmkit_replog_used_bytes', type: 'gauge', help: 'Bytes of the replication log holding entries not yet shipped to every site' },
  { name: 'dmkit_replog_size_bytes', type: 'gauge', help: 'Size of the replication log ring' },
  { name: 'dmkit_replication_site_state', type: 'gauge', help: 'State of a remote site: 1 for the state it is in, 0 for the others' },
  { name: 'dmkit_replication_site_up', type: 'gauge', help: '1 when the site can be written to now (connected, not down or suspended)' },
  { name: 'dmkit_replication_site_consistent', type: 'gauge', help: '1 when the site image is a prefix of the group\'s writes (in-order shipping, not resyncing)' },
  { name: 'dmkit_replication_site_lag_ios', type: 'gauge', help: 'Writes in the replication log not yet shipped to the site' },
  { name: 'dmkit_replication_site_lag_bytes', type: 'gauge', help: 'Bytes in the replication log not yet shipped to the site' },
  { name: 'dmkit_replication_site_lag_seconds', type: 'gauge', help: 'Age of the oldest write not yet shipped to the site' },
  { name: 'dmkit_replication_site_shipped_ios_total', type: 'counter', help: 'Writes shipped in order to the site' },
  { name: 'dmkit_replication_site_shipped_bytes_total', type: 'counter', help: 'Bytes shipped in order to the site' },
  { name: 'dmkit_replication_site_resynced_bytes_total', type: 'counter', help: 'Bytes copied to the site by resyncs' },
  { name: 'dmkit_replication_site_compared_bytes_total', type: 'counter', help: 'Bytes compared by digest (checksum resync, verify) instead of copied' },
  { name: 'dmkit_replication_site_errors_total', type: 'counter', help: 'Failed writes to the site' },
  { name: 'dmkit_replication_site_wire_bytes_total', type: 'counter', help: 'Bytes of replication frames exchanged with the site by direction (writes, digests, replies; without TLS and TCP overhead), tcp slinks' },
  { name: 'dmkit_replication_site_payload_bytes_total', type: 'counter', help: 'Write data sent to the site, before compression, tcp slinks' },
  { name: 'dmkit_replication_site_compressed_bytes_total', type: 'counter', help: 'Write data sent to the site as sent (after compression), tcp slinks' },
  { name: 'dmkit_replication_site_compression_ratio', type: 'gauge', help: 'Write data before compression per byte sent, tcp slinks' },
  { name: 'dmkit_replication_site_reconnects_total', type: 'counter', help: 'Reconnections of the site link' },
  { name: 'dmkit_replication_site_work_done_bytes', type: 'gauge', help: 'Bytes done of the site\'s resync or verify now running' },
  { name: 'dmkit_replication_site_work_total_bytes', type: 'gauge', help: 'Bytes to do in the site\'s resync or verify now running' },
  { name: 'dmkit_replication_site_out_of_sync_regions', type: 'gauge', help: 'Regions of the site\'s dirty logs marked out of sync (to be resynced), over all devices of the group' },
  { name: 'dmkit_replication_site_regions', type: 'gauge', help: 'Regions of the site\'s dirty logs, over all devices of the group' },
  { name: 'dmkit_replication_site_verify_differing_regions', type: 'gauge', help: 'Regions found differing by the site\'s last verify' },
];

/** the replication JSON of a device's live table, if it has a replicator or replicator-dev line */
function replicationJson(d: MappedDevice, type: 'replicator' | 'replicator-dev'): unknown {
  const e = d.live?.entries.find((x) => x.type.name === type);
  return e?.target.statusJson?.() ?? null;
}

function addIo(s: Scrape, device: string, io: IoStatsSnapshot): void {
  for (const op of IO_OPS) {
    const o = io.ops[op];
    const l = { device, op };
    s.add('dmkit_device_io_total', l, o.count);
    s.add('dmkit_device_io_errors_total', l, o.errors);
    if (op !== 'flush') s.add('dmkit_device_io_bytes_total', l, o.bytes);
    let cum = 0;
    for (let i = 0; i < LATENCY_BOUNDS_S.length; i++) {
      cum += o.buckets[i]!;
      s.add('dmkit_device_io_duration_seconds', { ...l, le: LATENCY_BOUNDS_S[i]! }, cum, 'dmkit_device_io_duration_seconds_bucket');
    }
    s.add('dmkit_device_io_duration_seconds', { ...l, le: '+Inf' }, o.count, 'dmkit_device_io_duration_seconds_bucket');
    s.add('dmkit_device_io_duration_seconds', l, o.seconds, 'dmkit_device_io_duration_seconds_sum');
    s.add('dmkit_device_io_duration_seconds', l, o.count, 'dmkit_device_io_duration_seconds_count');
  }
}

function addGroup(s: Scrape, device: string, g: GroupJson, regions: Map<number, { out: number; all: number }>): void {
  const l = { device };
  s.add('dmkit_replication_primary', l, g.role === 'primary' ? 1 : 0);
  s.add('dmkit_replication_consistent', l, g.consistent ? 1 : 0);
  s.add('dmkit_replication_split_brain', l, g.splitBrain ? 1 : 0);
  s.add('dmkit_replog_used_bytes', l, g.replog.usedSectors * 512);
  s.add('dmkit_replog_size_bytes', l, g.replog.sizeSectors * 512);
  for (const site of g.sites) {
    if (site.state === 'local') continue;
    const sl = { device, slink: site.slink, type: site.type };
    for (const st of SITE_STATES) s.add('dmkit_replication_site_state', { ...sl, state: st }, site.state === st ? 1 : 0);
    const link = site.link ?? null;
    const linkState = link?.connection ?? link?.state;
    const up = site.state !== 'down' && site.state !== 'suspended' && (linkState === undefined || linkState === 'connected');
    s.add('dmkit_replication_site_up', sl, up ? 1 : 0);
    s.add('dmkit_replication_site_consistent', sl, site.consistent ? 1 : 0);
    s.add('dmkit_replication_site_lag_ios', sl, site.lag?.ios ?? 0);
    s.add('dmkit_replication_site_lag_bytes', sl, site.lag?.bytes ?? 0);
    s.add('dmkit_replication_site_lag_seconds', sl, (site.lag?.ageMs ?? 0) / 1000);
    s.add('dmkit_replication_site_shipped_ios_total', sl, site.shipped?.ios ?? 0);
    s.add('dmkit_replication_site_shipped_bytes_total', sl, site.shipped?.bytes ?? 0);
    s.add('dmkit_replication_site_resynced_bytes_total', sl, site.resyncedBytes ?? 0);
    s.add('dmkit_replication_site_compared_bytes_total', sl, site.comparedBytes ?? 0);
    s.add('dmkit_replication_site_errors_total', sl, site.errors ?? 0);
    if (link && typeof link.bytesOnWire === 'number') {
      s.add('dmkit_replication_site_wire_bytes_total', { ...sl, direction: 'sent' }, link.bytesOnWire);
      s.add('dmkit_replication_site_wire_bytes_total', { ...sl, direction: 'received' }, link.bytesReceived ?? 0);
      s.add('dmkit_replication_site_payload_bytes_total', sl, link.payloadBytes ?? 0);
      s.add('dmkit_replication_site_compressed_bytes_total', sl, link.compressedBytes ?? 0);
      if (typeof link.compressionRatio === 'number') s.add('dmkit_replication_site_compression_ratio', sl, link.compressionRatio);
    }
    if (link && typeof link.reconnects === 'number') s.add('dmkit_replication_site_reconnects_total', sl, link.reconnects);
    const w = site.resync;
    const work = w?.work ?? 'none';
    s.add('dmkit_replication_site_work_done_bytes', { ...sl, work }, (w?.done ?? 0) * 512);
    s.add('dmkit_replication_site_work_total_bytes', { ...sl, work }, (w?.total ?? 0) * 512);
    const r = regions.get(site.slink);
    if (r) {
      s.add('dmkit_replication_site_out_of_sync_regions', sl, r.out);
      s.add('dmkit_replication_site_regions', sl, r.all);
    }
    if (site.lastVerify) s.add('dmkit_replication_site_verify_differing_regions', sl, site.lastVerify.differing);
  }
}

/** out-of-sync and total regions of each slink's dirty logs, per replicator (by its `dm:NAME` ref) */
function dirtyRegions(dm: DeviceMapper): Map<string, Map<number, { out: number; all: number }>> {
  const out = new Map<string, Map<number, { out: number; all: number }>>();
  for (const d of dm.list()) {
    const j = replicationJson(d, 'replicator-dev') as DevJson | null;
    if (!j) continue;
    let per = out.get(j.replicator);
    if (!per) out.set(j.replicator, (per = new Map()));
    for (const s of j.sites) {
      if (s.regions === undefined) continue;
      const acc = per.get(s.slink) ?? { out: 0, all: 0 };
      acc.all += s.regions;
      acc.out += s.regions - (s.inSyncRegions ?? s.regions);
      per.set(s.slink, acc);
    }
  }
  return out;
}

/** Read every device once: the samples of one scrape. */
export function scrapeEngine(dm: DeviceMapper): Scrape {
  const s = new Scrape();
  const regions = dirtyRegions(dm);
  for (const d of dm.list()) {
    const device = d.name;
    const l = { device };
    s.add('dmkit_device_info', { device, uuid: d.uuid, targets: [...new Set(d.live?.entries.map((e) => e.type.name) ?? [])].join(',') }, 1);
    s.add('dmkit_device_size_bytes', l, d.sectors * 512);
    s.add('dmkit_device_openers', l, d.openCount);
    s.add('dmkit_device_suspended', l, d.suspended ? 1 : 0);
    s.add('dmkit_device_secondary', l, d.secondary !== null ? 1 : 0);
    s.add('dmkit_device_inflight_ios', l, d.inflight);
    s.add('dmkit_device_events_total', l, d.eventNr);
    addIo(s, device, d.ioStats());
    const g = replicationJson(d, 'replicator') as GroupJson | null;
    if (g) addGroup(s, device, g, regions.get(d.ref) ?? new Map());
  }
  return s;
}

/**
 * The daemon's metrics: a prom-client registry holding process metrics and, per scrape,
 * dmkit's metrics as read by `scrapeEngine`.
 */
export class DaemonMetrics {
  readonly registry = new Registry();
  readonly #dm: DeviceMapper;
  #current = new Scrape();
  #turn: Promise<void> = Promise.resolve();

  constructor(dm: DeviceMapper) {
    this.#dm = dm;
    collectDefaultMetrics({ register: this.registry });
    // prom-client names these gauges `…_total`, which Prometheus reserves for counters
    // (promtool check metrics says so); the same counts are in nodejs_active_{handles,requests,resources} by type
    for (const n of ['nodejs_active_handles_total', 'nodejs_active_requests_total', 'nodejs_active_resources_total']) this.registry.removeSingleMetric(n);
    for (const def of DEFS) {
      // a metric prom-client formats: its values are this scrape's samples
      const metric = {
        name: def.name, help: def.help, type: def.type, aggregator: 'sum',
        get: async () => ({ name: def.name, help: def.help, type: def.type, aggregator: 'sum', values: this.#current.samples.get(def.name) ?? [] }),
        reset: () => {},
      };
      this.registry.registerMetric(metric as unknown as Metric<string>);
    }
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  /** the text exposition of the engine as it is now (concurrent scrapes take turns: they share #current) */
  scrape(): Promise<string> {
    const run = this.#turn.then(async () => {
      this.#current = scrapeEngine(this.#dm);
      try {
        return await this.registry.metrics();
      } finally {
        this.#current = new Scrape();
      }
    });
    this.#turn = run.then(() => undefined, () => undefined);
    return run;
  }
}
