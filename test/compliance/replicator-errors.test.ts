/**
 * replicator and replicator-dev: every constructor error with the exact message the table
 * loader reports (`NAME: line N: TARGET: detail`), each case as line 1 or line 2 and with
 * nothing left open or bound afterwards; every message error with its exact message; and
 * what each message does, seen in status, table, `--json` and the images' bytes. Last,
 * the control device itself (zeroes on read, EPERM on write) and its events.
 *
 * Engine: the library, over real image files; the site's devices are `dm:` linear devices
 * (test/helpers/replication.ts), changed behind dmkit's back only by writing their files.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { listDirtyLogs } from '../../src/dirtylog/registry.ts';
import { builtinTargets, DeviceMapper, TableError } from '../../src/index.ts';
import { listReplogs } from '../../src/replog/registry.ts';
import { listSlinks } from '../../src/slink/registry.ts';
import {
  caughtUp, image, makeGroup, pokeFile, readFileRange, replJson, SECTOR, siteJson, slinkState, tmpDir, waitFor, type Group,
} from '../helpers/replication.ts';
import { countingTarget, expectSameBytes } from './helpers.ts'; // also quiets the engine's warnings

const LEN = 2048; // sectors of every replicated device here (1 MiB)
const REGION = 64;
const NR = LEN / REGION; // 32

/** the rejection of `p` (fails the test if it resolves) */
async function rejection(p: Promise<unknown>): Promise<Error & { code?: string }> {
  const err = await p.then(() => null, (e: unknown) => e as Error & { code?: string });
  if (!err) throw new Error('expected a rejection, got success');
  return err;
}

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
  [`dm:repl 1 0 1 $L nolog 1 ${REGION} ${DEV_OK1}`, "invalid slink 0 dirty log parameter count '1' (expected an integer from 0 to 0)"],
  [`dm:repl 1 0 1 $MISSING nolog 0 ${DEV_OK1}`, 'slink 0: device lookup failed: $MISSING: no such file or device'],
  [`dm:repl 1 ${DEV_OK0} 1 2 $R x core 1 ${REGION}`, "slink 1: blockdev takes 1 device parameter (<dev>), got 2 ('$R x')"],
  [`dm:repl 1 ${DEV_OK0} 1 1 $R frob 0`, "unknown dirty log type 'frob' (expected one of $DLOGS)"],
  [`dm:repl 1 ${DEV_OK0} 1 1 $R core 1 12`, 'invalid region size 12 (must be a power of 2, ≥ 8 sectors)'],
  [`dm:repl 1 ${DEV_OK0} 1 1 $R core 1 4096`, 'invalid region size 4096 (must not exceed the target length of 2048 sectors)'],
  [`dm:repl 1 ${DEV_OK0} 1 1 $R core 3 ${REGION} sync x`, 'invalid core log argument count 3 (expected 1 or 2: <region_size> [sync|nosync])'],
  [`dm:repl 1 ${DEV_OK0} 1 1 $R core 2 ${REGION} maybe`, "invalid sync argument 'maybe' (expected sync or nosync)"],
  [`dm:repl 1 ${DEV_OK0} 1 1 $R disk 1 $DLOG`, 'invalid disk log argument count 1 (expected 2 or 3: <log_dev> <region_size> [sync|nosync])'],
  [`dm:repl 1 ${DEV_OK0} 1 1 $R disk 2 $MISSING ${REGION}`, 'device lookup failed: $MISSING: no such file or device'],
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

let g: Group | null = null;
afterEach(async () => {
  await g?.dm.close();
  if (g) fs.rmSync(g.dir, { recursive: true, force: true });
  g = null;
});

async function group(policy = 'async'): Promise<Group> {
  g = await makeGroup({ dir: tmpDir(), devices: 1, sectors: LEN, region: REGION, policy });
  return g;
}

const msg = (grp: Group, ...words: string[]): Promise<string> => grp.dm.message('repl', 0, words);
const volStatus = (grp: Group): string => grp.dm.status('vol0')[0]!.params;
const replTable = (grp: Group): string => grp.dm.table('repl')[0]!.params;

