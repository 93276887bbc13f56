/**
 * Slink compliance: one suite run against every transport case of slink-cases.ts, then
 * what only `blockdev` does (the registry's rules are in test/unit/slink-registry.test.ts). Slinks are created through the registry,
 * as the replicator creates them; devices are attached from inside a real table of a real
 * engine (the `slink-host` target below stands in for replicator-dev: its `ctx.open` is the
 * engine's, and the core releases what it opened). Every scenario ends by comparing the
 * site's bytes, read independently by the case, with a reference model.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { EMPTY, type Bio, type BioFlags } from '../../src/core/bio.ts';
import { ArgReader } from '../../src/core/args.ts';
import { log } from '../../src/core/log.ts';
import { escapeArg, parseTable } from '../../src/core/table-parse.ts';
import type { TargetType } from '../../src/core/types.ts';
import { BlockError, DeviceMapper, TargetArgError, builtinTargets } from '../../src/index.ts';
import { createSlink } from '../../src/slink/registry.ts';
import type { RemoteDevice, SiteLink, SlinkContext } from '../../src/slink/types.ts';
import { SECTOR, expectSameBytes, makeImage, makeTempDir, prng, tableText } from './helpers.ts';
import { SLINK_CASES, type SlinkSite } from './slink-cases.ts';

const DEVICES = 2;
const SECTORS = 4096;
const ERRNO = new Set(['EIO', 'ENXIO', 'ETIMEDOUT', 'ECONNRESET', 'ESHUTDOWN', 'ENODEV', 'ENOSPC', 'EROFS', 'EPERM', 'EACCES', 'EAGAIN']);
const rng = prng(2024);

/** what the slink-host target attaches with, and what it attached (by host device name) */
interface Host {
  link: SiteLink | null;
  readonly remotes: Map<string, RemoteDevice>;
}

/**
 * `slink-host <dev_nr> <dev_params…>`: attaches a site device through the slink under test
 * from its constructor, maps its bios to it, detaches at destroy; status table re-emits the
 * tuple with `params()`.
 */
function hostTarget(host: Host): TargetType {
  return {
    name: 'slink-host',
    version: [0, 1, 0],
    async create(ctx, args) {
      const r = new ArgReader(args, 'slink-host');
      const devNr = r.uint('device number');
      const link = host.link ?? r.fail('no slink to attach through');
      const remote = await link.attach({ device: ctx.device, open: (ref) => ctx.open(ref), length: ctx.length }, devNr, args.slice(1));
      host.remotes.set(ctx.device, remote);
      return {
        map: (bio) => remote.submit(bio),
        status: (type) => (type === 'table' ? [String(devNr), ...remote.params()].join(' ') : ''),
        destroy: () => remote.detach(),
      };
    },
  };
}

let dir: string;
let dm: DeviceMapper;
let host: Host;
let events: number;

const sctx: SlinkContext = { device: 'repl', groupId: '00112233445566778899aabbccddeeff', event: () => void events++, log: log('slink-test') };

beforeEach(() => {
  dir = makeTempDir('dmkit-slink-');
  host = { link: null, remotes: new Map() };
  dm = new DeviceMapper({ targets: [...builtinTargets, hostTarget(host)] });
  events = 0;
});

