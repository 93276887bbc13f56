/**
 * Resync under a writer that never stops, over the `tcp` slink to a second real daemon
 * (REPLICATION.md guarantee 5), with the default (auto) rate control:
 *
 *  - a full first copy of a device filled with data starts while a writer keeps writing
 *    4 KiB blocks at random all through it; the site reaches in-order shipping (`A`)
 *    while the writer still runs;
 *  - the progress shown (`--json` `sites[].resync`, and the replicator's own progress)
 *    never goes backwards: done and total only grow, done ≤ total;
 *  - the controller saw the application's writes (its flow backed off for them);
 *  - once the writer stops and the site has caught up, the site's image, the local image
 *    and an independent model of every write are byte-identical.
 *
 * Then `resync-rate` over the CLI's message path: a fixed rate, `auto` again, and a bad word.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DeviceMapper } from '../../src/index.ts';
import { expectSameBytes } from '../compliance/helpers.ts'; // also quiets the engine's warnings
import { image, Model, SECTOR, siteJson, slinkState, tmpDir, waitFor } from '../helpers/replication.ts';
import { SiteDaemon } from '../helpers/site-daemon.ts';

const LEN = 32768; // 16 MiB
const REGION = 128; // 64 KiB: 256 regions

let site: SiteDaemon;
let dir: string;
let dm: DeviceMapper;

beforeAll(async () => {
  site = await SiteDaemon.start();
  dir = tmpDir('dmkit-converge-');
});
afterAll(async () => {
  await dm?.close();
  await site?.close();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

interface Sample {
  done: number;
  total: number;
}

interface FlowJson {
  mode: string;
  rate: number;
  backoff: string | null;
}

describe('resync under a continuous writer, over tcp', () => {
  it('finishes while the writer runs, progress never goes back, the images end identical', { timeout: 120_000 }, async () => {
    const remoteImg = image(dir, 'remote0.img', LEN);
    // the site's disk is slow to write (3 ms), so the first copy takes a while under the writer
    await site.request('create', { name: 'site0', table: `0 ${LEN} delay ${remoteImg} 0 0 ${remoteImg} 0 3` });
    const local = image(dir, 'local0.img', LEN);
    const model = new Model(LEN);
    const seed = crypto.randomBytes(LEN * SECTOR);
    fs.writeFileSync(local, seed);
    model.write(0, seed);
    const rlog = image(dir, 'rlog', 8192 + 64);
    image(dir, 'dlog0', 64); // all zeroes: a new log, every region out of sync (the full first copy)

    dm = new DeviceMapper();
    await dm.create('repl', {
      table: `0 1 replicator ringbuffer 4 ${rlog} 0 auto 8192 blockdev 1 0 tcp 5 1 async retest=1 peer=${site.address} secret=${site.secretFile}`,
    });
    expect((dm.status('repl')[0]!.detail as { resyncControl: unknown }).resyncControl).toMatchObject({ mode: 'auto', limit: null });

    let stop = false;
    let writes = 0;
    let writerError: unknown = null;
    const samples: Sample[] = [];
    const groupSamples: Sample[] = [];
    const backoffs = new Set<string>();
    let sawA = false;
    await dm.create('vol0', { table: `0 ${LEN} replicator-dev dm:repl 0 0 1 ${local} nolog 0 1 1 site0 disk 2 ${path.join(dir, 'dlog0')} ${REGION}` });
    const writer = (async () => {
      while (!stop) {
        const data = crypto.randomBytes(4096);
        const off = crypto.randomInt(LEN / 8) * 4096;
        await dm.write('vol0', off, data);
        model.write(off, data);
        writes++;
      }
    })().catch((err: unknown) => (writerError = err));
    const sampler = setInterval(() => {
      const s = siteJson(dm) as ReturnType<typeof siteJson> & { resync: { work: string; done: number; total: number } | null; resyncFlow: FlowJson };
      if (s.resync?.work === 'resync') samples.push({ done: s.resync.done, total: s.resync.total });
      const p = dm.get('repl').live!.entries[0]!.target.progress?.(); // the target's own figures
      if (p) groupSamples.push({ done: p.doneSectors, total: p.totalSectors });
      if (s.resyncFlow.backoff) backoffs.add(s.resyncFlow.backoff);
    }, 10);
    try {
      await waitFor(() => writes > 50, 'the writer going');
      expect(slinkState(dm)).toBe('R');
      await waitFor(() => slinkState(dm) === 'A' || writerError !== null, 'the site in order while the writer runs', 90_000);
      sawA = !stop && writerError === null;
      const w0 = writes;
      await waitFor(() => writes > w0 + 20, 'the writer going on after the resync');
    } finally {
      stop = true;
      clearInterval(sampler);
      await writer;
    }
    expect(writerError).toBeNull();
    expect(sawA).toBe(true);
    await waitFor(() => /(^| )1:A,0,0( |$)/.test(dm.status('repl')[0]!.params), 'caught up', 30_000);
    expect(dm.status('vol0')[0]!.params).toBe('A,1/1 A,256/256');
    expect(siteJson(dm).resyncedBytes).toBeGreaterThanOrEqual(LEN * SECTOR);

    // progress: seen while it ran, and never backwards
    for (const [what, list] of [['site resync', samples], ['group progress', groupSamples]] as const) {
      expect(list.length, `${what}: samples`).toBeGreaterThan(5);
      expect(list.some((x) => x.done < x.total), `${what}: seen before the end`).toBe(true);
      for (let i = 0; i < list.length; i++) {
        const x = list[i]!;
        expect(x.done, `${what} sample ${i}: done ≤ total`).toBeLessThanOrEqual(x.total);
        if (i === 0) continue;
        const prev = list[i - 1]!;
        expect(x.done, `${what} sample ${i}: done never goes back (${prev.done} → ${x.done})`).toBeGreaterThanOrEqual(prev.done);
        expect(x.total, `${what} sample ${i}: total never shrinks`).toBeGreaterThanOrEqual(prev.total);
      }
    }
    // the controller backed off for the application's writes
    expect([...backoffs].some((b) => b.startsWith('app-writes'))).toBe(true);

    const remote = fs.readFileSync(remoteImg);
    expectSameBytes(fs.readFileSync(local), model.bytes, 'local image');
    expectSameBytes(remote, model.bytes, 'site image');
  });

  it('resync-rate: fixed with a unit, auto again, a bad word refused', async () => {
    const ctl = (): { mode: string; limit: number | null } => (dm.status('repl')[0]!.detail as { resyncControl: { mode: string; limit: number | null } }).resyncControl;
    await dm.message('repl', 0, ['resync-rate', '40m']);
    expect(ctl()).toMatchObject({ mode: 'fixed', limit: 40 << 20 });
    expect((siteJson(dm) as unknown as { resyncFlow: FlowJson }).resyncFlow).toMatchObject({ mode: 'fixed' });
    await dm.message('repl', 0, ['resync-rate', 'auto']);
    expect(ctl()).toMatchObject({ mode: 'auto', limit: null });
    await expect(dm.message('repl', 0, ['resync-rate', '40x'])).rejects.toThrow(/invalid resync rate '40x' \(expected auto, or bytes per second: <N>\[k\|m\|g\]\)/);
    expect(ctl()).toMatchObject({ mode: 'auto' });
  });
});
