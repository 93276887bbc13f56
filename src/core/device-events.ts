/**
 * The engine's event stream (`DeviceMapper`'s 'device-event', `dmkit events`): every state
 * change of every device and replication site, numbered in the order it happened.
 *
 *   kind    exists (a snapshot line, not a change) | create | change | destroy
 *   object  device, or site when the event names a replicator site (`slink`)
 *   name    the device; eventNr its event counter after the event (only target events
 *           and role changes count; lifecycle operations do not, as in dm)
 *   state   the object's state after the event: a device's active | suspended | removed,
 *           a site's state as `status --json` names it (asynchronous, down, suspended, …)
 *   op      lifecycle operations of the engine: create, load, clear, suspend, resume,
 *           remove, rename (with `from`, the old name)
 *   text    what happened, in words; the target's own for target events
 *
 * plus the event's detail (`EventDetail`: slink, role, work, phase and counts).
 */
import type { EventDetail } from './types.ts';

export type EventKind = 'exists' | 'create' | 'change' | 'destroy';
export type LifecycleOp = 'create' | 'load' | 'clear' | 'suspend' | 'resume' | 'remove' | 'rename';

export interface DeviceEvent {
  /** engine-wide, from 1, in the order the events happened; an `exists` line has the last one issued */
  readonly seq: number;
  /** ISO 8601 time */
  readonly time: string;
  readonly kind: EventKind;
  readonly object: 'device' | 'site';
  readonly name: string;
  readonly eventNr: number;
  readonly state: string;
  readonly op?: LifecycleOp;
  readonly slink?: number;
  readonly text: string;
  readonly [key: string]: string | number | boolean | undefined;
}

/** keys the detail cannot replace */
const CORE = new Set(['seq', 'time', 'kind', 'object', 'name', 'eventNr', 'text']);

/** Build an event; a `state` in the detail (a site's) wins over the device's. */
export function makeEvent(
  head: { seq: number; kind: EventKind; name: string; eventNr: number; state: string; text?: string },
  detail?: EventDetail,
): DeviceEvent {
  const ev: Record<string, string | number | boolean> = {
    seq: head.seq,
    time: new Date().toISOString(),
    kind: head.kind,
    object: typeof detail?.slink === 'number' ? 'site' : 'device',
    name: head.name,
    eventNr: head.eventNr,
    state: head.state,
  };
  for (const [k, v] of Object.entries(detail ?? {})) if (!CORE.has(k)) ev[k] = v;
  ev.text = head.text ?? '';
  return ev as DeviceEvent;
}
