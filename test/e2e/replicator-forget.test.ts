/**
 * Devices of a group that are not loaded after a restart: their kept log entries hold the
 * ring (the sites ship a device's entries, and recovery replays them, only once it is
 * bound), the group says which device holds it, and `forget <dev#>` gives them up; a device
 * removed from the group is not waited for after a restart. Real engines over real files,
 * restarted by closing one engine and opening the same files in another; every scenario
 * ends with images compared against a reference model or the local image. (`forget`'s
 * refusals: test/compliance/replicator-errors.test.ts.)
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { DeviceMapper } from '../../src/index.ts';
import { caughtUp, makeGroup, Model, tmpDir, waitFor, type Group } from '../helpers/replication.ts';

let g: Group | null = null;
afterEach(async () => {
  await g?.dm.close();
  if (g) fs.rmSync(g.dir, { recursive: true, force: true });
  g = null;
});

/** the same files in a new engine: the sites, the replicator, and the replicator-devs `vols` */
async function reopen(grp: Group, vols: number[], events?: string[]): Promise<Group> {
  const replTable = grp.dm.table('repl')[0]!.params;
  await grp.dm.close();
  const dm = new DeviceMapper();
  if (events) dm.on('device-event', (e: { name: string; text?: string }) => { if (e.name === 'repl' && e.text) events.push(e.text); });
  for (let i = 0; i < grp.spec.devices; i++) await dm.create(`site${i}`, { table: `0 ${grp.spec.sectors} linear ${grp.remote(i)} 0` });
  await dm.create('repl', { table: `0 1 replicator ${replTable}` });
  for (const i of vols) await dm.create(`vol${i}`, { table: grp.devTable(i) });
  return { ...grp, dm, status: () => dm.status('repl')[0]!.params };
}

/** more 64 KiB writes to vol0 than the ring holds, recorded in `model` (not awaited) */
function fillRing(grp: Group, model: Model): Promise<void> {
  return (async () => {
    for (let k = 0; k < 48; k++) {
      const data = crypto.randomBytes(65536);
      await grp.dm.write('vol0', (k % 16) * 65536, data);
      model.write((k % 16) * 65536, data);
    }
  })();
}

/** writes of `n` random 4 KiB blocks to `vol` (within its first 1 MiB, where fillRing does not write for vol0) */
async function writeBlocks(grp: Group, vol: string, n: number, model?: Model): Promise<void> {
  for (let k = 0; k < n; k++) {
    const data = crypto.randomBytes(4096);
    const at = (256 + crypto.randomInt(1792 - 8)) * 512;
    await grp.dm.write(vol, at, data);
    model?.write(at, data);
  }
}

const file = (f: string): Buffer => fs.readFileSync(f);

describe('replicator: devices not loaded after a restart', () => {
  it('one that stays away holds the full ring and the group says so; `forget` lets the writers go, and if it comes back every site of it is verified whole', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 2, sectors: 4096, ring: 4096 });
    // the site misses vol1's writes (suspended), so the ring keeps them past the clean stop
    await g.dm.message('repl', 0, ['slink', 'suspend', '1']);
    await writeBlocks(g, 'vol1', 20);
    const events: string[] = [];
    g = await reopen(g, [0], events); // vol1's replicator-dev is not loaded again
    const model0 = new Model(4096);
    fs.readFileSync(g.local(0)).copy(model0.bytes);
    const writes = fillRing(g, model0);
    await waitFor(() => events.some((t) => t.startsWith('replication log full: device 1 not loaded since the restart holds it')), 'the group to say what holds the ring');
    let done = false;
    void writes.then(() => { done = true; });
    await new Promise((r) => setTimeout(r, 300));
    expect(done, 'writers wait: the site has not taken vol1\'s entries').toBe(false);
    await g.dm.message('repl', 0, ['forget', '1']);
    await writes;
    await waitFor(() => caughtUp(g!), 'vol0 shipped');
    expect(file(g.local(0)).equals(model0.bytes)).toBe(true);
    expect(file(g.remote(0)).equals(model0.bytes)).toBe(true);
    expect(events).toContain('device 1 forgotten: no site is sent its logged writes; if it is loaded again, every site verifies it whole (checksum resync)');
    expect(file(g.remote(1)).equals(file(g.local(1))), 'the site lacks vol1\'s forgotten writes').toBe(false);
    // kept across a restart: vol1 comes back, and its site is made equal to its image
    const events2: string[] = [];
    g = await reopen(g, [0, 1], events2);
    await waitFor(() => events2.includes('device 1 (vol1) was forgotten: every site verifies it whole (checksum resync)'), 'vol1 verified whole');
    await waitFor(() => caughtUp(g!) && g!.dm.status('vol1')[0]!.params === 'A,1/1 A,64/64', 'vol1 resynced');
    expect(file(g.remote(1)).equals(file(g.local(1)))).toBe(true);
    expect(file(g.remote(0)).equals(model0.bytes)).toBe(true);
    // verified once: a further restart does not verify it again
    const events3: string[] = [];
    g = await reopen(g, [0, 1], events3);
    await waitFor(() => caughtUp(g!), 'in order');
    expect(events3.filter((t) => t.includes('forgotten'))).toEqual([]);
  });

  it('a device removed while the site was behind is not waited for after a restart: the site ships the others\' writes', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 2, sectors: 4096 });
    await g.dm.message('repl', 0, ['slink', 'suspend', '1']);
    const model0 = new Model(4096);
    await writeBlocks(g, 'vol1', 10);
    await writeBlocks(g, 'vol0', 10, model0);
    await g.dm.remove('vol1'); // its entries go to its dirty log; the site skips them
    await writeBlocks(g, 'vol0', 10, model0);
    g = await reopen(g, [0]);
    await waitFor(() => caughtUp(g!), 'vol0 shipped past vol1\'s entries').catch((e) => { throw new Error(`${e.message}: ${g!.status()}`); });
    expect(file(g.remote(0)).equals(model0.bytes)).toBe(true);
    expect(g.dm.status('vol0')[0]!.params).toBe('A,1/1 A,64/64');
  });
});
