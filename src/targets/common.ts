/** Helpers shared by target constructors. */
import { TargetArgError } from '../core/errors.ts';
import { escapeArg } from '../core/table-parse.ts';
import type { BlockDev, TargetContext } from '../core/types.ts';

/**
 * Open `ref` and check that [offset, offset + length) lies inside it
 * ("device too small for target" otherwise).
 */
export async function openDevice(ctx: TargetContext, ref: string, offset: number, length = ctx.length): Promise<BlockDev> {
  let dev: BlockDev;
  try {
    dev = await ctx.open(ref);
  } catch (err) {
    throw new TargetArgError((err as Error).message, (err as { code?: string }).code ?? 'EINVAL');
  }
  if (offset + length > dev.sectors) {
    throw new TargetArgError(`device too small for target: ${ref} has ${dev.sectors} sectors, needs ${offset + length} (offset ${offset} + length ${length})`);
  }
  return dev;
}

/** A device reference as a status('table') argument: escaped so the table parser gives it back. */
export function refArg(dev: BlockDev): string {
  return escapeArg(dev.ref);
}
