/**
 * The transports the slink compliance suite (slink.test.ts) runs against, and how to set
 * up a site for each. A case gets the suite's engine (the "source" side, where the
 * replicator would run and whose table opens the site devices) and builds a site of
 * `devices` devices of `sectors` sectors; the suite then drives the slink created through
 * the registry and checks the site's bytes with `readSite`, which must read them
 * independently of the slink (the backing files with node:fs, say).
 *
 * Faults come from the engine's own targets (`error` loaded under a site device) or, for
 * network transports, from a fault-injecting proxy or a stopped server: never from a mock.
 * The tcp transport adds its case here.
 */
import fs from 'node:fs';
import path from 'node:path';
import { log } from '../../src/core/log.ts';
import { DeviceMapper } from '../../src/index.ts';
import { loadSecret } from '../../src/replication/handshake.ts';
import { ReplicationReceiver } from '../../src/replication/receiver.ts';
import { FaultProxy } from '../support/fault-proxy.ts';
import { startNbdkit, type Nbdkit } from '../helpers/nbdkit.ts';
import { SECTOR, makeImage } from './helpers.ts';

/** What the suite gives a case. */
export interface SlinkEnv {
  /** the suite's engine: its tables attach the site devices (through `ctx.open`) */
  readonly dm: DeviceMapper;
  /** a temp dir of the test, removed by the suite */
  readonly dir: string;
  /** how many site devices to make, numbered 0 … devices − 1 */
  readonly devices: number;
  /** the size of each, in sectors (the suite attaches them with this length) */
  readonly sectors: number;
}

/** A site set up for one test. */
export interface SlinkSite {
  /** the registered type name (or alias) the table would give */
  readonly slinkType: string;
  /** transport options a working slink to this site needs (`peer=…`), maybe none */
  readonly options: readonly string[];
  /** the replicator-dev's `<dev_params…>` for site device `i` (unescaped words) */
  devParams(i: number): string[];
  /** device i's `sectors` sectors as the site stores them, read without the slink */
  readSite(i: number): Buffer | Promise<Buffer>;
  /** make every site device fail its I/O (the site is down) */
  breakSite(): Promise<void>;
  /** undo breakSite: the same devices, with the same contents, work again */
  healSite(): Promise<void>;
  /** `<dev_params…>` naming devices that do not exist at a site that answers (attach refuses them) */
  readonly missingDevParams: readonly (readonly string[])[];
  /**
   * What attach does while the site is broken (after breakSite): `down` — the device
   * attaches, fails its I/O and test() until healSite, then works (nbd: a server that does
   * not answer is a site down, not a table error, so a replicator-dev's table loads while its
   * remote site is unreachable); `refused` — attach fails as for a missing device.
   */
  readonly attachWhileBroken: 'down' | 'refused';
  /** `<dev_params…>` of a site device holding fewer than `sectors` sectors */
  smallDevParams(sectors: number): Promise<string[]>;
  /** release what setup made that the suite does not (servers, processes); the suite closes its engine after */
  teardown(): Promise<void>;
}

export interface SlinkCase {
  readonly name: string;
  setup(env: SlinkEnv): Promise<SlinkSite>;
}

/** where site device i starts in its image: a linear offset, so device-relative sectors show */
const SITE_OFFSET = 128;

/**
 * blockdev (or its alias `local`): site devices `dm:siteN` in the suite's own engine, each
 * `linear` over an image file at an offset. breakSite loads `error` tables under them and
 * resumes; healSite loads the linear tables back.
 */
function blockdevCase(slinkType: 'blockdev' | 'local'): SlinkCase {
  return {
    name: slinkType === 'local' ? 'local (alias of blockdev)' : 'blockdev',
    async setup({ dm, dir, devices, sectors }) {
      const images: string[] = [];
      const linear = (i: number): string => `0 ${sectors} linear ${images[i]} ${SITE_OFFSET}`;
      const reload = async (table: (i: number) => string): Promise<void> => {
        for (let i = 0; i < devices; i++) {
          await dm.load(`site${i}`, table(i));
          await dm.resume(`site${i}`);
        }
      };
      for (let i = 0; i < devices; i++) {
        images.push(makeImage(dir, `site${i}.img`, SITE_OFFSET + sectors + 64, 100 + i));
        await dm.create(`site${i}`, { table: linear(i) });
      }
      return {
        slinkType,
        options: [],
        devParams: (i) => [`dm:site${i}`],
        readSite(i) {
          const buf = Buffer.alloc(sectors * SECTOR);
          const fd = fs.openSync(images[i]!, 'r');
          try {
            fs.readSync(fd, buf, 0, buf.length, SITE_OFFSET * SECTOR);
          } finally {
            fs.closeSync(fd);
          }
          return buf;
        },
        breakSite: () => reload(() => `0 ${sectors} error`),
        healSite: () => reload(linear),
        missingDevParams: [['dm:nosuch'], [path.join(dir, 'nosuch.img')]],
        attachWhileBroken: 'down', // an error table under dm:siteN opens like any device
        async smallDevParams(need) {
          await dm.create('small', { table: `0 ${need - 1} linear ${images[0]} 0` });
          return ['dm:small'];
        },
        teardown: () => Promise.resolve(),
      };
    },
  };
}

