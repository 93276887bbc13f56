/**
 * replicator and replicator-dev: every constructor error with the exact message the table
 * loader reports (`NAME: line N: TARGET: detail`), each case as line 1 or line 2 and with
 * nothing left open or bound afterwards; every message error with its exact message, a
 * refused message changing nothing. What each message does: replicator-messages.test.ts.
 *
 * Engine: the library, over real image files; the site's devices are `dm:` linear devices
 * (test/helpers/replication.ts), changed behind dmkit's back only by writing their files.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { listDirtyLogs } from '../../src/dirtylog/registry.ts';
import { DeviceMapper, TableError } from '../../src/index.ts';
import { listReplogs } from '../../src/replog/registry.ts';
import { listSlinks } from '../../src/slink/registry.ts';
import {
  image, groupPerTest, rejectionOf as rejection, slinkState, tmpDir, waitFor, type Group,
} from '../helpers/replication.ts';
import { expectSameBytes } from './helpers.ts'; // also quiets the engine's warnings

const LEN = 2048; // sectors of every replicated device here (1 MiB)
const REGION = 64;

// ---------------------------------------------------------------------------------------
// constructor errors

/** [arguments, message]; $RLOG, $L, $R, $R2, $SMALL, $DLOG, $MISSING, $TYPES… stand for paths and lists */
type Case = [args: string, message: string];

const OK_LOG = 'ringbuffer 3 $RLOG 0 auto';
const OK_SLINKS = 'blockdev 1 0 blockdev 1 1';

const REPLICATOR_CASES: Case[] = [
  ['', 'missing replog type'],
  [`frob 2 $RLOG 0 ${OK_SLINKS}`, "unknown replog type 'frob' (expected one of $REPLOGS)"],
  [`ringbuffer 0 ${OK_SLINKS}`, "invalid replog parameters count '0' (expected an integer of at least 1)"],
  ['ringbuffer 9 $RLOG 0 blockdev 1 0', 'not enough arguments for replog parameters (expected 9, got 5)'],
  [`ringbuffer 1 $RLOG ${OK_SLINKS}`, 'ringbuffer: invalid argument count 1 (expected <dev> <dev_start> [auto|create|open [<size>]])'],
  [`ringbuffer 3 $RLOG 0 maybe ${OK_SLINKS}`, "ringbuffer: invalid open mode 'maybe' (expected one of auto, create, open)"],
  [`ringbuffer 4 $RLOG 0 auto 100 ${OK_SLINKS}`, 'ringbuffer: invalid size 100 (at least 4096 sectors: 2 MiB)'],
  [`ringbuffer 3 $RLOG 0 open ${OK_SLINKS}`, 'ringbuffer: $RLOG at sector 0: no replication log (all zeroes, no magic); create or auto makes one'],
  [`ringbuffer 3 $MISSING 0 open ${OK_SLINKS}`, 'ringbuffer: device lookup failed: $MISSING: no such file or device'],
  [`${OK_LOG} blockdev 1 0 frob 1 1`, "unknown slink type 'frob' (expected one of $SLINKS)"],
  [`${OK_LOG} blockdev 1 1 blockdev 1 2`, 'missing slink 0 (the local site, e.g. blockdev 1 0)'],
  [`${OK_LOG} blockdev 1 0`, 'missing a remote slink (expected at least one slink besides slink 0)'],
  [`${OK_LOG} blockdev 1 0 blockdev 1 1 local 1 1`, 'slink 1 is given twice'],
  [`${OK_LOG} blockdev 1 0 blockdev 1 0 blockdev 1 1`, 'slink 0 is given twice'],
  [`${OK_LOG} blockdev 2 0 sync blockdev 1 1`, 'slink 0 is the local site: it takes no policy or fall-behind'],
  [`${OK_LOG} blockdev 3 0 ios 5 blockdev 1 1`, 'slink 0 is the local site: it takes no policy or fall-behind'],
  [`${OK_LOG} blockdev 1 0 blockdev 1 64`, "invalid slink number '64' (expected an integer from 0 to 63)"],
  [`${OK_LOG} blockdev 1 0 blockdev 2 1 fast`, "slink 1: unknown policy 'fast' (expected sync|synchronous|async|asynchronous, optionally +stall or +pull-ahead)"],
  [`${OK_LOG} blockdev 1 0 blockdev 2 1 async+later`, "slink 1: unknown policy 'async+later' (expected sync|synchronous|async|asynchronous, optionally +stall or +pull-ahead)"],
  [`${OK_LOG} blockdev 1 0 blockdev 2 1 sync+stall`, "slink 1: sync slink takes no '+stall' in policy 'sync+stall' (only an async slink falls behind)"],
  [`${OK_LOG} blockdev 1 0 blockdev 4 1 sync ios 10`, "slink 1: sync slink takes no fall-behind (got 'ios 10')"],
  [`${OK_LOG} blockdev 1 0 blockdev 3 1 synchronous size=1m`, "slink 1: sync slink takes no fall-behind (got 'size=1m')"],
  [`${OK_LOG} blockdev 1 0 blockdev 4 1 async size 64x`, "slink 1: invalid fall-behind size '64x' (expected <N>[s|k|m|g|t|p])"],
  [`${OK_LOG} blockdev 1 0 blockdev 4 1 async timeout 5y`, "slink 1: invalid fall-behind timeout '5y' (expected <N>[t|s|m|h|d])"],
  [`${OK_LOG} blockdev 1 0 blockdev 3 1 async ios=0`, "slink 1: invalid fall-behind ios '0' (expected a positive integer <N>)"],
  [`${OK_LOG} blockdev 1 0 blockdev 2 1 frob=1`, "slink 1: unknown blockdev option 'frob' (expected retest=…)"],
  [`${OK_LOG} blockdev 2 0 al-extents=491 blockdev 1 1`, "slink 0: invalid al-extents '491' (expected 0 to 490: extents of 4 MiB in the activity log; 0 keeps none)"],
  [`${OK_LOG} blockdev 2 0 al-extents=x blockdev 1 1`, "slink 0: invalid al-extents 'x' (expected 0 to 490: extents of 4 MiB in the activity log; 0 keeps none)"],
  [`${OK_LOG} blockdev 1 0 blockdev 2 1 al-extents=8`, "slink 1: unknown blockdev option 'al-extents' (expected retest=…)"],
  [`${OK_LOG} blockdev 1 0 blockdev 2 1 retest=0`, "slink 1: invalid retest '0' (expected seconds, an integer from 1 to 2147483)"],
];