/** fill vol0 with random bytes (written through dmkit), flushed; returns what it holds */
async function fillVol(grp: Group): Promise<Buffer> {
  const data = crypto.randomBytes(LEN * SECTOR);
  for (let off = 0; off < data.length; off += 64 * 1024) await grp.dm.write('vol0', off, data.subarray(off, off + 64 * 1024));
  await grp.dm.flush('vol0');
  return data;
}

function expectImagesEqual(grp: Group, expected: Buffer, what: string): void {
  expectSameBytes(fs.readFileSync(grp.local(0)), expected, `${what}: local image`);
  expectSameBytes(fs.readFileSync(grp.remote(0)), expected, `${what}: remote image`);
}

describe('message errors', () => {
  const USAGE = 'policy <slink#> <policy>, fallbehind <slink#> <spec>|none, slink suspend|resume <slink#>, resync <slink#> [full], verify <slink#>, clear-bitmap <slink#>, statistics on|off|reset, replog resize <sectors>, resync-rate <bytes/s>';
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
    ['resync 1 partial', "invalid resync option 'partial' (expected one of full)"],
    ['resync 1 full now', "too many arguments (unexpected 'now')"],
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
    ['resync-rate fast', "invalid resync rate 'fast' (expected a non-negative integer)"],
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

describe('message effects', () => {
  it('policy: the state, the table and whether a write waits for the site follow it', async () => {
    const grp = await group();
    expect(replTable(grp)).toMatch(/ blockdev 1 0 blockdev 3 1 async retest=1$/);
    await msg(grp, 'policy', '1', 'sync');
    expect(grp.status()).toMatch(/^0:S,0,0 1:S,0,0 /);
    expect(replTable(grp)).toMatch(/ blockdev 1 0 blockdev 3 1 sync retest=1$/);
    expect(siteJson(grp.dm).policy).toBe('sync');
    // synchronous: the remote file has each write when it is acknowledged
    await grp.slowSite(200);
    for (let k = 0; k < 5; k++) {
      const data = crypto.randomBytes(4096);
      await grp.dm.write('vol0', k * 8192, data);
      expectSameBytes(readFileRange(grp.remote(0), k * 8192, 4096), data, `sync write ${k} on the site at its ack`);
    }
    await msg(grp, 'policy', '1', 'async+pull-ahead');
    expect(grp.status()).toMatch(/^0:S,0,0 1:A,/);
    expect(replTable(grp)).toMatch(/ blockdev 3 1 async\+pull-ahead retest=1$/);
    // asynchronous: with the site taking 200 ms per write, acks come before the site has them
    const data = crypto.randomBytes(4096);
    await grp.dm.write('vol0', 100 * 4096, data);
    expect(readFileRange(grp.remote(0), 100 * 4096, 4096).equals(data)).toBe(false);
    await waitFor(() => caughtUp(grp), 'caught up');
    expectSameBytes(readFileRange(grp.remote(0), 100 * 4096, 4096), data, 'async write after catching up');
  });

  it('policy sync: a FUA write reaches the site as FUA and a flush as a flush, both before the ack', async () => {
    const counting = countingTarget();
    const dm = new DeviceMapper({ targets: [...builtinTargets, counting.type] });
    g = await makeGroup({ dir: tmpDir(), devices: 1, sectors: LEN, region: REGION, policy: 'sync' }, dm);
    await dm.load('site0', `0 ${LEN} counting ${g.remote(0)} 0`); // the site's device counts what reaches it
    await dm.resume('site0');
    const c = counting.counts.get('site0')!;
    await dm.write('vol0', 8192, Buffer.alloc(4096, 1), { fua: true });
    expect(c).toMatchObject({ writes: 1, fuaWrites: 1 });
    const flushes = c.flushes;
    await dm.flush('vol0');
    expect(c.flushes).toBeGreaterThan(flushes);
    await dm.write('vol0', 16384, Buffer.alloc(4096, 2));
    expect(c).toMatchObject({ writes: 2, fuaWrites: 1 });
    expectSameBytes(readFileRange(g.remote(0), 8192, 12288), Buffer.concat([Buffer.alloc(4096, 1), Buffer.alloc(4096), Buffer.alloc(4096, 2)]), 'site image');
  });

  it('fallbehind: set, replaced and removed, shown in table and json; the table loads back', async () => {
    const grp = await group();
    await msg(grp, 'fallbehind', '1', 'ios', '5');
    expect(replTable(grp)).toMatch(/ blockdev 5 1 async ios 5 retest=1$/);
    expect(siteJson(grp.dm).fallBehind).toBe('ios 5');
    await msg(grp, 'fallbehind', '1', 'size=1m');
    expect(replTable(grp)).toMatch(/ blockdev 4 1 async size=1m retest=1$/);
    expect(siteJson(grp.dm).fallBehind).toBe('size=1m');
    await msg(grp, 'fallbehind', '1', 'timeout', '2s');
    const table = replTable(grp);
    expect(table).toMatch(/ blockdev 5 1 async timeout 2s retest=1$/);
    // the printed table is one `create` accepts, with the same result
    const vol = grp.dm.table('vol0')[0]!.params;
    await grp.dm.remove('vol0');
    await grp.dm.remove('repl');
    await grp.dm.create('repl', { table: `0 1 replicator ${table}` });
    await grp.dm.create('vol0', { table: `0 ${LEN} replicator-dev ${vol}` });
    expect(replTable(grp)).toBe(table);
    await msg(grp, 'fallbehind', '1', 'none');
    expect(replTable(grp)).toMatch(/ blockdev 3 1 async retest=1$/);
    expect(siteJson(grp.dm).fallBehind).toBeNull();
  });

  it('slink suspend: state D, the backlog stays in the ring and off the site; resume ships it', async () => {
    const grp = await group();
    const ev0 = grp.dm.get('repl').eventNr;
    await msg(grp, 'slink', 'suspend', '1');
    expect(grp.status()).toMatch(/^0:S,0,0 1:D,0,0 /);
    expect(volStatus(grp)).toBe(`A,1/1 D,${NR}/${NR}`);
    expect(siteJson(grp.dm).state).toBe('suspended');
    expect(grp.dm.get('repl').eventNr).toBeGreaterThan(ev0);
    const data = crypto.randomBytes(8 * 4096);
    for (let k = 0; k < 8; k++) await grp.dm.write('vol0', k * 65536, data.subarray(k * 4096, (k + 1) * 4096));
    // 8 entries of a 512-byte header and 4 KiB: 72 sectors of the ring
    expect(grp.status()).toBe('0:S,0,0 1:D,8,64 72/8192');
    await new Promise((r) => setTimeout(r, 300)); // two checkpoint ticks: nothing moves while suspended
    expect(grp.status()).toBe('0:S,0,0 1:D,8,64 72/8192');
    expect(fs.readFileSync(grp.remote(0)).equals(Buffer.alloc(LEN * SECTOR))).toBe(true);
    const ev1 = grp.dm.get('repl').eventNr;
    await msg(grp, 'slink', 'resume', '1');
    expect(grp.dm.get('repl').eventNr).toBeGreaterThan(ev1);
    await waitFor(() => grp.status() === '0:S,0,0 1:A,0,0 0/8192', 'caught up after resume, the ring emptied by a checkpoint');
    expect(volStatus(grp)).toBe(`A,1/1 A,${NR}/${NR}`);
    expectSameBytes(fs.readFileSync(grp.remote(0)), fs.readFileSync(grp.local(0)), 'remote after resume');
    for (let k = 0; k < 8; k++) expectSameBytes(readFileRange(grp.remote(0), k * 65536, 4096), data.subarray(k * 4096, (k + 1) * 4096), `write ${k}`);
  });

  it('statistics: counted, reset, off and on again', async () => {
    const grp = await group();
    for (let k = 0; k < 5; k++) await grp.dm.write('vol0', k * 4096, Buffer.alloc(4096, k + 1));
    await grp.dm.flush('vol0');
    expect(replJson(grp.dm).statistics).toMatchObject({ enabled: true, writes: 5, writeBytes: 5 * 4096, flushes: 1 });
    await msg(grp, 'statistics', 'reset');
    expect(replJson(grp.dm).statistics).toMatchObject({ enabled: true, writes: 0, writeBytes: 0, flushes: 0, overflows: 0 });
    await msg(grp, 'statistics', 'off');
    await grp.dm.write('vol0', 0, Buffer.alloc(8192, 9));
    await grp.dm.flush('vol0');
    expect(replJson(grp.dm).statistics).toMatchObject({ enabled: false, writes: 0, writeBytes: 0, flushes: 0 });
    await msg(grp, 'statistics', 'on');
    await grp.dm.write('vol0', 0, Buffer.alloc(8192, 10));
    expect(replJson(grp.dm).statistics).toMatchObject({ enabled: true, writes: 1, writeBytes: 8192, flushes: 0 });
  });

  it('replog resize: status, json and table show the new size, which survives a reload', async () => {
    const grp = await group();
    const rlog = path.join(grp.dir, 'rlog');
    await grp.dm.write('vol0', 0, Buffer.alloc(4096, 1));
    await msg(grp, 'replog', 'resize', '6144');
    expect(grp.status()).toMatch(/ \d+\/6144$/);
    expect(replJson(grp.dm).replog.sizeSectors).toBe(6144);
    expect(replTable(grp)).toMatch(new RegExp(`^ringbuffer 4 ${rlog} 0 open 6144 `));
    const data = crypto.randomBytes(64 * 1024);
    await grp.dm.write('vol0', 65536, data);
    await waitFor(() => caughtUp(grp), 'caught up after shrinking');
    const table = replTable(grp);
    const vol = grp.dm.table('vol0')[0]!.params;
    await grp.dm.remove('vol0');
    await grp.dm.remove('repl');
    // the header wins: a table naming another size opens the resized log as it is
    await grp.dm.create('repl', { table: `0 1 replicator ${table.replace(' open 6144 ', ' open 8192 ')}` });
    await grp.dm.create('vol0', { table: `0 ${LEN} replicator-dev ${vol}` });
    expect(grp.status()).toMatch(/ \d+\/6144$/);
    await msg(grp, 'replog', 'resize', '8256'); // grow: the whole file
    expect(grp.status()).toMatch(/ \d+\/8256$/);
    expectSameBytes(readFileRange(grp.remote(0), 65536, data.length), data, 'write made between the resizes');
  });

  it('resync 1 full: R while it copies every region, then A and the images equal', async () => {
    const grp = await group();
    const data = await fillVol(grp);
    await waitFor(() => caughtUp(grp), 'caught up');
    // the site's image damaged behind dmkit's back in three regions
    for (const r of [2, 9, 30]) pokeFile(grp.remote(0), r * REGION * SECTOR + 1000, Buffer.alloc(600, 0xee));
    const before = siteJson(grp.dm).resyncedBytes;
    await msg(grp, 'resync-rate', String(512 * 1024)); // 1 MiB at 512 KiB/s: long enough to be seen
    const ev = grp.dm.get('repl').eventNr;
    await msg(grp, 'resync', '1', 'full');
    expect(slinkState(grp.dm)).toBe('R');
    expect(volStatus(grp)).toMatch(new RegExp(`^A,1/1 R,\\d+\\+?/${NR}$`));
    expect(siteJson(grp.dm)).toMatchObject({ mode: 'dirty-log', consistent: false });
    expect(grp.dm.get('repl').eventNr).toBeGreaterThan(ev);
    await waitFor(() => caughtUp(grp), 'resynced', 20_000);
    expect(volStatus(grp)).toBe(`A,1/1 A,${NR}/${NR}`);
    expect(siteJson(grp.dm)).toMatchObject({ mode: 'in-order', consistent: true });
    expect(siteJson(grp.dm).resyncedBytes - before).toBe(LEN * SECTOR); // every region, once
    expectImagesEqual(grp, data, 'after resync full');
  });

  it('verify 1 counts exactly the regions damaged behind dmkit\'s back; resync 1 repairs exactly those', async () => {
    const grp = await group();
    const data = await fillVol(grp);
    await waitFor(() => caughtUp(grp), 'caught up');
    await msg(grp, 'verify', '1');
    await waitFor(() => siteJson(grp.dm).lastVerify !== null, 'first verify');
    expect(siteJson(grp.dm).lastVerify).toEqual({ differing: 0, regions: NR });

    const damaged = [0, 5, 17, 31];
    pokeFile(grp.remote(0), 5 * REGION * SECTOR, Buffer.alloc(512, 0x5a)); // first sector of region 5
    pokeFile(grp.remote(0), 6 * REGION * SECTOR - 1, Buffer.from([data[6 * REGION * SECTOR - 1]! ^ 1])); // last byte of region 5
    pokeFile(grp.remote(0), 17 * REGION * SECTOR + 7777, Buffer.from('garbage'));
    pokeFile(grp.remote(0), 3, Buffer.from([data[3]! ^ 0xff]));
    pokeFile(grp.remote(0), LEN * SECTOR - 4096, Buffer.alloc(4096));
    const first = siteJson(grp.dm).lastVerify;
    expect(await msg(grp, 'verify', '1')).toBe('verify started');
    await waitFor(() => siteJson(grp.dm).lastVerify !== first, 'second verify');
    expect(siteJson(grp.dm).lastVerify).toEqual({ differing: damaged.length, regions: NR });
    expect(volStatus(grp)).toBe(`A,1/1 A,${NR - damaged.length}/${NR}`);
    // verify only marks: the site's bytes are still the damaged ones
    expect(readFileRange(grp.remote(0), 17 * REGION * SECTOR + 7777, 7).toString()).toBe('garbage');

    const before = siteJson(grp.dm).resyncedBytes;
    await msg(grp, 'resync', '1');
    await waitFor(() => caughtUp(grp) && volStatus(grp) === `A,1/1 A,${NR}/${NR}`, 'repaired');
    expect(siteJson(grp.dm).resyncedBytes - before).toBe(damaged.length * REGION * SECTOR);
    expectImagesEqual(grp, data, 'after verify + resync');
  });

  it('verify under a running writer: writes in flight are no false positives, the one damaged region is found', async () => {
    const grp = await group();
    const data = await fillVol(grp);
    await waitFor(() => caughtUp(grp), 'caught up');
    pokeFile(grp.remote(0), 3 * REGION * SECTOR + 100, Buffer.from('damage'));
    let stop = false;
    let writes = 0;
    const writer = (async () => {
      while (!stop) { // regions 16-31 only
        const off = (16 * REGION + crypto.randomInt(16 * REGION / 8) * 8) * SECTOR;
        const block = crypto.randomBytes(4096);
        await grp.dm.write('vol0', off, block);
        block.copy(data, off);
        writes++;
      }
    })();
    try {
      await waitFor(() => writes > 20, 'the writer going');
      await msg(grp, 'verify', '1');
      await waitFor(() => siteJson(grp.dm).lastVerify !== null, 'the verify');
    } finally {
      stop = true;
      await writer;
    }
    expect(siteJson(grp.dm).lastVerify).toEqual({ differing: 1, regions: NR });
    expect(volStatus(grp)).toBe(`A,1/1 A,${NR - 1}/${NR}`);
    await msg(grp, 'resync', '1');
    await waitFor(() => caughtUp(grp) && volStatus(grp) === `A,1/1 A,${NR}/${NR}`, 'repaired');
    expectImagesEqual(grp, data, 'after verify under writes + resync');
  });

  it('verify of a suspended slink with a backlog holds no write (refused, or done without waiting for the site)', async () => {
    const grp = await group();
    await msg(grp, 'slink', 'suspend', '1');
    await grp.dm.write('vol0', 0, Buffer.alloc(4096, 1)); // a backlog the site cannot take while suspended
    const reply = await msg(grp, 'verify', '1').catch((e: Error) => e.message);
    expect(reply).toMatch(/^(verify started|slink 1 is (down|suspended): nothing to verify against)$/);
    for (const r of [0, 1, NR - 1]) {
      const write = grp.dm.write('vol0', r * REGION * SECTOR, Buffer.alloc(4096, 2));
      const held = await Promise.race([write.then(() => false), new Promise<boolean>((res) => setTimeout(() => res(true), 3000))]);
      expect(held, `a write to region ${r} is held by the verify of a suspended slink`).toBe(false);
    }
    await msg(grp, 'slink', 'resume', '1');
    if (reply === 'verify started') await waitFor(() => siteJson(grp.dm).lastVerify !== null, 'the verify');
    await waitFor(() => caughtUp(grp), 'caught up');
    expectSameBytes(fs.readFileSync(grp.remote(0)), fs.readFileSync(grp.local(0)), 'remote after resume');
  });

  it('clear-bitmap 1 declares the site in sync without copying (seeding); later writes ship in order', async () => {
    const grp = await group();
    await msg(grp, 'slink', 'suspend', '1');
    const data = await fillVol(grp); // never shipped: the site is suspended
    await msg(grp, 'resync', '1', 'full');
    expect(volStatus(grp)).toBe(`A,1/1 D,0/${NR}`);
    // the "truck": the image copied by hand, except region 20, which the operator got wrong
    fs.copyFileSync(grp.local(0), grp.remote(0));
    pokeFile(grp.remote(0), 20 * REGION * SECTOR, Buffer.alloc(REGION * SECTOR, 0x77));
    const resynced = siteJson(grp.dm).resyncedBytes;
    await msg(grp, 'clear-bitmap', '1');
    expect(volStatus(grp)).toBe(`A,1/1 D,${NR}/${NR}`);
    await msg(grp, 'slink', 'resume', '1');
    const later = crypto.randomBytes(4096);
    await grp.dm.write('vol0', 3 * REGION * SECTOR, later);
    data.set(later, 3 * REGION * SECTOR);
    await waitFor(() => caughtUp(grp), 'caught up after clear-bitmap');
    expect(volStatus(grp)).toBe(`A,1/1 A,${NR}/${NR}`);
    expect(siteJson(grp.dm).resyncedBytes).toBe(resynced); // nothing copied
    const remote = fs.readFileSync(grp.remote(0));
    expectSameBytes(remote.subarray(3 * REGION * SECTOR, 4 * REGION * SECTOR), data.subarray(3 * REGION * SECTOR, 4 * REGION * SECTOR), 'region written after clear-bitmap');
    expect(remote.subarray(20 * REGION * SECTOR, 21 * REGION * SECTOR).equals(Buffer.alloc(REGION * SECTOR, 0x77))).toBe(true);
    remote.fill(0x77, 20 * REGION * SECTOR, 21 * REGION * SECTOR);
    data.fill(0x77, 20 * REGION * SECTOR, 21 * REGION * SECTOR);
    expectSameBytes(remote, data, 'everything else as the truck brought it');
  });
});

describe('the control device', () => {
  it('reads return zeroes, writes fail with EPERM, flushes succeed', async () => {
    const grp = await group();
    const buf = Buffer.alloc(SECTOR, 0xa5);
    await grp.dm.get('repl').submit({ op: 'read', sector: 0, sectors: 1, data: buf, flags: {} });
    expect(buf.equals(Buffer.alloc(SECTOR))).toBe(true);
    const err = await rejection(grp.dm.write('repl', 0, Buffer.alloc(SECTOR, 1)));
    expect(err.code).toBe('EPERM');
    expect(err.message).toBe('repl: the replicator control device carries no data');
    await grp.dm.flush('repl');
    expect(replJson(grp.dm).statistics.writes).toBe(0);
  });

  it('raises an event when the site goes down and when it comes back', async () => {
    const grp = await group();
    await grp.dm.write('vol0', 0, Buffer.alloc(4096, 1));
    await waitFor(() => caughtUp(grp), 'caught up');
    const ev0 = grp.dm.get('repl').eventNr;
    await grp.breakSite();
    const waitDown = grp.dm.wait('repl', ev0);
    await grp.dm.write('vol0', 4096, Buffer.alloc(4096, 2));
    expect(await waitDown).toBeGreaterThan(ev0);
    await waitFor(() => slinkState(grp.dm) === 'D', 'slink 1 down');
    const ev1 = grp.dm.get('repl').eventNr;
    expect(ev1).toBeGreaterThan(ev0);
    await grp.healSite();
    await waitFor(() => caughtUp(grp), 'back after the retest');
    expect(grp.dm.get('repl').eventNr).toBeGreaterThan(ev1);
    expectSameBytes(fs.readFileSync(grp.remote(0)), fs.readFileSync(grp.local(0)), 'remote after the site came back');
  });
});
