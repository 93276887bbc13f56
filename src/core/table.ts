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
  readonly #release: Array<() => void>;
  #destroyed = false;

  constructor(entries: TableEntry[], deps: string[], release: Array<() => void>, readOnly: boolean) {
    this.entries = entries;
    this.deps = deps;
    this.#release = release;
    this.readOnly = readOnly;
    const last = entries[entries.length - 1];
    this.sectors = last ? last.end : 0;
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

  /** the whole table as file ranges in sector order (every target's fileMap), else null */
  fileMap(): FileSpan[] | null {
    const out: FileSpan[] = [];
    for (const e of this.entries) {
      const spans = e.target.fileMap?.() ?? null;
      if (!spans) return null;
      let n = 0;
      for (const s of spans) n += s.sectors;
      if (n !== e.length) return null; // a target that does not account for all of itself
      out.push(...spans);
    }
    return out;
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
