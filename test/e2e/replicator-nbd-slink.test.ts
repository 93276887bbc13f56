/**
 * The `nbd` slink with the real engine (library): a group of two devices replicated to two
 * sites over NBD, slink 1 to nbdkit (`file dir=`, one export per image) and slink 2 to
 * qemu-nbd (one server per image), each server on a Unix socket over image files that the
 * test reads with node:fs. Every scenario ends with the local images, the model of what was
 * written and both sites' images compared byte for byte.
 *
 * Faults are real: a server SIGKILLed while writes are in flight (the site goes down,
 * `D`, and catches up from the ring after the server is started again, without a full
 * resync), and a replicator created while a site's server is not running (the volume comes
 * up, the site is down until the server starts). Then the slink's own words: its table
 * errors and its status.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { log } from '../../src/core/log.ts';
import { DeviceMapper, TargetArgError } from '../../src/index.ts';
import { createSlink } from '../../src/slink/registry.ts';
import type { SiteLink, SlinkContext } from '../../src/slink/types.ts';
import { startNbdkit, type Nbdkit } from '../helpers/nbdkit.ts';
import { requireTools, TOOL_PATH } from '../helpers/nbd-tools.ts';
import { image, Model, replJson, SECTOR, siteJson, slinkState, tmpDir, waitFor } from '../helpers/replication.ts';

const DEVICES = 2;
/** 32 MiB a device: a full resync would copy far more than any scenario writes */
const SECTORS = 65_536;
const SIZE = SECTORS * SECTOR;
const RING = 32_768;
/** the shipper's entries in flight to one site (replicator-shipper.ts): shipped again after a failure */
const MAX_INFLIGHT = 32;
const REGION = 64;

/** a server process the test started (nbdkit or qemu-nbd), killed at the end */
interface Server {
  kill(): Promise<void>;
}

/** `qemu-nbd -f raw -t -k SOCK IMAGE` in the foreground, ready once its pid file is written */
async function startQemuNbd(sock: string, img: string): Promise<Server> {
  requireTools(['qemu-nbd']);
  const pidFile = `${sock}.pid`;
  fs.rmSync(pidFile, { force: true });
  fs.rmSync(sock, { force: true });
  const proc: ChildProcess = spawn('qemu-nbd', ['-f', 'raw', '-t', '-k', sock, '--pid-file', pidFile, img], {
    stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, PATH: TOOL_PATH },
  });
  let stderr = '';
  proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((resolve) => proc.on('exit', () => resolve()));
  for (const end = Date.now() + 10_000; !fs.existsSync(pidFile) || fs.statSync(pidFile).size === 0 || !fs.existsSync(sock);) {
    if (proc.exitCode !== null || Date.now() > end) throw new Error(`qemu-nbd ${img} did not start: ${stderr}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return {
    async kill() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
      await exited;
    },
  };
}

/** the two sites, their servers (null while stopped) and the group over them */
interface Rig {
  dm: DeviceMapper;
  dir: string;
  local(i: number): string;
  /** site `slink`'s image of device i */
  remote(slink: 1 | 2, i: number): string;
  nbdkit: Nbdkit | null;
  qemu: Array<Server | null>;
  startSite(slink: 1 | 2): Promise<void>;
  /** SIGKILL the site's server(s) */
  killSite(slink: 1 | 2): Promise<void>;
  models: Model[];
}

let rig: Rig | null = null;

afterEach(async () => {
  const r = rig;
  rig = null;
  if (!r) return;
  await r.dm.close();
  await r.killSite(1);
  await r.killSite(2);
  fs.rmSync(r.dir, { recursive: true, force: true });
});

/**
 * Images and servers (slink 1's nbdkit not started when `site1Down`), then `repl` with
 * slinks 1 and 2 (`policy`, retest=1) and vol0…vol1.
 */
async function makeRig(policy: string, opts: { site1Down?: boolean } = {}): Promise<Rig> {
  const dir = tmpDir('dmkit-nbd-slink-');
  const site1 = path.join(dir, 'site1');
  const site2 = path.join(dir, 'site2');
  fs.mkdirSync(site1);
  fs.mkdirSync(site2);
  const kitSock = path.join(dir, 'nbdkit.sock');
  const qemuSock = (i: number): string => path.join(dir, `qemu${i}.sock`);
  const r: Rig = {
    dm: new DeviceMapper(),
    dir,
    local: (i) => path.join(dir, `local${i}.img`),
    remote: (slink, i) => path.join(slink === 1 ? site1 : site2, `vol${i}.img`),
    nbdkit: null,
    qemu: [],
    async startSite(slink) {
      if (slink === 1) {
        fs.rmSync(kitSock, { force: true });
        r.nbdkit = await startNbdkit(kitSock, ['file', `dir=${site1}`]);
      } else {
        for (let i = 0; i < DEVICES; i++) r.qemu[i] = await startQemuNbd(qemuSock(i), r.remote(2, i));
      }
    },
    async killSite(slink) {
      if (slink === 1) {
        await r.nbdkit?.kill();
        r.nbdkit = null;
      } else {
        for (const q of r.qemu) await q?.kill();
        r.qemu = r.qemu.map(() => null);
      }
    },
    models: Array.from({ length: DEVICES }, () => new Model(SECTORS)),
  };
  rig = r;
  for (let i = 0; i < DEVICES; i++) {
    image(dir, `local${i}.img`, SECTORS);
    image(site1, `vol${i}.img`, SECTORS);
    image(site2, `vol${i}.img`, SECTORS);
    image(dir, `dlog1-${i}`, 64);
    image(dir, `dlog2-${i}`, 64);
  }
  if (!opts.site1Down) await r.startSite(1);
  await r.startSite(2);
  const rlog = image(dir, 'rlog', RING + 64);
  const slink = (n: number): string => {
    const words = [String(n), ...policy.split(' '), 'retest=1'];
    return `nbd ${words.length} ${words.join(' ')}`;
  };
  await r.dm.create('repl', { table: `0 1 replicator ringbuffer 4 ${rlog} 0 auto ${RING} blockdev 1 0 ${slink(1)} ${slink(2)}` });
  for (let i = 0; i < DEVICES; i++) {
    const remote1 = `nbd+unix:///vol${i}.img?socket=${kitSock}`;
    const remote2 = `nbd+unix:///?socket=${qemuSock(i)}`;
    await r.dm.create(`vol${i}`, {
      table: `0 ${SECTORS} replicator-dev dm:repl ${i} 0 1 ${r.local(i)} nolog 0 `
        + `1 1 ${remote1} disk 3 ${path.join(dir, `dlog1-${i}`)} ${REGION} nosync `
        + `2 1 ${remote2} disk 3 ${path.join(dir, `dlog2-${i}`)} ${REGION} nosync`,
    });
  }
  return r;
}

