/**
 * GroupRole's verdicts on a sender's generation ids (src/targets/replicator-role.ts), with
 * its state on disk: the same generation resumes, the one the sender last knew a partial
 * resync, and after an unplanned promotion a site that only received the old generation a
 * full (checksum) resync, while the old primary itself (it made that generation; its dirty
 * logs hold what it never shipped) still gets a partial one.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { log } from '../../src/core/log.ts';
import { GroupRole } from '../../src/targets/replicator-role.ts';

let dir: string;
beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dmkit-role-'));
});
afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

const L = log('test');
const file = (id: string): string => path.join(dir, 'replication', 'groups', `${id}.json`);

/** three groups standing for sites A (primary), B and C (secondaries holding A's generation in order) */
function threeSites(): { a: GroupRole; b: GroupRole; c: GroupRole } {
  const a = new GroupRole(dir, 'a'.repeat(32), L);
  a.wrote();
  const b = new GroupRole(dir, 'b'.repeat(32), L);
  const c = new GroupRole(dir, 'c'.repeat(32), L);
  for (const x of [b, c]) {
    x.demote(false);
    expect(x.judge(a.gens(1)).ok).toBe(true); // fresh: takes A's stream
    x.inSync(a.current);
  }
  return { a, b, c };
}

describe('GroupRole.judge', () => {
  it('a planned move: the third site resumes with a partial resync (only the new primary\'s writes)', () => {
    const { a, b, c } = threeSites();
    const gA = a.current;
    a.demote(false);
    b.promote([1, 3], true);
    expect(b.gens(3)).toMatchObject({ peer: gA, unplannedFrom: null });
    expect(c.judge(b.gens(3))).toMatchObject({ ok: true, resync: 'partial' });
    expect(a.judge(b.gens(1))).toMatchObject({ ok: true, resync: 'partial' });
  });

  it('an unplanned failover: a site that only received the old generation is resynced whole; the old primary, partially', () => {
    const { a, b, c } = threeSites();
    const gA = a.current;
    b.promote([1, 3]); // A died: nobody demoted it
    expect(b.gens(3)).toMatchObject({ current: b.current, peer: gA, unplannedFrom: gA });
    const v = c.judge(b.gens(3));
    expect(v).toMatchObject({ ok: true, resync: 'full' });
    expect(v.why).toMatch(/without a planned move/);
    // A comes back and is demoted: it made gA, its dirty logs hold what it never shipped
    a.demote(false);
    expect(a.judge(b.gens(1))).toMatchObject({ ok: true, resync: 'partial' });
    // once C holds B's generation, B's next connection resumes with nothing to resync
    c.inSync(b.current);
    expect(c.judge(b.gens(3))).toMatchObject({ ok: true, resync: 'none' });
  });

  it('keeps what it made and where it was promoted from across a restart; a file from before them is read conservatively', () => {
    const { a, b, c } = threeSites();
    const gA = a.current;
    b.promote([1, 3]);
    const b2 = new GroupRole(dir, 'b'.repeat(32), L);
    expect(b2.gens(3)).toMatchObject({ current: b.current, unplannedFrom: gA });
    const a2 = new GroupRole(dir, 'a'.repeat(32), L);
    a2.demote(false);
    expect(a2.judge(b2.gens(1))).toMatchObject({ resync: 'partial' }); // it made gA

    // older state files have neither field: a secondary is taken to have made nothing
    const old = JSON.parse(fs.readFileSync(file('c'.repeat(32)), 'utf8')) as Record<string, unknown>;
    delete old.created;
    delete old.unplannedFrom;
    fs.writeFileSync(file('c'.repeat(32)), JSON.stringify(old));
    expect(new GroupRole(dir, 'c'.repeat(32), L).judge(b2.gens(3))).toMatchObject({ resync: 'full' });
    expect(c.current).toBe(gA);
  });
});
