/**
 * A constructed mapping table: targets in sector order, the devices they opened, and the
 * lookup used on the I/O path. Built by the device manager (which owns device opening);
 * destroyed once, releasing targets then devices in reverse order.
 */
import type { FileSpan, Target, TargetType } from './types.ts';

export interface TableEntry {
  readonly begin: number;
  readonly length: number;
  readonly end: number;
  readonly type: TargetType;
  readonly target: Target;
  readonly line: number;
  /** target.maxIoSectors or 0 */
  readonly maxIo: number;
}

export class Table {
  readonly entries: readonly TableEntry[];
  readonly sectors: number;
  readonly readOnly: boolean;
  /** references of the devices the table opened (deps) */
  readonly deps: readonly string[];
  /** the targets a flush goes to: those that take flushes (`Target.flushBios` ≠ 0), in table order */
  readonly flushTargets: readonly Target[];
  readonly #release: Array<() => void>;
  #destroyed = false;

  constructor(entries: TableEntry[], deps: string[], release: Array<() => void>, readOnly: boolean) {
    this.entries = entries;
    this.deps = deps;
    this.#release = release;
    this.readOnly = readOnly;
    const last = entries[entries.length - 1];
    this.sectors = last ? last.end : 0;
    this.flushTargets = entries.filter((e) => e.target.flushBios !== 0).map((e) => e.target);
  }

  /** index of the entry covering `sector` (binary search; sector < this.sectors) */
  find(sector: number): number {
    const e = this.entries;
    if (e.length === 1) return 0;
    let lo = 0;
    let hi = e.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (e[mid]!.begin <= sector) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

  /**
   * The table's file ranges: every line that is plain file ranges (Target.fileMap) gives its
   * spans, every other line one span without a device (its I/O must go through `map`).
   * Null when no line has file ranges.
   */
  fileMap(): Array<FileSpan | { readonly sectors: number; readonly dev: null }> | null {
    const out: Array<FileSpan | { sectors: number; dev: null }> = [];
    let files = false;
    for (const e of this.entries) {
      const spans = e.target.fileMap?.() ?? null;
      let n = 0;
      for (const s of spans ?? []) n += s.sectors;
      if (spans && n === e.length) {
        out.push(...spans);
        files = true;
      } else out.push({ sectors: e.length, dev: null }); // a target that does not account for all of itself counts as none
    }
    return files ? out : null;
  }

  async destroy(): Promise<void> {
    if (this.#destroyed) return;
    this.#destroyed = true;
    for (let i = this.entries.length - 1; i >= 0; i--) {
      try {
        await this.entries[i]!.target.destroy?.();
      } catch {
        /* a destructor failing must not keep devices open */
      }
    }
    for (let i = this.#release.length - 1; i >= 0; i--) this.#release[i]!();
  }

  get destroyed(): boolean {
    return this.#destroyed;
  }
}
