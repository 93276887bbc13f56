/**
 * Entries a site began that this log lost.
 *
 * A process crash loses nothing of the log (the page cache keeps it), but a power loss of
 * the source machine loses what was appended after the log's last flush (FUA, flush, suspend;
 * the 200 ms checkpoints flush only the sites), while a site across the network may already have applied some of
 * it. Recovery then gives the next entries the lost entries' seqs. A `tcp` site keeps an
 * applied position by seq and skips what it thinks it has, so without a check it would
 * skip those new entries, acknowledged writes, for good, and silently.
 *
 * A site reports (receiver stream.ts) its position (A, P): every entry up to seq A applied,
 * P the epoch of entry A (a flush entry) or of the entry that began the next epoch; and M,
 * the highest seq it began (M > A: entries of epoch P applied or in flight when its last
 * connection ended; its position moves to M when that epoch ends). For a site that only
 * ever had this log's entries: P = epoch(A) or P ≥ epoch(A + 1), and epoch(M) = P when
 * M > A. Epochs never decrease along the log, and a restarted replicator starts its epochs
 * above every epoch the lost tail could have used (the checkpoint keeps the counter). So a
 * site that began a lost entry shows one of:
 *
 *   - A > head, or M > head: the log never had that entry;
 *   - epoch(A) > P: the log's entry A is a newer one;
 *   - epoch(A) < P < epoch(A + 1), or epoch(A) < P with A the head: the site began an epoch
 *     the log does not have;
 *   - epoch(M) ≠ P (M > A): the log's entry M is another one.
 *
 * P above epoch(A + 1) is taken as it is: a site reaches it by passing a failed entry A + 1
 * that the sender gave up (it went to the dirty logs); such a site also reports M, which is
 * judged. A seq before the ring's tail cannot be read and is not judged: the position must
 * then be told by the other rules (M above the head, typically, when the ring was empty).
 */
import type { Replog, ReplogEntry } from '../replog/types.ts';
import type { SitePosition } from '../slink/types.ts';

/** whether a site at `site` began entries `log` lost; `head`: the last entry appended */
export async function holdsLostEntries(log: Replog, head: number, site: SitePosition): Promise<boolean> {
  const { applied, epoch } = site;
  const started = Math.max(site.started, applied);
  if (applied > head || started > head) return true;
  if (started > applied) {
    const m = await entry(log, started);
    if (m && m.epoch !== epoch) return true;
  }
  if (applied === 0) return false;
  const a = await entry(log, applied);
  if (!a) return false;
  if (a.epoch > epoch) return true;
  if (a.epoch === epoch) return false;
  const next = applied < head ? await entry(log, applied + 1) : null;
  return applied === head || (next !== null && epoch < next.epoch);
}

/** the epoch of entry `seq` when the ring still has it, else 0 */
export async function epochOf(log: Replog, seq: number): Promise<number> {
  return (await entry(log, seq))?.epoch ?? 0;
}

/** entry `seq`, or null when the ring no longer (or does not yet) hold it */
async function entry(log: Replog, seq: number): Promise<ReplogEntry | null> {
  if (seq < log.tail || seq > log.head) return null;
  try {
    return await log.reader(seq).next();
  } catch (err) {
    if ((err as { code?: string }).code === 'EOVERFLOW') return null; // a checkpoint moved the tail past it meanwhile
    throw err;
  }
}
