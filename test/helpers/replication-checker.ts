/**
 * An independent reference checker for write-order fidelity (REPLICATION.md guarantees 2
 * and 3). It knows nothing of the engine (it imports no engine code): its input is what an
 * application saw — the writes it submitted, when, and which of them were acknowledged —
 * and the bytes of one site's images.
 *
 * The history. Every write covers whole blocks of `blockBytes`, and every block of every
 * write carries content that no other write's block and no initial block has, so the bytes
 * of a block name the write that put them there. Times come from any clock of the writer's
 * own (its event counter is best): `submitTime` when it sent the write, `ackTime` when the
 * reply arrived (null: never, it was in flight at the cut). Write B *depends on* write A when
 * A was acknowledged before B was submitted: only then can the application have chosen B
 * knowing A is done, and only then must a replica that shows B also show A. Writes in flight
 * together are unordered. The writer never has two writes to one block in flight at once,
 * so the writes to a block are totally ordered by dependency; a history that breaks this
 * (or repeats content) cannot be checked soundly and is refused with a HistoryError.
 *
 * The algorithm, for an image of every device of the group:
 *  1. per block, its *sequence*: the initial content, then the writes touching the block in
 *     submission order (= dependency order, by the rule above);
 *  2. per block, its *position*: the index in that sequence of the bytes found on the image.
 *     Bytes that are nowhere in the sequence are a problem (`unknown`: torn, corrupt, or a
 *     write never submitted; `misplaced` when they are another block's write);
 *  3. the *visible* writes are those some block shows; the *cut* T is the latest submitTime
 *     among them;
 *  4. the *required* writes are those acknowledged before T — exactly the writes some
 *     visible write depends on, directly or not (A → B → C gives ack(A) < submit(B) <
 *     ack(B) < submit(C) ≤ T) — plus, with `requireAcked`, every acknowledged write;
 *  5. the image is valid iff on no block does a required write come after the position
 *     found (each required write is there, or a newer write of that block is).
 * Then the image equals the source after the downward-closed set S = required ∪ visible,
 * where the visible writes nothing in S depends on (the writes in flight at the boundary)
 * may be partly applied: guarantee 2's "some prefix of epochs plus a subset of the next
 * epoch", at block granularity. A block showing its initial content while a required write
 * touched it, or a write of the future without one it depends on, fails step 5.
 */
import crypto from 'node:crypto';

export interface WriteRecord {
  /** unique in the history */
  readonly id: number;
  /** the device's index in the group (the index into `initial` and `image`) */
  readonly dev: number;
  /** byte offset, a multiple of blockBytes */
  readonly offset: number;
  /** blockDigest of each block of the data, in order */
  readonly digests: readonly string[];
  readonly submitTime: number;
  /** when the acknowledgement arrived; null = never acknowledged */
  readonly ackTime: number | null;
}

export interface CheckInput {
  readonly blockBytes: number;
  readonly writes: readonly WriteRecord[];
  /** each device's content before the first write of the history */
  readonly initial: readonly Buffer[];
  /** each device's content on the site to check */
  readonly image: readonly Buffer[];
  /** every acknowledged write must be on the image (a source after a crash, a synchronous site) */
  readonly requireAcked?: boolean;
  /** problems listed in full (default 20; all are counted) */
  readonly maxProblems?: number;
}

export type Problem =
  | { kind: 'unknown'; dev: number; block: number; digest: string }
  | { kind: 'misplaced'; dev: number; block: number; writeId: number; ofDev: number; ofBlock: number }
  | {
    kind: 'missing';
    dev: number;
    block: number;
    /** the write whose content the block shows (null: the initial content) */
    found: number | null;
    /** the newest required write of the block, which is not there */
    required: number;
    requiredAck: number;
    /** the cut (null when only requireAcked made it required) */
    cut: number | null;
  };

