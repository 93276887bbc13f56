/**
 * The activity log after a power loss of the source (docs/targets/replicator.md, "Power
 * loss"), with the real daemon and CLI and a `blockdev` site on a file.
 *
 * The power loss is made as the disks would show it after a reboot: the local image and the
 * log's ring as they were at the last full flush (a suspend), and the log's checkpoint slots
 * as they are at the kill. Checkpoint slots are written with FUA, so a real power loss keeps
 * the newest one, and with it the extents the activity log held when the lost writes were
 * made; the ring's entries and the local image's writes since the flush are gone, while the
 * site, another disk, applied them. Checkpoints then carry another boot id, as written before
 * the "reboot".
 *
 *  - with the activity log, only its extents are compared at the site, and the site ends equal
 *    to the local image (the lost writes lost everywhere alike);
 *  - with `al-extents=0` every region is compared, as before;
 *  - a device whose table does not load after the power loss: the extents recovered stay in
 *    the checkpoints (pinned) while writes to others make extents leave a small activity log,
 *    and the device is verified in them when it binds after a later restart.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { ok } from '../helpers/daemon.ts';
import { fromAnotherBoot } from '../helpers/power-loss.ts';
import { SiteDaemon } from '../helpers/site-daemon.ts';
import { until } from './failover-sites.ts';

const MIB = 1 << 20;
const EXTENT = 4 * MIB;
const BYTES = 64 * MIB; // 16 extents
const SECTORS = BYTES / 512;
const RING = 8192; // sectors of the log: 4 MiB
const RING_AREA = 24 * 512; // where the ring's entries begin (docs/formats/replog.md)
const CUT_OFF = /the replication log was not closed cleanly in an earlier boot/;

let d: SiteDaemon | null = null;
afterEach(async () => {
  await d?.close();
  d = null;
});

function blank(f: string, bytes: number): string {
  fs.writeFileSync(f, '');
  fs.truncateSync(f, bytes);
  return f;
}

interface Group {
  d: SiteDaemon;
  f: (name: string) => string;
  /** write 4 KiB of random bytes at `offset` of vol through the CLI; returns them */
  put: (offset: number) => Promise<Buffer>;
  /** the site's status (JSON) */
  site: () => Promise<{ comparedBytes: number; mode: string; resync: unknown; lag: { ios: number } }>;
  /** suspend the group (a full flush, a quiesced checkpoint) and copy what a disk would keep of it */
  flushAndCopy: () => Promise<{ img: Buffer; log: Buffer }>;
  /** SIGKILL, then put back the image and the ring as flushed, with the slots of now from another boot */
  powerLoss: (copy: { img: Buffer; log: Buffer }) => Promise<void>;
}

/** `remoteKind`: the remote device is `dm:site0`, a linear device over remote.img that a test can break (an `error` table) */
async function group(alExtents: number | null, dlog: 'disk' | 'core', remoteKind: 'file' | 'dm' = 'file'): Promise<Group> {
  d = await SiteDaemon.start();
  const daemon = d;
  const sb = daemon.sb;
  const f = (name: string): string => path.join(sb.dir, name);
  blank(f('rlog'), (RING + 64) * 512);
  blank(f('local.img'), BYTES);
  blank(f('remote.img'), BYTES);
  blank(f('dlog'), 64 * 1024);
  const slink0 = alExtents === null ? 'blockdev 1 0' : `blockdev 2 0 al-extents=${alExtents}`;
  const log = dlog === 'disk' ? `disk 3 ${f('dlog')} 128 nosync` : 'core 2 128 nosync';
  await ok(sb, ['create', 'repl', '--table', `0 1 replicator ringbuffer 4 ${f('rlog')} 0 auto ${RING} ${slink0} blockdev 3 1 async retest=1`]);
  if (remoteKind === 'dm') await ok(sb, ['create', 'site0', '--table', `0 ${SECTORS} linear ${f('remote.img')} 0`]);
  const remote = remoteKind === 'dm' ? 'dm:site0' : f('remote.img');
  await ok(sb, ['create', 'vol', '--table', `0 ${SECTORS} replicator-dev dm:repl 0 0 1 ${f('local.img')} nolog 0 1 1 ${remote} ${log}`]);
  const put = async (offset: number): Promise<Buffer> => {
    const data = crypto.randomBytes(4096);
    fs.writeFileSync(f('block'), data);
    await ok(sb, ['io', 'write', 'vol', String(offset), f('block')]);
    return data;
  };
  const site = async (): Promise<{ comparedBytes: number; mode: string; resync: unknown; lag: { ios: number } }> => (await groupJson(sb)).sites[1] as never;
  const flushAndCopy = async (): Promise<{ img: Buffer; log: Buffer }> => {
    await ok(sb, ['suspend', 'vol']);
    await ok(sb, ['suspend', 'repl']);
    const copy = { img: fs.readFileSync(f('local.img')), log: fs.readFileSync(f('rlog')) };
    await ok(sb, ['resume', 'repl']);
    await ok(sb, ['resume', 'vol']);
    return copy;
  };
  const powerLoss = async (copy: { img: Buffer; log: Buffer }): Promise<void> => {
    await daemon.kill();
    const now = fs.readFileSync(f('rlog'));
    const log = Buffer.from(copy.log);
    now.copy(log, 0, 0, RING_AREA); // header and slots as of now: FUA writes, durable
    fromAnotherBoot(log);
    fs.writeFileSync(f('rlog'), log);
    fs.writeFileSync(f('local.img'), copy.img);
  };
  return { d: daemon, f, put, site, flushAndCopy, powerLoss };
}

