/**
 * What a power loss of the source costs the sites, with and without the activity log
 * (docs/benchmarks.md, "An activity log"): the real daemon, a group with a `blockdev` site
 * on a file, a device of `--size` (default 1 GiB) filled with random bytes at both ends.
 * Writes go to 4 extents; the group is suspended (a full flush) and what the disks hold
 * is copied; 4 more writes (one in a new extent) reach the site; the daemon is SIGKILLed
 * and the image and the log's ring are put back as copied, the slots as written, from
 * another boot (as test/e2e/replicator-activity-daemon.test.ts does). Timed: from the
 * restart command until the site ships in order again with nothing to resync; with the
 * bytes compared by checksum and the bytes copied. Images stay in the page cache (the
 * machine's disk is not what is compared here: the amount read is).
 *
 *   npx tsx tools/bench/power-loss-verify.ts [--size 1g] [--runs 3] [--out FILE]
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { ok } from '../../test/helpers/daemon.ts';
import { fromAnotherBoot } from '../../test/helpers/power-loss.ts';
import { SiteDaemon } from '../../test/helpers/site-daemon.ts';

const MIB = 1 << 20;
const EXTENT = 4 * MIB;
const RING = 16384;

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1]! : dflt;
}
const bytes = (() => {
  const m = /^(\d+)([mg])$/i.exec(arg('size', '1g'));
  if (!m) throw new Error('--size N[m|g]');
  return Number(m[1]) * (m[2]!.toLowerCase() === 'g' ? 1024 * MIB : MIB);
})();
const runs = Number(arg('runs', '3'));
const out = arg('out', '');
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface Site { mode: string; resync: unknown; comparedBytes: number; resyncedBytes: number; lag: { ios: number } }

async function site(d: SiteDaemon): Promise<Site> {
  const j = JSON.parse(await ok(d.sb, ['status', '--json', 'repl'])) as Array<{ lines: Array<{ detail: { sites: Site[] } }> }>;
  return j[0]!.lines[0]!.detail.sites[1]!;
}

async function once(al: number | null): Promise<{ al: number | null; seconds: number; comparedBytes: number; resyncedBytes: number }> {
  const d = await SiteDaemon.start();
  try {
    const f = (n: string): string => path.join(d.sb.dir, n);
    const data = crypto.randomBytes(16 * MIB);
    const fd = fs.openSync(f('local.img'), 'w');
    for (let o = 0; o < bytes; o += data.length) fs.writeSync(fd, data, 0, Math.min(data.length, bytes - o), o);
    fs.closeSync(fd);
    fs.copyFileSync(f('local.img'), f('remote.img'));
    fs.writeFileSync(f('rlog'), '');
    fs.truncateSync(f('rlog'), (RING + 64) * 512);
    fs.writeFileSync(f('dlog'), '');
    fs.truncateSync(f('dlog'), 1 * MIB);
    const slink0 = al === null ? 'blockdev 1 0' : `blockdev 2 0 al-extents=${al}`;
    await ok(d.sb, ['create', 'repl', '--table', `0 1 replicator ringbuffer 4 ${f('rlog')} 0 auto ${RING} ${slink0} blockdev 3 1 async retest=1`]);
    await ok(d.sb, ['create', 'vol', '--table', `0 ${bytes / 512} replicator-dev dm:repl 0 0 1 ${f('local.img')} nolog 0 1 1 ${f('remote.img')} disk 3 ${f('dlog')} 128 nosync`]);
    const put = async (offset: number): Promise<void> => {
      fs.writeFileSync(f('block'), crypto.randomBytes(4096));
      await ok(d.sb, ['io', 'write', 'vol', String(offset), f('block')]);
    };
    // polled every 20 ms from the status; the images are compared once it says so (not timed)
    const inOrder = async (limitMs: number): Promise<Site> => {
      const end = Date.now() + limitMs;
      for (;;) {
        const s = await site(d);
        if (s.mode === 'in-order' && s.resync === null && s.lag.ios === 0) return s;
        if (Date.now() > end) throw new Error(`the site did not catch up in ${limitMs} ms: ${JSON.stringify(s)}`);
        await sleep(20);
      }
    };
    const same = (): void => {
      if (!fs.readFileSync(f('remote.img')).equals(fs.readFileSync(f('local.img')))) throw new Error('the site differs from the local image');
    };
    for (const x of [0, 3, 7, 11]) await put(x * EXTENT + 8192);
    await inOrder(60_000);
    await sleep(300);
    same();
    await ok(d.sb, ['suspend', 'vol']);
    await ok(d.sb, ['suspend', 'repl']);
    const img = fs.readFileSync(f('local.img'));
    const log = fs.readFileSync(f('rlog'));
    await ok(d.sb, ['resume', 'repl']);
    await ok(d.sb, ['resume', 'vol']);
    for (const x of [0, 3, 7, 13]) await put(x * EXTENT + 65536);
    await sleep(500);
    await d.kill();
    fs.readFileSync(f('rlog')).copy(log, 0, 0, 24 * 512);
    fromAnotherBoot(log);
    fs.writeFileSync(f('rlog'), log);
    fs.writeFileSync(f('local.img'), img);
    const t0 = performance.now();
    await d.restart();
    const s = await inOrder(600_000);
    const seconds = (performance.now() - t0) / 1000;
    same();
    return { al, seconds, comparedBytes: s.comparedBytes, resyncedBytes: s.resyncedBytes };
  } finally {
    await d.close();
  }
}

const results = [];
for (let i = 0; i < runs; i++) {
  for (const al of i % 2 === 0 ? [null, 0] : [0, null]) {
    const r = await once(al);
    results.push(r);
    console.log(`${al === null ? 'activity log (490)' : 'al-extents=0'}: ${r.seconds.toFixed(2)} s, compared ${(r.comparedBytes / MIB).toFixed(0)} MiB, copied ${(r.resyncedBytes / MIB).toFixed(2)} MiB`);
  }
}
if (out) fs.writeFileSync(out, JSON.stringify({ size: bytes, date: new Date().toISOString(), results }, null, 2) + '\n');
