/**
 * The replicator's slink list against its counts (`<slink_type> <#slink_params>
 * <slink_params…>`), through the real table loader: a list longer than its count names the
 * count and the first word past it (not `missing slink parameters of 'retest=2' count`, as
 * when that word was read as the next slink's type), wherever it stands; a list shorter
 * than its count says how many it got, also when the count swallowed the next slink's type;
 * a word that is neither a parameter nor a known type stays an unknown slink type. Every case as line 1 or 2, nothing left open afterwards.
 * checkSlinkCount (src/slink/params.ts) on its own: test/unit/slink-params.test.ts.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { DeviceMapper, TableError } from '../../src/index.ts';
import { listSlinks } from '../../src/slink/registry.ts';
import { image, rejectionOf as rejection, tmpDir } from '../helpers/replication.ts';
import './helpers.ts'; // quiets the engine's warnings

const LOG = 'ringbuffer 3 $RLOG 0 auto';
const TCP = 'peer=127.0.0.1:7788 secret=$SECRET tls=on compress=lz4';
const LATE = "follows where the next slink's type or the end of the line was expected";

const CASES: Array<[args: string, message: string]> = [
  // the how-to's line: 7 parameters counted as 6
  [`${LOG} blockdev 1 0 tcp 6 1 async ${TCP} retest=2`, `slink 1 ('tcp'): its parameter count says 6, but a 7th, 'retest=2', ${LATE}`],
  // one too many, with more slinks after it
  [`${LOG} blockdev 1 0 blockdev 1 1 sync blockdev 1 2`, `slink 1 ('blockdev'): its parameter count says 1, but a 2nd, 'sync', ${LATE}`],
  [`${LOG} blockdev 2 1 async ios 5 blockdev 1 0`, `slink 1 ('blockdev'): its parameter count says 2, but a 3rd, 'ios', ${LATE}`],
  // the last counted word a fall-behind value with a unit
  [`${LOG} blockdev 1 0 blockdev 4 1 async size 64m retest=2`, `slink 1 ('blockdev'): its parameter count says 4, but a 5th, 'retest=2', ${LATE}`],
  [`${LOG} blockdev 1 0 blockdev 5 1 async timeout 10s ios=8 retest=2`, `slink 1 ('blockdev'): its parameter count says 5, but a 6th, 'retest=2', ${LATE}`],
  [`${LOG} local 1 0 0 blockdev 2 1 async`, `slink 0 ('local'): its parameter count says 1, but a 2nd, '0', ${LATE}`],
  [`${LOG} blockdev 1 0 tcp 9 1 async ${TCP} io-timeout=5 integrity=crc32c retest=2 tls-ca=x`, `slink 1 ('tcp'): its parameter count says 9, but a 10th, 'tls-ca=x', ${LATE}`],
  // too few: at the end of the line, unchanged; before another slink, which it swallows
  [`${LOG} blockdev 1 0 tcp 6 1 ${TCP}`, "not enough arguments for slink parameters of 'tcp' (expected 6, got 5)"],
  [`${LOG} tcp 6 1 ${TCP} blockdev 1 0`, "slink 1 ('tcp'): its parameter count says 6, but its 6th, 'blockdev', looks like the next slink's type (expected 6 parameters, got 5)"],
  // a word that is no parameter and starts no slink: the slink's own parser names it
  [`${LOG} blockdev 1 0 blockdev 2 1 fast`, "slink 1: unknown policy 'fast' (expected sync|synchronous|async|asynchronous, optionally +stall or +pull-ahead)"],
  // a word that is no parameter stays a slink type, known or not
  [`${LOG} blockdev 1 0 frob 1 1`, "unknown slink type 'frob' (expected one of $SLINKS)"],
];

describe('slink parameter counts', () => {
  let dir: string;
  let dm: DeviceMapper;
  let paths: Record<string, string>;

  beforeEach(() => {
    dir = tmpDir('dmkit-slink-count-');
    dm = new DeviceMapper();
    const secret = path.join(dir, 'secret');
    fs.writeFileSync(secret, 'x'.repeat(32), { mode: 0o600 });
    paths = { $RLOG: image(dir, 'rlog', 8192), $SECRET: secret, $SLINKS: listSlinks().join(', ') };
  });

  afterEach(async () => {
    await dm.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const fill = (s: string): string => Object.entries(paths).reduce((t, [k, v]) => t.replaceAll(k, v), s);

  it.each(CASES.map((c, i) => [i % 2 + 1, ...c] as const))('line %i: %s', async (line, args, message) => {
    const entry = `1 replicator ${fill(args)}`;
    const table = line === 1 ? `0 ${entry}` : `0 8 zero\n8 ${entry}`;
    const err = await rejection(dm.create('repl', { table }));
    expect(err).toBeInstanceOf(TableError);
    expect(err.code).toBe('EINVAL');
    expect(err.message).toBe(`repl: line ${line}: replicator: ${fill(message)}`);
    expect(dm.has('repl')).toBe(false);
    expect(dm.targets.uses('replicator')).toBe(0);
    // nothing stays open: another engine takes the log's lock
    const other = new DeviceMapper();
    try {
      await other.create('probe', { table: `0 8 linear ${paths.$RLOG} 0` });
    } finally {
      await other.close();
    }
  });
});
