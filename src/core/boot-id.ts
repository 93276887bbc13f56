/**
 * This boot's id (`/proc/sys/kernel/random/boot_id`, 16 bytes; zeroes where the system has
 * none). A record written in this boot that a process crash left behind is still there (the
 * page cache kept it); one from another boot is only as good as the last flush before a
 * power loss or machine crash. The receiver's positions (replication/position.ts) and the
 * replication log's checkpoints (targets/replicator-group.ts) tell the two apart by it.
 */
import fs from 'node:fs';

const BOOT_ID_FILE = '/proc/sys/kernel/random/boot_id';

function read(): Buffer {
  try {
    const hex = fs.readFileSync(BOOT_ID_FILE, 'utf8').trim().replace(/-/g, '');
    if (/^[0-9a-f]{32}$/.test(hex)) return Buffer.from(hex, 'hex');
  } catch { /* no /proc */ }
  return Buffer.alloc(16);
}

/** this boot's id: 16 bytes, all zero when unknown */
export const BOOT_ID: Buffer = read();

/** whether the system has a boot id (without one, nothing can be known to be of this boot) */
export const HAS_BOOT_ID = BOOT_ID.some((b) => b !== 0);