const DEV_OK0 = '0 1 $L nolog 0';
const DEV_OK1 = `1 1 $R core 1 ${REGION}`;

const DEV_CASES: Case[] = [
  [`$RLOG 1 ${DEV_OK0} ${DEV_OK1}`, "invalid replicator device '$RLOG' (expected dm:NAME of a replicator device)"],
  [`dm:nothere 1 ${DEV_OK0} ${DEV_OK1}`, 'device lookup failed: dm:nothere: no such device'],
  [`dm:lin 1 ${DEV_OK0} ${DEV_OK1}`, 'dm:lin is not an active replicator device'],
  [`dm:repl 256 ${DEV_OK0} ${DEV_OK1}`, "invalid device number '256' (expected an integer from 0 to 255)"],
  [`dm:repl x ${DEV_OK0} ${DEV_OK1}`, "invalid device number 'x' (expected an integer from 0 to 255)"],
  [`dm:repl 0 ${DEV_OK0} ${DEV_OK1}`, 'device number 0 is already used by vol0 in dm:repl'],
  [`dm:repl 1 ${DEV_OK0} 3 1 $R core 1 ${REGION}`, "no slink 3 in $DEV's replicator (slinks: 0, 1, 2)"],
  [`dm:repl 1 ${DEV_OK0} ${DEV_OK1} 1 1 $R2 core 1 ${REGION}`, 'slink 1 is given twice'],
  [`dm:repl 1 ${DEV_OK0} ${DEV_OK1} 0 1 $R2 nolog 0`, 'slink 0 is given twice'],
  [`dm:repl 1 ${DEV_OK1}`, 'missing slink 0 (the local device: 0 1 <dev> nolog 0)'],
  [`dm:repl 1 0 1 $L core 1 ${REGION} ${DEV_OK1}`, "slink 0 is the local site: its dirty log must be 'nolog 0' or '- 0' (got 'core')"],
  [`dm:repl 1 0 1 $L nolog 1 ${REGION} ${DEV_OK1}`, "slink 0 is the local site: its dirty log takes no parameters (expected 'nolog 0', got 'nolog 1')"],
  [`dm:repl 1 0 1 $MISSING nolog 0 ${DEV_OK1}`, 'slink 0: device lookup failed: $MISSING: no such file or device'],
  [`dm:repl 1 ${DEV_OK0} 1 2 $R x core 1 ${REGION}`, "slink 1: blockdev takes 1 device parameter (<dev>), got 2 ('$R x')"],
  [`dm:repl 1 ${DEV_OK0} 1 1 $R frob 0`, "slink 1: dirty log: unknown dirty log type 'frob' (expected one of $DLOGS)"],
  [`dm:repl 1 ${DEV_OK0} 1 1 $R core 1 12`, 'slink 1: dirty log: invalid region size 12 (must be a power of 2, ≥ 8 sectors)'],
  [`dm:repl 1 ${DEV_OK0} 1 1 $R core 1 4096`, 'slink 1: dirty log: invalid region size 4096 (must not exceed the target length of 2048 sectors)'],
  [`dm:repl 1 ${DEV_OK0} 1 1 $R core 3 ${REGION} sync x`, 'slink 1: dirty log: invalid core log argument count 3 (expected 1 or 2: <region_size> [sync|nosync])'],
  [`dm:repl 1 ${DEV_OK0} 1 1 $R core 2 ${REGION} maybe`, "slink 1: dirty log: invalid sync argument 'maybe' (expected sync or nosync)"],
  [`dm:repl 1 ${DEV_OK0} 1 1 $R disk 1 $DLOG`, 'slink 1: dirty log: invalid disk log argument count 1 (expected 2 or 3: <log_dev> <region_size> [sync|nosync])'],
  [`dm:repl 1 ${DEV_OK0} 1 1 $R disk 2 $MISSING ${REGION}`, 'slink 1: dirty log: device lookup failed: $MISSING: no such file or device'],
  [`dm:repl 1 ${DEV_OK0} ${DEV_OK1} 2 1 $R2 core 1 128`, 'region sizes differ between slinks (64, 128): every remote slink of a device takes the same region size'],
  [`dm:repl 1 ${DEV_OK0} 1 1 $SMALL core 1 ${REGION}`, 'slink 1: device too small for target: $SMALL has 1024 sectors, needs 2048'],
];

