/**
 * Entries a site holds that this log lost.
 *
 * A process crash loses nothing of the log (the page cache keeps it), but a power loss of
 * the source machine loses what was appended after the log's last flush (checkpoints every
 * 200 ms, FUA, flush), while a site across the network may already have applied some of
 * it. Recovery then gives the next entries the lost entries' seqs. A `tcp` site keeps an
 * applied position by seq and skips what it thinks it has, so without a check it would
 * skip those new entries, acknowledged writes, for good, and silently.
 *
 * A site's position (receiver stream.ts) is a pair (A, P): every entry up to seq A applied,
 * and P the epoch it was at: the epoch of entry A (a flush entry) or of the entry that
 * started the next epoch, so P = epoch(A) or P ≥ epoch(A + 1) for a log that has those
 * entries as the site had them. Epochs never decrease along the log, and a new process
 * starts its epochs above the recovered head's and (from the clock, ×1000 per ms) above
 * any the previous process handed out. So a site that applied a lost entry A, or began a
 * lost epoch, shows one of:
 *
 *   - A > head: the log never had entry A;
 *   - epoch(A) > P: the log's entry A is a newer one;
 *   - epoch(A) < P < epoch(A + 1), or epoch(A) < P with A the head: the site began an epoch
 *     the log does not have (and may hold part of it).
 *
 * P above epoch(A + 1) is taken as it is: a site reaches it by passing a failed entry A + 1
 * that the sender gave up (it went to the dirty logs), so only a lost epoch begun after such
 * a give-up, with entry A + 1 still in the log, would go unseen.
 *
 * A position before the ring's tail cannot be judged: such a site is on its dirty logs or
 * ships from later entries, so it skips nothing new (what it may hold of lost entries is
 * the power-loss limit of docs/targets/replicator.md, which `verify` finds).
 */
import type { Replog } from '../replog/types.ts';

/** whether a site at position (`applied`, `epoch`) holds entries `log` lost; `head`: the last entry appended */
export async function holdsLostEntries(log: Replog, head: number, applied: number, epoch: number): Promise<boolean> {
  if (applied === 0) return false;
  if (applied > head) return true;
  if (applied < log.tail) return false;
  const reader = log.reader(applied);
  const at = await reader.next();
  if (!at) return true; // not written after all (cannot happen below the head)
  if (at.epoch > epoch) return true;
  if (at.epoch === epoch) return false;
  const next = applied < head ? await reader.next() : null;
  return next === null || epoch < next.epoch;
}

/** the epoch of entry `seq` when the ring still has it, else 0 */
export async function epochOf(log: Replog, seq: number): Promise<number> {
  if (seq < log.tail || seq > log.head) return 0;
  const e = await log.reader(seq).next();
  return e?.epoch ?? 0;
}
