/**
 * The judgement of a tcp site's position at connect (src/targets/replicator-lost.ts) against
 * a real ringbuffer log: positions a site reaches by applying this log are never judged to
 * hold lost entries; positions it can only have from entries the log lost always are.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { FileDev } from '../../src/core/file-dev.ts';
import { log } from '../../src/core/log.ts';
import { createReplog } from '../../src/replog/registry.ts';
import type { Replog } from '../../src/replog/types.ts';
import { epochOf, holdsLostEntries } from '../../src/targets/replicator-lost.ts';

const files: FileDev[] = [];
let dir = '';
afterEach(() => {
  for (const f of files.splice(0)) f.close();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

/** a log with entries 1 … 6 of epochs 10 10 20 30 30 40 (a flush alone in epoch 20) */
async function sixEntries(): Promise<Replog> {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmkit-lost-'));
  const file = path.join(dir, 'rlog');
  fs.writeFileSync(file, '');
  fs.truncateSync(file, 4096 * 512);
  const rl = await createReplog('ringbuffer', {
    device: 'repl',
    open: async (ref) => {
      const f = FileDev.open(ref, ref);
      files.push(f);
      return f;
    },
    event: () => undefined,
    log: log('lost-test'),
  }, [file, '0', 'create', '4096']);
  await rl.recover();
  for (const [i, epoch] of [10, 10, 20, 30, 30, 40].entries()) {
    const flush = epoch === 20;
    await rl.append({ op: flush ? 'flush' : 'write', devNr: 0, sector: i * 8, sectors: flush ? 0 : 8, data: flush ? Buffer.alloc(0) : Buffer.alloc(4096, i + 1), epoch, fua: false });
  }
  expect(rl.head).toBe(6);
  return rl;
}

describe('holdsLostEntries: a site position (applied A, epoch P) against the log', () => {
  it('positions a site reaches by applying this log are not judged lost', async () => {
    const rl = await sixEntries();
    const legit: Array<[number, number]> = [
      [0, 0], // nothing applied
      [2, 10], // the epoch of entry A
      [2, 20], // entry A + 1 started the next epoch (a flush, alone in it)
      [3, 20], // the flush entry applied (P = its epoch)
      [3, 30], // the next epoch began
      [4, 30], [5, 30], [5, 40], [6, 40],
      [2, 30], // A held below a failed entry 3 given up by the sender; P is the epoch after it
    ];
    for (const [a, p] of legit) expect(await holdsLostEntries(rl, 6, { applied: a, epoch: p, started: a }), `(${a}, ${p})`).toBe(false);
  });

  it('positions only a lost entry or a lost epoch gives are judged lost', async () => {
    const rl = await sixEntries();
    const lost: Array<[number, number]> = [
      [7, 40], [9, 41], // beyond the head: entries the log never had
      [3, 10], // the log's entry 3 is of a later epoch than the site was at
      [6, 35], // the log's entry 6 (epoch 40) is newer than the site's epoch
      [2, 15], // between the epochs of entries 2 and 3: an epoch the log does not have
      [5, 35], // between 30 (entry 5) and 40 (entry 6): the same
      [6, 41], // the head, and the site began a later epoch
    ];
    for (const [a, p] of lost) expect(await holdsLostEntries(rl, 6, { applied: a, epoch: p, started: a }), `(${a}, ${p})`).toBe(true);
  });

  it('the highest seq a site began: beyond the head, or of another epoch than its position\'s, is lost; one of this log\'s is not', async () => {
    const rl = await sixEntries();
    const at = (applied: number, epoch: number, started: number): Promise<boolean> => holdsLostEntries(rl, 6, { applied, epoch, started });
    expect(await at(3, 30, 5)).toBe(false); // entries 4 and 5 of epoch 30 begun
    expect(await at(5, 40, 6)).toBe(false);
    expect(await at(6, 40, 8)).toBe(true); // began entries 7 and 8: the log has none
    expect(await at(3, 30, 6)).toBe(true); // entry 6 is of epoch 40 here, not the 30 the site was in
    expect(await at(3, 25, 5)).toBe(true);
    await rl.checkpoint({ localDone: 6, slinks: [{ slink: 1, seq: 6, mode: 'ship' }] });
    expect(rl.tail).toBe(7); // the ring is empty: A = 6 cannot be read
    expect(await at(6, 40, 6)).toBe(false);
    expect(await at(6, 45, 6)).toBe(false); // not judged: nothing to read
    expect(await at(6, 45, 9)).toBe(true); // but the entries it began are beyond the head
    await rl.destroy();
  });

  it('a position before the tail is not judged; epochOf reads what the ring has, 0 elsewhere', async () => {
    const rl = await sixEntries();
    await rl.checkpoint({ localDone: 4, slinks: [{ slink: 1, seq: 4, mode: 'ship' }] });
    expect(rl.tail).toBe(5);
    expect(await holdsLostEntries(rl, 6, { applied: 3, epoch: 10, started: 3 })).toBe(false); // entry 3 is gone: cannot tell
    expect(await holdsLostEntries(rl, 6, { applied: 5, epoch: 20, started: 5 })).toBe(true); // entry 5 is kept: judged
    expect([await epochOf(rl, 4), await epochOf(rl, 5), await epochOf(rl, 6), await epochOf(rl, 7)]).toEqual([0, 30, 40, 0]);
    await rl.destroy();
  });
});
