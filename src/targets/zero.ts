/**
 * zero: reads return zeroes; writes and discards succeed and store nothing. It takes no
 * flushes (dm-zero's num_flush_bios is 0): there is nothing below it to make durable.
 */
import type { Bio } from '../core/bio.ts';
import { ArgReader } from '../core/args.ts';
import type { Extent, Target, TargetType } from '../core/types.ts';

const zeroTarget: Target = {
  flushBios: 0,
  map(bio: Bio): Promise<void> {
    if (bio.op === 'read') bio.data.fill(0);
    return Promise.resolve();
  },
  status: () => '',
  allocation: (_sector: number, sectors: number): Promise<Extent[]> => Promise.resolve([{ sectors, state: 'hole' }]),
};

export const zero: TargetType = {
  name: 'zero',
  version: [1, 2, 0],
  /** no arguments */
  create(_ctx, args) {
    new ArgReader(args, 'zero').expectEnd();
    return zeroTarget;
  },
};