describe('constructor errors', () => {
  let dir: string;
  let dm: DeviceMapper;
  let paths: Record<string, string>;

  beforeEach(() => {
    dir = tmpDir('dmkit-repl-errors-');
    dm = new DeviceMapper();
    paths = {
      $RLOG: image(dir, 'rlog', 8192),
      $L: image(dir, 'l.img', LEN),
      $R: image(dir, 'r.img', LEN),
      $R2: image(dir, 'r2.img', LEN),
      $SMALL: image(dir, 'small.img', LEN / 2),
      $DLOG: image(dir, 'dlog', 64),
      $MISSING: path.join(dir, 'missing.img'),
      $REPLOGS: listReplogs().join(', '),
      $SLINKS: listSlinks().join(', '),
      $DLOGS: listDirtyLogs().join(', '),
    };
  });

  afterEach(async () => {
    await dm.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const fill = (s: string, device: string): string =>
    Object.entries({ ...paths, $DEV: device })
      .sort(([a], [b]) => b.length - a.length) // $R2 before $R
      .reduce((t, [k, v]) => t.replaceAll(k, v), s);

  /** nothing the failed table opened stays open: another engine takes each image's lock */
  async function expectReleased(files: string[]): Promise<void> {
    const other = new DeviceMapper();
    try {
      for (const [i, f] of files.entries()) await other.create(`probe${i}`, { table: `0 8 linear ${f} 0` });
    } finally {
      await other.close();
    }
  }

  it.each(REPLICATOR_CASES.map((c, i) => [i % 2 + 1, ...c] as const))('replicator, line %i: %s', async (line, args, message) => {
    const entry = `1 replicator ${fill(args, 'repl')}`;
    const table = line === 1 ? `0 ${entry}` : `0 8 zero\n8 ${entry}`;
    const err = await rejection(dm.create('repl', { table }));
    expect(err).toBeInstanceOf(TableError);
    expect(err.code).toBe('EINVAL');
    expect(err.message).toBe(`repl: line ${line}: replicator: ${fill(message, 'repl')}`);
    expect(dm.has('repl')).toBe(false);
    expect(dm.targets.uses('replicator')).toBe(0);
    await expectReleased([paths.$RLOG!]);
  });

  it.each(DEV_CASES.map((c, i) => [i % 2 + 1, ...c] as const))('replicator-dev, line %i: %s', async (line, args, message) => {
    await dm.create('repl', { table: `0 1 replicator ${fill(OK_LOG, 'repl')} blockdev 1 0 blockdev 2 1 retest=1 blockdev 2 2 retest=1` });
    await dm.create('lin', { table: `0 ${LEN} linear ${image(dir, 'lin.img', LEN)} 0` });
    await dm.create('vol0', { table: `0 ${LEN} replicator-dev dm:repl 0 0 1 ${image(dir, 'l0.img', LEN)} nolog 0 1 1 ${image(dir, 'r0.img', LEN)} core 2 ${REGION} nosync` });
    const opens = dm.info('repl').openCount;
    const status = dm.status('repl')[0]!.params;

    const entry = `${LEN} replicator-dev ${fill(args, 'vol9')}`;
    const table = line === 1 ? `0 ${entry}` : `0 8 zero\n8 ${entry}`;
    const err = await rejection(dm.create('vol9', { table }));
    expect(err).toBeInstanceOf(TableError);
    expect(err.code).toBe('EINVAL');
    expect(err.message).toBe(`vol9: line ${line}: replicator-dev: ${fill(message, 'vol9')}`);
    expect(dm.has('vol9')).toBe(false);
    expect(dm.info('repl').openCount).toBe(opens);
    expect(dm.targets.uses('replicator-dev')).toBe(1); // vol0's
    await expectReleased([paths.$L!, paths.$R!, paths.$R2!, paths.$SMALL!, paths.$DLOG!]);
    // the group goes on as before: vol0 still replicates, device number 1 is still free
    expect(dm.status('repl')[0]!.params).toBe(status);
    const vol1 = `dm:repl 1 0 1 ${paths.$L} - 0 ${fill(DEV_OK1, 'vol1')}`; // '- 0' stands for 'nolog 0'
    await dm.create('vol1', { table: `0 ${LEN} replicator-dev ${vol1}` });
    expect(dm.table('vol1')[0]!.params).toBe(vol1);
    expect(dm.status('vol1')[0]!.params).toMatch(/^A,1\/1 [AR],\d+\+?\/32$/);
  });
});

// ---------------------------------------------------------------------------------------
// messages

const group = groupPerTest({ devices: 1, sectors: LEN, region: REGION });

const msg = (grp: Group, ...words: string[]): Promise<string> => grp.dm.message('repl', 0, words);
const replTable = (grp: Group): string => grp.dm.table('repl')[0]!.params;

describe('message errors', () => {
  const USAGE = 'policy <slink#> <policy>, fallbehind <slink#> <spec>|none, slink suspend|resume <slink#>, resync <slink#> [full] [checksum], verify <slink#>, clear-bitmap <slink#>, statistics on|off|reset, replog resize <sectors>, resync-rate auto|<bytes/s>[k|m|g], forget <dev#>';
  const CASES: Array<[words: string, message: string]> = [
    ['frob', `unknown message 'frob' (expected ${USAGE})`],
    ['policy', 'missing slink number'],
    ['policy x sync', "invalid slink number 'x' (expected a non-negative integer)"],
    ['policy 0 sync', 'slink 0 is the local site (expected a remote slink: 1)'],
    ['policy 7 sync', 'no slink 7 in this replicator (remote slinks: 1)'],
    ['policy 1', 'missing policy'],
    ['policy 1 fast', "slink 1: unknown policy 'fast' (expected sync|synchronous|async|asynchronous, optionally +stall or +pull-ahead)"],
    ['policy 1 sync+pull-ahead', "slink 1: sync slink takes no '+pull-ahead' in policy 'sync+pull-ahead' (only an async slink falls behind)"],
    ['policy 1 sync extra', "too many arguments (unexpected 'extra')"],
    ['fallbehind 0 ios 5', 'slink 0 is the local site (expected a remote slink: 1)'],
    ['fallbehind 1 size 64x', "slink 1: invalid fall-behind size '64x' (expected <N>[s|k|m|g|t|p])"],
    ['fallbehind 1 weight 5', "slink 1: invalid fall-behind 'weight 5' (expected ios|size|timeout <N>, or ios=<N> and so on)"],
    ['fallbehind 1 ios 5 6', "slink 1: invalid fall-behind 'ios 5 6' (expected ios|size|timeout <N>, or ios=<N> and so on)"],
    ['slink', 'missing slink action'],
    ['slink pause 1', "invalid slink action 'pause' (expected one of suspend, resume)"],
    ['slink suspend 0', 'slink 0 is the local site (expected a remote slink: 1)'],
    ['slink resume 9', 'no slink 9 in this replicator (remote slinks: 1)'],
    ['resync 1 partial', "invalid resync option 'partial' (expected one of full, checksum)"],
    ['resync 1 full now', "invalid resync option 'now' (expected one of full, checksum)"],
    ['resync 1 checksum full checksum', "resync option 'checksum' given twice"],
    ['resync 0', 'slink 0 is the local site (expected a remote slink: 1)'],
    ['verify 2', 'no slink 2 in this replicator (remote slinks: 1)'],
    ['clear-bitmap 0', 'slink 0 is the local site (expected a remote slink: 1)'],
    ['statistics', 'missing statistics action'],
    ['statistics maybe', "invalid statistics action 'maybe' (expected one of on, off, reset)"],
    ['statistics on off', "too many arguments (unexpected 'off')"],
    ['replog grow 8192', "invalid replog action 'grow' (expected one of resize)"],
    ['replog resize', 'missing replog size'],
    ['replog resize 0', "invalid replog size '0' (expected an integer of at least 1)"],
    ['replog resize 1.5', "invalid replog size '1.5' (expected an integer of at least 1)"],
    ['replog resize 100', 'ringbuffer: invalid size 100 (at least 4096 sectors: 2 MiB)'],
    ['replog resize 99999999', 'ringbuffer: device too small for replog: $RLOG has 8256 sectors, needs 99999999 (dev_start 0 + size 99999999)'],
    ['resync-rate fast', "invalid resync rate 'fast' (expected auto, or bytes per second: <N>[k|m|g])"],
    ['forget', 'missing device number'],
    ['forget x', "invalid device number 'x' (expected an integer from 0 to 255)"],
    ['forget 256', "invalid device number '256' (expected an integer from 0 to 255)"],
    ['forget 0', 'device 0 is loaded (vol0): `dmkit remove vol0` takes it out of the group'],
    ['forget 7', 'device 7 is not in the group (its devices: 0)'],
    ['forget 7 now', "too many arguments (unexpected 'now')"],
  ];

  it.each(CASES)('%s', async (words, message) => {
    const grp = await group();
    const table = replTable(grp);
    const err = await rejection(msg(grp, ...words.split(' ')));
    expect(err.code).toBe('EINVAL');
    expect(err.message).toBe(message.replaceAll('$RLOG', path.join(grp.dir, 'rlog')));
    expect(replTable(grp)).toBe(table); // a refused message changes nothing
    expect(grp.status()).toMatch(/^0:S,0,0 1:A,0,0 /);
  });

  it('replog resize below the entries the ring keeps is refused, naming what does not fit; once shipped it is done', async () => {
    const grp = await group();
    await msg(grp, 'slink', 'suspend', '1');
    for (let k = 0; k < 70; k++) await grp.dm.write('vol0', (k % 32) * 32768, Buffer.alloc(32768, k));
    expect(grp.status()).toBe('0:S,0,0 1:D,70,4480 4550/8192'); // 70 × (512 + 32768) bytes kept
    const err = await rejection(msg(grp, 'replog', 'resize', '4096'));
    expect(err.code).toBe('EINVAL');
    expect(err.message).toBe('ringbuffer: cannot shrink to 4096 sectors: the kept entries 1-70 reach ring byte 2329600, the new ring holds 2084352');
    expect(grp.status()).toBe('0:S,0,0 1:D,70,4480 4550/8192');
    await msg(grp, 'slink', 'resume', '1');
    await waitFor(() => grp.status() === '0:S,0,0 1:A,0,0 0/8192', 'shipped and freed');
    await msg(grp, 'replog', 'resize', '4096');
    expect(grp.status()).toBe('0:S,0,0 1:A,0,0 0/4096');
    expectSameBytes(fs.readFileSync(grp.remote(0)), fs.readFileSync(grp.local(0)), 'site image');
  });

  it('fallbehind on a sync slink is refused; so is verify of a down slink', async () => {
    const grp = await group('sync');
    expect((await rejection(msg(grp, 'fallbehind', '1', 'ios', '5'))).message).toBe("slink 1: sync slink takes no fall-behind (got 'ios 5')");
    expect(replTable(grp)).toMatch(/ blockdev 3 1 sync retest=1$/);
    await grp.breakSite();
    await grp.dm.write('vol0', 0, Buffer.alloc(4096, 1)); // fails on the site: slink 1 goes down, the write succeeds
    expect(slinkState(grp.dm)).toBe('D');
    expect((await rejection(msg(grp, 'verify', '1'))).message).toBe('slink 1 is down: nothing to verify against');
  });
});
