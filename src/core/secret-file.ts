/**
 * A shared secret kept in a file: the replication secret, the HTTP listener's token. The
 * file must be a regular file that only its owner can read (a secret others can read is
 * refused, as ssh refuses a private key), and hold at least 16 bytes once trimmed.
 */
import fs from 'node:fs';
import { DmError } from './errors.ts';

/** Read the secret in `file`; `what` names it in errors ("replication secret", "HTTP token"). */
export function readSecretFile(file: string, what: string): Buffer {
  let st: fs.Stats;
  try {
    st = fs.statSync(file);
  } catch (err) {
    throw new DmError('ENOENT', `${what} ${file}: cannot read it: ${(err as Error).message}`);
  }
  if (!st.isFile()) throw new DmError('EINVAL', `${what} ${file}: not a regular file`);
  if ((st.mode & 0o077) !== 0) {
    throw new DmError('EACCES', `${what} ${file}: mode ${(st.mode & 0o777).toString(8).padStart(4, '0')} lets others read it; chmod 600 it (refused)`);
  }
  const key = Buffer.from(fs.readFileSync(file, 'utf8').trim(), 'utf8');
  if (key.length < 16) throw new DmError('EINVAL', `${what} ${file}: ${key.length} bytes; a secret needs at least 16`);
  return key;
}
