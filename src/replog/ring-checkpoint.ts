/**
 * Checkpoints of a `ringbuffer` log: the replicator's shipping positions (CheckpointState)
 * and the ring's tail position, in two alternating 4 KiB slots after the header.
 *
 * Each checkpoint gets the next generation number and goes to slot `generation mod 2`,
 * durably (FUA), so a torn write damages only the slot being written and the other slot
 * still holds the previous checkpoint; recovery takes the valid slot with the highest
 * generation. The ring frees space only after the checkpoint that lets it is durable,
 * so the winning slot never names an entry that was overwritten.
 *
 * Why checkpoints and not per-entry state: the original ring rewrote an entry's header
 * each time a site link had copied it, one small write per entry per link, a throughput
 * limit. Here entries are written once and never touched again; positions are persisted
 * in one slot write per checkpoint, however many entries it covers. After a crash a link
 * may be sent entries past its last checkpointed position again: the receiver's sequence
 * numbers make that harmless.
 */
import { BlockError } from '../core/errors.ts';
import { MAX_SLINKS, decodeCheckpoint, optional } from './ring-format.ts';
import type { Checkpoint } from './ring-format.ts';
import type { LogDevice } from './ring-io.ts';
import type { Position } from './ring-index.ts';
import { CHECKPOINT_MAX_ACTIVE, CHECKPOINT_MAX_LEFT, type CheckpointState, type SlinkPosition } from './types.ts';

/** The newest valid checkpoint of the log `uuid` among `slots`, or null when none is valid. */
export function newestCheckpoint(slots: readonly Buffer[], uuid: Buffer): Checkpoint | null {
  let best: Checkpoint | null = null;
  for (const b of slots) {
    const cp = decodeCheckpoint(b, uuid);
    if (cp && (!best || cp.generation > best.generation)) best = cp;
  }
  return best;
}

/**
 * The seq of the oldest entry `state` still needs: one past the lowest of localDone and
 * every slink's seq (a `log` slink needs its entries for its dirty logs, a `ship` one to
 * ship them).
 */
export function oldestNeeded(state: CheckpointState): number {
  let low = state.localDone;
  for (const s of state.slinks) low = Math.min(low, s.seq);
  return low + 1;
}

/**
 * Check a state the caller wants persisted against a log whose head is `head`; throws a
 * `BlockError` EINVAL naming what is wrong.
 */
export function checkState(state: CheckpointState, head: number): void {
  const bad = (why: string): never => {
    throw new BlockError('EINVAL', `ringbuffer: invalid checkpoint: ${why}`);
  };
  if (state.slinks.length > MAX_SLINKS) bad(`${state.slinks.length} slinks (at most ${MAX_SLINKS})`);
  const position = (what: string, seq: number): void => {
    if (!Number.isSafeInteger(seq) || seq < 0) bad(`${what} ${seq} is not a sequence number`);
    if (seq > head) bad(`${what} ${seq} is beyond the head ${head}`);
  };
  position('localDone', state.localDone);
  const seen = new Set<number>();
  for (const s of state.slinks) {
    if (!Number.isInteger(s.slink) || s.slink < 0 || s.slink > 0xffffffff) bad(`slink number ${s.slink}`);
    if (seen.has(s.slink)) bad(`slink ${s.slink} appears twice`);
    seen.add(s.slink);
    if (s.mode !== 'ship' && s.mode !== 'log') bad(`slink ${s.slink} mode '${String(s.mode)}'`);
    position(`slink ${s.slink} seq`, s.seq);
  }
  if (state.epoch !== undefined && (!Number.isSafeInteger(state.epoch) || state.epoch < 0)) bad(`epoch ${state.epoch}`);
  if (state.boot !== undefined && !/^[0-9a-f]{32}$/.test(state.boot)) bad(`boot id '${state.boot}' (32 lowercase hex digits)`);
  const inRange = (list: readonly number[] | undefined, max: number, what: string): void => {
    for (const n of list ?? []) if (!Number.isInteger(n) || n < 0 || n > max) bad(`${what} ${n} (0 to ${max})`);
  };
  inRange(state.devices, 255, 'device number');
  inRange(state.left?.map((l) => l.dev), 255, 'device number (left)');
  for (const l of state.left ?? []) position(`device ${l.dev} left at seq`, l.seq);
  if (new Set(state.left?.map((l) => l.dev)).size !== (state.left?.length ?? 0)) bad('a device that left appears twice');
  if ((state.left?.length ?? 0) > CHECKPOINT_MAX_LEFT) bad(`${state.left!.length} devices that left (at most ${CHECKPOINT_MAX_LEFT})`);
  inRange(state.forgotten, 255, 'device number (forgotten)');
  inRange(state.verify, 63, 'slink to verify');
  const act = state.activity;
  if (act) {
    if (act.extents.length > CHECKPOINT_MAX_ACTIVE) bad(`${act.extents.length} activity-log extents (at most ${CHECKPOINT_MAX_ACTIVE})`);
    inRange(act.extents, 0xffffffff, 'activity-log extent');
  }
}

/** A frozen copy of `state` (the caller may reuse its objects). */
export function copyState(state: CheckpointState): CheckpointState {
  const slinks: SlinkPosition[] = state.slinks.map((s) => Object.freeze({ slink: s.slink, seq: s.seq, mode: s.mode }));
  const sorted = (list: readonly number[] | undefined): readonly number[] => Object.freeze([...new Set(list ?? [])].sort((a, b) => a - b));
  return Object.freeze({
    localDone: state.localDone, slinks: Object.freeze(slinks),
    ...optional({ epoch: state.epoch, verify: sorted(state.verify), boot: state.boot, quiesced: state.quiesced, devices: sorted(state.devices),
      left: Object.freeze([...(state.left ?? [])].sort((a, b) => a.dev - b.dev).map((l) => Object.freeze({ dev: l.dev, seq: l.seq }))),
      forgotten: sorted(state.forgotten),
      activity: state.activity ? Object.freeze({ extents: sorted(state.activity.extents), incomplete: state.activity.incomplete }) : undefined,
    }),
  });
}

/** Writes checkpoints in generation order and remembers the last one written. */
export class CheckpointSlots {
  readonly #io: LogDevice;
  readonly #uuid: Buffer;
  #last: Checkpoint;

  /** `last`: the checkpoint recovery found (or the initial one of a new log) */
  constructor(io: LogDevice, uuid: Buffer, last: Checkpoint) {
    this.#io = io;
    this.#uuid = uuid;
    this.#last = last;
  }

  /** the newest checkpoint on the device */
  get last(): Checkpoint {
    return this.#last;
  }

  /** the caller's last persisted state, or null while only the initial checkpoint exists */
  get state(): CheckpointState | null {
    return this.#last.initial ? null : this.#last.state;
  }

  /**
   * Persist `state` (null: keep the last one) with the ring's tail at `tail`; resolves once
   * it is durable. Rejects with the device's `BlockError`; the last checkpoint then stays
   * the newest (its slot was not touched).
   */
  async write(state: CheckpointState | null, tail: Position): Promise<Checkpoint> {
    const prev = this.#last;
    const cp: Checkpoint = {
      generation: prev.generation + 1,
      initial: state === null && prev.initial,
      state: state ?? prev.state,
      tailSeq: tail.seq,
      tailOffset: tail.off,
      tailPrevCrc: tail.prevCrc,
      time: Date.now(),
    };
    await this.#io.writeCheckpoint(cp, this.#uuid);
    this.#last = cp;
    return cp;
  }
}
