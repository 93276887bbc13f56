/**
 * Checksum resync and verify over the `blockdev` slink (the site's blocks are read by the
 * replicator itself and compared with the local ones byte for byte): damage written into the site's image behind
 * dmkit's back is found region by region, `resync 1 checksum` sends exactly the 4 KiB
 * blocks that differ (status --json: resyncedBytes, comparedBytes), `resync 1 full
 * checksum` compares every region and still sends only those blocks; the images end equal
 * to the local image written through dmkit (the reference).
 *
 * Engine: the library, over real image files (test/helpers/replication.ts).
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import { describe, expect, it } from 'vitest';
import { caughtUp, groupPerTest, pokeFile, SECTOR, siteJson, waitFor, type Group } from '../helpers/replication.ts';
import { expectSameBytes } from './helpers.ts';

const LEN = 4096; // sectors (2 MiB)
const REGION = 256; // 128 KiB regions
const NR = LEN / REGION; // 16
const BLOCK = 4096;

const group = groupPerTest({ devices: 1, sectors: LEN, region: REGION });
const msg = (grp: Group, ...words: string[]): Promise<string> => grp.dm.message('repl', 0, words);
const volStatus = (grp: Group): string => grp.dm.status('vol0')[0]!.params;
const stats = (grp: Group): { resyncedBytes: number; comparedBytes: number } => siteJson(grp.dm) as unknown as { resyncedBytes: number; comparedBytes: number };

async function fillVol(grp: Group): Promise<Buffer> {
  const data = crypto.randomBytes(LEN * SECTOR);
  for (let off = 0; off < data.length; off += 64 * 1024) await grp.dm.write('vol0', off, data.subarray(off, off + 64 * 1024));
  await grp.dm.flush('vol0');
  await waitFor(() => caughtUp(grp), 'caught up');
  return data;
}

/** damage 5 blocks in 3 regions: region 1 (one byte), region 6 (two adjacent blocks), region 15 (two blocks apart, the last of the device) */
function damage(grp: Group, data: Buffer): number {
  const at = [1 * REGION * SECTOR + 3 * BLOCK + 17, 6 * REGION * SECTOR, 6 * REGION * SECTOR + BLOCK + 100, 15 * REGION * SECTOR + 2 * BLOCK, LEN * SECTOR - 1];
  for (const off of at) pokeFile(grp.remote(0), off, Buffer.from([data[off]! ^ 0xa5]));
  return at.length;
}

async function verify(grp: Group): Promise<{ differing: number; regions: number }> {
  const before = siteJson(grp.dm).lastVerify;
  expect(await msg(grp, 'verify', '1')).toBe('verify started');
  await waitFor(() => siteJson(grp.dm).lastVerify !== before, 'verify');
  return siteJson(grp.dm).lastVerify!;
}

describe('checksum resync and verify by digests (blockdev)', () => {
  it('verify finds exactly the damaged regions; resync 1 checksum sends exactly the damaged blocks', async () => {
    const grp = await group();
    const data = await fillVol(grp);
    const blocks = damage(grp, data);
    const compared0 = stats(grp).comparedBytes;
    expect(await verify(grp)).toEqual({ differing: 3, regions: NR });
    expect(stats(grp).comparedBytes - compared0).toBe(LEN * SECTOR); // every region compared once
    expect(volStatus(grp)).toBe(`A,1/1 A,${NR - 3}/${NR}`);

    const { resyncedBytes, comparedBytes } = stats(grp);
    await msg(grp, 'resync', '1', 'checksum');
    await waitFor(() => caughtUp(grp) && volStatus(grp) === `A,1/1 A,${NR}/${NR}`, 'repaired');
    expect(stats(grp).resyncedBytes - resyncedBytes).toBe(blocks * BLOCK);
    expect(stats(grp).comparedBytes - comparedBytes).toBe(3 * REGION * SECTOR);
    expectSameBytes(fs.readFileSync(grp.remote(0)), fs.readFileSync(grp.local(0)), 'site against local after checksum resync');
    expectSameBytes(fs.readFileSync(grp.local(0)), data, 'local image');
    expect(await verify(grp)).toEqual({ differing: 0, regions: NR });
  });

  it('resync 1 full checksum compares every region and sends only the damaged blocks; plain resync full sends everything', async () => {
    const grp = await group();
    const data = await fillVol(grp);
    const blocks = damage(grp, data);
    const { resyncedBytes, comparedBytes } = stats(grp);
    await msg(grp, 'resync', '1', 'full', 'checksum');
    await waitFor(() => caughtUp(grp) && volStatus(grp) === `A,1/1 A,${NR}/${NR}`, 'full checksum resync');
    expect(stats(grp).resyncedBytes - resyncedBytes).toBe(blocks * BLOCK);
    expect(stats(grp).comparedBytes - comparedBytes).toBe(LEN * SECTOR);
    expectSameBytes(fs.readFileSync(grp.remote(0)), fs.readFileSync(grp.local(0)), 'site after full checksum resync');

    // checksum is not sticky: once the site is in sync, a plain full resync copies every region
    const after = stats(grp);
    await msg(grp, 'resync', '1', 'full');
    await waitFor(() => caughtUp(grp) && volStatus(grp) === `A,1/1 A,${NR}/${NR}`, 'plain full resync');
    expect(stats(grp).resyncedBytes - after.resyncedBytes).toBe(LEN * SECTOR);
    expect(stats(grp).comparedBytes).toBe(after.comparedBytes);
  });
});
