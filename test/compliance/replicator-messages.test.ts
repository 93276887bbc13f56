/**
 * What each replicator message does, seen in status, table, `--json` and the images'
 * bytes: policy (and a sync site getting FUA and flush before the ack), fallbehind,
 * slink suspend/resume, statistics, replog resize, resync full, verify (damage written
 * behind dmkit's back into the site's image, found region by region, also under a running
 * writer, then repaired by resync), clear-bitmap (seeding); then the control device itself
 * (zeroes on read, EPERM on write) and its events. Errors: replicator-errors.test.ts.
 *
 * Engine: the library, over real image files; the site's devices are `dm:` linear devices
 * (test/helpers/replication.ts), changed behind dmkit's back only by writing their files.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { builtinTargets, DeviceMapper } from '../../src/index.ts';
import {
  caughtUp, groupPerTest, pokeFile, readFileRange, rejectionOf as rejection, replJson, SECTOR, siteJson, slinkState, waitFor,
  type Group,
} from '../helpers/replication.ts';
import { countingTarget, expectSameBytes } from './helpers.ts'; // also quiets the engine's warnings

const LEN = 2048; // sectors of the replicated device (1 MiB)
const REGION = 64;
const NR = LEN / REGION; // 32

const group = groupPerTest({ devices: 1, sectors: LEN, region: REGION });

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
    const g = await group('sync', dm);
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