afterEach(async () => {
  await dm.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

/** attach `params` as device `devNr` of host device `name` (a replicator-dev of `length` sectors) */
async function attach(name: string, devNr: number, params: readonly string[], length = SECTORS): Promise<RemoteDevice> {
  const words = [String(devNr), ...params.map(escapeArg)].join(' ');
  await dm.create(name, { table: `0 ${length} slink-host ${words}` });
  return host.remotes.get(name)!;
}

/** the message of a refused attach (the engine's TableError around the slink's message) */
async function attachError(params: readonly string[], length = SECTORS): Promise<string> {
  const err = await attach('bad', 0, params, length).then(() => null, (e: Error) => e);
  expect(err, `expected attach of ${JSON.stringify(params)} to be refused`).not.toBeNull();
  expect((err as { code?: string }).code).toBe('EINVAL');
  expect(dm.has('bad')).toBe(false);
  return err!.message;
}

async function slinkError(type: string, options: readonly string[]): Promise<string> {
  const err = await createSlink(type, sctx, 2, options).then(() => null, (e: Error) => e);
  expect(err, `expected ${type} ${options.join(' ')} to be refused`).toBeInstanceOf(TargetArgError);
  expect((err as TargetArgError).code).toBe('EINVAL');
  return err!.message;
}

/** expect `p` to reject with a BlockError carrying an errno code */
async function expectIoError(p: Promise<unknown>, what: string): Promise<void> {
  const err = await p.then(() => null, (e: unknown) => e);
  expect(err, `${what} should fail`).toBeInstanceOf(BlockError);
  expect(ERRNO.has((err as BlockError).code), `${what}: code ${(err as BlockError).code}`).toBe(true);
}

const io = (op: Bio['op'], sector: number, sectors: number, data: Buffer = EMPTY, flags: BioFlags = {}): Bio =>
  ({ op, sector, sectors, data, flags });
const randomSectors = (n: number): Buffer => rng.fill(Buffer.alloc(n * SECTOR));

describe.each(SLINK_CASES)('slink compliance: $name', (c) => {
  let site: SlinkSite;
  let link: SiteLink;
  /** the reference model: what each site device must hold */
  let model: Buffer[];

  beforeEach(async () => {
    site = await c.setup({ dm, dir, devices: DEVICES, sectors: SECTORS });
    link = await createSlink(site.slinkType, sctx, 1, site.options);
    host.link = link;
    model = [];
    for (let i = 0; i < DEVICES; i++) model.push(Buffer.from(await site.readSite(i)));
  });

  afterEach(async () => {
    await dm.close(); // the replicator-devs go first: their devices are detached
    await link.destroy();
    await site.teardown();
  });

  async function attachAll(): Promise<RemoteDevice[]> {
    const out: RemoteDevice[] = [];
    for (let i = 0; i < DEVICES; i++) out.push(await attach(`h${i}`, i, site.devParams(i)));
    return out;
  }

  async function write(remote: RemoteDevice, sector: number, data: Buffer, flags: BioFlags = {}): Promise<void> {
    await remote.submit(io('write', sector, data.length / SECTOR, data, flags));
    data.copy(model[remote.devNr]!, sector * SECTOR);
  }

  async function checkSite(what: string): Promise<void> {
    for (let i = 0; i < DEVICES; i++) expectSameBytes(await site.readSite(i), model[i]!, `${what}: site device ${i}`);
  }

  it('is created through the registry under the name the table gave', () => {
    expect(link.type).toBe(site.slinkType);
    expect(link.slink).toBe(1);
    expect(link.retestMs).toBe(15_000);
    expect(link.options()).toEqual(site.options);
    expect(typeof link.status('info')).toBe('string');
    // through its registered name or an alias (`local`), a file site says it needs no round
    // trip (a synchronous write then does not wait a turn before its local write)
    expect(link.overNetwork !== false).toBe(site.slinkType === 'nbd' || site.slinkType === 'tcp');
  });

  it('attaches each device; params() gives the tuple back through a table', async () => {
    const remotes = await attachAll();
    for (const [i, remote] of remotes.entries()) {
      expect(remote.devNr).toBe(i);
      expect(remote.sectors).toBeGreaterThanOrEqual(SECTORS);
      const line = tableText(dm.table(`h${i}`));
      expect(parseTable(`h${i}`, line)[0]!.args).toEqual([String(i), ...site.devParams(i)]);
      await dm.load(`h${i}`, line); // the status table attaches again
      await dm.resume(`h${i}`);
    }
    await write(host.remotes.get('h1')!, 5, randomSectors(3));
    await checkSite('after re-attaching from the status table');
  });

  it('writes land byte for byte, with and without fua; reads return them', async () => {
    const remotes = await attachAll();
    const slot = SECTORS / 8;
    for (let round = 0; round < 4; round++) {
      const batch: Promise<void>[] = [];
      for (const remote of remotes) {
        for (let s = 0; s < 8; s++) {
          const count = 1 + rng.int(Math.min(64, slot));
          const sector = s * slot + rng.int(slot - count + 1);
          batch.push(write(remote, sector, randomSectors(count), { fua: rng.int(2) === 1 }));
        }
      }
      await Promise.all(batch);
      await checkSite(`after write round ${round}`);
    }
    await write(remotes[0]!, 0, randomSectors(1), { fua: true });
    await write(remotes[1]!, SECTORS - 7, randomSectors(7));
    await checkSite('after writes at both ends');
    for (const remote of remotes) {
      const buf = Buffer.alloc(SECTORS * SECTOR);
      await remote.submit(io('read', 0, SECTORS, buf));
      expectSameBytes(buf, model[remote.devNr]!, `read of device ${remote.devNr}`);
    }
  });

  it('carries flush, write-zeroes and discard', async () => {
    const [a, b] = await attachAll();
    await write(a!, 100, randomSectors(300));
    await a!.submit(io('flush', 0, 0));
    await a!.submit(io('write-zeroes', 120, 40));
    model[0]!.fill(0, 120 * SECTOR, 160 * SECTOR);
    await a!.submit(io('write-zeroes', 200, 8, EMPTY, { fua: true, noUnmap: true }));
    model[0]!.fill(0, 200 * SECTOR, 208 * SECTOR);
    await b!.submit(io('flush', 0, 0, EMPTY, { preflush: true }));
    await checkSite('after write-zeroes');

    const before = Buffer.from(model[1]!);
    await b!.submit(io('discard', 512, 256));
    const after = await site.readSite(1);
    for (let s = 512; s < 768; s++) { // a discarded sector holds its old data or zeroes
      const got = after.subarray(s * SECTOR, (s + 1) * SECTOR);
      const old = before.subarray(s * SECTOR, (s + 1) * SECTOR);
      expect(got.equals(old) || got.every((x) => x === 0), `discarded sector ${s}`).toBe(true);
      got.copy(model[1]!, s * SECTOR);
    }
    await checkSite('after discard');
    await write(b!, 600, randomSectors(16), { fua: true });
    await checkSite('after a write into the discarded range');
  });

  it('I/O through the replicator-dev table reaches the site', async () => {
    await attachAll();
    const data = randomSectors(24);
    await dm.write('h1', 1000 * SECTOR, data, { fua: true });
    data.copy(model[1]!, 1000 * SECTOR);
    await dm.flush('h1');
    await checkSite('after a write through the host device');
    expectSameBytes(await dm.read('h1', 1000 * SECTOR, data.length), data, 'read through the host device');
  });

  it('test() succeeds on a healthy site, fails while it is broken, succeeds after healing', async () => {
    const [a, b] = await attachAll();
    await write(a!, 30, randomSectors(4));
    await a!.test();
    await b!.test();

    await site.breakSite();
    await expectIoError(a!.test(), 'test() of a broken site');
    await expectIoError(b!.test(), 'test() of a broken site');
    /** [device, sector, sectors] of the I/O that failed: it may or may not have landed */
    const failed: Array<[number, number, number]> = [[0, 10, 4], [0, 20, 1], [1, 0, 8]];
    await expectIoError(a!.submit(io('write', 10, 4, randomSectors(4))), 'write to a broken site');
    await expectIoError(a!.submit(io('write', 20, 1, randomSectors(1), { fua: true })), 'fua write to a broken site');
    await expectIoError(b!.submit(io('write-zeroes', 0, 8)), 'write-zeroes to a broken site');
    await expectIoError(b!.submit(io('read', 0, 8, Buffer.alloc(8 * SECTOR))), 'read from a broken site');
    // a flush may succeed (dm's error target takes no flushes); whichever, it settles
    await b!.submit(io('flush', 0, 0)).catch((e: unknown) => expect(e).toBeInstanceOf(BlockError));

    await site.healSite();
    await a!.test();
    await b!.test();
    for (const [dev, sector, count] of failed) {
      (await site.readSite(dev)).copy(model[dev]!, sector * SECTOR, sector * SECTOR, (sector + count) * SECTOR);
    }
    await checkSite('after healing: everything but the failed I/O as before');
    await write(a!, 10, randomSectors(4), { fua: true });
    await write(b!, 0, randomSectors(8));
    await checkSite('after writes to the healed site');
  });

  it('attach while the site is broken: down until healed (or refused), as the case declares', async () => {
    await site.breakSite();
    if (site.attachWhileBroken === 'refused') {
      expect(await attachError(site.devParams(0))).toContain('slink 1: ');
      return;
    }
    const [a, b] = await attachAll();
    await expectIoError(a!.submit(io('write', 40, 2, randomSectors(2))), 'write to a device attached while broken');
    await expectIoError(b!.test(), 'test() of a device attached while broken');
    await site.healSite();
    await a!.test();
    await b!.test();
    (await site.readSite(0)).copy(model[0]!, 40 * SECTOR, 40 * SECTOR, 42 * SECTOR); // the failed write may have landed
    await write(a!, 8, randomSectors(8), { fua: true });
    await write(b!, 100, randomSectors(3));
    await checkSite('after healing a site that was broken at attach');
  });

  it('attach refuses a missing device, a device too small and a wrong parameter count', async () => {
    for (const params of site.missingDevParams) {
      const msg = await attachError(params);
      expect(msg).toContain('slink 1: ');
      expect(msg).toContain(params[0]);
    }
    const small = await site.smallDevParams(SECTORS);
    expect(await attachError(small)).toContain('device too small');
    expect(await attachError([])).toContain('slink 1: ');
    expect(await attachError([...site.devParams(0), 'extra'])).toContain('slink 1: ');
    const remote = await attach('h0', 0, small, SECTORS - 1); // it is big enough for a shorter device
    await write(remote, 0, randomSectors(1));
  });

  it('options() round-trips through createSlink; retest=<seconds> sets retestMs', async () => {
    const a = await createSlink(site.slinkType, sctx, 2, [...site.options, 'retest=7']);
    expect(a.type).toBe(site.slinkType);
    expect(a.slink).toBe(2);
    expect(a.retestMs).toBe(7000);
    expect(a.options()).toEqual([...site.options, 'retest=7']);
    const b = await createSlink(site.slinkType, sctx, 2, a.options());
    expect(b.options()).toEqual(a.options());
    expect(b.retestMs).toBe(7000);
    const one = await createSlink(site.slinkType, sctx, 3, [...site.options, 'retest=1']);
    expect(one.retestMs).toBe(1000);
    await Promise.all([a.destroy(), b.destroy(), one.destroy()]);
  });

  it('refuses an unknown option and a bad retest', async () => {
    expect(await slinkError(site.slinkType, [...site.options, 'bogus=1'])).toContain("'bogus'");
    for (const bad of ['0', '-1', 'x', '1.5', '', '1e3', '99999999999']) {
      const msg = await slinkError(site.slinkType, [...site.options, `retest=${bad}`]);
      expect(msg).toContain('slink 2: ');
      expect(msg).toContain('retest');
    }
  });
});

describe('blockdev', () => {
  beforeEach(() => {
    host.link = null;
  });

  it('attaches an image file by path (escaped in params) and writes land in it', async () => {
    const img = makeImage(dir, 'my site #1.img', SECTORS, 5);
    host.link = await createSlink('blockdev', sctx, 1, []);
    const remote = await attach('h0', 3, [img]);
    expect(remote.ref).toBe(img);
    expect(remote.params()).toEqual([escapeArg(img)]);
    expect(remote.digest).toBeUndefined();
    const data = randomSectors(9);
    await remote.submit(io('write', SECTORS - 9, 9, data, { fua: true }));
    expectSameBytes(fs.readFileSync(img).subarray((SECTORS - 9) * SECTOR), data, 'the image file');
    await remote.test();
    await dm.remove('h0');
    await host.link.destroy();
  });

  it('names the bad parameter exactly', async () => {
    host.link = await createSlink('blockdev', sctx, 1, []);
    await dm.create('site0', { table: `0 100 linear ${makeImage(dir, 's.img', 128, 1)} 0` });
    const prefix = 'bad: line 1: slink-host: slink 1: ';
    expect(await attachError([])).toBe(`${prefix}blockdev takes 1 device parameter (<dev>), got none`);
    expect(await attachError(['dm:site0', 'x'])).toBe(`${prefix}blockdev takes 1 device parameter (<dev>), got 2 ('dm:site0 x')`);
    expect(await attachError(['dm:nosuch'])).toBe(`${prefix}device lookup failed: dm:nosuch: no such device`);
    const missing = path.join(dir, 'none.img');
    expect(await attachError([missing])).toBe(`${prefix}device lookup failed: ${missing}: no such file or device`);
    expect(await attachError(['dm:site0'], 101)).toBe(`${prefix}device too small for target: dm:site0 has 100 sectors, needs 101`);
    expect(dm.info('site0').openCount).toBe(0); // a refused attach leaves nothing open
    await host.link.destroy();
  });

  it('names the bad option exactly', async () => {
    expect(await slinkError('blockdev', ['peer=a:1'])).toBe("slink 2: unknown blockdev option 'peer' (expected retest=…)");
    expect(await slinkError('local', ['retest=1', 'retest=2'])).toBe("slink 2: blockdev option 'retest' given twice");
    expect(await slinkError('blockdev', ['retest'])).toBe("slink 2: invalid blockdev option 'retest' (expected <key>=<value>)");
    expect(await slinkError('blockdev', ['retest=0'])).toBe("slink 2: invalid retest '0' (expected seconds, an integer from 1 to 2147483)");
    const max = await createSlink('blockdev', sctx, 2, ['retest=2147483']);
    expect(max.retestMs).toBe(2_147_483_000);
    await max.destroy();
  });

  it('status: no info, the options as table', async () => {
    const l = await createSlink('local', sctx, 4, ['retest=30']);
    expect(l.status('info')).toBe('');
    expect(l.status('table')).toBe('retest=30');
    expect(l.type).toBe('local');
    await l.destroy();
  });

  it('detach leaves the device to the core, and the remote refuses I/O after it', async () => {
    const img = makeImage(dir, 's.img', SECTORS, 2);
    await dm.create('site0', { table: `0 ${SECTORS} linear ${img} 0` });
    host.link = await createSlink('blockdev', sctx, 1, []);
    const remote = await attach('h0', 0, ['dm:site0']);
    expect(dm.info('site0').openCount).toBe(1);
    await dm.remove('h0');
    expect(dm.info('site0').openCount).toBe(0);
    const err = await remote.submit(io('write', 0, 1, randomSectors(1))).then(() => null, (e: BlockError) => e);
    expect(err?.code).toBe('ESHUTDOWN');
    await host.link.destroy();
  });
});
