/**
 * A power loss of a replication source, as its disks would show it after a reboot: the
 * log's checkpoint slots (sectors 8–15 and 16–23, docs/formats/replog.md) written in another
 * boot and not quiesced.
 */
import { crc32c } from '@node-rs/crc32';

/** every valid-looking checkpoint slot of the log image `log` made to carry another boot id, not quiesced (CRC fixed) */
export function fromAnotherBoot(log: Buffer): void {
  for (const at of [4096, 8192]) {
    const slot = log.subarray(at, at + 4096);
    if (slot.toString('latin1', 0, 8) !== 'DMKRCKP\0') continue;
    slot.fill(0xee, 3088, 3104); // the boot id
    slot[3104] = 0; // not quiesced
    slot.writeUInt32LE(crc32c(slot.subarray(0, 4092)), 4092);
  }
}
