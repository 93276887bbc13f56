/**
 * A replication group's role and generation ids (REPLICATION.md "Roles, failover, split
 * brain"; docs/howto/failover.md), after DRBD's model:
 *
 *   current   the generation of the data: a new random id when the group is promoted, and
 *             when a primary writes while a site that had the current generation is away
 *             (from then on that site's copy and ours have parted: it is a split brain if
 *             the site is promoted meanwhile);
 *   peers     per remote slink, the generation that site was last known to hold in order
 *             (it took our stream in order, or finished a resync from us);
 *   history   earlier generations of this group, newest first.
 *
 * A receiving site compares the sender's ids with its own at OPEN (`judge`): the same
 * generation resumes; ours being the one the sender last knew us at is a partial resync
 * (the regions the sender wrote since, plus the regions we changed and never shipped);
 * one of the sender's older generations is a full resync; anything else is refused — a
 * split brain when both come from a common generation, unrelated data otherwise — unless
 * the operator said which side's changes go (`demote --discard-my-data`) or this group
 * never wrote anything (`fresh`, a new second site).
 *
 * The state lives in `<stateDir>/replication/groups/<log uuid>.json`, written atomically
 * (temp file, fsync, rename) before the change it records takes effect; a library engine
 * without a state dir keeps it in memory only.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import { writeAtomicSync } from '../core/atomic-file.ts';
import path from 'node:path';
import type { Logger } from '../core/log.ts';

const HISTORY = 8;
const ID_RE = /^[0-9a-f]{16}$/;

export type Role = 'primary' | 'secondary';

/** What a sender puts in OPEN for one slink. */
export interface GenIds {
  readonly current: string;
  /** the generation the sender last knew this site at (null: never in sync with it yet) */
  readonly peer: string | null;
  readonly history: readonly string[];
  /**
   * the generation the sender was promoted from when that was not a planned move (its old
   * primary did not demote with every site in sync): a site that only received it may hold
   * writes of it the sender lacks, or lack some the sender has (absent: planned, or an
   * older sender)
   */
  readonly unplannedFrom?: string | null;
}

/** The receiving group's answer to a sender's GenIds. */
export type Verdict =
  | { readonly ok: true; readonly resync: 'none' | 'partial' | 'full'; readonly why: string }
  | { readonly ok: false; readonly verdict: 'peer-primary' | 'split-brain' | 'unrelated'; readonly why: string };

interface State {
  role: Role;
  current: string;
  peers: Record<string, string>;
  history: string[];
  /** never written as primary: may take any stream */
  fresh: boolean;
  /** secondary whose image is an in-order copy of `current` (false while a resync into it runs) */
  consistent: boolean;
  /** `demote --discard-my-data`: the next primary to connect overwrites our changes */
  discard: boolean;
  /** the last split brain seen (a message), until resolved */
  splitBrain: string | null;
  /** generations this group made as primary, newest first (a site's own writes are in its dirty logs) */
  created: string[];
  /** the generation this group was last promoted from without a planned move (GenIds.unplannedFrom) */
  unplannedFrom: string | null;
}

export function newGenId(): string {
  return crypto.randomBytes(8).toString('hex');
}

export class GroupRole {
  readonly #file: string | null;
  readonly #log: Logger;
  #s: State;
  /** `demote` runs: what the sites have not taken is being marked (not persisted: a crash leaves it primary) */
  #demoting = false;

  /** `stateDir` null: in memory only */
  constructor(stateDir: string | null, groupId: string, log: Logger) {
    this.#log = log;
    this.#file = stateDir ? path.join(stateDir, 'replication', 'groups', `${groupId}.json`) : null;
    const current = newGenId();
    this.#s = this.#load() ?? { role: 'primary', current, peers: {}, history: [], fresh: true, consistent: true, discard: false, splitBrain: null, created: [current], unplannedFrom: null };
  }

