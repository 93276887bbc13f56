/**
 * A sequential writer over fresh extents, with and without the activity log: the cost of
 * its checkpoint slot writes (one per 4 MiB extent, held ahead of the stream). A group as
 * R1's (64 MiB log, a blockdev site on a file, async), one replicator-dev over a fresh
 * sparse image; `--gib` GiB written in 1 MiB writes, 8 in flight, from offset 0; timed to
 * the last acknowledgement. Alternates `al-extents` default and 0, `--runs` times each.
 *
 *   npx tsx tools/bench/seq-activity.ts [--gib 2] [--runs 2] [--out FILE]
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { DeviceMapper } from '../../src/index.ts';

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1]! : dflt;
}
const GIB = 1 << 30;
const bytes = Number(arg('gib', '2')) * GIB;
const runs = Number(arg('runs', '2'));
const out = arg('out', '');

async function once(al: number | null): Promise<{ al: number | null; mbps: number; misses: number; prefetched: number; flushes: number; outside: number }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmkit-seqal-'));
  const f = (n: string): string => path.join(dir, n);
  const blank = (n: string, size: number): void => {
    fs.writeFileSync(f(n), '');
    fs.truncateSync(f(n), size);
  };
  blank('rlog', 64 << 20);
  blank('local.img', bytes);
  blank('remote.img', bytes);
  blank('dlog', 1 << 20);
  const dm = new DeviceMapper();
  try {
    const slink0 = al === null ? 'blockdev 1 0' : `blockdev 2 0 al-extents=${al}`;
    await dm.create('repl', { table: `0 1 replicator ringbuffer 4 ${f('rlog')} 0 auto ${(64 << 20) / 512} ${slink0} blockdev 3 1 async retest=1` });
    await dm.create('vol0', { table: `0 ${bytes / 512} replicator-dev dm:repl 0 0 1 ${f('local.img')} nolog 0 1 1 ${f('remote.img')} disk 3 ${f('dlog')} 1024 nosync` });
    const buf = Buffer.alloc(1 << 20, 0x5a);
    let next = 0;
    const t0 = performance.now();
    const writer = async (): Promise<void> => {
      while (next < bytes) {
        const at = next;
        next += buf.length;
        await dm.write('vol0', at, buf);
      }
    };
    await Promise.all(Array.from({ length: 8 }, writer));
    const seconds = (performance.now() - t0) / 1000;
    const a = (dm.status('repl')[0]!.detail as { activityLog: { misses: number; prefetched: number; flushes: number; outside: number } }).activityLog;
    return { al, mbps: bytes / seconds / 1e6, misses: a.misses, prefetched: a.prefetched, flushes: a.flushes, outside: a.outside };
  } finally {
    await dm.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

const results = [];
for (let i = 0; i < runs; i++) {
  for (const al of i % 2 === 0 ? [null, 0] : [0, null]) {
    const r = await once(al);
    results.push(r);
    console.log(`${al === null ? 'activity log (490)' : 'al-extents=0'}: ${r.mbps.toFixed(0)} MB/s acked; misses ${r.misses}, prefetched ${r.prefetched}, flushes ${r.flushes}, outside ${r.outside}`);
  }
}
if (out) fs.writeFileSync(out, JSON.stringify({ bytes, date: new Date().toISOString(), results }, null, 2) + '\n');
