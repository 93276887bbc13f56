/**
 * A constructed mirror (dm-raid1's `mirror_set`): its legs and their health, the dirty
 * log, the I/O paths, resync and the suspend/resume hooks. Built by `mirror.create`.
 *
 * Bios never cross a region (maxIoSectors = region size), so each touches one region.
 */
import { ArgReader } from '../core/args.ts';
import type { Bio } from '../core/bio.ts';
import { EMPTY } from '../core/bio.ts';
import { RegionGate, type CopyOutcome } from '../core/copy.ts';
import { BlockError, toBlockError } from '../core/errors.ts';
import type { BlockDev, Progress, StatusType, Target, TargetContext } from '../core/types.ts';
import type { DirtyLog } from '../dirtylog/types.ts';
import { refArg } from './common.ts';
import { RegionTracker, resyncRegions } from './mirror-regions.ts';

export interface MirrorLeg {
  readonly dev: BlockDev;
  readonly offset: number;
}

export interface MirrorFeatures {
  /** handle_errors (or the legacy block_on_error) */
  handleErrors: boolean;
  keepLog: boolean;
}

/** leg faults, as status health characters; the first set in this order is shown */
const FAULTS = { F: 1, D: 2, S: 4, R: 8 } as const;
type Fault = keyof typeof FAULTS;
const FAULT_TEXT: Record<Fault, string> = { F: 'flush failed', D: 'write failed', S: 'resync failed', R: 'read failed' };

/** regions copied at once by resync */
const RESYNC_CONCURRENCY = 4;
const FLUSH: Bio = { op: 'flush', sector: 0, sectors: 0, data: EMPTY, flags: {} };

interface Leg extends MirrorLeg {
  faults: number;
}

type State = 'new' | 'active' | 'suspended';

export class MirrorSet implements Target {
  readonly maxIoSectors: number;
  readonly #ctx: TargetContext;
  readonly #log: DirtyLog;
  readonly #legs: Leg[];
  readonly #features: MirrorFeatures;
  readonly #gate: RegionGate;
  readonly #regions: RegionTracker;
  /** the leg reads go to and resync copies from */
  #default = 0;
  /** every region was in sync when last looked at (dm-raid1's ms->in_sync) */
  #inSync = false;
  #rate = 0;
  #resync: { abort: AbortController; done: Promise<void> } | null = null;
  #state: State = 'new';

  constructor(ctx: TargetContext, log: DirtyLog, legs: readonly MirrorLeg[], features: MirrorFeatures) {
    this.#ctx = ctx;
    this.#log = log;
    this.#legs = legs.map((l) => ({ dev: l.dev, offset: l.offset, faults: 0 }));
    this.#features = features;
    this.maxIoSectors = log.regionSize;
    this.#gate = new RegionGate(log.regionSize);
    this.#regions = new RegionTracker(log, this.#gate, (err) => this.#logFailed(err));
  }

  /**
   * The log's `flushData` hook, before it records regions clean: flush the legs without
   * faults (all legs if none); rejects if any of them failed.
   */
  async flushData(): Promise<void> {
    const r = await this.#flushLegs();
    if (r.failed > 0) throw new BlockError('EIO', `${this.#ctx.device}: ${r.failed} mirror leg(s) could not be flushed`);
  }

  map(bio: Bio): Promise<void> {
    if (bio.op === 'read') return this.#read(bio);
    if (bio.op === 'flush') return this.#flush();
    return this.#write(bio);
  }

  // ---- reads ----

