/**
 * The replicator in-process: a group of devices replicated to a second site (image files
 * behind `dm:` devices, so the site can be failed with the engine's own targets), every
 * scenario ending with the site's images compared against the source and a reference model.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { DeviceMapper } from '../../src/index.ts';
import { FileDev } from '../../src/core/file-dev.ts';
import { caughtUp, makeGroup, Model, SECTOR, tmpDir, waitFor, type Group } from '../helpers/replication.ts';

let g: Group | null = null;
afterEach(async () => {
  await g?.dm.close();
  if (g) fs.rmSync(g.dir, { recursive: true, force: true });
  g = null;
});

async function randomWrites(grp: Group, models: Model[], n: number, maxSectors = 16): Promise<void> {
  for (let k = 0; k < n; k++) {
    const dev = k % grp.spec.devices;
    const sectors = 1 + crypto.randomInt(maxSectors);
    const sector = crypto.randomInt(grp.spec.sectors - sectors);
    const data = crypto.randomBytes(sectors * SECTOR);
    await grp.dm.write(`vol${dev}`, sector * SECTOR, data);
    models[dev]!.write(sector * SECTOR, data);
  }
}

function expectSame(grp: Group, models: Model[]): void {
  for (let i = 0; i < grp.spec.devices; i++) {
    expect(fs.readFileSync(grp.local(i)).equals(models[i]!.bytes), `local ${i} equals the model`).toBe(true);
    expect(fs.readFileSync(grp.remote(i)).equals(models[i]!.bytes), `remote ${i} equals the model`).toBe(true);
  }
}

describe('replicator (library)', () => {
  it('ships the writes of every device of the group to the second site', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 2, sectors: 4096 });
    const models = [new Model(4096), new Model(4096)];
    await randomWrites(g, models, 300);
    await g.dm.flush('vol0');
    await waitFor(() => caughtUp(g!), 'slink 1 caught up');
    expectSame(g, models);
    expect(g.status()).toMatch(/^0:S,0,0 1:A,0,0 \d+\/8192$/);
    expect(g.dm.status('vol0')[0]!.params).toBe('A,1/1 A,64/64');
  });

  it('a sync site has each write before it is acknowledged', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 1, sectors: 2048, policy: 'sync' });
    for (let k = 0; k < 50; k++) {
      const data = crypto.randomBytes(4096);
      const sector = crypto.randomInt(2048 - 8);
      await g.dm.write('vol0', sector * SECTOR, data);
      const fd = fs.openSync(g.remote(0), 'r');
      const got = Buffer.alloc(4096);
      fs.readSync(fd, got, 0, 4096, sector * SECTOR);
      fs.closeSync(fd);
      expect(got.equals(data)).toBe(true);
    }
    expect(g.status()).toMatch(/^0:S,0,0 1:S,0,0 /);
  });

  it('status table round-trips through create', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 1, sectors: 2048, policy: 'async+pull-ahead size=1m' });
    const repl = g.dm.table('repl')[0]!;
    const vol = g.dm.table('vol0')[0]!;
    await g.dm.remove('vol0');
    await g.dm.remove('repl');
    await g.dm.create('repl', { table: `0 1 replicator ${repl.params}` });
    await g.dm.create('vol0', { table: `0 2048 replicator-dev ${vol.params}` });
    expect(g.dm.table('repl')[0]!.params).toBe(repl.params);
    expect(g.dm.table('vol0')[0]!.params).toBe(vol.params);
  });

  it('a dead site never fails a write; it is retested and catches up from its position', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 2, sectors: 4096, ring: 8192 });
    const models = [new Model(4096), new Model(4096)];
    await randomWrites(g, models, 20);
    await waitFor(() => caughtUp(g!), 'caught up');
    await g.breakSite();
    await randomWrites(g, models, 100);
    await waitFor(() => /1:D,/.test(g!.status()), 'slink 1 down');
    await g.healSite();
    await waitFor(() => caughtUp(g!), 'caught up after retest');
    expectSame(g, models);
  });

  it('ring overflow with a dead site: writes go on, the site falls back to its dirty logs and resyncs', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 2, sectors: 8192, ring: 4096 });
    const models = [new Model(8192), new Model(8192)];
    await g.breakSite();
    await randomWrites(g, models, 10);
    await waitFor(() => /1:D,/.test(g!.status()), 'slink 1 down');
    await randomWrites(g, models, 400, 64); // ~6 MiB through a 2 MiB ring
    expect(g.dm.status('vol0')[0]!.params).toMatch(/^A,1\/1 D,\d+\/128$/);
    await g.healSite();
    await waitFor(() => caughtUp(g!), 'resynced');
    expectSame(g, models);
    expect(g.dm.status('vol0')[0]!.params).toBe('A,1/1 A,128/128');
  });

  it('large writes through a small ring to a slow site: entry memory is reused, every shipped byte is right', async () => {
    // 256 KiB entries (each a buffer of its own, reused once it is behind the tail and no
    // ship reads it) through a 4 MiB ring, four writers, a site whose writes take 1 ms:
    // the ring wraps ~12 times with ships in flight. Every write goes to a place of its own
    // (nothing overwrites a wrong byte) and `+stall` holds the writers when the ring is
    // full (no resync copies over one): the site's images are exactly what was shipped.
    const sectors = 100 * 512;
    g = await makeGroup({ dir: tmpDir(), devices: 2, sectors, ring: 8192, region: 512, policy: 'async+stall ios 64' });
    const models = [new Model(sectors), new Model(sectors)];
    await g.slowSite(1);
    const writer = async (w: number): Promise<void> => {
      for (let i = 0; i < 50; i++) {
        const dev = i % 2;
        const sector = (w * 25 + (i >> 1)) * 512; // writer w's 25 places of each device, each once
        const data = crypto.randomBytes(512 * SECTOR);
        await g!.dm.write(`vol${dev}`, sector * SECTOR, data);
        models[dev]!.write(sector * SECTOR, data);
      }
    };
    await Promise.all([0, 1, 2, 3].map(writer));
    await waitFor(() => caughtUp(g!), 'caught up', 60_000);
    expect(g.dm.status('repl')[0]!.detail).toMatchObject({ statistics: { overflows: 0 } });
    expectSame(g, models);
  });

  it('a suspended replicator logs nothing: its devices\' writes wait until resume, then replicate', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 1, sectors: 2048 });
    const models = [new Model(2048)];
    await randomWrites(g, models, 10);
    await g.dm.suspend('repl');
    const head = (g.dm.status('repl')[0]!.detail as { replog: { head: number } }).replog.head;
    const data = crypto.randomBytes(4096);
    let done = false;
    const pending = g.dm.write('vol0', 8192, data).then(() => (done = true));
    await new Promise((r) => setTimeout(r, 300));
    expect(done, 'the write waits while the replicator is suspended').toBe(false);
    expect((g.dm.status('repl')[0]!.detail as { replog: { head: number } }).replog.head).toBe(head);
    await g.dm.resume('repl');
    await pending;
    models[0]!.write(8192, data);
    await waitFor(() => caughtUp(g!), 'caught up');
    expectSame(g, models);
  });

  it('after a restart, a site behind reports its whole backlog kept in the ring, then ships it in order', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 1, sectors: 2048 });
    const models = [new Model(2048)];
    await randomWrites(g, models, 5);
    // caught up and checkpointed (the ring empty): the site's position is persisted at the head
    await waitFor(() => / 1:A,0,0 0\/8192$/.test(g!.status()), 'caught up and checkpointed');
    await g.dm.message('repl', 0, ['slink', 'suspend', '1']);
    for (let k = 0; k < 10; k++) { // 10 × 8 sectors the site does not have
      const data = crypto.randomBytes(4096);
      await g.dm.write('vol0', k * 8192, data);
      models[0]!.write(k * 8192, data);
    }
    expect(g.status()).toMatch(/^0:S,0,0 1:D,10,80 /);
    const replTable = g.dm.table('repl')[0]!.params;
    const devTable = g.dm.table('vol0')[0]!.params;
    await g.dm.close();
    // the same files in a new engine; the site is down at first (an error table under it)
    const dm = new DeviceMapper();
    g = { ...g, dm, status: () => dm.status('repl')[0]!.params };
    await dm.create('site0', { table: '0 2048 error' });
    await dm.create('repl', { table: `0 1 replicator ${replTable}` });
    await dm.create('vol0', { table: `0 2048 replicator-dev ${devTable}` });
    await waitFor(() => /^0:S,0,0 1:D,/.test(g!.status()), 'slink 1 down');
    // the kept backlog is its lag: the 10 writes and the flush entry of the engine's close
    expect(g.status()).toMatch(/^0:S,0,0 1:D,11,80 /);
    await dm.load('site0', `0 2048 linear ${g.remote(0)} 0`);
    await dm.resume('site0');
    await waitFor(() => caughtUp(g!), 'caught up from the ring');
    expectSame(g, models);
    expect(g.dm.status('vol0')[0]!.params).toBe('A,1/1 A,32/32'); // shipped in order: no region went out of sync
  });

  it('a device not loaded since a crash holds the full ring for its logged writes: the group says so, and they are replayed when it binds', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 2, sectors: 2048, ring: 4096 });
    // vol1's local device slow: its write is logged (the entry in the ring) but not yet on vol1's image
    await g.dm.remove('vol1');
    await g.dm.create('loc1', { table: `0 2048 delay ${g.local(1)} 0 3000` });
    await g.dm.create('vol1', { table: g.devTable(1).replace(` ${g.local(1)} `, ' dm:loc1 ') });
    const lost = crypto.randomBytes(8192);
    const inflight = g.dm.write('vol1', 4096, lost);
    await waitFor(() => /^0:S,0,0 1:\S+ [1-9]\d*\/\d+$/.test(g!.status()), 'the entry in the ring');
    // the crash: the files as a SIGKILL now leaves them (the page cache), opened by a new engine
    const dir2 = tmpDir();
    for (const f of fs.readdirSync(g.dir)) fs.copyFileSync(`${g.dir}/${f}`, `${dir2}/${f}`);
    const dir1 = g.dir;
    const moved = (t: string): string => t.split(dir1).join(dir2);
    const replTable = moved(g.dm.table('repl')[0]!.params);
    await inflight;
    await g.dm.close();
    fs.rmSync(dir1, { recursive: true, force: true });
    const dm = new DeviceMapper();
    g = { ...g, dm, dir: dir2, local: (i) => `${dir2}/local${i}.img`, remote: (i) => `${dir2}/remote${i}.img`, status: () => dm.status('repl')[0]!.params };
    const events: string[] = [];
    dm.on('device-event', (e: { name: string; text?: string }) => { if (e.name === 'repl' && e.text) events.push(e.text); });
    for (let i = 0; i < 2; i++) await dm.create(`site${i}`, { table: `0 2048 linear ${g.remote(i)} 0` });
    await dm.create('repl', { table: `0 1 replicator ${replTable}` });
    await dm.create('vol0', { table: moved(g.devTable(0)) });
    // vol0 writes more than the ring holds: it fills, and the tail is vol1's unreplayed entry
    const model0 = new Model(2048);
    const writes = (async () => {
      for (let k = 0; k < 48; k++) {
        const data = crypto.randomBytes(65536);
        await dm.write('vol0', (k % 16) * 65536, data);
        model0.write((k % 16) * 65536, data);
      }
    })();
    await waitFor(() => events.some((t) => t.startsWith('replication log full: device 1 not loaded since the restart holds it')), 'the group to say what holds the ring');
    let done = false;
    void writes.then(() => { done = true; });
    await new Promise((r) => setTimeout(r, 300));
    expect(done).toBe(false); // writers wait: the entry is the only copy of vol1's write
    await dm.create('vol1', { table: moved(g.devTable(1)) }); // over its image now
    await writes;
    expect(fs.readFileSync(g.local(1)).subarray(4096, 4096 + 8192).equals(lost)).toBe(true);
    expect(fs.readFileSync(g.local(0)).equals(model0.bytes)).toBe(true);
  });

  it('checkpoints flush the site, not the local image file nor the log file (this machine\'s: a power loss of it is detected)', async () => {
    const flush = vi.spyOn(FileDev.prototype, 'flush');
    try {
      g = await makeGroup({ dir: tmpDir(), devices: 1, sectors: 2048 });
      flush.mockClear();
      const model = new Model(2048);
      await randomWrites(g, [model], 40);
      // shipped and checkpointed: the ring empty again, so a checkpoint recorded the site's position
      await waitFor(() => / 1:A,0,0 0\/8192$/.test(g!.status()), 'shipped and checkpointed');
      const flushed = (f: string): number => flush.mock.contexts.filter((d) => (d as FileDev).path === f).length;
      expect(flushed(g.remote(0)), 'the site flushed before its position was recorded').toBeGreaterThan(0);
      expect(flushed(g.local(0)), 'the local image').toBe(0);
      expect(flushed(`${g.dir}/rlog`), 'the log').toBe(0);
      expectSame(g, [model]);
      // a device leaving the group is flushed: checkpoints did not
      await g.dm.remove('vol0');
      expect(flushed(g.local(0)), 'the local image as it left the group').toBe(1);
    } finally {
      flush.mockRestore();
    }
  });

  it('checkpoints flush a local device that is not a file of this machine (`dm:`), though no write asked for a flush', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 1, sectors: 2048 });
    // vol0 again, over dm:loc0 (linear over its image) instead of the image itself
    await g.dm.remove('vol0');
    await g.dm.create('loc0', { table: `0 2048 linear ${g.local(0)} 0` });
    await g.dm.create('vol0', { table: g.devTable(0).replace(` ${g.local(0)} `, ' dm:loc0 ') });
    expect(g.dm.table('vol0')[0]!.params).toContain(' dm:loc0 ');
    const data = crypto.randomBytes(4096);
    await g.dm.write('vol0', 8192, data);
    // the group's checkpoints (every 200 ms once something moved) flush loc0: its cache may be
    // elsewhere than this machine's, where a power loss would not be told by the boot id
    await waitFor(() => g!.dm.ioStats('loc0').ops.flush.count > 0, 'a checkpoint to flush loc0');
    expect(fs.readFileSync(g.local(0)).subarray(8192, 8192 + 4096).equals(data)).toBe(true);
  });
});
