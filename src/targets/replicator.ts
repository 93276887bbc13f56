/**
 * replicator: the control target of a replication group. It owns the replication log
 * (from the replog registry) and the group's site links (from the slink registry); the
 * devices of the group are `replicator-dev` targets that name it. The write path, sites,
 * checkpoints and overflow handling are in replicator-group.ts and replicator-site.ts.
 */
import { ArgReader } from '../core/args.ts';
import { TargetArgError } from '../core/errors.ts';
import type { Target, TargetContext, TargetType } from '../core/types.ts';
import { createReplog } from '../replog/registry.ts';
import type { Replog, ReplogContext } from '../replog/types.ts';
import { checkSlinkCount, parseSlinkParams } from '../slink/params.ts';
import { createSlink } from '../slink/registry.ts';
import type { SiteLink, SlinkContext, SlinkParams, SlinkRoles } from '../slink/types.ts';
import { MAX_EXTENTS } from './replicator-activity.ts';
import { ReplicatorGroup } from './replicator-group.ts';
import { GroupRole } from './replicator-role.ts';
import { Site } from './replicator-site.ts';

/**
 * The group's roles for its slinks (SlinkContext.roles). Slinks are made before the group
 * (they are its parameters), so this reaches the group once it exists; a site that answers
 * before then (attach happens later, with the replicator-devs) is never asked.
 */
function rolesOf(group: () => ReplicatorGroup | null): SlinkRoles {
  return {
    secondary: () => group()?.role.secondary ?? false,
    gens: (slink) => group()!.roles.gens(slink),
    opened: (slink, devNr, resync, needs) => group()?.roles.opened(slink, devNr, resync, needs),
    refused: (slink, verdict, why) => group()?.roles.refused(slink, verdict, why),
  };
}

/** slink numbers 0 … MAX_SLINK (the checkpoint holds up to 64 positions) */
const MAX_SLINK = 63;

/** `<replog_type> <#replog_params> <replog_params…>` */
async function parseReplog(ctx: TargetContext, r: ArgReader): Promise<Replog> {
  const type = r.next('replog type');
  const args = r.group('replog parameters', { min: 1 });
  const logCtx: ReplogContext = { device: ctx.device, open: (ref) => ctx.open(ref), event: () => ctx.event(), log: ctx.log };
  return createReplog(type, logCtx, args);
}

const AL_OPTION = /^al-extents=(.*)$/s;

/**
 * Slink 0's `al-extents=<N>` (the group's activity log, 0 … MAX_EXTENTS; 0 keeps none), taken
 * out of the options its transport gets; the default when absent
 */
function activityExtents(r: ArgReader, params: SlinkParams): [number, string[]] {
  let n = MAX_EXTENTS;
  const rest: string[] = [];
  for (const o of params.options) {
    const m = AL_OPTION.exec(o);
    if (!m) {
      rest.push(o);
      continue;
    }
    if (!/^[0-9]+$/.test(m[1]!) || Number(m[1]) > MAX_EXTENTS) r.fail(`slink 0: invalid al-extents '${m[1]}' (expected 0 to ${MAX_EXTENTS}: extents of 4 MiB in the activity log; 0 keeps none)`);
    n = Number(m[1]);
  }
  return [n, rest];
}

/** `(<slink_type> <#slink_params> <slink_params…>){1..N}`: slink 0 (local) exactly once */
async function parseSlinks(ctx: TargetContext, r: ArgReader, log: Replog, made: SiteLink[], group: () => ReplicatorGroup | null): Promise<{ slinks: Array<{ link: SiteLink; params: SlinkParams }>; activity: number }> {
  const slinkCtx: SlinkContext = { device: ctx.device, groupId: log.uuid, event: () => ctx.event(), log: ctx.log, roles: rolesOf(() => group()),
    judge: (slink, site) => group()?.judgeApplied(slink, site) ?? Promise.resolve(null),
  };
  const out: Array<{ link: SiteLink; params: SlinkParams }> = [];
  let activity = MAX_EXTENTS;
  while (!r.atEnd()) {
    const type = r.next('slink type');
    const words = r.group(`slink parameters of '${type}'`, { min: 1 });
    checkSlinkCount(type, words, r.peek());
    let params = parseSlinkParams(words, MAX_SLINK);
    if (out.some((x) => x.params.slink === params.slink)) r.fail(`slink ${params.slink} is given twice`);
    if (params.slink === 0 && (params.policyText !== null || params.fallBehind !== null)) {
      r.fail('slink 0 is the local site: it takes no policy or fall-behind');
    }
    if (params.slink === 0) {
      const [n, options] = activityExtents(r, params);
      activity = n;
      params = { ...params, options };
    }
    const link = await createSlink(type, slinkCtx, params.slink, params.options);
    made.push(link);
    out.push({ link, params });
  }
  if (!out.some((x) => x.params.slink === 0)) r.fail('missing slink 0 (the local site, e.g. blockdev 1 0)');
  if (out.length < 2) r.fail('missing a remote slink (expected at least one slink besides slink 0)');
  return { slinks: out, activity };
}

export const replicator: TargetType = {
  name: 'replicator',
  version: [1, 0, 0],
  /**
   * `<replog_type> <#replog_params> <replog_params…> (<slink_type> <#slink_params> <slink_params…>){2..N}`
   *   replog  ringbuffer <2-4> <dev> <dev_start> [auto|create|open [<size>]]
   *   slink   <type> <#params> <slink#> [<policy> [<fallbehind>]] [<key>=<value>…]
   *           slink 0 is the local site (`blockdev 1 0`); 1 … 63 are remote; slink 0
   *           takes al-extents=<0-490> (the activity log; default 490, 0 keeps none)
   *           policy sync|synchronous|async|asynchronous[+stall|+pull-ahead] (default async)
   *           fallbehind ios <N> | size <N>[s|k|m|g|t|p] | timeout <N>[t|s|m|h|d] (or key=N)
   * The control device carries no data: reads return zeroes, writes fail with EPERM.
   */
  async create(ctx: TargetContext, args: string[]): Promise<Target> {
    const r = new ArgReader(args, 'replicator');
    const log = await parseReplog(ctx, r);
    const made: SiteLink[] = [];
    try {
      let theGroup: ReplicatorGroup | null = null;
      const { slinks, activity } = await parseSlinks(ctx, r, log, made, () => theGroup);
      const local = slinks.find((x) => x.params.slink === 0)!.link;
      const sites: Site[] = [];
      const role = new GroupRole(ctx.stateDir ? ctx.stateDir : null, log.uuid, ctx.log);
      const group = new ReplicatorGroup(ctx, log, local, sites, role, activity);
      theGroup = group;
      for (const { link, params } of slinks) {
        if (params.slink === 0) continue;
        sites.push(new Site(group, link, params.policy, params.policyText, params.fallBehind, params.fallBehindText));
      }
      return group;
    } catch (err) {
      for (const l of made.reverse()) await l.destroy();
      await log.destroy();
      if (err instanceof TargetArgError) throw err;
      throw new TargetArgError((err as Error).message, (err as { code?: string }).code);
    }
  },
};