export interface CheckResult {
  ok: boolean;
  /** the first maxProblems problems */
  problems: Problem[];
  problemCount: number;
  /** latest submitTime of a visible write (null: the image shows no write of the history) */
  cut: number | null;
  visible: number;
  required: number;
  acked: number;
  /** acknowledged writes wholly on the image (each of their blocks shows them or a newer write) */
  ackedPresent: number;
  /** the longest prefix of the acknowledged writes, in acknowledgement order, wholly on the image */
  ackedPrefix: number;
}

/** a history the checker cannot judge soundly */
export class HistoryError extends Error {}

export function blockDigest(block: Buffer): string {
  return crypto.createHash('sha256').update(block).digest('hex');
}

/** per block: the sequence of writes (index 0 = the initial content) */
interface Block {
  initial: string;
  writes: WriteRecord[];
}

function blocksOf(input: CheckInput): Block[][] {
  const { blockBytes, initial, image } = input;
  if (initial.length !== image.length) throw new HistoryError(`${initial.length} initial images but ${image.length} site images`);
  return initial.map((buf, dev) => {
    if (buf.length % blockBytes !== 0 || image[dev]!.length !== buf.length) {
      throw new HistoryError(`device ${dev}: initial ${buf.length} bytes, image ${image[dev]!.length} bytes (blocks of ${blockBytes})`);
    }
    const out: Block[] = [];
    for (let o = 0; o < buf.length; o += blockBytes) out.push({ initial: blockDigest(buf.subarray(o, o + blockBytes)), writes: [] });
    return out;
  });
}

/** place every write on its blocks, ordered by submission; refuse histories the algorithm cannot judge */
function sequences(input: CheckInput): Block[][] {
  const blocks = blocksOf(input);
  const seen = new Set<number>();
  const sorted = [...input.writes].sort((a, b) => a.submitTime - b.submitTime);
  for (const w of sorted) {
    if (seen.has(w.id)) throw new HistoryError(`write ${w.id} appears twice`);
    seen.add(w.id);
    if (w.ackTime !== null && !(w.ackTime > w.submitTime)) throw new HistoryError(`write ${w.id} acknowledged (${w.ackTime}) before it was submitted (${w.submitTime})`);
    const dev = blocks[w.dev];
    const first = w.offset / input.blockBytes;
    if (!dev || !Number.isInteger(first) || first < 0 || first + w.digests.length > dev.length || w.digests.length === 0) {
      throw new HistoryError(`write ${w.id}: device ${w.dev} offset ${w.offset} × ${w.digests.length} blocks is not whole blocks inside the device`);
    }
    for (let i = 0; i < w.digests.length; i++) {
      const b = dev[first + i]!;
      const prev = b.writes[b.writes.length - 1];
      if (prev && (prev.ackTime === null || prev.ackTime >= w.submitTime)) {
        throw new HistoryError(`writes ${prev.id} and ${w.id} to device ${w.dev} block ${first + i} were in flight together: the writes to a block must be ordered`);
      }
      if (w.digests[i] === b.initial || b.writes.some((x) => digestOn(x, first + i, input.blockBytes) === w.digests[i])) {
        throw new HistoryError(`write ${w.id}: its content for device ${w.dev} block ${first + i} is not unique`);
      }
      b.writes.push(w);
    }
  }
  return blocks;
}

function digestOn(w: WriteRecord, block: number, blockBytes: number): string {
  return w.digests[block - w.offset / blockBytes]!;
}

/** where each digest of the history is, for naming misplaced content */
function digestIndex(writes: readonly WriteRecord[], blockBytes: number): Map<string, { w: WriteRecord; block: number }> {
  const m = new Map<string, { w: WriteRecord; block: number }>();
  for (const w of writes) w.digests.forEach((d, i) => m.set(d, { w, block: w.offset / blockBytes + i }));
  return m;
}

