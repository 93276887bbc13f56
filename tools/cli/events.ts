/**
 * `dmkit events [--json] [--now]`: the daemon's `events` stream (like `drbdsetup events2`):
 * an `exists` line for every device and replicator site, then every change as it happens
 * until interrupted (`--now`: the snapshot only). One line per event, plain
 * (format.ts eventLine, docs/cli.md) or JSON. Ends quietly on SIGINT, SIGTERM and when
 * the reader of its output goes away (EPIPE, `dmkit events | head -3`): it notices at the
 * next line it cannot write.
 */
import type { DeviceEvent } from '../../src/core/device-events.ts';
import type { Session } from './actions.ts';
import * as F from './format.ts';

export async function events(s: Session, o: Record<string, unknown>): Promise<void> {
  let stopping = false;
  const show = (ev: DeviceEvent): void => {
    if (!stopping) s.out(o.json ? `${JSON.stringify(ev)}\n` : F.eventLine(ev));
  };
  const stream = s.client.stream<DeviceEvent, null>('events', { now: !!o.now }, show);
  const stop = (): void => {
    if (stopping) return;
    stopping = true;
    stream.cancel();
  };
  // stays attached: a write already under way may still fail after the stream has ended
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code !== 'EPIPE') s.err(`dmkit: events: ${err.message}\n`);
    stop();
  });
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
  try {
    await stream.done;
  } catch (err) {
    if (!stopping || (err as { code?: string }).code !== 'ECANCELED') throw err;
  } finally {
    process.off('SIGINT', stop);
    process.off('SIGTERM', stop);
  }
}
