/**
 * The control operations: one handler per op, each reading its arguments through `Args`
 * (errors name the op and the argument) and calling the engine. The server awaits the
 * state save after every op in `MUTATING` before it sends the reply.
 */
import type { DeviceMapper } from '../core/device-manager.ts';
import type { ReplicationReceiver } from '../replication/receiver.ts';
import { demote, promote } from '../replication/role-ops.ts';
import { DEMOTED, replicatedDevice } from '../replication/roles.ts';
import type { DeviceEvent } from '../core/device-events.ts';
import type { ProgressReport } from '../core/types.ts';
import { DeviceError, DmError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import { Args, MAX_IO, type DeviceSummary, type HelloResult, type ProgressItem, type WatchItem } from './protocol.ts';
import type { StateStore } from './state.ts';
import { events } from './events.ts';

export interface OpContext {
  readonly dm: DeviceMapper;
  readonly state: StateStore;
  hello(): HelloResult;
  /** aborted when the request is cancelled or its connection closes */
  readonly signal: AbortSignal;
  /** send a streamed item for this request */
  emit(item: unknown): void;
  /** the replication receiver, when this daemon is a receiving site */
  receiver?(): ReplicationReceiver | null;
}

type Handler = (a: Args, ctx: OpContext) => Promise<unknown> | unknown;

/** ops that may change the device set or its tables: their change is saved before the reply */
export const MUTATING: ReadonlySet<string> = new Set([
  'create', 'load', 'reload', 'clear', 'suspend', 'resume', 'remove', 'remove_all', 'rename', 'setuuid', 'message', 'promote', 'demote',
]);

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function summary(dm: DeviceMapper, name: string): DeviceSummary {
  const d = dm.get(name);
  const types = d.live?.entries.map((e) => e.type.name) ?? [];
  const out: DeviceSummary = { ...dm.info(name), deps: dm.deps(name), types, io: d.ioStats() };
  const repl = d.live?.entries.find((e) => e.type.name === 'replicator' || e.type.name === 'replicator-dev');
  if (repl?.target.statusJson) out.replication = repl.target.statusJson();
  const p = dm.progress(name);
  if (p) out.progress = item(name, p);
  return out;
}

/** who references `dm:NAME` in a live or inactive table */
function holdersOf(dm: DeviceMapper, name: string): string[] {
  const ref = `dm:${name}`;
  return dm.list().filter((d) => [d.live, d.inactive].some((t) => t?.deps.includes(ref))).map((d) => d.name);
}

async function remove(a: Args, { dm }: OpContext): Promise<unknown> {
  const name = a.str('name');
  const opts = { force: a.bool('force'), deferred: a.bool('deferred') };
  // dmsetup --retry: a few more tries while something briefly holds the device open
  for (let attempt = 0; ; attempt++) {
    try {
      return { result: await dm.remove(name, opts) };
    } catch (err) {
      if (!a.bool('retry') || (err as DmError).code !== 'EBUSY' || attempt >= 24) throw err;
      await sleep(200);
    }
  }
}

async function removeAll(a: Args, { dm }: OpContext): Promise<unknown> {
  const removed = await dm.removeAll();
  if (a.bool('force')) {
    for (const d of dm.list()) {
      if (!d.live) continue;
      await dm.load(d.name, `0 ${d.sectors} error`);
      await dm.resume(d.name);
    }
    removed.push(...(await dm.removeAll()));
  }
  if (a.bool('deferred')) for (const d of dm.list()) await dm.remove(d.name, { deferred: true });
  return { removed, remaining: dm.list().map((d) => d.name) };
}

function rename(a: Args, { dm }: OpContext): unknown {
  const name = a.str('name');
  const newName = a.str('newName');
  dm.get(name);
  const holders = holdersOf(dm, name);
  if (holders.length) {
    throw new DeviceError('EBUSY', `${name}: cannot rename: the table of ${holders.join(', ')} refers to it as dm:${name}`);
  }
  dm.rename(name, newName);
  return null;
}

function item(name: string, p: ProgressReport): ProgressItem {
  return { name, work: p.work, doneSectors: p.doneSectors, totalSectors: p.totalSectors, percent: p.percent, rate: p.rate, eta: p.eta };
}

/**
 * Stream the device's background work (dm.progress: resync, verify) until none is left.
 * The final result is the completed figure, or null when nothing was running.
 */
async function progress(a: Args, ctx: OpContext): Promise<ProgressItem | null> {
  const name = a.str('name');
  const interval = a.optUint('intervalMs') ?? 250;
  const dev = ctx.dm.get(name);
  let last: ProgressItem | null = null;
  for (;;) {
    const ev = dev.eventNr;
    const p = ctx.dm.progress(name);
    if (!p || p.doneSectors >= p.totalSectors) {
      if (p) return item(name, p);
      return last && { ...last, doneSectors: last.totalSectors, percent: 100, eta: 0 };
    }
    last = item(name, p);
    ctx.emit(last);
    const ac = new AbortController();
    const stop = (): void => ac.abort();
    ctx.signal.addEventListener('abort', stop, { once: true });
    await Promise.race([dev.wait(ev, ac.signal), sleep(interval)]).catch(() => undefined);
    ac.abort();
    ctx.signal.removeEventListener('abort', stop);
    if (ctx.signal.aborted) throw new DmError('ECANCELED', 'cancelled');
    if (dev.removed) throw new DeviceError('ENXIO', `${name}: device removed`);
  }
}

function watch(_a: Args, ctx: OpContext): Promise<never> {
  const onChange = (): void => ctx.emit({ type: 'change' } satisfies WatchItem);
  // target events and role changes (those that count in eventNr), not lifecycle operations
  const onEvent = (ev: DeviceEvent): void => {
    if (ev.kind === 'change' && ev.op === undefined) ctx.emit({ type: 'event', name: ev.name, eventNr: ev.eventNr } satisfies WatchItem);
  };
  ctx.dm.on('change', onChange);
  ctx.dm.on('device-event', onEvent);
  return new Promise((_resolve, reject) => {
    ctx.signal.addEventListener('abort', () => {
      ctx.dm.off('change', onChange);
      ctx.dm.off('device-event', onEvent);
      reject(new DmError('ECANCELED', 'cancelled'));
    }, { once: true });
  });
}

async function io(a: Args, { dm }: OpContext): Promise<unknown> {
  const kind = a.oneOf('op', ['read', 'write', 'flush', 'discard', 'write-zeroes'] as const);
  const name = a.str('name');
  if (kind === 'flush') return dm.flush(name).then(() => ({}));
  const offset = a.uint('offset');
  if (kind === 'write') {
    const data = Buffer.from(a.text('data'), 'base64');
    if (data.length > MAX_IO) throw new DmError('EINVAL', `io: at most ${MAX_IO} bytes per request`);
    await dm.write(name, offset, data, { fua: a.bool('fua') });
    return { length: data.length };
  }
  const length = a.uint('length');
  if (length > MAX_IO) throw new DmError('EINVAL', `io: at most ${MAX_IO} bytes per request`);
  if (kind === 'read') return { data: (await dm.read(name, offset, length)).toString('base64') };
  if (kind === 'discard') await dm.discard(name, offset, length);
  else await dm.writeZeroes(name, offset, length, { fua: a.bool('fua') });
  return {};
}

async function load(a: Args, { dm, state }: OpContext): Promise<null> {
  const name = a.str('name');
  await dm.load(name, a.text('table'), { readOnly: a.bool('readOnly') });
  state.dropUnrestoredInactive(dm.get(name));
  return null;
}

/** a new replicator-dev of a secondary (demoted) group refuses writers like the group's other devices */
async function markDemoted(dm: DeviceMapper, name: string): Promise<void> {
  const dev = dm.get(name);
  if (dev.secondary === null && replicatedDevice(dev)?.role.secondary) await dev.setSecondary(DEMOTED);
}

export const handlers: Readonly<Record<string, Handler>> = {
  hello: (_a, ctx) => ctx.hello(),
  version: (_a, ctx) => ({ version: ctx.hello().version }),
  list: (_a, { dm }) => ({ devices: dm.list().map((d) => summary(dm, d.name)) }),
  info: (a, { dm }) => summary(dm, a.str('name')),
  create: async (a, { dm }) => {
    const name = a.str('name');
    await dm.create(name, { table: a.optText('table'), uuid: a.optStr('uuid'), readOnly: a.bool('readOnly') });
    await markDemoted(dm, name);
    return summary(dm, name);
  },
  load,
  reload: load,
  clear: async (a, { dm, state }) => {
    const name = a.str('name');
    await dm.clear(name);
    state.dropUnrestoredInactive(dm.get(name));
    return null;
  },
  suspend: (a, { dm }) => dm.suspend(a.str('name'), { noflush: a.bool('noflush') }).then(() => null),
  resume: async (a, { dm, state }) => {
    const name = a.str('name');
    await dm.resume(name);
    state.dropUnrestoredInactive(dm.get(name));
    await markDemoted(dm, name);
    return null;
  },
  remove,
  remove_all: removeAll,
  rename,
  setuuid: (a, { dm }) => {
    dm.setUuid(a.str('name'), a.str('uuid'));
    return null;
  },
  table: (a, { dm }) => ({ lines: dm.table(a.str('name'), { inactive: a.bool('inactive') }) }),
  status: (a, { dm }) => {
    const name = a.str('name');
    const p = dm.progress(name);
    return { lines: dm.status(name), ...(p ? { progress: item(name, p) } : {}) };
  },
  deps: (a, { dm }) => {
    const d = dm.get(a.str('name'));
    return { deps: [...((a.bool('inactive') ? d.inactive : d.live)?.deps ?? [])] };
  },
  targets: (_a, { dm }) => ({ targets: dm.targets.list().map((t) => ({ name: t.name, version: [...t.version] })) }),
  message: async (a, { dm }) => ({ reply: await dm.message(a.str('name'), a.uint('sector'), a.strings('args')) }),
  wait: async (a, { dm, signal }) => ({ eventNr: await dm.wait(a.str('name'), a.uint('eventNr'), signal) }),
  progress,
  watch,
  promote: (a, ctx) => promote(ctx.dm, a.str('name'), { force: a.bool('force'), receiver: ctx.receiver?.() ?? null }),
  demote: (a, ctx) => demote(ctx.dm, a.str('name'), { discard: a.bool('discard'), receiver: ctx.receiver?.() ?? null }),
  events,
  io,
};

/**
 * Run one op as the control socket does (the HTTP listener's changes go through here too):
 * its arguments read by `Args`, an unknown op refused with ENOSYS, and the device set saved
 * after an op that may change it, also when it fails part way.
 */
export async function runOp(op: string, args: Record<string, unknown>, ctx: OpContext, l: Logger): Promise<unknown> {
  const handler = Object.hasOwn(handlers, op) ? handlers[op] : undefined;
  if (!handler) throw new DmError('ENOSYS', `unknown operation '${op}'`);
  try {
    const result = await handler(new Args(op, args), ctx);
    if (MUTATING.has(op)) await ctx.state.save();
    return result;
  } catch (err) {
    if (MUTATING.has(op)) await ctx.state.save().catch((e: Error) => l.error(`saving state: ${e.message}`));
    if (!(err as { code?: unknown })?.code) l.error(`${op}: unexpected failure: ${(err as Error)?.stack ?? String(err)}`);
    throw err;
  }
}