interface GroupJson { sites: unknown[]; activityLog: { extents: number; maxExtents: number; pinned: number; misses: number; flushes: number; outside: number } }

async function groupJson(sb: SiteDaemon['sb']): Promise<GroupJson> {
  const out = JSON.parse(await ok(sb, ['status', '--json', 'repl'])) as Array<{ lines: Array<{ detail: GroupJson }> }>;
  return out[0]!.lines[0]!.detail;
}

const remoteEqualsLocal = (g: Group) => async (): Promise<boolean> => fs.readFileSync(g.f('remote.img')).equals(fs.readFileSync(g.f('local.img')));

/** writes before the flush (extents 0 and 5), then lost ones (extents 9 and 12, and one more in extent 0) that the site applies */
async function loseWrites(g: Group): Promise<{ img: Buffer; lost: Array<[number, Buffer]> }> {
  await g.put(4096);
  await g.put(5 * EXTENT + 8192);
  await until('the site to hold the first writes', remoteEqualsLocal(g), (v) => v);
  const copy = await g.flushAndCopy();
  const lost: Array<[number, Buffer]> = [];
  for (const offset of [9 * EXTENT + 65536, 12 * EXTENT, 65536]) lost.push([offset, await g.put(offset)]);
  const holds = async (): Promise<boolean> => {
    const remote = fs.readFileSync(g.f('remote.img'));
    return lost.every(([o, data]) => remote.subarray(o, o + 4096).equals(data));
  };
  await until('the site to apply the writes the source will lose', holds, (v) => v);
  await g.powerLoss(copy);
  return { img: copy.img, lost };
}

