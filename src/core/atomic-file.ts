/**
 * Small state files replaced whole, so that a crash or a power loss leaves the old content
 * or the new, never an empty or torn file: written to a temporary file beside it, fsync-ed,
 * renamed over it, and the directory fsync-ed (the rename itself durable).
 */
import fs from 'node:fs';
import path from 'node:path';

function tmpOf(file: string): string {
  return path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.tmp`);
}

/** write tmp + fsync + rename + fsync(dir) */
export async function writeAtomic(file: string, body: string): Promise<void> {
  const dir = path.dirname(file);
  const tmp = tmpOf(file);
  const fh = await fs.promises.open(tmp, 'w', 0o600);
  try {
    await fh.writeFile(body);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await fs.promises.rename(tmp, file);
  const dh = await fs.promises.open(dir, 'r');
  try {
    await dh.sync();
  } finally {
    await dh.close();
  }
}

/** writeAtomic, synchronously (for a change that must be durable before the caller goes on) */
export function writeAtomicSync(file: string, body: string): void {
  const tmp = tmpOf(file);
  const fd = fs.openSync(tmp, 'w', 0o600);
  try {
    fs.writeSync(fd, body);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, file);
  const dfd = fs.openSync(path.dirname(file), 'r');
  try {
    fs.fsyncSync(dfd);
  } finally {
    fs.closeSync(dfd);
  }
}
