/**
 * `npm run demo`: dmkit's main job on built-in defaults, in a temporary directory, in a few
 * seconds. A group of two devices is replicated to a second site (image files behind `dm:`
 * devices, so the site can be slowed and failed with the engine's own `delay` and `error`
 * targets): writes, the site falling behind (fall-behind forces the slink synchronous, `F`),
 * the site down while the ring overflows into the dirty logs, the site back and resynced,
 * and every image compared by sha256 with its counterpart and with a reference model. Then
 * the same group shape replicated over the network (a `tcp` slink to a replication receiver,
 * the link broken and healed), and a short stacked setup (striped + linear + zero, an
 * online mirror copy). Prints the
 * commands and status lines as dmsetup would, and a verdict; exits 1 if anything differs.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { DeviceMapper } from '../src/index.ts';
import type { DeviceEvent } from '../src/core/device-events.ts';
import { log } from '../src/core/log.ts';
import { formatTableLine } from '../src/core/table-parse.ts';
import { loadSecret } from '../src/replication/handshake.ts';
import { ReplicationReceiver } from '../src/replication/receiver.ts';

const MiB = 1 << 20;
const SECTORS = 65536; // 32 MiB per device
const REGION = 512; // sectors per dirty-log region: 128 regions per device
const RING = 8192; // the replication log: 4 MiB
const FALL_BEHIND = 64; // ios: beyond this the async slink turns synchronous

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmkit-demo-'));
const img = (name: string, bytes: number): string => {
  const p = path.join(dir, name);
  fs.writeFileSync(p, '');
  fs.truncateSync(p, bytes);
  return p;
};
const say = (s = ''): void => void process.stdout.write(`${s}\n`);
const sh = (s: string): void => say(`$ ${s}`);
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const sha = (file: string): string => crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
const checks: Array<{ what: string; ok: boolean }> = [];
const check = (what: string, ok: boolean): boolean => {
  checks.push({ what, ok });
  return ok;
};

const dm = new DeviceMapper();
const line = (name: string, prefix: boolean): string => dm.status(name).map((l) => `${prefix ? `${name}: ` : ''}${formatTableLine(l)}`).join('\n');
const repl = (): string => dm.status('repl')[0]!.params;
const slink1 = (): string => /(?:^| )1:(\S+)/.exec(repl())![1]!;
/** slink 1 in the replicator's `status --json` */
const siteJson = (): { shipped: { ios: number; bytes: number }; resyncedBytes: number; errors: number } => {
  const detail = dm.status('repl')[0]!.detail as { sites: Array<{ slink: number }> };
  return detail.sites.find((x) => x.slink === 1) as unknown as ReturnType<typeof siteJson>;
};

async function create(name: string, table: string): Promise<void> {
  sh(`dmkit create ${name} --table "${table}"`);
  await dm.create(name, { table });
}

async function reload(name: string, table: string): Promise<void> {
  sh(`dmkit load ${name} --table "${table}" && dmkit resume ${name}`);
  await dm.load(name, table);
  await dm.resume(name);
}

