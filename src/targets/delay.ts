/**
 * delay: holds bios for a fixed time before issuing them, per class (reads, writes,
 * flushes), each class onto its own device range, as dm-delay.
 *
 * Reads use the read class; writes, discards and write-zeroes the write class (the read
 * class when none is given); flushes the flush class (the write class when none is given).
 * A class with 0 ms issues at once. Held bios are issued, never dropped, at presuspend
 * (so suspend drains them) and at destroy; between presuspend and resume nothing is held.
 */
import type { Bio } from '../core/bio.ts';
import { ArgReader } from '../core/args.ts';
import type { BlockDev, StatusType, Target, TargetContext, TargetType } from '../core/types.ts';
import { openDevice, refArg } from './common.ts';

/** the longest delay a Node timer can hold (about 24.8 days) */
export const MAX_DELAY_MS = 2 ** 31 - 1;

type ClassName = 'read' | 'write' | 'flush';
const CLASSES: readonly ClassName[] = ['read', 'write', 'flush'];

interface DelayClass {
  readonly dev: BlockDev;
  readonly offset: number;
  readonly ms: number;
}

interface Held {
  readonly kind: ClassName;
  readonly dev: BlockDev;
  readonly bio: Bio;
  readonly resolve: () => void;
  readonly reject: (err: unknown) => void;
  timer?: NodeJS.Timeout;
}

function classOf(bio: Bio): ClassName {
  if (bio.op === 'read') return 'read';
  return bio.op === 'flush' ? 'flush' : 'write';
}

class Delay implements Target {
  /** the classes as given (1 to 3), for status('table') */
  readonly #given: readonly DelayClass[];
  readonly #classes: Readonly<Record<ClassName, DelayClass>>;
  readonly #held = new Set<Held>();
  readonly #count: Record<ClassName, number> = { read: 0, write: 0, flush: 0 };
  #mayDelay = true;

  constructor(given: DelayClass[]) {
    this.#given = given;
    const read = given[0]!;
    const write = given[1] ?? read;
    this.#classes = { read, write, flush: given[2] ?? write };
  }

  map(bio: Bio): Promise<void> {
    const kind = classOf(bio);
    const c = this.#classes[kind];
    const out: Bio = kind === 'flush' ? bio : { op: bio.op, sector: bio.sector + c.offset, sectors: bio.sectors, data: bio.data, flags: bio.flags };
    if (c.ms === 0 || !this.#mayDelay) return c.dev.submit(out);
    return new Promise<void>((resolve, reject) => {
      const h: Held = { kind, dev: c.dev, bio: out, resolve, reject };
      h.timer = setTimeout(() => void this.#release(h), c.ms);
      this.#held.add(h);
      this.#count[kind]++;
    });
  }

  /** issue one held bio; resolves when it has completed either way */
  #release(h: Held): Promise<void> {
    clearTimeout(h.timer);
    if (!this.#held.delete(h)) return Promise.resolve();
    this.#count[h.kind]--;
    const p = h.dev.submit(h.bio);
    p.then(h.resolve, h.reject);
    return p.then(noop, noop);
  }

  /** issue every held bio, oldest first; resolves when they have all completed */
  #releaseAll(): Promise<void> {
    return Promise.all([...this.#held].map((h) => this.#release(h))).then(noop);
  }

  presuspend(): void {
    this.#mayDelay = false;
    void this.#releaseAll();
  }

  resume(): void {
    this.#mayDelay = true;
  }

  destroy(): Promise<void> {
    this.#mayDelay = false;
    return this.#releaseAll();
  }

  status(type: StatusType): string {
    if (type === 'info') return CLASSES.map((k) => this.#count[k]).join(' ');
    return this.#given.map((c) => `${refArg(c.dev)} ${c.offset} ${c.ms}`).join(' ');
  }
}

function noop(): void {}

interface ClassArgs {
  ref: string;
  offset: number;
  ms: number;
}

/** `<dev> <offset> <delay_ms>` of one class */
function parseClass(r: ArgReader, kind: ClassName): ClassArgs {
  const ref = r.next(`${kind} device`);
  const offset = r.uint(`${kind} offset`);
  const ms = r.uint(`${kind} delay`, { max: MAX_DELAY_MS });
  return { ref, offset, ms };
}

async function openClasses(ctx: TargetContext, list: ClassArgs[]): Promise<DelayClass[]> {
  const out: DelayClass[] = [];
  for (const c of list) out.push({ dev: await openDevice(ctx, c.ref, c.offset), offset: c.offset, ms: c.ms });
  return out;
}

export const delay: TargetType = {
  name: 'delay',
  version: [1, 4, 0],
  /**
   * `<dev> <offset> <delay_ms> [<wdev> <woffset> <wdelay_ms> [<fdev> <foffset> <fdelay_ms>]]`
   *   3 arguments: one class for all I/O; 6: reads, then writes (and flushes);
   *   9: reads, writes, flushes. Each device must hold offset + target length sectors.
   *   delay_ms from 0 (no delay) to 2147483647.
   */
  async create(ctx: TargetContext, args: string[]): Promise<Target> {
    const r = new ArgReader(args, 'delay');
    if (args.length !== 3 && args.length !== 6 && args.length !== 9) {
      r.fail(`invalid argument count ${args.length} (expected 3, 6 or 9: <dev> <offset> <delay_ms> for reads, then writes, then flushes)`);
    }
    const given = CLASSES.slice(0, args.length / 3).map((kind) => parseClass(r, kind));
    r.expectEnd();
    return new Delay(await openClasses(ctx, given));
  },
};
