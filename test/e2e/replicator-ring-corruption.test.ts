/**
 * A replication log damaged between two runs of the engine. The ring is read here with an
 * independent decoder of the documented layout (ring-format.ts's header comment: a 4 KiB
 * log header, two 4 KiB checkpoint slots, then entries of a 512-byte header — magic "DMKE",
 * seq at byte 32, sector at 48 — and their payload), never with the engine's own code.
 *
 *  (a) a flipped byte in the log header: the replicator refuses to load, naming the
 *      corruption and the place (device and sector);
 *  (b) a flipped payload byte in an entry of the backlog (entries the suspended site had
 *      not received when the engine closed): at recovery that entry and every later one
 *      are discarded and never shipped; the local devices keep every write they
 *      acknowledged, and since the checkpoint counted those entries as written, the log is
 *      known damaged: the site is verified whole and ends equal to the local images, with no
 *      byte of the damage.
 *  (c) a damaged entry that one site had already taken while another site held the ring:
 *      the first site's checkpointed position lies beyond the head the scan finds; the
 *      group still loads (the position is taken at the head) and ships a new write to both.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { DeviceMapper, TableError } from '../../src/index.ts';
import { expectSameBytes } from '../compliance/helpers.ts'; // also quiets the engine's warnings
import {
  caughtUp, makeGroup, Model, pokeFile, readFileRange, replJson, SECTOR, slinkState, tmpDir, waitFor, type Group,
} from '../helpers/replication.ts';

const LEN = 2048;
const RING = 8192;
/** the ring area starts after the header and two checkpoint slots: 3 × 4 KiB */
const RING_START = 3 * 4096;
const ENTRY_MAGIC = Buffer.from('DMKE', 'latin1');

let g: Group | null = null;
let dm2: DeviceMapper | null = null;
afterEach(async () => {
  await dm2?.close();
  await g?.dm.close().catch(() => undefined);
  if (g) fs.rmSync(g.dir, { recursive: true, force: true });
  g = null;
  dm2 = null;
});

/** The same group's devices again in a new engine, from the tables the first one printed. */
async function reopen(grp: Group, replTable: string, devTables: string[]): Promise<DeviceMapper> {
  const dm = new DeviceMapper();
  for (let i = 0; i < grp.spec.devices; i++) {
    await dm.create(`site${i}`, { table: `0 ${LEN} linear ${grp.remote(i)} 0` });
  }
  await dm.create('repl', { table: `0 1 replicator ${replTable}` });
  for (const [i, t] of devTables.entries()) await dm.create(`vol${i}`, { table: `0 ${LEN} replicator-dev ${t}` });
  return dm;
}

/** byte offset in the log file of the entry with sequence number `seq` (scanning every 512-byte position) */
function findEntry(rlog: Buffer, seq: number): { at: number; sector: number; payload: number } {
  for (let at = RING_START; at + 512 <= rlog.length; at += 512) {
    if (!rlog.subarray(at, at + 4).equals(ENTRY_MAGIC)) continue;
    if (rlog[at + 8] !== 1 || Number(rlog.readBigUInt64LE(at + 32)) !== seq) continue;
    return { at, sector: Number(rlog.readBigUInt64LE(at + 48)), payload: rlog.readUInt32LE(at + 12) };
  }
  throw new Error(`no entry with seq ${seq} in the ring`);
}