/**
 * `n` random writes of 1–`max` sectors, one after the other, devices in turn, every 7th
 * with fua, `pauseMs` apart; the bytes written
 */
async function randomWrites(r: Rig, n: number, opts: { max?: number; pauseMs?: number; stop?: () => boolean } = {}): Promise<number> {
  let bytes = 0;
  for (let k = 0; k < n && !opts.stop?.(); k++) {
    if (opts.pauseMs) await new Promise((res) => setTimeout(res, opts.pauseMs));
    const dev = k % DEVICES;
    const sectors = 1 + crypto.randomInt(opts.max ?? 16);
    const sector = crypto.randomInt(SECTORS - sectors);
    const data = crypto.randomBytes(sectors * SECTOR);
    await r.dm.write(`vol${dev}`, sector * SECTOR, data, { fua: k % 7 === 0 });
    r.models[dev]!.write(sector * SECTOR, data);
    bytes += data.length;
  }
  return bytes;
}

/**
 * Writes of 1–8 sectors 5 ms apart until `stop()` (at most 2000: what the ring holds below
 * half full, so a site down for the whole run is shipped from the ring, not resynced);
 * resolves with the bytes written.
 */
function writer(r: Rig): { stop(): Promise<number> } {
  let stopped = false;
  const done = randomWrites(r, 2000, { max: 8, pauseMs: 5, stop: () => stopped });
  return {
    stop() {
      stopped = true;
      return done;
    },
  };
}

function status(r: Rig): string {
  return r.dm.status('repl')[0]!.params;
}

/** both remote slinks shipped everything, in order (A or S, no backlog) */
function caughtUp(r: Rig): boolean {
  return /(^| )1:[AS],0,0 2:[AS],0,0 /.test(status(r));
}

function expectSame(r: Rig, what: string): void {
  for (let i = 0; i < DEVICES; i++) {
    const want = r.models[i]!.bytes;
    expect(fs.readFileSync(r.local(i)).equals(want), `${what}: local ${i} equals the model`).toBe(true);
    for (const slink of [1, 2] as const) {
      expect(fs.readFileSync(r.remote(slink, i)).equals(want), `${what}: site ${slink} image ${i} equals the local image`).toBe(true);
    }
  }
}

/** the slink's transport word in the `--json` status (its `status('info')`) */
function transport(r: Rig, slink: number): string | null {
  return (siteJson(r.dm, slink) as unknown as { transport: string | null }).transport;
}

