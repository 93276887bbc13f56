/**
 * error: every bio fails with EIO. Replaces any target to fail a device. It takes no
 * flushes (dm-error's num_flush_bios is 0): a flush of its device skips it and succeeds.
 */
import type { Bio } from '../core/bio.ts';
import { ArgReader } from '../core/args.ts';
import { BlockError } from '../core/errors.ts';
import type { Target, TargetType } from '../core/types.ts';

export const error: TargetType = {
  name: 'error',
  version: [1, 7, 0],
  /** no arguments; an optional `<dev> <offset>` is accepted and ignored (LVM habit) */
  create(ctx, args) {
    const r = new ArgReader(args, 'error');
    if (args.length !== 0 && args.length !== 2) r.fail('invalid argument count (expected none, or <dev> <offset> which is ignored)');
    const device = ctx.device;
    return {
      flushBios: 0,
      map(_bio: Bio): Promise<void> {
        return Promise.reject(new BlockError('EIO', `${device}: error target`));
      },
      status: () => '',
    };
  },
};