async function until(cond: () => boolean, what: string, ms = 30_000): Promise<void> {
  for (const end = Date.now() + ms; !cond(); await sleep(10)) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what} (repl: ${repl()})`);
  }
}

/** what every acknowledged write put on each device */
const models = [Buffer.alloc(SECTORS * 512), Buffer.alloc(SECTORS * 512)];

/**
 * `n` random writes of 4–64 KiB over both devices, `depth` in flight; returns bytes written.
 * Each lane writes its own slice of the devices, so writes in flight never overlap and the
 * model's order is the devices' order.
 */
async function writes(n: number, depth: number): Promise<number> {
  let next = 0;
  let bytes = 0;
  const slice = Math.floor((SECTORS * 512) / depth / 4096) * 4096;
  const lane = async (l: number): Promise<void> => {
    for (let k = next++; k < n; k = next++) {
      const dev = k % 2;
      const len = 4096 * (1 + crypto.randomInt(16));
      const off = l * slice + 4096 * crypto.randomInt((slice - len) / 4096 + 1);
      const data = crypto.randomBytes(len);
      await dm.write(`vol${dev}`, off, data);
      data.copy(models[dev]!, off);
      bytes += len;
    }
  };
  await Promise.all(Array.from({ length: depth }, (_, l) => lane(l)));
  return bytes;
}

async function replication(): Promise<void> {
  const a = [img('a0.img', SECTORS * 512), img('a1.img', SECTORS * 512)];
  const b = [img('b0.img', SECTORS * 512), img('b1.img', SECTORS * 512)];
  const dlog = [img('b0.dlog', 64 * 1024), img('b1.dlog', 64 * 1024)];
  const rlog = img('rlog', RING * 512);
  const siteTable = (i: number): string => `0 ${SECTORS} linear ${b[i]} 0`;
  say('== A group of two devices replicated to a second site ==');
  say('site A: a0.img, a1.img; site B: b0.img, b1.img behind dm devices siteb0, siteb1');
  say();
  for (const i of [0, 1]) await create(`siteb${i}`, siteTable(i));
  await create('repl', `0 1 replicator ringbuffer 4 ${rlog} 0 auto ${RING} blockdev 1 0 blockdev 4 1 async ios=${FALL_BEHIND} retest=1`);
  for (const i of [0, 1]) {
    await create(`vol${i}`, `0 ${SECTORS} replicator-dev dm:repl ${i} 0 1 ${a[i]} nolog 0 1 1 dm:siteb${i} disk 2 ${dlog[i]} ${REGION}`);
  }
  sh('dmkit message repl 0 clear-bitmap 1      # both sides are blank: in sync without a first copy');
  await dm.message('repl', 0, ['clear-bitmap', '1']);
  sh('dmkit status');
  for (const n of ['repl', 'vol0', 'vol1']) say(line(n, true));

  say();
  say('-- 1. writes: site B keeps up (async: acknowledged once logged and on site A) --');
  let t0 = Date.now();
  let bytes = await writes(800, 8);
  const wroteMs = Date.now() - t0;
  await until(() => slink1() === 'A,0,0', 'site B to catch up');
  say(`800 random writes (${(bytes / MiB).toFixed(1)} MiB) over vol0 and vol1 in ${wroteMs} ms; site B caught up ${Date.now() - t0 - wroteMs} ms later`);
  sh('dmkit status repl');
  say(line('repl', false));

  say();
  say(`-- 2. site B slow: writes there take 20 ms; more than ${FALL_BEHIND} ios behind forces the slink synchronous (F) --`);
  for (const i of [0, 1]) await reload(`siteb${i}`, `0 ${SECTORS} delay ${b[i]} 0 0 ${b[i]} 0 20`);
  const ev0 = dm.get('repl').eventNr;
  let forced = '';
  const onEvent = (ev: DeviceEvent): void => {
    if (ev.name === 'repl' && !forced && slink1().startsWith('F')) forced = line('repl', false);
  };
  dm.on('device-event', onEvent); // raised as the slink changes state: its status shows the new one
  t0 = Date.now();
  bytes = await writes(600, 32);
  dm.off('device-event', onEvent);
  say(`600 writes (${(bytes / MiB).toFixed(1)} MiB), 32 in flight, in ${Date.now() - t0} ms`);
  if (forced) say(`as it fell behind: ${forced}`);
  say(`events raised: ${dm.get('repl').eventNr - ev0} ("slink 1 fell behind: synchronous", "… back under its fall-behind: asynchronous")`);
  check('the slink turned synchronous (F) when it fell behind', forced !== '');
  await until(() => slink1() === 'A,0,0', 'site B to drain its backlog');
  sh('dmkit status repl');
  say(line('repl', false));

  say();
  say('-- 3. site B down: an error table under its disks; writes go on, the 4 MiB ring overflows into the dirty logs --');
  for (const i of [0, 1]) await reload(`siteb${i}`, `0 ${SECTORS} error`);
  t0 = Date.now();
  bytes = await writes(400, 8);
  say(`400 writes (${(bytes / MiB).toFixed(1)} MiB) in ${Date.now() - t0} ms, none failed`);
  await until(() => /^D,/.test(slink1()), 'site B marked down');
  sh('dmkit status');
  for (const n of ['repl', 'vol0', 'vol1']) say(line(n, true));
  const outOfSync = dm.status('vol0')[0]!.params.split(' ')[1]!;
  check('site B went down and fell back to its dirty logs', /^D,\d+\/128$/.test(outOfSync) && outOfSync !== 'D,128/128');

  say();
  say('-- 4. site B back: retested within 1 s, then only the out-of-sync regions are copied (R), then in-order shipping again --');
  const resynced = siteJson().resyncedBytes;
  for (const i of [0, 1]) await reload(`siteb${i}`, siteTable(i));
  t0 = Date.now();
  let quarter = -1;
  await until(() => {
    const p = dm.progress('repl'); // what `dmkit wait --progress repl` follows
    const q = p && p.totalSectors > 0 ? Math.floor((4 * p.doneSectors) / p.totalSectors) : -1;
    if (p && q > quarter) {
      quarter = q;
      say(`repl: ${p.work} ${p.doneSectors}/${p.totalSectors} sectors (${Math.floor((100 * p.doneSectors) / p.totalSectors)}%)`);
    }
    return slink1() === 'A,0,0';
  }, 'site B to resync');
  say(`site B back in sync ${Date.now() - t0} ms after it came back`);
  sh('dmkit status');
  for (const n of ['repl', 'vol0', 'vol1']) say(line(n, true));
  const site = siteJson();
  say(`status --json, slink 1: shipped ${site.shipped.ios} ios (${(site.shipped.bytes / MiB).toFixed(1)} MiB) in order, resynced ${((site.resyncedBytes - resynced) / MiB).toFixed(1)} MiB just now, ${site.errors} I/O error(s) seen`);

  say();
  say('-- 5. compare: sha256 of every image, site A against site B and against what was written --');
  for (const i of [0, 1]) {
    const local = sha(a[i]!);
    const remote = sha(b[i]!);
    const model = crypto.createHash('sha256').update(models[i]!).digest('hex');
    say(`vol${i}: a${i}.img ${local.slice(0, 16)}…  b${i}.img ${remote.slice(0, 16)}…  ${local === remote ? 'equal' : 'DIFFERENT'}`);
    check(`vol${i}: site B equals site A`, local === remote);
    check(`vol${i}: site A holds every acknowledged write`, local === model);
  }
  for (const n of ['vol0', 'vol1', 'repl', 'siteb0', 'siteb1']) await dm.remove(n);
}

/**
 * The same over the network: site C is another engine with a replication receiver on
 * loopback (in a real setup, `dmkit daemon --replication-listen` on another machine); the
 * group reaches it through a `tcp` slink (shared secret, TLS, lz4). The receiver is stopped
 * while writes go on (the link breaks: site C goes D, the ring holds the backlog) and
 * started again on the same port: site C catches up from the ring, in order.
 */
async function network(): Promise<void> {
  say();
  say('== The same over the network: site C receives over tcp (authenticated, TLS, lz4) ==');
  const secret = path.join(dir, 'sitec.key');
  fs.writeFileSync(secret, crypto.randomBytes(32).toString('hex'), { mode: 0o600 });
  const c = [img('c0.img', SECTORS * 512), img('c1.img', SECTORS * 512)];
  const siteC = new DeviceMapper();
  for (const i of [0, 1]) await siteC.create(`c${i}`, { table: `0 ${SECTORS} linear ${c[i]} 0` });
  const receiver = async (at: number): Promise<{ rx: ReplicationReceiver; port: number }> => {
    const r = new ReplicationReceiver(siteC, { host: '127.0.0.1', port: at, secret: loadSecret(secret), stateDir: path.join(dir, 'sitec-state') }, log('sitec'));
    return { rx: r, port: (await r.listen()).port };
  };
  let { rx, port } = await receiver(0);
  sh(`dmkit daemon --replication-listen 127.0.0.1:${port} --replication-secret sitec.key   # at site C; devices c0, c1`);
  const a = [img('a0n.img', SECTORS * 512), img('a1n.img', SECTORS * 512)];
  const slink = `tcp 7 1 async peer=127.0.0.1:${port} secret=${secret} tls=on compress=lz4 retest=1`;
  await create('netrepl', `0 1 replicator ringbuffer 4 ${img('rlog2', RING * 4 * 512)} 0 auto ${RING * 4} blockdev 1 0 ${slink}`);
  for (const i of [0, 1]) await create(`vol${i}`, `0 ${SECTORS} replicator-dev dm:netrepl ${i} 0 1 ${a[i]} nolog 0 1 1 c${i} core 2 ${REGION} nosync`);
  for (const m of models) m.fill(0);
  const link = (): { connection: string; bytesOnWire: number; payloadBytes: number } => {
    const d = dm.status('netrepl')[0]!.detail as { sites: Array<{ slink: number; link: ReturnType<typeof link> }> };
    return d.sites.find((x) => x.slink === 1)!.link;
  };
  const slinkN = (): string => /(?:^| )1:(\S+)/.exec(dm.status('netrepl')[0]!.params)![1]!;
  await writes(400, 8);
  await until(() => slinkN() === 'A,0,0', 'site C to catch up');
  const l = link();
  say(`400 writes; site C caught up: ${l.connection}, ${(l.bytesOnWire / MiB).toFixed(1)} MiB on the wire for ${(l.payloadBytes / MiB).toFixed(1)} MiB of writes (random data: lz4 sends it as it is)`);
  say('-- the link breaks (site C\'s receiver stops) while 300 more writes go on --');
  await rx.close();
  await writes(300, 8);
  await until(() => slinkN().startsWith('D'), 'site C marked down');
  sh('dmkit status netrepl');
  say(line('netrepl', false));
  ({ rx, port } = await receiver(port));
  await until(() => slinkN() === 'A,0,0', 'site C to catch up after the break');
  say(`site C back: caught up from the ring, ${link().connection}`);
  sh('dmkit status netrepl');
  say(line('netrepl', false));
  for (const i of [0, 1]) {
    const local = sha(a[i]!);
    const remote = sha(c[i]!);
    say(`vol${i}: a${i}n.img ${local.slice(0, 16)}…  c${i}.img ${remote.slice(0, 16)}…  ${local === remote ? 'equal' : 'DIFFERENT'}`);
    check(`vol${i}: site C (over tcp) equals site A`, local === remote);
    check(`vol${i}: site A holds every acknowledged write (network group)`, local === crypto.createHash('sha256').update(models[i]!).digest('hex'));
  }
  for (const n of ['vol0', 'vol1', 'netrepl']) await dm.remove(n);
  await rx.close();
  await siteC.close();
}