describe('replicator with nbd slinks to nbdkit and qemu-nbd', () => {
  it('async: the writes of both devices reach both servers, byte for byte', async () => {
    const r = await makeRig('async');
    await randomWrites(r, 300);
    await r.dm.flush('vol0');
    await waitFor(() => caughtUp(r), 'both slinks caught up');
    expectSame(r, 'async');
    expect(transport(r, 1)).toBe('connected 0:connected 1:connected');
    expect(transport(r, 2)).toBe('connected 0:connected 1:connected');
    expect(r.dm.table('repl')[0]!.params).toContain(' nbd 3 1 async retest=1 nbd 3 2 async retest=1');
  });

  it('sync: each write is in both sites\' images before it is acknowledged', async () => {
    const r = await makeRig('sync');
    for (let k = 0; k < 60; k++) {
      const dev = k % DEVICES;
      const data = crypto.randomBytes(8 * SECTOR);
      const sector = crypto.randomInt(SECTORS - 8);
      await r.dm.write(`vol${dev}`, sector * SECTOR, data);
      r.models[dev]!.write(sector * SECTOR, data);
      for (const slink of [1, 2] as const) {
        const fd = fs.openSync(r.remote(slink, dev), 'r');
        const got = Buffer.alloc(data.length);
        fs.readSync(fd, got, 0, got.length, sector * SECTOR);
        fs.closeSync(fd);
        expect(got.equals(data), `write ${k} on site ${slink} when acknowledged`).toBe(true);
      }
    }
    expect(status(r)).toMatch(/^0:S,0,0 1:S,0,0 2:S,0,0 /);
    expectSame(r, 'sync');
  });

  for (const [policy, slink, server] of [['async', 1, 'nbdkit'], ['sync', 2, 'qemu-nbd']] as const) {
    it(`${policy}: ${server} SIGKILLed mid-write: site ${slink} goes down, catches up after the restart without a full resync`, async () => {
      const r = await makeRig(policy);
      await randomWrites(r, 100);
      await waitFor(() => caughtUp(r), 'caught up before the kill');
      const before = siteJson(r.dm, slink);
      const w = writer(r);
      await waitFor(() => siteJson(r.dm, slink).shipped.ios > before.shipped.ios + 20, 'the writer shipping to the site');
      await r.killSite(slink);
      await waitFor(() => slinkState(r.dm, slink) === 'D', `slink ${slink} down`);
      expect(siteJson(r.dm, slink).errors).toBeGreaterThan(before.errors);
      await waitFor(() => /^down /.test(transport(r, slink) ?? ''), 'the transport says down');
      await r.startSite(slink);
      await waitFor(() => slinkState(r.dm, slink) !== 'D', `slink ${slink} back after the restart`);
      const written = await w.stop();
      await r.dm.flush('vol0');
      await waitFor(() => caughtUp(r), 'caught up after the restart');
      expectSame(r, `after ${server} was SIGKILLed and restarted`);
      const after = siteJson(r.dm, slink);
      // the site got the writes since `before` (those in flight at the kill maybe twice), never a copy of the devices
      expect(after.resyncedBytes, 'resynced bytes').toBeLessThan(SIZE / 8);
      expect(after.shipped.bytes - before.shipped.bytes, 'shipped bytes').toBeLessThanOrEqual(written + MAX_INFLIGHT * 16 * SECTOR);
      expect(written, 'the writer wrote far less than a device').toBeLessThan(SIZE / 4);
      expect(transport(r, slink)).toBe('connected 0:connected 1:connected');
      expect(replJson(r.dm).statistics.writes).toBeGreaterThan(100);
    });
  }

  it('created while the nbdkit site is down: the volumes come up, the site is down, and catches up once the server starts', async () => {
    const r = await makeRig('async', { site1Down: true });
    const data = crypto.randomBytes(64 * SECTOR);
    await r.dm.write('vol1', 4096 * SECTOR, data, { fua: true });
    r.models[1]!.write(4096 * SECTOR, data);
    expect((await r.dm.read('vol1', 4096 * SECTOR, data.length)).equals(data), 'local I/O works').toBe(true);
    await randomWrites(r, 50);
    await waitFor(() => slinkState(r.dm, 1) === 'D', 'slink 1 down');
    await waitFor(() => transport(r, 1) === 'down 0:down 1:down', 'the transport says down');
    expect(siteJson(r.dm, 1).lastError).toMatch(/nbd\+unix:\/\/\/vol\d\.img/);
    await r.startSite(1);
    await randomWrites(r, 50);
    await r.dm.flush('vol0');
    await waitFor(() => caughtUp(r), 'caught up after the server started');
    expectSame(r, 'after the server started');
    expect(siteJson(r.dm, 1).resyncedBytes, 'no resync: the ring held the backlog').toBe(0);
    expect(transport(r, 1)).toBe('connected 0:connected 1:connected');
    const link = (siteJson(r.dm, 1) as unknown as { link: { state: string; devices: Array<{ devNr: number; uri: string; state: string; error: string | null }> } }).link;
    expect(link.state).toBe('connected');
    expect(link.devices.map((d) => [d.devNr, d.state, d.error])).toEqual([[0, 'connected', null], [1, 'connected', null]]);
    expect(link.devices[1]!.uri).toMatch(/^nbd\+unix:\/\/\/vol1\.img\?socket=/);
  });
});

