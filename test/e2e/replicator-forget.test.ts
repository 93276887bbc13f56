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
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { DeviceMapper } from '../../src/index.ts';
import { caughtUp, makeGroup, Model, tmpDir, waitFor, type Group } from '../helpers/replication.ts';
import { fromAnotherBoot } from '../helpers/power-loss.ts';

let g: Group | null = null;
afterEach(async () => {
  await g?.dm.close();
  if (g) fs.rmSync(g.dir, { recursive: true, force: true });
  g = null;
});

/** every file of the group as it is now: what a SIGKILL leaves (the page cache is kept) */
function snapshot(grp: Group): Map<string, Buffer> {
  const m = new Map<string, Buffer>();
  for (const f of fs.readdirSync(grp.dir)) m.set(path.join(grp.dir, f), fs.readFileSync(path.join(grp.dir, f)));
  return m;
}

/**
 * The same files in a new engine: the sites, the replicator, and the replicator-devs `vols`.
 * With `killed`, the files are put back as they were then (the engine was SIGKILLed there).
 */
async function reopen(grp: Group, vols: number[], events?: string[], killed?: Map<string, Buffer>): Promise<Group> {
  const replTable = grp.dm.table('repl')[0]!.params;
  await grp.dm.close();
  for (const [f, bytes] of killed ?? []) fs.writeFileSync(f, bytes);
  const dm = new DeviceMapper();
  if (events) dm.on('device-event', (e: { name: string; text?: string }) => { if (e.name === 'repl' && e.text) events.push(e.text); });
  for (let i = 0; i < grp.spec.devices; i++) await dm.create(`site${i}`, { table: `0 ${grp.spec.sectors} linear ${grp.remote(i)} 0` });
  await dm.create('repl', { table: `0 1 replicator ${replTable}` });
  for (const i of vols) await dm.create(`vol${i}`, { table: grp.devTable(i) });
  const swap = async (table: (i: number) => string): Promise<void> => {
    for (let i = 0; i < grp.spec.devices; i++) {
      await dm.load(`site${i}`, table(i));
      await dm.resume(`site${i}`);
    }
  };
  return {
    ...grp, dm, status: () => dm.status('repl')[0]!.params,
    breakSite: () => swap(() => `0 ${grp.spec.sectors} error`),
    healSite: () => swap((i) => `0 ${grp.spec.sectors} linear ${grp.remote(i)} 0`),
  };
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

/** a group of two whose site has missed (slink suspended) 10 writes of vol1, then `vol0Writes` of vol0; with vol0's model */
async function siteBehind(vol0Writes: number): Promise<{ grp: Group; model0: Model }> {
  const grp = await makeGroup({ dir: tmpDir(), devices: 2, sectors: 4096 });
  await grp.dm.message('repl', 0, ['slink', 'suspend', '1']);
  const model0 = new Model(4096);
  await writeBlocks(grp, 'vol1', 10);
  await writeBlocks(grp, 'vol0', vol0Writes, model0);
  return { grp, model0 };
}

/** a group whose site is slow, 60 writes of vol1 (and 30 of vol0) behind at the site, and vol1's remove begun (not awaited) */
async function removeBehindSlowSite(): Promise<{ grp: Group; removing: Promise<unknown> }> {
  const grp = await makeGroup({ dir: tmpDir(), devices: 2, sectors: 4096 });
  await grp.slowSite(40);
  for (let k = 0; k < 30; k++) { // one epoch each; vol0's among them, so entries of either may be in flight when the remove ends
    await writeBlocks(grp, 'vol1', 2);
    await writeBlocks(grp, 'vol0', 1);
  }
  return { grp, removing: grp.dm.remove('vol1') }; // a healthy site gets up to 2 s to take the rest in order
}

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

  it('a resync that cannot mark the entries of one not loaded lets the other devices\' writers go between its tries, past its converging passes', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 2, sectors: 4096, ring: 65536 });
    await g.dm.message('repl', 0, ['slink', 'suspend', '1']);
    await writeBlocks(g, 'vol1', 10);
    const events: string[] = [];
    g = await reopen(g, [0], events); // vol1 not loaded: its entries cannot be marked at the site
    await g.dm.message('repl', 0, ['resync', '1']);
    const model0 = new Model(4096);
    fs.readFileSync(g.local(0)).copy(model0.bytes);
    // passes 1-3 run under the writer; from the 4th, each try holds the writers for at most
    // a second and then lets them go for one: 8 s covers about three such tries. A write
    // every 20 ms (the ring holds them all: nothing waits for ring space)
    const doneAt: number[] = [];
    const t0 = Date.now();
    let stop = false;
    const writer = (async () => {
      while (!stop) {
        await writeBlocks(g!, 'vol0', 1, model0);
        doneAt.push(Date.now() - t0);
        await new Promise((r) => setTimeout(r, 20));
      }
    })();
    await new Promise((r) => setTimeout(r, 8000));
    const late = doneAt.filter((t) => t > 6000).length;
    await g.dm.message('repl', 0, ['forget', '1']);
    stop = true;
    await writer;
    expect(late, `writes completed in the last 2 s of 8 (of ${doneAt.length})`).toBeGreaterThan(0);
    expect(file(g.local(0)).equals(model0.bytes)).toBe(true);
    await waitFor(() => caughtUp(g!), 'the resync done once vol1 is forgotten');
    expect(file(g.remote(0)).equals(model0.bytes)).toBe(true);
  });

  it('a device removed, then a power loss that loses entries up to its leaving point: its number\'s new writes reach the site', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 2, sectors: 4096 });
    await g.dm.message('repl', 0, ['slink', 'suspend', '1']); // the ring keeps vol1's entries
    await writeBlocks(g, 'vol1', 5);
    const rlog = path.join(g.dir, 'rlog');
    const flushedLog = file(rlog); // what the disk had of the ring when the power went
    await writeBlocks(g, 'vol1', 5);
    await g.dm.remove('vol1'); // left at the head: its 10 entries (its slot written FUA)
    await new Promise((r) => setTimeout(r, 400));
    const killed = snapshot(g);
    const log = killed.get(rlog)!;
    flushedLog.copy(log, 12288, 12288); // the ring's entries as last flushed; the slots as written (FUA)
    fromAnotherBoot(log);
    const events: string[] = [];
    g = await reopen(g, [0, 1], events, killed); // vol1 (device 1) loaded again
    await waitFor(() => events.some((t) => t.includes('not closed cleanly')), 'the power loss found');
    await g.dm.message('repl', 0, ['slink', 'resume', '1']).catch(() => undefined);
    await waitFor(() => caughtUp(g!), 'verified and in order');
    await writeBlocks(g, 'vol1', 8); // entries that take the lost entries' seqs
    await waitFor(() => caughtUp(g!), 'shipped');
    expect(file(g.remote(1)).equals(file(g.local(1))), 'the site has device 1\'s new writes').toBe(true);
  });

  it('a site on its dirty logs is not declared in sync while a device of the group is not loaded yet', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 2, sectors: 4096, ring: 4096 });
    await g.breakSite();
    const model1 = new Model(4096);
    fs.readFileSync(g.local(1)).copy(model1.bytes);
    for (let k = 0; k < 48; k++) { // more than the ring: the dead site goes to its dirty logs
      const data = crypto.randomBytes(65536);
      await g.dm.write('vol1', (k % 16) * 65536, data);
      model1.write((k % 16) * 65536, data);
    }
    await waitFor(() => /^0:S,0,0 1:D/.test(g!.status()), 'the site down');
    // vol1's table as the engine saves it (no `nosync`: its dirty log is kept, not started anew)
    const vol1Table = `0 4096 replicator-dev ${g.dm.table('vol1')[0]!.params}`;
    const events: string[] = [];
    g = await reopen(g, [0], events); // the site healed; vol1 (all its writes out of sync there) not loaded
    const states: string[] = [];
    const t0 = Date.now();
    while (Date.now() - t0 < 3000) {
      states.push(g.status().split(' ')[1]!.split(',')[0]!);
      await new Promise((r) => setTimeout(r, 20));
    }
    expect(states.filter((x) => x === '1:A'), 'declared in sync without vol1').toEqual([]);
    expect(events.filter((t) => t.includes('in sync: shipping in order'))).toEqual([]);
    await g.dm.create('vol1', { table: vol1Table });
    await waitFor(() => caughtUp(g!) && g!.dm.status('vol1')[0]!.params === 'A,1/1 A,64/64', 'vol1 resynced once loaded');
    expect(file(g.local(1)).equals(model1.bytes), 'local').toBe(true);
    expect(file(g.remote(1)).equals(model1.bytes), `remote; events ${JSON.stringify(events)}`).toBe(true);
  });

  it('clear-bitmap is refused while a device of the group is not loaded (it would hold the writers for it); the writers go on', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 2, sectors: 4096 });
    await g.dm.message('repl', 0, ['slink', 'suspend', '1']);
    await writeBlocks(g, 'vol1', 5);
    g = await reopen(g, [0]);
    await g.dm.message('repl', 0, ['slink', 'resume', '1']).catch(() => undefined);
    await g.dm.message('repl', 0, ['resync', '1']); // on its dirty logs: clear-bitmap would wait for vol1's entries to be marked
    await expect(g.dm.message('repl', 0, ['clear-bitmap', '1'])).rejects.toMatchObject({
      code: 'EBUSY', message: expect.stringContaining('clear-bitmap 1: device 1 is of the group but not loaded since the restart'),
    });
    const model0 = new Model(4096);
    fs.readFileSync(g.local(0)).copy(model0.bytes);
    await writeBlocks(g, 'vol0', 5, model0); // not held
    expect(file(g.local(0)).equals(model0.bytes)).toBe(true);
    await g.dm.message('repl', 0, ['forget', '1']);
    await g.dm.message('repl', 0, ['clear-bitmap', '1']);
  });

  it('one not loaded while its site is down holds the full ring without sending the site to its dirty logs; the group says so, and `forget` lets the writers go', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 2, sectors: 4096, ring: 4096 });
    await g.dm.message('repl', 0, ['slink', 'suspend', '1']);
    await writeBlocks(g, 'vol1', 20);
    const events: string[] = [];
    g = await reopen(g, [0], events);
    await g.breakSite(); // down: no shipping loop runs for it
    const model0 = new Model(4096);
    fs.readFileSync(g.local(0)).copy(model0.bytes);
    const writes = fillRing(g, model0);
    await waitFor(() => events.some((t) => t.startsWith('replication log full: device 1 not loaded since the restart holds it')), 'the group to say what holds the ring');
    expect(events.filter((t) => t.includes('on its dirty logs'))).toEqual([]);
    await g.dm.message('repl', 0, ['forget', '1']);
    await writes;
    await g.healSite();
    await waitFor(() => caughtUp(g!), 'vol0 shipped once the site is back');
    expect(file(g.remote(0)).equals(model0.bytes)).toBe(true);
  });

  it('a device removed while the site was behind is not waited for after a restart: the site ships the others\' writes', async () => {
    const { grp, model0 } = await siteBehind(10);
    g = grp;
    await g.dm.remove('vol1'); // its entries go to its dirty log; the site skips them
    await writeBlocks(g, 'vol0', 10, model0);
    g = await reopen(g, [0]);
    await waitFor(() => caughtUp(g!), 'vol0 shipped past vol1\'s entries').catch((e) => { throw new Error(`${e.message}: ${g!.status()}`); });
    expect(file(g.remote(0)).equals(model0.bytes)).toBe(true);
    expect(g.dm.status('vol0')[0]!.params).toBe('A,1/1 A,64/64');
  });

  it('a device number removed and used again: the new device\'s writes reach the site after a SIGKILL, the old one\'s kept entries do not', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 2, sectors: 4096 });
    await g.dm.message('repl', 0, ['slink', 'suspend', '1']);
    const model0 = new Model(4096);
    await writeBlocks(g, 'vol0', 3, model0); // the site stops at vol0's first entry until vol0 binds after the restart
    await writeBlocks(g, 'vol1', 10); // the old vol1's, kept for the site (then in vol1's dirty log)
    await g.dm.remove('vol1');
    await new Promise((r) => setTimeout(r, 600)); // checkpointed: vol1 left
    // the number used again, by a device over other files (zeroed images, their own dirty log)
    for (const f of ['local9.img', 'remote9.img']) fs.writeFileSync(path.join(g.dir, f), Buffer.alloc(4096 * 512));
    fs.writeFileSync(path.join(g.dir, 'dlog9'), Buffer.alloc(64 * 512));
    await g.dm.create('site9', { table: `0 4096 linear ${path.join(g.dir, 'remote9.img')} 0` });
    const table9 = g.devTable(1).replace(g.local(1), path.join(g.dir, 'local9.img')).replace('dm:site1', 'dm:site9').replace(path.join(g.dir, 'dlog1'), path.join(g.dir, 'dlog9'));
    await g.dm.create('vol9', { table: table9 });
    const model9 = new Model(4096);
    await writeBlocks(g, 'vol9', 10, model9);
    const killed = snapshot(g); // SIGKILL: no checkpoint since these writes
    const replTable = g.dm.table('repl')[0]!.params;
    await g.dm.close();
    for (const [f, bytes] of killed) fs.writeFileSync(f, bytes);
    // vol9 (device 1) bound before vol0, on whose first entry the site waits: it meets the old
    // device 1's entries with device 1 bound
    const dm = new DeviceMapper();
    for (const n of [0, 1, 9]) await dm.create(`site${n}`, { table: `0 4096 linear ${path.join(g.dir, `remote${n}.img`)} 0` });
    await dm.create('repl', { table: `0 1 replicator ${replTable}` });
    await dm.create('vol9', { table: table9 });
    await dm.create('vol0', { table: g.devTable(0) });
    g = { ...g, dm, status: () => dm.status('repl')[0]!.params };
    await waitFor(() => caughtUp(g!), 'caught up after the restart');
    expect(file(path.join(g.dir, 'local9.img')).equals(model9.bytes)).toBe(true);
    expect(file(path.join(g.dir, 'remote9.img')).equals(model9.bytes), 'the new device\'s site: its writes, none of the old one\'s').toBe(true);
    expect(dm.status('vol9')[0]!.params).toBe('A,1/1 A,64/64');
    expect(file(g.remote(0)).equals(model0.bytes)).toBe(true);
  });

  it('a SIGKILL while `remove` waits for a slow site to take the device\'s backlog: after the restart the site gets it, from the ring', async () => {
    const { grp, removing } = await removeBehindSlowSite();
    g = grp;
    await new Promise((r) => setTimeout(r, 1000)); // checkpoints meanwhile
    const killed = snapshot(g);
    await removing;
    g = await reopen(g, [0, 1], undefined, killed);
    await waitFor(() => caughtUp(g!) && g!.dm.status('vol1')[0]!.params === 'A,1/1 A,64/64', 'caught up after the restart');
    expect(file(g.remote(1)).equals(file(g.local(1)))).toBe(true);
  });

  it('forget is refused while the device is being loaded (its logged writes replayed), and the replay completes', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 2, sectors: 4096 });
    const model1 = new Model(4096);
    await new Promise((r) => setTimeout(r, 400)); // a checkpoint before the writes: they are after its localDone
    await writeBlocks(g, 'vol1', 5, model1);
    const killed = snapshot(g); // SIGKILL before the next checkpoint: vol1's writes are replayed at its bind
    g = await reopen(g, [0], undefined, killed);
    // vol1 over a slow local device: its replay takes a while
    await g.dm.create('loc1', { table: `0 4096 delay ${g.local(1)} 0 500` });
    const loading = g.dm.create('vol1', { table: g.devTable(1).replace(` ${g.local(1)} `, ' dm:loc1 ') });
    await waitFor(() => g!.dm.get('loc1').inflight > 0, 'the replay under way');
    const err = await g.dm.message('repl', 0, ['forget', '1']).then(() => null, (e: Error) => e);
    expect(err?.message).toBe('device 1 is being loaded (its logged writes replayed, its sites judged): try again once it is');
    await loading;
    expect(file(g.local(1)).equals(model1.bytes)).toBe(true);
  });

  it('a device removed while its replicator is suspended is recorded as left at once: a SIGKILL before the resume does not make the restart wait for it', async () => {
    const { grp, model0 } = await siteBehind(5);
    g = grp;
    await g.dm.suspend('repl');
    await g.dm.remove('vol1');
    const killed = snapshot(g); // SIGKILL while the replicator is suspended
    await g.dm.resume('repl');
    g = await reopen(g, [0], undefined, killed);
    await waitFor(() => caughtUp(g!), 'vol0 shipped past the removed vol1\'s entries');
    expect(file(g.remote(0)).equals(model0.bytes)).toBe(true);
  });

  it('a local-only device (no remote at the site) removed while the site is behind: the site goes past its entries, and a device that takes its number later is not sent them', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 1, sectors: 4096, ring: 4096 });
    const blankImg = (name: string): string => {
      fs.writeFileSync(path.join(g!.dir, name), Buffer.alloc(4096 * 512));
      return path.join(g!.dir, name);
    };
    await g.dm.create('vol2', { table: `0 4096 replicator-dev dm:repl 2 0 1 ${blankImg('local2.img')} nolog 0` });
    await g.dm.message('repl', 0, ['slink', 'suspend', '1']);
    const model0 = new Model(4096);
    await writeBlocks(g, 'vol2', 5);
    await writeBlocks(g, 'vol0', 5, model0);
    await g.dm.remove('vol2');
    // device number 2 again, replicated this time, before the site has gone past the old entries
    const loc3 = blankImg('local3.img');
    const rem3 = blankImg('remote3.img');
    blankImg('dlog3');
    await g.dm.create('site3', { table: `0 4096 linear ${rem3} 0` });
    await g.dm.create('vol3', { table: `0 4096 replicator-dev dm:repl 2 0 1 ${loc3} nolog 0 1 1 dm:site3 disk 3 ${path.join(g.dir, 'dlog3')} 64 nosync` });
    const model3 = new Model(4096);
    await writeBlocks(g, 'vol3', 5, model3);
    await g.dm.message('repl', 0, ['slink', 'resume', '1']);
    await waitFor(() => caughtUp(g!), 'the site past the removed device\'s entries');
    expect(file(g.remote(0)).equals(model0.bytes)).toBe(true);
    expect(file(rem3).equals(model3.bytes), 'the new device 2\'s site: its writes, none of the old one\'s').toBe(true);
    // and the ring does not hold them: more than it holds goes through
    await fillRing(g, model0);
    await waitFor(() => caughtUp(g!), 'shipped');
    expect(file(g.remote(0)).equals(model0.bytes)).toBe(true);
  });

  it('a device number is not bound again while its device is still leaving (its backlog being recorded)', async () => {
    const { grp, removing } = await removeBehindSlowSite();
    g = grp;
    await new Promise((r) => setTimeout(r, 300));
    const err = await g.dm.create('vol1b', { table: g.devTable(1) }).then(() => null, (e: Error) => e);
    expect(err?.message).toMatch(/device number 1 is still leaving the group \(its backlog being recorded for the sites\): try again once its remove is done/);
    await removing;
    await g.dm.remove('vol1b').catch(() => undefined);
    // once it is done; its disk dirty log as it was left (without `nosync`, which would declare it in sync)
    await g.dm.create('vol1', { table: g.devTable(1).replace(' disk 3 ', ' disk 2 ').replace(' nosync', '') });
    await g.healSite();
    await waitFor(() => caughtUp(g!) && g!.dm.status('vol1')[0]!.params === 'A,1/1 A,64/64', 'resynced');
    expect(file(g.remote(1)).equals(file(g.local(1)))).toBe(true);
  });

  it('a write of a device waiting to be logged when the device is removed fails (ENXIO) and logs nothing: the site goes on, and a device taking the number later is not sent it', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 2, sectors: 4096 });
    await g.dm.message('repl', 0, ['slink', 'suspend', '1']);
    const model0 = new Model(4096);
    await writeBlocks(g, 'vol0', 4, model0);
    await g.dm.suspend('repl'); // writers wait to be logged
    const late = g.dm.write('vol1', 0, crypto.randomBytes(4096)).then(() => null, (e: Error) => e);
    await new Promise((r) => setTimeout(r, 200));
    await g.dm.remove('vol1');
    await g.dm.resume('repl');
    const err = await late;
    expect(err).toMatchObject({ code: 'ENXIO' });
    expect(err!.message).toMatch(/vol1: no longer in the group of repl \(removed\)/);
    await g.dm.message('repl', 0, ['slink', 'resume', '1']);
    await waitFor(() => caughtUp(g!), 'the site caught up');
    // the number again, over blank files: nothing of the removed vol1 reaches its site
    for (const f of ['local9.img', 'remote9.img']) fs.writeFileSync(path.join(g.dir, f), Buffer.alloc(4096 * 512));
    await g.dm.create('site9', { table: `0 4096 linear ${path.join(g.dir, 'remote9.img')} 0` });
    await g.dm.create('vol9', { table: `0 4096 replicator-dev dm:repl 1 0 1 ${path.join(g.dir, 'local9.img')} nolog 0 1 1 dm:site9 core 2 64 nosync` });
    await writeBlocks(g, 'vol0', 2, model0);
    await waitFor(() => caughtUp(g!), 'caught up');
    expect(file(path.join(g.dir, 'remote9.img')).equals(Buffer.alloc(4096 * 512))).toBe(true);
    expect(file(g.remote(0)).equals(model0.bytes)).toBe(true);
  });

  it('a device removed while a healthy site is behind on it: the site is sent the rest in order before the remove returns', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 2, sectors: 4096 });
    await g.dm.message('repl', 0, ['slink', 'suspend', '1']);
    const model1 = new Model(4096);
    await writeBlocks(g, 'vol1', 10, model1);
    await g.dm.message('repl', 0, ['slink', 'resume', '1']);
    await g.dm.remove('vol1');
    expect(file(g.remote(1)).equals(model1.bytes), 'the site has the removed device\'s writes').toBe(true);
    expect(file(g.local(1)).equals(model1.bytes)).toBe(true);
  });

  it('a device removed behind a slow site: its writes in flight to the site land before its devices close (the site does not go down), the rest is in its dirty log', async () => {
    const { grp, removing } = await removeBehindSlowSite();
    g = grp;
    const events: string[] = [];
    g.dm.on('device-event', (e: { name: string; text?: string }) => { if (e.name === 'repl' && e.text) events.push(e.text); });
    await removing;
    await writeBlocks(g, 'vol0', 3);
    await waitFor(() => caughtUp(g!), 'caught up');
    expect(events.filter((t) => / down$/.test(t))).toEqual([]);
  });
});