/** The engine's other job, briefly: a stack over images, verified byte for byte, and an online mirror copy. */
async function stacked(): Promise<void> {
  say();
  say('== A stacked setup: striped + linear + zero, and an online mirror copy ==');
  const [a, b, c] = ['disk-a.img', 'disk-b.img', 'disk-c.img'].map((n) => img(n, 32 * MiB));
  await create('stripes', `0 131072 striped 2 128 ${a} 0 ${b} 0`);
  const volTable = `0 98304 linear dm:stripes 16384\n98304 65536 linear ${c} 0\n163840 8192 zero`;
  say(`$ dmkit create vol <<'EOF'\n${volTable}\nEOF`);
  await dm.create('vol', { table: volTable });
  const size = dm.get('vol').sectors * 512;
  const model = Buffer.alloc(size);
  for (let i = 0; i < 200; i++) {
    const len = 512 * (1 + crypto.randomInt(512));
    const off = 512 * crypto.randomInt((size - len) / 512 + 1);
    const data = crypto.randomBytes(len);
    await dm.write('vol', off, data);
    data.copy(model, off);
  }
  model.fill(0, 163840 * 512); // the zero target stores nothing
  const back = await dm.read('vol', 0, size);
  say(`200 random writes across 3 targets and 2 layers; the device reads back as written: ${back.equals(model) ? 'yes' : 'NO'}`);
  check('the stacked device reads back as written', back.equals(model));
  const d = img('disk-d.img', size);
  await create('copy', `0 ${size / 512} mirror core 1 1024 2 dm:vol 0 ${d} 0`);
  for (;;) {
    const ev = dm.get('copy').eventNr; // read first, so the in-sync event cannot slip past
    if (!dm.progress('copy')) break;
    await dm.wait('copy', ev);
  }
  sh('dmkit status copy');
  say(line('copy', false));
  const cloned = fs.readFileSync(d).equals(model);
  say(`disk-d.img equals the volume: ${cloned ? 'yes' : 'NO'}`);
  check('the mirror copy equals the volume', cloned);
  for (const n of ['copy', 'vol', 'stripes']) await dm.remove(n);
}

async function main(): Promise<void> {
  process.env.DMKIT_LOG ??= 'error'; // the site's failure is narrated here, not logged as warnings
  const t0 = Date.now();
  say(`dmkit demo in ${dir}`);
  say();
  await replication();
  await network();
  await stacked();
  await dm.close();
  fs.rmSync(dir, { recursive: true, force: true });
  const failed = checks.filter((c) => !c.ok);
  say();
  if (failed.length === 0) {
    say(`demo OK in ${((Date.now() - t0) / 1000).toFixed(1)} s: ${checks.length} checks passed (site B identical to site A after a slow spell, an outage and a resync; site C over tcp identical after a broken link)`);
  } else {
    for (const c of failed) say(`FAILED: ${c.what}`);
    say(`demo FAILED: ${failed.length} of ${checks.length} checks`);
    process.exit(1);
  }
}

main().catch((err) => {
  process.stderr.write(`demo failed: ${(err as Error).stack ?? err}\n`);
  process.exit(1);
});