export function checkSite(input: CheckInput): CheckResult {
  const { blockBytes } = input;
  const blocks = sequences(input);
  const max = input.maxProblems ?? 20;
  const problems: Problem[] = [];
  let problemCount = 0;
  const problem = (p: Problem): void => {
    if (problemCount++ < max) problems.push(p);
  };
  let index: Map<string, { w: WriteRecord; block: number }> | null = null;

  // step 2: positions
  const positions = blocks.map((dev, d) => dev.map((b, k) => {
    const digest = blockDigest(input.image[d]!.subarray(k * blockBytes, (k + 1) * blockBytes));
    if (digest === b.initial) return 0;
    const at = b.writes.findIndex((w) => digestOn(w, k, blockBytes) === digest);
    if (at >= 0) return at + 1;
    index ??= digestIndex(input.writes, blockBytes);
    const other = index.get(digest);
    if (other) problem({ kind: 'misplaced', dev: d, block: k, writeId: other.w.id, ofDev: other.w.dev, ofBlock: other.block });
    else problem({ kind: 'unknown', dev: d, block: k, digest });
    return -1;
  }));

  // step 3: visible writes and the cut
  const visible = new Set<WriteRecord>();
  blocks.forEach((dev, d) => dev.forEach((b, k) => {
    const p = positions[d]![k]!;
    if (p > 0) visible.add(b.writes[p - 1]!);
  }));
  let cut: number | null = null;
  for (const w of visible) if (cut === null || w.submitTime > cut) cut = w.submitTime;

  // step 4: required writes
  const isRequired = (w: WriteRecord): boolean => w.ackTime !== null && ((cut !== null && w.ackTime < cut) || !!input.requireAcked);
  let required = 0;
  for (const w of input.writes) if (isRequired(w)) required++;

  // step 5: no required write after the position found; and which acknowledged writes are whole
  const notWhole = new Set<WriteRecord>();
  blocks.forEach((dev, d) => dev.forEach((b, k) => {
    const p = positions[d]![k]!;
    if (p < 0) {
      for (const w of b.writes) notWhole.add(w);
      return;
    }
    let newest: WriteRecord | null = null;
    for (let q = p; q < b.writes.length; q++) {
      const w = b.writes[q]!;
      notWhole.add(w);
      if (isRequired(w)) newest = w;
    }
    if (newest) {
      problem({
        kind: 'missing', dev: d, block: k, found: p === 0 ? null : b.writes[p - 1]!.id,
        required: newest.id, requiredAck: newest.ackTime!, cut: cut !== null && newest.ackTime! < cut ? cut : null,
      });
    }
  }));

  const acked = input.writes.filter((w) => w.ackTime !== null).sort((a, b) => a.ackTime! - b.ackTime!);
  let ackedPrefix = 0;
  while (ackedPrefix < acked.length && !notWhole.has(acked[ackedPrefix]!)) ackedPrefix++;
  return {
    ok: problemCount === 0,
    problems,
    problemCount,
    cut,
    visible: visible.size,
    required,
    acked: acked.length,
    ackedPresent: acked.filter((w) => !notWhole.has(w)).length,
    ackedPrefix,
  };
}

export function describeProblem(p: Problem): string {
  const where = `device ${p.dev} block ${p.block}`;
  switch (p.kind) {
    case 'unknown':
      return `${where}: content of no write of the history nor the initial content (sha256 ${p.digest.slice(0, 16)}…)`;
    case 'misplaced':
      return `${where}: holds write ${p.writeId}'s content for device ${p.ofDev} block ${p.ofBlock}`;
    case 'missing': {
      const found = p.found === null ? 'its initial content' : `write ${p.found}`;
      const why = p.cut === null ? 'every acknowledged write must be there' : `acknowledged at ${p.requiredAck}, before the cut ${p.cut}`;
      return `${where}: shows ${found}, but write ${p.required} (${why}) or a newer one must be there`;
    }
  }
}

export function summarize(r: CheckResult): string {
  const head = `${r.ok ? 'valid' : `INVALID (${r.problemCount} problem(s))`}: cut ${r.cut ?? '-'}, visible ${r.visible}, required ${r.required}, acknowledged ${r.ackedPresent}/${r.acked} present (prefix ${r.ackedPrefix})`;
  return [head, ...r.problems.map((p) => `  ${describeProblem(p)}`)].join('\n');
}