describe('the activity log after a power loss of the source', { timeout: 120_000 }, () => {
  it('only the extents the activity log held are compared at the site, which ends equal to the local image', async () => {
    const g = await group(null, 'disk'); // the default: 490 extents
    const { img, lost } = await loseWrites(g);
    expect(fs.readFileSync(g.f('remote.img')).equals(img)).toBe(false); // the site holds the lost writes
    await g.d.restart();
    expect(g.d.log()).toMatch(CUT_OFF);
    // extents 0, 5, 9 and 12: every write since the last full flush went to one of them
    expect(g.d.log()).toMatch(/at every site the 4 extent\(s\) of 4 MiB the activity log held are verified/);
    await until('the site to equal the local image', remoteEqualsLocal(g), (v) => v, 60_000);
    expect(fs.readFileSync(g.f('local.img')).equals(img)).toBe(true);
    for (const [o] of lost) expect(fs.readFileSync(g.f('remote.img')).subarray(o, o + 4096).equals(img.subarray(o, o + 4096))).toBe(true);
    const s = await until('the site in order', g.site, (x) => x.mode === 'in-order' && x.resync === null);
    expect(s.comparedBytes).toBe(4 * EXTENT); // not the 64 MiB of the device
    // replication goes on
    await g.put(14 * EXTENT);
    await until('a later write at the site', remoteEqualsLocal(g), (v) => v);
  });

  it('with al-extents=0 no activity log is kept: every region is compared', async () => {
    const g = await group(0, 'disk');
    expect(await ok(g.d.sb, ['table', 'repl'])).toMatch(/ blockdev 2 0 al-extents=0 blockdev 3 1 async retest=1\n$/);
    const { img } = await loseWrites(g);
    await g.d.restart();
    expect(g.d.log()).toMatch(/at every site every region is verified/);
    await until('the site to equal the local image', remoteEqualsLocal(g), (v) => v, 60_000);
    expect(fs.readFileSync(g.f('local.img')).equals(img)).toBe(true);
    const s = await until('the site in order', g.site, (x) => x.mode === 'in-order' && x.resync === null);
    expect(s.comparedBytes).toBe(BYTES);
  });

  it('a device that does not load after the power loss: its extents stay in the checkpoints (pinned) while others come and go, and it is verified when it binds later', async () => {
    const g = await group(2, 'disk');
    const sb = g.d.sb;
    expect((await groupJson(sb)).activityLog).toMatchObject({ extents: 0, maxExtents: 2, pinned: 0 });
    // a second device, vol1 (device 1)
    for (const n of ['local1.img', 'remote1.img']) blank(g.f(n), BYTES);
    blank(g.f('dlog1'), 64 * 1024);
    await ok(sb, ['create', 'vol1', '--table', `0 ${SECTORS} replicator-dev dm:repl 1 0 1 ${g.f('local1.img')} nolog 0 1 1 ${g.f('remote1.img')} disk 3 ${g.f('dlog1')} 128 nosync`]);
    const put1 = async (offset: number): Promise<Buffer> => {
      const data = crypto.randomBytes(4096);
      fs.writeFileSync(g.f('block'), data);
      await ok(sb, ['io', 'write', 'vol1', String(offset), g.f('block')]);
      return data;
    };
    const equal1 = async (): Promise<boolean> => fs.readFileSync(g.f('remote1.img')).equals(fs.readFileSync(g.f('local1.img')));
    await put1(4096);
    await until('the site to hold vol1\'s first write', equal1, (v) => v);
    // the flush (vol1 suspended too), then a write to vol1 that the source loses and the site applies
    await ok(sb, ['suspend', 'vol1']);
    const copy = await g.flushAndCopy();
    const img1 = fs.readFileSync(g.f('local1.img'));
    await ok(sb, ['resume', 'vol1']);
    const lost = await put1(9 * EXTENT);
    await until('the site to apply vol1\'s write the source will lose', async () => fs.readFileSync(g.f('remote1.img')).subarray(9 * EXTENT, 9 * EXTENT + 4096).equals(lost), (v) => v);
    await g.powerLoss(copy);
    fs.writeFileSync(g.f('local1.img'), img1);
    fs.renameSync(g.f('local1.img'), g.f('local1.away')); // vol1's disk is away at the restart: its table does not load
    await g.d.restart();
    expect(g.d.log()).toMatch(/at every site the 2 extent\(s\) of 4 MiB the activity log held are verified/); // vol1's extents 0 and 9
    // vol writes to three extents: room only by letting extents go after full flushes; the pinned stay
    for (const x of [3, 4, 6]) await g.put(x * EXTENT);
    const al = (await groupJson(sb)).activityLog;
    expect([al.pinned, al.extents]).toEqual([2, 4]);
    expect(al.flushes).toBeGreaterThan(0);
    await until('vol at its site', remoteEqualsLocal(g), (v) => v);
    await new Promise((r) => setTimeout(r, 500)); // checkpoints of this state
    await g.d.kill();
    fs.renameSync(g.f('local1.away'), g.f('local1.img'));
    await g.d.restart(); // the same boot: not cut off; vol1 binds and is verified now
    expect(g.d.log().match(new RegExp(CUT_OFF, 'g'))).toHaveLength(1);
    await until('vol1\'s site to equal its local image', equal1, (v) => v, 60_000);
    expect(fs.readFileSync(g.f('local1.img')).equals(img1)).toBe(true);
  });
});