/**
 * nbd: one nbdkit (`file dir=`) on a Unix socket serves the site's image files, each as the
 * export named after its file. breakSite SIGKILLs nbdkit; healSite starts it again on the
 * same socket over the same files. A missing device is an export the running server does
 * not have (it answers: attach refuses); a server that is not running is a site down, which
 * attach accepts (`attachWhileBroken: 'down'`).
 */
function nbdCase(): SlinkCase {
  return {
    name: 'nbd (nbdkit file plugin)',
    async setup({ dir, devices, sectors }) {
      const exports = path.join(dir, 'exports');
      fs.mkdirSync(exports);
      const sock = path.join(dir, 'nbdkit.sock');
      const start = (): Promise<Nbdkit> => {
        fs.rmSync(sock, { force: true });
        return startNbdkit(sock, ['file', `dir=${exports}`]);
      };
      const uri = (name: string): string => `nbd+unix:///${name}?socket=${sock}`;
      const images: string[] = [];
      for (let i = 0; i < devices; i++) images.push(makeImage(exports, `site${i}.img`, sectors, 100 + i));
      let server: Nbdkit | null = await start();
      return {
        slinkType: 'nbd',
        options: [],
        devParams: (i) => [uri(`site${i}.img`)],
        readSite: (i) => fs.readFileSync(images[i]!),
        async breakSite() {
          await server?.kill();
          server = null;
        },
        async healSite() {
          server ??= await start();
        },
        missingDevParams: [[uri('nosuch.img')]],
        attachWhileBroken: 'down',
        async smallDevParams(need) {
          makeImage(exports, 'small.img', need - 1, 7);
          return [uri('small.img')];
        },
        async teardown() {
          await server?.kill();
        },
      };
    },
  };
}

/**
 * tcp: a real replication receiver (src/replication/receiver.ts) over a second engine of
 * its own, whose devices `siteN` are linear over the image files, reached through a
 * fault-injecting proxy. breakSite makes the proxy reset every connection and refuse new
 * ones (the receiver is unreachable); healSite lets them through again.
 */
function tcpCase(): SlinkCase {
  return {
    name: 'tcp (a replication receiver over its own engine)',
    async setup({ dir, devices, sectors }) {
      const site = new DeviceMapper();
      const images: string[] = [];
      for (let i = 0; i < devices; i++) {
        images.push(makeImage(dir, `site${i}.img`, sectors + SITE_OFFSET, 100 + i));
        await site.create(`site${i}`, { table: `0 ${sectors} linear ${images[i]} ${SITE_OFFSET}` });
      }
      const secret = path.join(dir, 'site.key');
      fs.writeFileSync(secret, '0123456789abcdef0123456789abcdef\n', { mode: 0o600 });
      const rx = new ReplicationReceiver(site, { host: '127.0.0.1', port: 0, secret: loadSecret(secret), stateDir: path.join(dir, 'positions') }, log('rx'));
      const { port } = await rx.listen();
      const proxy = await FaultProxy.start({ target: { host: '127.0.0.1', port } });
      const readSite = (i: number): Buffer => {
        const all = fs.readFileSync(images[i]!);
        return all.subarray(SITE_OFFSET * SECTOR, (SITE_OFFSET + sectors) * SECTOR);
      };
      return {
        slinkType: 'tcp',
        options: [`peer=${proxy.address}`, `secret=${secret}`, 'io-timeout=2'],
        devParams: (i) => [`site${i}`],
        readSite,
        async breakSite() {
          proxy.refuse(true);
          proxy.reset();
        },
        async healSite() {
          proxy.refuse(false);
        },
        missingDevParams: [['nosuch']],
        attachWhileBroken: 'down',
        async smallDevParams(need) {
          const img = makeImage(dir, 'small.img', need - 1, 7);
          await site.create('small', { table: `0 ${need - 1} linear ${img} 0` });
          return ['small'];
        },
        async teardown() {
          await proxy.close();
          await rx.close();
          await site.close();
        },
      };
    },
  };
}

/** every transport case, run by slink.test.ts */
export const SLINK_CASES: readonly SlinkCase[] = [blockdevCase('blockdev'), blockdevCase('local'), nbdCase(), tcpCase()];
