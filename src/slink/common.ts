/**
 * What every transport does the same way: its one-word device parameter, the "device too
 * small" check and message, `test()` (a flush, then a read of sector 0), and its options
 * as status table text.
 *
 *   const ref = readDeviceParam(slink, 'nbd', '<nbd-uri>', params);
 *   const small = tooSmall(slink, ref, dev.sectors, ctx.length); // message or null
 *   await testDevice((bio) => remote.submit(bio));
 */
import { EMPTY, SECTOR_SIZE, type Bio } from '../core/bio.ts';
import { TargetArgError } from '../core/errors.ts';
import { escapeArg } from '../core/table-parse.ts';

/**
 * The replicator-dev's `<dev_params…>` of a transport that takes exactly one word (`<dev>`,
 * `<nbd-uri>`); throws `TargetArgError` naming the slink, the transport and what it got.
 */
export function readDeviceParam(slink: number, transport: string, what: string, params: readonly string[]): string {
  if (params.length !== 1) {
    const got = params.length === 0 ? 'none' : `${params.length} ('${params.join(' ')}')`;
    throw new TargetArgError(`slink ${slink}: ${transport} takes 1 device parameter (${what}), got ${got}`);
  }
  return params[0]!;
}

/** the "device too small" message when `has` sectors cannot hold `needs`, else null */
export function tooSmall(slink: number, ref: string, has: number, needs: number): string | null {
  return has < needs ? `slink ${slink}: device too small for target: ${ref} has ${has} sectors, needs ${needs}` : null;
}

/** `RemoteDevice.test()` of a device reached through `submit`: a flush, then a read of sector 0; both must succeed */
export async function testDevice(submit: (bio: Bio) => Promise<void>): Promise<void> {
  await submit({ op: 'flush', sector: 0, sectors: 0, data: EMPTY, flags: {} });
  await submit({ op: 'read', sector: 0, sectors: 1, data: Buffer.alloc(SECTOR_SIZE), flags: {} });
}

/** the transport options as status table text: the words as given, escaped */
export function optionsTable(options: readonly string[]): string {
  return options.map(escapeArg).join(' ');
}
