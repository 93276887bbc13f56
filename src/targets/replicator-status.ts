/**
 * The replicator's status: the info line (REPLICATION.md "Status"), the table line (which
 * `create` accepts back), and `--json` with names.
 */
import type { StatusType } from '../core/types.ts';
import { DEFAULT_POLICY, formatSlinkParams } from '../slink/params.ts';
import { MAX_EXTENTS } from './replicator-activity.ts';
import type { ReplicatorGroup } from './replicator-group.ts';
import type { Site } from './replicator-site.ts';

/** `<slink#>:<state>,<outstanding_ios>,<outstanding_sectors>`… `<used>/<size>`; table: the constructor's arguments */
export function groupStatus(g: ReplicatorGroup, type: StatusType): string {
  if (type === 'info') {
    const sites = g.sites.map((s) => `${s.slink}:${s.state},${s.outstandingIos()},${s.outstandingSectors()}`);
    return [`${g.local.slink}:S,0,0`, ...sites, g.log.status('info')].join(' ');
  }
  const replog = g.log.status('table');
  const words = [g.log.type, String(countWords(replog)), replog];
  words.push(slinkTable(g.local.type, formatSlinkParams({
    slink: g.local.slink, policy: DEFAULT_POLICY, policyText: null, fallBehind: null, fallBehindText: null,
    options: g.activity.capacity === MAX_EXTENTS ? g.local.options() : [...g.local.options(), `al-extents=${g.activity.capacity}`],
  })));
  for (const s of g.sites) words.push(slinkTable(s.link.type, siteParams(s)));
  return words.join(' ');
}

function slinkTable(type: string, params: string[]): string {
  return `${type} ${params.length} ${params.join(' ')}`;
}

function siteParams(s: Site): string[] {
  return formatSlinkParams({
    slink: s.slink, policy: s.policy, policyText: s.policyText,
    fallBehind: s.fallBehind, fallBehindText: s.fallBehindText, options: s.link.options(),
  });
}

/** words of table text, where `\ ` is an escaped space inside a word */
function countWords(text: string): number {
  return text.split(/(?<!\\) +/).filter((w) => w.length > 0).length;
}

export function groupStatusJson(g: ReplicatorGroup): unknown {
  const [used, size] = g.log.status('info').split('/').map(Number);
  return {
    replog: { type: g.log.type, usedSectors: used, sizeSectors: size, head: g.head, tail: g.log.tail },
    ...g.role.toJson(),
    statistics: g.stats,
    resyncControl: g.resyncControl.status(),
    activityLog: { extents: g.activity.size, maxExtents: g.activity.capacity, pinned: g.activity.pinned, ...g.activity.stats },
    sites: [
      { slink: g.local.slink, type: g.local.type, state: 'local', stateChar: 'S' },
      ...g.sites.map((s) => ({
        slink: s.slink,
        type: s.link.type,
        state: s.stateName,
        stateChar: s.state,
        policy: s.policyText ?? (s.policy.mode === 'sync' ? 'sync' : 'async'),
        fallBehind: s.fallBehindText,
        mode: s.mode === 'ship' ? 'in-order' : 'dirty-log',
        consistent: s.consistent,
        lag: { ios: s.outstandingIos(), sectors: s.outstandingSectors(), bytes: s.outstandingSectors() * 512, ageMs: s.lagMs() },
        shipped: { ios: s.stats.shippedIos, bytes: s.stats.shippedBytes },
        resyncedBytes: s.stats.resyncedBytes,
        comparedBytes: s.stats.comparedBytes,
        resync: s.progress(),
        resyncFlow: g.resyncControl.flowStatus(s.slink),
        lastVerify: s.lastVerify,
        errors: s.stats.errors,
        lastError: s.lastError || null,
        transport: s.link.status('info') || null,
        link: s.link.statusJson?.() ?? null,
      })),
    ],
  };
}