describe('a corrupted replication log', () => {
  it('(a) a flipped byte in the log header: the replicator refuses to load, naming the corruption and the place', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 1, sectors: LEN, ring: RING });
    await g.dm.write('vol0', 0, crypto.randomBytes(8192));
    await waitFor(() => caughtUp(g!), 'caught up');
    const replTable = g.dm.table('repl')[0]!.params; // `… open 8192 …`
    const devTable = g.dm.table('vol0')[0]!.params;
    await g.dm.close();
    const rlog = path.join(g.dir, 'rlog');
    const where = `${rlog} at sector 0`;

    const cases: Array<{ at: number; table: string; message: string }> = [
      // the size field (byte 32): CRC-checked
      { at: 33, table: replTable, message: `ringbuffer: ${where}: header CRC mismatch (corrupted log)` },
      // the table that created it (auto): refused too, never overwritten
      { at: 33, table: g.replTable.replace(/^0 1 replicator /, ''), message: `ringbuffer: ${where}: header CRC mismatch (corrupted log); auto never overwrites it (create does)` },
      // the magic ("DMKRLOG\0" with its first byte flipped)
      { at: 0, table: replTable, message: `ringbuffer: ${where}: not a replication log (foreign data, magic 454d4b524c4f4700)` },
      // the version (a later format keeps magic and version where they are)
      { at: 8, table: replTable, message: `ringbuffer: ${where}: unsupported replication log version 0 (this dmkit reads version 1)` },
    ];
    const header = readFileRange(rlog, 0, 4096);
    for (const c of cases) {
      const bad = Buffer.from(header);
      bad[c.at] ^= 0x01;
      pokeFile(rlog, 0, bad);
      const dm = new DeviceMapper();
      try {
        await dm.create('site0', { table: `0 ${LEN} linear ${g.remote(0)} 0` });
        const err = await dm.create('repl', { table: `0 1 replicator ${c.table}` }).then(() => null, (e: unknown) => e as Error);
        expect(err).toBeInstanceOf(TableError);
        expect(err!.message).toBe(`repl: line 1: replicator: ${c.message}`);
        expect(dm.has('repl')).toBe(false);
      } finally {
        await dm.close();
      }
      expect(readFileRange(rlog, 0, 4096).equals(bad), 'the damaged header is left as it was').toBe(true);
    }
    // the header put back: the log opens again, with what it held
    pokeFile(rlog, 0, header);
    dm2 = await reopen(g, replTable, [devTable]);
    expect(dm2.status('repl')[0]!.params).toMatch(/^0:S,0,0 1:A,0,0 \d+\/8192$/);
  });

  it('(c) a damaged entry that one site had taken while the other held the ring: the group still loads, and ships on', async () => {
    const dir = tmpDir();
    const file = (name: string, sectors: number): string => {
      const f = path.join(dir, name);
      fs.writeFileSync(f, '');
      fs.truncateSync(f, sectors * SECTOR);
      return f;
    };
    const rlog = file('rlog', RING + 64);
    const local = file('local.img', LEN);
    const remotes = [file('remote1.img', LEN), file('remote2.img', LEN)];
    const dlogs = [file('dlog1', 64), file('dlog2', 64)];
    const replTable = `ringbuffer 4 ${rlog} 0 auto ${RING} blockdev 1 0 blockdev 3 1 async retest=1 blockdev 3 2 async retest=1`;
    const devTable = `dm:repl 0 0 1 ${local} nolog 0 1 1 dm:site1 disk 3 ${dlogs[0]} 64 nosync 2 1 dm:site2 disk 3 ${dlogs[1]} 64 nosync`;
    const build = async (): Promise<DeviceMapper> => {
      const dm = new DeviceMapper();
      for (const [i, r] of remotes.entries()) await dm.create(`site${i + 1}`, { table: `0 ${LEN} linear ${r} 0` });
      await dm.create('repl', { table: `0 1 replicator ${replTable}` });
      await dm.create('vol0', { table: `0 ${LEN} replicator-dev ${devTable}` });
      return dm;
    };
    const model = new Model(LEN);
    const shipAll = (dm: DeviceMapper): Promise<void> => waitFor(() => /^0:S,0,0 1:A,0,0 2:A,0,0 /.test(dm.status('repl')[0]!.params), 'both sites caught up');
    let dm = await build();
    try {
      for (let k = 0; k < 4; k++) {
        const data = crypto.randomBytes(4096);
        await dm.write('vol0', k * 4096, data);
        model.write(k * 4096, data);
      }
      await shipAll(dm);
      await dm.message('repl', 0, ['slink', 'suspend', '2']); // site 2 holds the ring from here
      const head0 = replJson(dm).replog.head;
      for (let k = 0; k < 10; k++) {
        const data = Buffer.alloc(4096, `<held ${k}>`);
        await dm.write('vol0', (20 + k) * 4096, data);
        model.write((20 + k) * 4096, data);
      }
      await waitFor(() => /1:A,0,0/.test(dm.status('repl')[0]!.params), 'site 1 caught up');
      await new Promise((r) => setTimeout(r, 500)); // checkpoints record site 1 at the head
      await dm.close();
      // the fourth held entry damaged: the scan ends before site 1's checkpointed position
      const e = findEntry(fs.readFileSync(rlog), head0 + 4);
      pokeFile(rlog, e.at + 512 + 100, Buffer.from('DAMAGED', 'latin1'));
      dm = await build(); // loads: the position beyond the head is taken at it (it was EINVAL at resume)
      expect(replJson(dm).replog.head).toBe(head0 + 3);
      await dm.message('repl', 0, ['slink', 'resume', '2']);
      const after = crypto.randomBytes(4096);
      await dm.write('vol0', 60 * 4096, after);
      model.write(60 * 4096, after);
      await shipAll(dm);
      for (const r of remotes) expectSameBytes(readFileRange(r, 60 * 4096, 4096), after, `${path.basename(r)}: the write after the reload`);
      expectSameBytes(fs.readFileSync(local), model.bytes, 'the local image: every acknowledged write');
    } finally {
      await dm.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('(b) a flipped payload byte in a backlog entry: it and every later entry are discarded at recovery, never shipped', async () => {
    g = await makeGroup({ dir: tmpDir(), devices: 2, sectors: LEN, ring: RING });
    const models = [new Model(LEN), new Model(LEN)];
    // shipped before the damage
    for (let k = 0; k < 20; k++) {
      const data = crypto.randomBytes(4096);
      const off = crypto.randomInt(LEN / 8) * 4096;
      await g.dm.write(`vol${k % 2}`, off, data);
      models[k % 2]!.write(off, data);
    }
    await g.dm.flush('vol0');
    await waitFor(() => caughtUp(g!), 'caught up');
    const shipped = models.map((m) => Buffer.from(m.bytes));

    // the backlog: ten writes the suspended site has not received, each a recognisable pattern
    await g.dm.message('repl', 0, ['slink', 'suspend', '1']);
    const head0 = replJson(g.dm).replog.head;
    const backlog: Array<{ dev: number; off: number; data: Buffer }> = [];
    for (let k = 0; k < 10; k++) {
      const data = Buffer.alloc(4096, `<backlog write ${k}>`);
      const off = (k * 3 + 1) * 4096;
      await g.dm.write(`vol${k % 2}`, off, data);
      backlog.push({ dev: k % 2, off, data });
    }
    expect(replJson(g.dm).replog.head).toBe(head0 + 10);
    expect(slinkState(g.dm)).toBe('D');
    const replTable = g.dm.table('repl')[0]!.params;
    const devTables = [0, 1].map((i) => g!.dm.table(`vol${i}`)[0]!.params);
    await g.dm.close();

    // the sixth backlog entry's payload changed on disk: its CRC no longer matches
    const rlog = path.join(g.dir, 'rlog');
    const BAD = 5;
    const e = findEntry(fs.readFileSync(rlog), head0 + 1 + BAD);
    expect(e).toMatchObject({ sector: backlog[BAD]!.off / SECTOR, payload: 4096 });
    const garbage = Buffer.from('CORRUPTED-PAYLOAD', 'latin1');
    pokeFile(rlog, e.at + 512 + 1000, garbage);

    dm2 = await reopen(g, replTable, devTables);
    expect(replJson(dm2).replog.head).toBe(head0 + BAD); // the scan stopped at the damaged entry
    // the checkpoint counted the backlog as written to the local devices (localDone) and the
    // log no longer holds it: damaged in this boot, not cut off. The entries lost may be
    // anywhere, so every site is verified whole against the local devices
    const verified = (): boolean => /^0:S,0,0 1:A,0,0 /.test(dm2!.status('repl')[0]!.params) &&
      [0, 1].every((i) => dm2!.status(`vol${i}`)[0]!.params === 'A,1/1 A,32/32');
    await waitFor(verified, 'every site verified whole');
    // the local devices: every acknowledged write, the discarded ones included; the site: the same
    for (const w of backlog) models[w.dev]!.write(w.off, w.data);
    for (let i = 0; i < 2; i++) {
      expectSameBytes(fs.readFileSync(g.local(i)), models[i]!.bytes, `local image ${i}`);
      expectSameBytes(await dm2.read(`vol${i}`, 0, LEN * SECTOR), models[i]!.bytes, `vol${i} read back`);
      const remote = fs.readFileSync(g.remote(i));
      expectSameBytes(remote, models[i]!.bytes, `site image ${i}: verified against the local image`);
      expect(remote.includes(garbage), `site image ${i} holds the damaged bytes`).toBe(false);
    }
    expect(shipped.some((b, i) => !b.equals(models[i]!.bytes)), 'the backlog changed the images').toBe(true);

    // new writes after recovery ship in order on top
    const after = crypto.randomBytes(4096);
    await dm2.write('vol1', 0, after);
    models[1]!.write(0, after);
    await waitFor(() => /^0:S,0,0 1:A,0,0 /.test(dm2!.status('repl')[0]!.params), 'caught up after recovery');
    expectSameBytes(readFileRange(g.remote(1), 0, 4096), after, 'a write after recovery on the site');
    for (let i = 0; i < 2; i++) expectSameBytes(fs.readFileSync(g.remote(i)), models[i]!.bytes, `site image ${i} at the end`);
  });
});