  async #read(bio: Bio): Promise<void> {
    const region = this.#gate.regionOf(bio.sector);
    let leg = this.#log.inSync(region) ? this.#readLeg() : this.#default;
    let tried = 0;
    for (;;) {
      try {
        return await this.#submit(leg, bio);
      } catch (err) {
        this.#fail(leg, 'R');
        tried |= 1 << leg;
        // another leg has the data only if the region is in sync
        const next = this.#log.inSync(region) ? this.#legs.findIndex((l, i) => l.faults === 0 && !(tried & (1 << i))) : -1;
        if (next < 0) throw toBlockError(err);
        this.#ctx.log.limited('read-retry', `${this.#ctx.device}: read failed on ${this.#legs[leg]!.dev.ref}, trying ${this.#legs[next]!.dev.ref}`);
        leg = next;
      }
    }
  }

  /** the default leg, or the first leg without faults if it has some (dm-raid1's choose_mirror) */
  #readLeg(): number {
    if (this.#legs[this.#default]!.faults === 0) return this.#default;
    const i = this.#legs.findIndex((l) => l.faults === 0);
    return i < 0 ? this.#default : i;
  }

  // ---- writes (also discard and write-zeroes) ----

  async #write(bio: Bio): Promise<void> {
    const gate = this.#gate;
    const region = gate.regionOf(bio.sector);
    if (!gate.tryEnter(region)) await gate.enter(region);
    try {
      if (!this.#log.inSync(region)) {
        // not yet copied: only the default leg (the resync source) takes it
        await this.#writeOne(this.#default, bio);
        return;
      }
      const marked = this.#regions.markForWrite(region);
      if (marked && !(await marked) && this.#features.handleErrors && this.#features.keepLog) {
        throw new BlockError('EIO', `${this.#ctx.device}: mirror log failed and keep_log is set`);
      }
      await this.#writeAll(bio, region);
    } finally {
      gate.leave(region);
      if (gate.writes(region) === 0) this.#regions.schedule();
    }
  }

  async #writeOne(leg: number, bio: Bio): Promise<void> {
    try {
      await this.#submit(leg, bio);
    } catch (err) {
      if (bio.op !== 'discard') this.#fail(leg, 'D');
      throw toBlockError(err);
    }
  }

  async #writeAll(bio: Bio, region: number): Promise<void> {
    const legs = this.#writeLegs();
    const results = await Promise.allSettled(legs.map((i) => this.#submit(i, bio)));
    let first: unknown = null;
    let landed = 0;
    for (let k = 0; k < results.length; k++) {
      const r = results[k]!;
      if (r.status === 'fulfilled') landed++;
      else {
        first ??= r.reason;
        if (bio.op !== 'discard') this.#fail(legs[k]!, 'D');
      }
    }
    // a failed discard degrades nothing; a write fails only when no leg took it
    if (first !== null && (bio.op === 'discard' || landed === 0)) throw toBlockError(first);
    if (first === null && legs.length === this.#legs.length) return;
    if (this.#features.handleErrors) {
      this.#log.setRegionSync(region, false);
      this.#inSync = false;
    }
  }

  /**
   * The legs a write to an in-sync region goes to: every leg, except with handle_errors
   * the legs that already failed a write (unless all have). Such a leg would only fail
   * again, and its region be marked out of sync, as the kernel does after each failed
   * write; skipping it reaches that state at once instead of waiting for the failure
   * each time (a leg on a lost NBD server fails only after the client's reconnect time).
   * It gets writes again when the mirror is back in sync (faults are forgotten then).
   */
  #writeLegs(): number[] {
    const all = this.#legs.map((_, i) => i);
    if (!this.#features.handleErrors) return all;
    const healthy = all.filter((i) => !(this.#legs[i]!.faults & FAULTS.D));
    return healthy.length > 0 ? healthy : all;
  }

  #submit(leg: number, bio: Bio): Promise<void> {
    const l = this.#legs[leg]!;
    return l.dev.submit({ op: bio.op, sector: bio.sector + l.offset, sectors: bio.sectors, data: bio.data, flags: bio.flags });
  }

  // ---- flush ----

  async #flush(): Promise<void> {
    const r = await this.#flushLegs();
    if (r.failed === r.flushed) throw new BlockError('EIO', `${this.#ctx.device}: no mirror leg could be flushed`);
    await this.#regions.clearIdle();
  }

  /** flush legs without faults (all legs when every one has some); marks failures `F` */
  async #flushLegs(): Promise<{ flushed: number; failed: number }> {
    let targets = this.#legs.flatMap((l, i) => (l.faults === 0 ? [i] : []));
    if (targets.length === 0) targets = this.#legs.map((_, i) => i);
    const results = await Promise.allSettled(targets.map((i) => this.#legs[i]!.dev.submit(FLUSH)));
    let failed = 0;
    results.forEach((r, k) => {
      if (r.status === 'rejected') {
        failed++;
        this.#fail(targets[k]!, 'F');
      }
    });
    return { flushed: targets.length, failed };
  }

  // ---- faults and sync state ----

  #fail(leg: number, fault: Fault): void {
    const l = this.#legs[leg]!;
    if (l.faults & FAULTS[fault]) return;
    l.faults |= FAULTS[fault];
    this.#ctx.log.warn(`${this.#ctx.device}: mirror leg ${leg} (${l.dev.ref}): ${FAULT_TEXT[fault]}`);
    if (this.#features.handleErrors && leg === this.#default) this.#failover();
    this.#ctx.event(`mirror leg ${leg} (${l.dev.ref}): ${FAULT_TEXT[fault]}`, { leg, fault });
  }

  /** with handle_errors: the default leg failed; another leg without faults takes over if it may */
  #failover(): void {
    if (!this.#inSync && !this.#features.keepLog) {
      this.#ctx.log.warn(`${this.#ctx.device}: default mirror leg failed while out of sync: reads may fail`);
      return;
    }
    const next = this.#legs.findIndex((l) => l.faults === 0);
    if (next < 0) this.#ctx.log.warn(`${this.#ctx.device}: every mirror leg has failed`);
    else this.#default = next;
  }

  #logFailed(err: unknown): void {
    this.#ctx.log.limited('log', `${this.#ctx.device}: mirror log: ${(err as Error).message}`);
  }

  /** raise the event when every region has become in sync; faults are forgotten then (dm-raid1) */
  #checkInSync(): void {
    if (this.#inSync || this.#log.getSyncCount() !== this.#log.regionCount) return;
    this.#inSync = true;
    for (const l of this.#legs) l.faults = 0;
    this.#ctx.event('mirror in sync: every region copied to every leg', { work: 'resync', phase: 'done' });
  }

  // ---- resync ----

  #startResync(): void {
    if (this.#resync || this.#log.getSyncCount() === this.#log.regionCount) return;
    const src = this.#default;
    const dst = this.#legs.flatMap((_, i) => (i === src ? [] : [i]));
    const abort = new AbortController();
    const run = resyncRegions({
      log: this.#log,
      gate: this.#gate,
      length: this.#ctx.length,
      src: this.#legs[src]!,
      dst: dst.map((i) => this.#legs[i]!),
      concurrency: RESYNC_CONCURRENCY,
      rate: () => this.#rate,
      signal: abort.signal,
      done: (region, outcome) => this.#recovered(region, outcome, src, dst),
    });
    const handle = {
      abort,
      done: run.then(
        () => undefined,
        (err: unknown) => {
          if ((err as { code?: string }).code !== 'EINTR') this.#ctx.log.warn(`${this.#ctx.device}: resync stopped: ${(err as Error).message}`);
        },
      ).finally(() => {
        if (this.#resync === handle) this.#resync = null;
      }),
    };
    this.#resync = handle;
  }

  #recovered(region: number, outcome: CopyOutcome, src: number, dst: number[]): void {
    if (outcome.readError) this.#fail(src, 'S');
    outcome.writeErrors.forEach((e, k) => {
      if (e) this.#fail(dst[k]!, 'S');
    });
    const ok = outcome.readError === null && outcome.writeErrors.every((e) => e === null);
    this.#log.setRegionSync(region, ok);
    if (!ok) return;
    this.#regions.recovered(region);
    this.#checkInSync();
  }

  async #stopResync(): Promise<void> {
    const r = this.#resync;
    if (!r) return;
    r.abort.abort();
    await r.done;
  }

  // ---- hooks ----

  /** stop resync, flush the log */
  async presuspend(): Promise<void> {
    await this.#stopResync();
    this.#regions.stop();
    await this.#log.presuspend().catch((err: unknown) => this.#logFailed(err));
    await this.#log.flush().catch(() => undefined); // a failure is in the log's status
  }

  /** I/O has drained: clear every idle region and persist the log */
  async postsuspend(): Promise<void> {
    await this.#regions.clearIdle();
    await this.#log.postsuspend().catch((err: unknown) => this.#logFailed(err));
    this.#state = 'suspended';
  }

  /** load the log's state, restart resync (nothing to do if not suspended: the kernel skips that case) */
  async resume(): Promise<void> {
    if (this.#state === 'active') return;
    await this.#log.resume();
    this.#state = 'active';
    this.#regions.start();
    this.#checkInSync();
    this.#startResync();
  }

  /** a live mirror is suspended first (as the kernel does before destroying a device) */
  async destroy(): Promise<void> {
    if (this.#state === 'active') {
      await this.presuspend().catch(() => undefined);
      await this.postsuspend().catch(() => undefined);
    }
    await this.#stopResync();
    this.#regions.stop();
    await this.#log.destroy();
  }

  /** `resync-rate <bytes/s>` (0 = unlimited) */
  message(args: string[]): void {
    const r = new ArgReader(args, 'mirror');
    const verb = r.next('message');
    if (verb !== 'resync-rate') r.fail(`unknown message '${verb}' (expected resync-rate <bytes/s>)`);
    this.#rate = r.uint('resync rate');
    r.expectEnd();
  }

  /** resync progress in sectors (regions in sync × region size); null once in sync */
  progress(): Progress | null {
    const total = this.#log.regionCount;
    const inSync = this.#log.getSyncCount();
    if (inSync >= total) return null;
    const size = this.#log.regionSize;
    return { work: 'resync', doneSectors: inSync * size, totalSectors: total * size };
  }

  status(type: StatusType): string {
    const legs = this.#legs;
    if (type === 'info') {
      const health = legs.map((l) => healthChar(l.faults)).join('');
      return `${legs.length} ${legs.map((l) => l.dev.ref).join(' ')} ${this.#log.getSyncCount()}/${this.#log.regionCount} 1 ${health} ${this.#log.status('info')}`;
    }
    const features = [this.#features.handleErrors ? 'handle_errors' : '', this.#features.keepLog ? 'keep_log' : ''].filter(Boolean);
    const featureText = features.length ? ` ${features.length} ${features.join(' ')}` : '';
    return `${this.#log.status('table')} ${legs.length} ${legs.map((l) => `${refArg(l.dev)} ${l.offset}`).join(' ')}${featureText}`;
  }
}

function healthChar(faults: number): string {
  if (faults === 0) return 'A';
  for (const f of ['F', 'D', 'S', 'R'] as const) if (faults & FAULTS[f]) return f;
  return 'A';
}
