/**
 * The operator's way out when a volume of a replicated group is gone (docs/targets/
 * replicator.md, `forget`), with the real daemon and CLI: the daemon is SIGKILLed while the
 * site is behind on vol1, vol1's disk (its image file) is lost, and the restarted daemon
 * cannot restore vol1. vol1's kept log entries then hold the ring: once it is full, vol0's
 * writer waits and the daemon's log says which device holds it. `dmkit message repl 0
 * forget 1` lets the writer go and vol0 reaches the site; a new disk for vol1 loaded later
 * is verified whole at the site, which ends equal to it.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ok, start } from '../helpers/daemon.ts';
import { SiteDaemon } from '../helpers/site-daemon.ts';
import { until } from './failover-sites.ts';

const SECTORS = 4096; // 2 MiB volumes
const RING = 4096; // a 2 MiB ring: one vol0 write of 2 MiB does not fit beside vol1's kept entries
let d: SiteDaemon | null = null;
afterAll(async () => {
  await d?.close();
});

function blank(f: string, bytes: number): string {
  fs.writeFileSync(f, '');
  fs.truncateSync(f, bytes);
  return f;
}

describe('forget with the daemon', { timeout: 120_000 }, () => {
  it('a volume whose disk is lost at a restart holds the ring; forget lets the others go on; its new disk is verified whole at the site', async () => {
    d = await SiteDaemon.start();
    const sb = d.sb;
    const f = (name: string): string => path.join(sb.dir, name);
    const rlog = blank(f('rlog'), (RING + 64) * 512);
    for (const i of [0, 1]) {
      for (const n of [`local${i}.img`, `remote${i}.img`]) blank(f(n), SECTORS * 512);
      blank(f(`dlog${i}`), 64 * 512);
    }
    const devTable = (i: number): string => `0 ${SECTORS} replicator-dev dm:repl ${i} 0 1 ${f(`local${i}.img`)} nolog 0 1 1 ${f(`remote${i}.img`)} disk 3 ${f(`dlog${i}`)} 64 nosync`;
    await ok(sb, ['create', 'repl', '--table', `0 1 replicator ringbuffer 4 ${rlog} 0 auto ${RING} blockdev 1 0 blockdev 3 1 async retest=1`]);
    for (const i of [0, 1]) await ok(sb, ['create', `vol${i}`, '--table', devTable(i)]);

    // the site misses vol1's writes (slink suspended): the log keeps them for it
    await ok(sb, ['message', 'repl', '0', 'slink', 'suspend', '1']);
    const block = f('block');
    for (let k = 0; k < 8; k++) {
      fs.writeFileSync(block, crypto.randomBytes(4096));
      await ok(sb, ['io', 'write', 'vol1', String(k * 65536), block]);
    }
    await d.kill(); // SIGKILL
    fs.rmSync(f('local1.img')); // vol1's disk is gone
    await d.restart();
    expect(d.log()).toMatch(/vol1.*local1\.img/); // its table could not be restored
    expect(await ok(sb, ['table', 'vol1'])).toBe('\n'); // no table

    // vol0 writes more than the ring holds beside vol1's entries: the writer waits, and the log says why
    const ref0 = crypto.randomBytes(SECTORS * 512);
    fs.writeFileSync(f('ref0'), ref0);
    const writer = start(sb, ['io', 'write', 'vol0', '0', f('ref0')]);
    await until('the daemon to say what holds the ring', async () => d!.log(), (log) => log.includes('repl: replication log full: device 1 not loaded since the restart holds it'));
    expect(writer.child.exitCode).toBeNull(); // still waiting
    expect(await ok(sb, ['message', 'repl', '0', 'forget', '1'])).toBe('');
    expect(await writer.done).toMatchObject({ code: 0, stderr: '' });
    await until('vol0 at the site', async () => fs.readFileSync(f('remote0.img')).equals(ref0), (v) => v);
    expect(fs.readFileSync(f('local0.img')).equals(ref0)).toBe(true);
    // (whether its last writes were also still to be replayed depends on the SIGKILL's moment against the 200 ms checkpoints)
    expect(d.log()).toMatch(/repl: device 1 forgotten: (its logged writes not yet on its local device are dropped, and )?no site is sent its logged writes/);

    // a new (blank) disk for vol1: loaded, it is verified whole at the site, which ends equal to it
    blank(f('local1.img'), SECTORS * 512);
    await ok(sb, ['load', 'vol1', '--table', devTable(1)]);
    await ok(sb, ['resume', 'vol1']);
    await until('vol1 verified whole', async () => d!.log(), (log) => log.includes('repl: device 1 (vol1) was forgotten: every site verifies it whole'));
    await until('the site of vol1 equal to its new disk', async () => fs.readFileSync(f('remote1.img')).equals(fs.readFileSync(f('local1.img'))), (v) => v, 60_000);
    const status = await ok(sb, ['status', 'vol1']);
    expect(status).toMatch(/A,64\/64/);
  });
});
