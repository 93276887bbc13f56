/**
 * A clean stop of the daemon with a replicator-dev suspended (docs/targets/replicator.md,
 * "Daemon restart"): the device is torn down by the stopping engine, so it stays in its
 * group, and the site keeps its position in the log. After the restart the site is sent the
 * backlog the log kept, in order, with no resync. Before the fix the daemon removed
 * suspended devices itself before the engine knew it was closing: the device left the
 * group, its site's backlog went to the dirty logs, and the restart resynced it.
 */
import fs from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { ok } from '../helpers/daemon.ts';
import { REGION_BYTES, closeAll, primaryAndReceiver, put, until } from './failover-sites.ts';

afterAll(closeAll);

describe('daemon stop with a suspended replicator-dev', { timeout: 120_000 }, () => {
  it('the device stays in its group: after the restart its site is sent the kept backlog in order, no resync', async () => {
    const { a, b, bImg, ref } = await primaryAndReceiver();
    try {
      await b.kill(); // B away: what A writes now stays in A's log for it
      for (let i = 0; i < 5; i++) await put(a, ref, (3 + 7 * i) * REGION_BYTES + 4096, 4096);
      await until('the backlog in the log', () => a.site(1), (s) => s.lag.ios >= 5);
      await ok(a.d.sb, ['suspend', 'vol']);
      await a.d.kill('SIGTERM');
      expect(a.d.log()).toContain('shutdown: vol: suspended; closing without flush');
      await a.d.restart();
      await ok(a.d.sb, ['resume', 'vol']).catch(() => undefined); // restored suspended, or active
      await b.restart();
      await until('B to equal the reference', async () => fs.readFileSync(bImg).equals(ref), (v) => v, 60_000);
      const s = (await a.site(1)) as unknown as { mode: string; resyncedBytes: number };
      expect(s.mode).toBe('in-order');
      expect(s.resyncedBytes).toBe(0); // shipped from the log, not resynced from its dirty logs
    } catch (err) {
      throw new Error(`${(err as Error).message}\nA's log: ${a.d.logTail(5000)}`, { cause: err });
    }
  });
});
