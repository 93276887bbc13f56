/**
 * The `events` op (`dmkit events`, like `drbdsetup events2`): first an `exists` item for
 * every device and every replicator site as they are now, then every DeviceEvent as it
 * happens, in order, until cancelled (`now`: the snapshot only). The snapshot is taken and
 * the stream subscribed in one step, so nothing between them is lost or seen twice: every
 * change streamed has a `seq` above the snapshot's.
 */
import type { DeviceMapper } from '../core/device-manager.ts';
import { makeEvent, type DeviceEvent } from '../core/device-events.ts';
import { DmError } from '../core/errors.ts';
import type { OpContext } from './ops.ts';
import type { Args } from './protocol.ts';

/** a replicator's sites as its `statusJson` names them */
interface SitesJson {
  sites?: Array<{ slink: number; state: string; mode?: string; consistent?: boolean; policy?: string }>;
}

/** `exists` items of the remote sites of every replicator (group) device */
function existingSites(dm: DeviceMapper): DeviceEvent[] {
  const out: DeviceEvent[] = [];
  for (const d of dm.list()) {
    for (const e of d.live?.entries ?? []) {
      if (e.type.name !== 'replicator' || !e.target.statusJson) continue;
      for (const s of (e.target.statusJson() as SitesJson).sites ?? []) {
        if (s.state === 'local') continue;
        const detail: Record<string, string | number | boolean> = { slink: s.slink };
        if (s.mode) detail.mode = s.mode;
        if (s.consistent !== undefined) detail.consistent = s.consistent;
        if (s.policy) detail.policy = s.policy;
        out.push(makeEvent({ seq: dm.eventSeq, kind: 'exists', name: d.name, eventNr: d.eventNr, state: s.state }, detail));
      }
    }
  }
  return out;
}

/** the snapshot: each device, then its sites */
export function existing(dm: DeviceMapper): DeviceEvent[] {
  const sites = existingSites(dm);
  return dm.existing().flatMap((d) => [d, ...sites.filter((s) => s.name === d.name)]);
}

export function events(a: Args, ctx: OpContext): Promise<null> {
  const items = existing(ctx.dm);
  if (a.bool('now')) {
    for (const it of items) ctx.emit(it);
    return Promise.resolve(null);
  }
  const onEvent = (ev: DeviceEvent): void => ctx.emit(ev);
  ctx.dm.on('device-event', onEvent);
  for (const it of items) ctx.emit(it);
  return new Promise((_resolve, reject) => {
    const stop = (): void => {
      ctx.dm.off('device-event', onEvent);
      reject(new DmError('ECANCELED', 'cancelled'));
    };
    if (ctx.signal.aborted) stop();
    else ctx.signal.addEventListener('abort', stop, { once: true });
  });
}