describe('nbd slink: table words and status', () => {
  const sctx: SlinkContext = { device: 'repl', groupId: '00112233445566778899aabbccddeeff', event: () => {}, log: log('slink-test') };
  let link: SiteLink | null = null;
  let dir = '';
  afterEach(async () => {
    await link?.destroy();
    link = null;
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
    dir = '';
  });

  async function refusal(p: Promise<unknown>): Promise<string> {
    const err = await p.then(() => null, (e: Error) => e);
    expect(err).toBeInstanceOf(TargetArgError);
    return err!.message;
  }

  it('names a bad option, device word or URI', async () => {
    expect(await refusal(createSlink('nbd', sctx, 2, ['peer=a:1']))).toBe("slink 2: unknown nbd option 'peer' (expected retest=…, io-timeout=…)");
    expect(await refusal(createSlink('nbd', sctx, 2, ['io-timeout=0']))).toBe("slink 2: invalid io-timeout '0' (expected seconds, an integer from 1 to 2147483)");
    const l = await createSlink('nbd', sctx, 1, ['retest=2', 'io-timeout=5']);
    link = l;
    expect(l.retestMs).toBe(2000);
    expect(l.options()).toEqual(['retest=2', 'io-timeout=5']);
    expect(l.status('table')).toBe('retest=2 io-timeout=5');
    expect(l.status('info')).toBe('');
    const dev = { device: 'vol0', open: () => Promise.reject(new Error('the nbd slink opens no engine device')), length: 128 };
    expect(await refusal(l.attach(dev, 0, ['/img/site.img']))).toBe(
      "slink 1: nbd device '/img/site.img' is not an NBD URI (expected nbd://, nbds://, nbd+unix:// or nbds+unix://)");
    expect(await refusal(l.attach(dev, 0, ['nbd+unix:///x']))).toBe(
      "slink 1: invalid NBD URI 'nbd+unix:///x': missing '?socket=PATH' (the Unix socket to connect to)");
    expect(await refusal(l.attach(dev, 0, []))).toBe('slink 1: nbd takes 1 device parameter (<nbd-uri>), got none');
  });

  it('a too-small export fails attach while the server runs; a server not running attaches down, and test() then checks the size', async () => {
    dir = tmpDir('dmkit-nbd-slink-');
    const exports = path.join(dir, 'exports');
    fs.mkdirSync(exports);
    image(exports, 'small.img', 100);
    const sock = path.join(dir, 'kit.sock');
    const uri = `nbd+unix:///small.img?socket=${sock}`;
    link = await createSlink('nbd', sctx, 1, []);
    const dev = { device: 'vol0', open: () => Promise.reject(new Error('unused')), length: 128 };
    const remote = await link.attach(dev, 3, [uri]); // no server yet: down, not an error
    expect(link.status('info')).toBe('down 3:down');
    const io = await remote.submit({ op: 'read', sector: 0, sectors: 1, data: Buffer.alloc(SECTOR), flags: {} }).then(() => null, (e: { code?: string }) => e);
    expect(io?.code).toBe('ENXIO');
    const server = await startNbdkit(sock, ['file', `dir=${exports}`]);
    try {
      expect(await refusal(link.attach({ ...dev, device: 'vol1' }, 4, [uri]))).toBe(
        `slink 1: device too small for target: ${uri} has 100 sectors, needs 128`);
      const err = await remote.test().then(() => null, (e: Error & { code?: string }) => e);
      expect(err?.message).toBe(`slink 1: device too small for target: ${uri} has 100 sectors, needs 128`);
      fs.truncateSync(path.join(exports, 'small.img'), 128 * SECTOR);
      await remote.test();
      expect(link.status('info')).toBe('connected 3:connected');
      expect(remote.sectors).toBe(128);
      await remote.detach();
      expect(link.status('info')).toBe('');
    } finally {
      await server.kill();
    }
  });
});