  get role(): Role {
    return this.#s.role;
  }
  /** secondary, or being demoted: ships nothing, resyncs nothing (but takes no stream until demoted) */
  get secondary(): boolean {
    return this.#s.role === 'secondary' || this.#demoting;
  }
  get current(): string {
    return this.#s.current;
  }
  get consistent(): boolean {
    return this.#s.consistent;
  }
  get fresh(): boolean {
    return this.#s.fresh;
  }
  get splitBrain(): string | null {
    return this.#s.splitBrain;
  }
  get discard(): boolean {
    return this.#s.discard;
  }
  peer(slink: number): string | null {
    return this.#s.peers[String(slink)] ?? null;
  }

  gens(slink: number): GenIds {
    return { current: this.#s.current, peer: this.peer(slink), history: [...this.#s.history], unplannedFrom: this.#s.unplannedFrom };
  }

  toJson(): Record<string, unknown> {
    const s = this.#s;
    return {
      role: s.role, generation: s.current, peers: { ...s.peers }, history: [...s.history], consistent: s.consistent,
      fresh: s.fresh, discardMyData: s.discard, splitBrain: s.splitBrain, unplannedFrom: s.unplannedFrom, persisted: this.#file !== null,
    };
  }

  // ---- changes (each persisted before it returns) ----

  /** a write as primary: the group is no longer fresh */
  wrote(): void {
    if (!this.#s.fresh) return;
    this.#s.fresh = false;
    this.#save();
  }

  /** a primary writes while site `slink`, which holds our current generation, is away: start a new one */
  rotate(): void {
    this.#newCurrent();
    this.#save();
  }

  /** site `slink` holds `gen` in order now (our stream from the head, or a finished resync) */
  peerHas(slink: number, gen: string): void {
    if (this.#s.peers[String(slink)] === gen) return;
    this.#s.peers[String(slink)] = gen;
    this.#save();
  }

  /** `slinks`: the group's remote slinks; each held at most what we held, the generation they are known at now */
  promote(slinks: readonly number[], planned = false): void {
    const s = this.#s;
    s.peers = Object.fromEntries(slinks.map((n) => [String(n), s.current]));
    s.unplannedFrom = planned ? null : s.current;
    this.#newCurrent();
    s.role = 'primary';
    s.discard = false;
    s.splitBrain = null;
    s.consistent = true;
    this.#save();
  }

  beginDemote(): void {
    this.#demoting = true;
  }

  demote(discard: boolean): void {
    this.#demoting = false;
    this.#s.role = 'secondary';
    this.#s.discard = discard;
    this.#save();
  }

  /**
   * A primary's stream was accepted (`judge` ok). The generation stays ours until the
   * sender says we hold its own in order (`inSync`), so every device of the group is judged
   * alike; a resync into us makes us inconsistent until then.
   */
  accepted(resync: boolean): void {
    const s = this.#s;
    if (!resync && !s.discard && !s.splitBrain) return;
    if (resync) s.consistent = false;
    s.splitBrain = null;
    this.#save();
  }

  /** the sender says we hold its generation `gen` in order (it ships to us in order, or finished a resync) */
  inSync(gen: string): boolean {
    const s = this.#s;
    if (s.current === gen && s.consistent && !s.fresh && !s.discard) return false;
    if (s.current !== gen) s.history = [s.current, ...s.history.filter((h) => h !== gen)].slice(0, HISTORY);
    s.current = gen;
    s.consistent = true;
    s.fresh = false;
    s.discard = false;
    this.#save();
    return true;
  }

  /** the sender is resyncing us (or was demoted mid-way): inconsistent until `inSync` */
  syncing(): void {
    if (!this.#s.consistent) return;
    this.#s.consistent = false;
    this.#save();
  }

  noteSplitBrain(why: string | null): void {
    if (this.#s.splitBrain === why) return;
    this.#s.splitBrain = why;
    this.#save();
  }

  /** The receiving side's decision for a sender's ids (see the file comment). */
  judge(g: GenIds): Verdict {
    const s = this.#s;
    const common = [g.peer, ...g.history].some((x) => x !== null && (x === s.current || s.history.includes(x)));
    const splitBrain = `split brain: both sides were written since the generation they shared (here ${s.current}, sender ${g.current}); name the side whose changes go with 'dmkit demote --discard-my-data' there`;
    if (this.#demoting) return { ok: false, verdict: 'peer-primary', why: 'the site is being demoted; try again in a moment' };
    if (s.role === 'primary') {
      // one of us holds an older generation of the other's data: no split brain, one side is to be demoted
      const ordered = s.history.includes(g.current) || g.history.includes(s.current) || g.peer === s.current;
      if (ordered || !common) {
        return { ok: false, verdict: 'peer-primary', why: `the site is primary (generation ${s.current}); demote one side and it resyncs from the other` };
      }
      return { ok: false, verdict: 'split-brain', why: splitBrain };
    }
    if (g.current === s.current) return { ok: true, resync: 'none', why: 'same generation' };
    if (g.peer === s.current) {
      if (g.unplannedFrom === s.current && !s.created.includes(s.current)) {
        // a third site after an unplanned failover: it and the sender hold different prefixes of
        // the old primary's stream, and nothing recorded the regions in between
        return { ok: true, resync: 'full', why: `the sender was promoted from generation ${s.current} without a planned move, and this site only received that generation: it may hold writes the sender lacks or lack some it has (a full checksum resync)` };
      }
      return { ok: true, resync: 'partial', why: `generation ${s.current} is where the sender last knew this site` };
    }
    if (s.discard) return { ok: true, resync: 'partial', why: 'its changes are discarded (demote --discard-my-data)' };
    if (s.fresh) return { ok: true, resync: 'none', why: 'a new site: its dirty logs say what to copy' };
    if (g.history.includes(s.current)) return { ok: true, resync: 'full', why: `generation ${s.current} is older than the sender keeps a bitmap for` };
    if (common) return { ok: false, verdict: 'split-brain', why: splitBrain };
    return { ok: false, verdict: 'unrelated', why: `unrelated data (here generation ${s.current}, sender ${g.current}); 'dmkit demote --discard-my-data' here to take the sender's data` };
  }

  // ---- storage ----

  /** a new generation, made by this group as (or on becoming) primary */
  #newCurrent(): void {
    const s = this.#s;
    s.history = [s.current, ...s.history].slice(0, HISTORY);
    s.current = newGenId();
    s.created = [s.current, ...s.created].slice(0, HISTORY);
  }

  #load(): State | null {
    if (!this.#file) return null;
    let text: string;
    try {
      text = fs.readFileSync(this.#file, 'utf8');
    } catch {
      return null;
    }
    try {
      const o = JSON.parse(text) as Partial<State>;
      if ((o.role !== 'primary' && o.role !== 'secondary') || typeof o.current !== 'string' || !ID_RE.test(o.current)) throw new Error('no role or generation');
      const ids = (a: unknown): string[] => (Array.isArray(a) ? a.filter((x): x is string => typeof x === 'string' && ID_RE.test(x)) : []);
      const peers: Record<string, string> = {};
      for (const [k, v] of Object.entries(o.peers ?? {})) if (/^\d+$/.test(k) && typeof v === 'string' && ID_RE.test(v)) peers[k] = v;
      return {
        role: o.role, current: o.current, peers, history: ids(o.history).slice(0, HISTORY), fresh: o.fresh === true,
        consistent: o.consistent !== false, discard: o.discard === true, splitBrain: typeof o.splitBrain === 'string' ? o.splitBrain : null,
        // a file from before these fields: a primary made its current generation, a secondary is taken to have made none
        created: Array.isArray(o.created) ? ids(o.created).slice(0, HISTORY) : o.role === 'primary' ? [o.current] : [],
        unplannedFrom: typeof o.unplannedFrom === 'string' && ID_RE.test(o.unplannedFrom) ? o.unplannedFrom : null,
      };
    } catch (err) {
      // refusing to guess a role: a damaged file makes the group secondary (no writes) until the operator promotes it
      this.#log.error(`${this.#file}: unreadable (${(err as Error).message}); the group starts secondary and inconsistent`);
      return { role: 'secondary', current: newGenId(), peers: {}, history: [], fresh: false, consistent: false, discard: false, splitBrain: null, created: [], unplannedFrom: null };
    }
  }

  #save(): void {
    if (!this.#file) return;
    fs.mkdirSync(path.dirname(this.#file), { recursive: true, mode: 0o700 });
    writeAtomicSync(this.#file, `${JSON.stringify(this.#s, null, 1)}\n`);
  }
}
