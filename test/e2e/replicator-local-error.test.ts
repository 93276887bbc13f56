/**
 * A local write that fails after its entry was logged (docs/targets/replicator.md, "Writes
 * and acknowledgement"): the write fails, but the sites get its entry, so without more the
 * site would keep data the local device lacks, for good. The range as the local device has
 * it is read back and logged after it: the site applies both, in order, and stays in order
 * (no resync). The local device is `dm:loc0`, made to fail writes for a moment with the
 * engine's own `flakey` target (`error_writes`; reads work).
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { DeviceMapper } from '../../src/index.ts';
import { image, tmpDir } from '../helpers/replication.ts';

let dm: DeviceMapper | null = null;
afterEach(async () => {
  await dm?.close();
  dm = null;
});

async function until(what: string, cond: () => boolean, ms = 30_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const S = 8192;

/** a group whose replicator-dev vol0 has `dm:loc0` (linear over local0.img) as its local device and remote0.img as its site */
async function setUp(): Promise<{ dir: string; f: (n: string) => string }> {
  const dir = tmpDir();
  const f = (n: string): string => path.join(dir, n);
  image(dir, 'rlog', 4096 + 64);
  image(dir, 'local0.img', S);
  image(dir, 'remote0.img', S);
  image(dir, 'dlog0', 64);
  dm = new DeviceMapper();
  await dm.create('loc0', { table: `0 ${S} linear ${f('local0.img')} 0` });
  await dm.create('repl', { table: `0 1 replicator ringbuffer 4 ${f('rlog')} 0 auto 4096 blockdev 1 0 blockdev 3 1 async retest=1` });
  await dm.create('vol0', { table: `0 ${S} replicator-dev dm:repl 0 0 1 dm:loc0 nolog 0 1 1 ${f('remote0.img')} disk 3 ${f('dlog0')} 64 nosync` });
  return { dir, f };
}

describe('a local write that fails after it was logged', { timeout: 60_000 }, () => {
  it('fails, and the site ends equal to the local device, in order: it does not keep the data the local device lacks', async () => {
    const { dir, f } = await setUp();
    const d = dm!;
    const at = 100 * 4096;
    const a = crypto.randomBytes(4096);
    await d.write('vol0', at, a);
    const remote = (): Buffer => fs.readFileSync(f('remote0.img')).subarray(at, at + 4096);
    await until('the site to hold the first write', () => remote().equals(a));

    // the local device fails writes (reads still work) for one write
    await d.load('loc0', `0 ${S} flakey ${f('local0.img')} 0 0 1 1 error_writes`);
    await d.resume('loc0');
    const b = crypto.randomBytes(4096);
    await expect(d.write('vol0', at, b)).rejects.toThrow(/flakey device is down/);
    await d.load('loc0', `0 ${S} linear ${f('local0.img')} 0`);
    await d.resume('loc0');

    // the site got the entry, then the correcting one: both hold a, and no resync ran
    await until('the site to equal the local device', () => fs.readFileSync(f('remote0.img')).equals(fs.readFileSync(f('local0.img'))));
    expect(fs.readFileSync(f('local0.img')).subarray(at, at + 4096).equals(a)).toBe(true);
    await until('the site in order again', () => /^0:S,0,0 1:A,0,0 /.test(d.status('repl')[0]!.params));
    expect(remote().equals(a)).toBe(true);
    const site = (d.status('repl')[0]!.detail as { sites: Array<{ slink: number; resyncedBytes: number }> }).sites.find((s) => s.slink === 1)!;
    expect(site.resyncedBytes).toBe(0);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('when the range cannot be read back either, the site keeps the failed write\'s data (the only copy left) and stays in order', async () => {
    const { dir, f } = await setUp();
    const d = dm!;
    const at = 200 * 4096;
    const remote = (): Buffer => fs.readFileSync(f('remote0.img')).subarray(at, at + 4096);
    await d.load('loc0', `0 ${S} flakey ${f('local0.img')} 0 0 1`); // every bio fails
    await d.resume('loc0');
    const b = crypto.randomBytes(4096);
    await expect(d.write('vol0', at, b)).rejects.toThrow(/flakey device is down/);
    await until('the site to apply the failed write', () => remote().equals(b));
    await d.load('loc0', `0 ${S} linear ${f('local0.img')} 0`);
    await d.resume('loc0');
    await new Promise((r) => setTimeout(r, 1500)); // (a resync, had one started, would have run by now)
    expect(remote().equals(b)).toBe(true);
    expect(d.status('repl')[0]!.params).toMatch(/^0:S,0,0 1:A,0,0 /);
    const site = (d.status('repl')[0]!.detail as { sites: Array<{ slink: number; resyncedBytes: number }> }).sites.find((s) => s.slink === 1)!;
    expect(site.resyncedBytes).toBe(0);
    fs.rmSync(dir, { recursive: true, force: true });
  });
});
