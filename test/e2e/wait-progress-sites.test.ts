/**
 * `dmkit wait --progress` of a group with two sites: site 2 suspended on its dirty logs
 * (a full resync asked for while suspended), site 1 resyncing. The wait follows site 1's
 * resync and ends when it is done, instead of waiting for site 2, which resyncs nothing
 * while suspended; site 1's image then equals the local one. Once site 2 is resumed, its
 * own resync shows and the wait ends again with both sites in sync.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanup, dmkit, image, ok, sandbox, type Sandbox } from '../helpers/daemon.ts';

const SECTORS = 8192; // 4 MiB
let sb: Sandbox;

const sites = async (): Promise<Record<number, string>> => {
  const j = JSON.parse(await ok(sb, ['info', '--json', 'repl'])) as Array<{ replication: { sites: Array<{ slink: number; state: string }> } }> | { replication: { sites: Array<{ slink: number; state: string }> } };
  const info = Array.isArray(j) ? j[0]! : j;
  return Object.fromEntries(info.replication.sites.map((s) => [s.slink, s.state]));
};

beforeAll(async () => {
  sb = sandbox();
  const rlog = image(sb, 'rlog', (8192 + 64) * 512);
  const local = image(sb, 'local.img', SECTORS * 512, (i) => (i * 31 + 7) & 0xff);
  const r1 = image(sb, 'r1.img', SECTORS * 512);
  const r2 = image(sb, 'r2.img', SECTORS * 512);
  const d1 = image(sb, 'd1', 32 * 1024);
  const d2 = image(sb, 'd2', 32 * 1024);
  await ok(sb, ['create', 'repl', '--table', `0 1 replicator ringbuffer 4 ${rlog} 0 auto 8192 blockdev 1 0 blockdev 3 1 async retest=1 blockdev 3 2 async retest=1`]);
  await ok(sb, ['create', 'vol', '--table', `0 ${SECTORS} replicator-dev dm:repl 0 0 1 ${local} nolog 0 1 1 ${r1} disk 3 ${d1} 64 nosync 2 1 ${r2} disk 3 ${d2} 64 nosync`]);
}, 60_000);

afterAll(async () => {
  await cleanup(sb);
});

describe('wait --progress with a suspended site', () => {
  it('follows the resync that can run and ends when it is done', async () => {
    await ok(sb, ['message', 'repl', '0', 'slink', 'suspend', '2']);
    await ok(sb, ['message', 'repl', '0', 'resync', '2', 'full']);
    await ok(sb, ['message', 'repl', '0', 'resync-rate', '1m']); // 4 s: still running when the wait (a CLI start on a loaded machine) begins
    await ok(sb, ['message', 'repl', '0', 'resync', '1', 'full']);
    const r = await dmkit(sb, ['wait', '--progress', 'repl']);
    expect(r.code).toBe(0);
    const lines = r.stderr.trimEnd().split('\n');
    expect(lines.at(-1)).toMatch(/^repl: resync 8192\/8192 sectors \(100%\)/); // site 1's work only: one device's worth
    expect(await sites()).toEqual({ 0: 'local', 1: 'asynchronous', 2: 'suspended' });
    const local = fs.readFileSync(path.join(sb.dir, 'local.img'));
    expect(fs.readFileSync(path.join(sb.dir, 'r1.img')).equals(local)).toBe(true);
    expect(fs.readFileSync(path.join(sb.dir, 'r2.img')).equals(local)).toBe(false);

    await ok(sb, ['message', 'repl', '0', 'slink', 'resume', '2']);
    const r2 = await dmkit(sb, ['wait', '--progress', 'repl']);
    expect(r2.code).toBe(0);
    expect(await sites()).toEqual({ 0: 'local', 1: 'asynchronous', 2: 'asynchronous' });
    expect(fs.readFileSync(path.join(sb.dir, 'r2.img')).equals(local)).toBe(true);
  }, 60_000);
});
