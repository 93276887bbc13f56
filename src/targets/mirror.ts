/**
 * mirror: keeps 2 to 9 identical copies (legs) of the target's range, with a dirty region
 * log so that after a crash only regions that had writes in flight are resynced
 * (dm-raid1). The I/O paths, resync and health are in mirror-set.ts; the log comes from
 * the dirty log registry.
 */
import { ArgReader } from '../core/args.ts';
import type { Target, TargetContext, TargetType } from '../core/types.ts';
import { createDirtyLog } from '../dirtylog/registry.ts';
import type { DirtyLog, DirtyLogContext } from '../dirtylog/types.ts';
import { openDevice } from './common.ts';
import { MirrorSet, type MirrorFeatures, type MirrorLeg } from './mirror-set.ts';

const MIN_LEGS = 2;
const MAX_LEGS = 9;

/**
 * `<log_type> <#log_args> <log_args…>`: create the log through the registry. Its
 * `flushData` hook reaches the mirror once it exists.
 */
async function parseLog(ctx: TargetContext, r: ArgReader, flushData: () => Promise<void>): Promise<DirtyLog> {
  const type = r.next('log type');
  const count = r.uint('log argument count');
  if (count > r.remaining) r.fail(`not enough log arguments (expected ${count}, got ${r.remaining})`);
  const args = Array.from({ length: count }, (_, i) => r.next(`log argument ${i + 1}`));
  const logCtx: DirtyLogContext = {
    device: ctx.device,
    open: (ref) => ctx.open(ref),
    event: () => ctx.event(),
    log: ctx.log,
    flushData,
  };
  return createDirtyLog(type, logCtx, args, ctx.length);
}

/** `<#legs> (<dev> <offset>){#legs}`: open each leg (the core releases them on failure). */
async function openLegs(ctx: TargetContext, r: ArgReader): Promise<MirrorLeg[]> {
  const n = r.uint('number of legs', { min: MIN_LEGS, max: MAX_LEGS });
  if (r.remaining < 2 * n) r.fail(`not enough leg arguments (expected ${2 * n} for ${n} legs, got ${r.remaining})`);
  const legs: MirrorLeg[] = [];
  for (let i = 0; i < n; i++) {
    const ref = r.next(`leg ${i} device`);
    const offset = r.uint(`leg ${i} offset`);
    legs.push({ dev: await openDevice(ctx, ref, offset), offset });
  }
  return legs;
}

/** `[<#features> <feature>…]`: handle_errors (legacy block_on_error), keep_log. */
function parseFeatures(r: ArgReader): MirrorFeatures {
  const f: MirrorFeatures = { handleErrors: false, keepLog: false };
  if (r.atEnd()) return f;
  const n = r.uint('feature count');
  if (n > r.remaining) r.fail(`not enough features (expected ${n}, got ${r.remaining})`);
  for (let i = 0; i < n; i++) {
    const word = r.next('feature');
    if (word === 'handle_errors' || word === 'block_on_error') f.handleErrors = true;
    else if (word === 'keep_log') f.keepLog = true;
    else r.fail(`unknown feature '${word}' (expected handle_errors or keep_log)`);
  }
  if (f.keepLog && !f.handleErrors) r.fail('keep_log requires handle_errors');
  return f;
}

export const mirror: TargetType = {
  name: 'mirror',
  version: [1, 14, 0],
  /**
   * `<log_type> <#log_args> <log_args…> <#legs> (<dev> <offset>){#legs} [<#features> <feature>…]`
   *   log      core <1|2> <region_size> [sync|nosync]
   *            disk <2|3> <log_dev> <region_size> [sync|nosync]
   *            region_size: sectors, a power of 2, ≥ 8, ≤ the target length
   *   legs     2 to 9 of `<dev> <offset>`; leg 0 is the default leg (reads, resync source)
   *   features handle_errors (or block_on_error), keep_log (requires handle_errors)
   */
  async create(ctx: TargetContext, args: string[]): Promise<Target> {
    const r = new ArgReader(args, 'mirror');
    let set: MirrorSet | null = null;
    const log = await parseLog(ctx, r, () => set?.flushData() ?? Promise.resolve());
    try {
      const legs = await openLegs(ctx, r);
      const features = parseFeatures(r);
      r.expectEnd();
      set = new MirrorSet(ctx, log, legs, features);
      return set;
    } catch (err) {
      await log.destroy();
      throw err;
    }
  },
};
