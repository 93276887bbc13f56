/**
 * The writer process behind ReplWriter (repl-writer.ts). Per round (`start`): connect to
 * every device of the group with the project's NbdClient (no reconnect: a lost daemon
 * fails what is in flight at once), run `lanes` writers that pick a device and blocks none
 * of which has a write in flight, and report each event, stamped with this process's event
 * counter, before the request is sent (S, F) and once its reply is in (A, G) or it failed
 * (X, Y). A lane stops at its first failure. `stop`: stop issuing, wait for what is in
 * flight, disconnect, report `end`.
 */
import { NbdClient } from '../../src/nbd/client.ts';
import { prng } from './nbd-tools.ts';
import { BLOCK, writeData, type FromChild, type ToChild, type WriterEvent, type WriterRound } from './repl-writer.ts';

const send = (m: FromChild): void => void process.send!(m);

let clock = 0;
let pending: WriterEvent[] = [];
function emit(e: WriterEvent): void {
  pending.push(e);
}
function flushEvents(): void {
  if (pending.length === 0) return;
  send({ ev: 'events', list: pending });
  pending = [];
}
const ticker = setInterval(flushEvents, 5);

interface Run {
  stopping: boolean;
  done: Promise<void>;
  clients: NbdClient[];
  submitted: number;
  acked: number;
}
let run: Run | null = null;

function message(err: unknown): string {
  return ((err as Error).message ?? String(err)).replace(/\n/g, ' ');
}

async function lane(r: Run, cfg: WriterRound, k: number, busy: Set<number>[], ids: { next: number }): Promise<void> {
  const rnd = prng(cfg.seed * 7919 + k * 104_729 + 1);
  for (let fid = 0; !r.stopping && r.submitted < cfg.maxWrites; ) {
    const dev = Math.floor(rnd() * cfg.uris.length);
    const blocks = 1 + Math.floor(rnd() * cfg.maxBlocks);
    const range = rnd() < cfg.hotShare ? Math.min(cfg.hot, cfg.span) : cfg.span;
    const first = Math.floor(rnd() * Math.max(1, range - blocks + 1));
    const n = Math.min(blocks, cfg.span - first);
    const b = busy[dev]!;
    let free = true;
    for (let i = 0; i < n && free; i++) free = !b.has(first + i);
    if (!free) {
      await new Promise((res) => setImmediate(res));
      continue;
    }
    for (let i = 0; i < n; i++) b.add(first + i);
    const id = ++ids.next;
    const fua = rnd() < cfg.fuaShare;
    const data = writeData(cfg.round, id, dev, first * BLOCK, n);
    r.submitted++;
    emit(['S', ++clock, id, dev, first * BLOCK, n, fua ? 1 : 0]);
    try {
      await r.clients[dev]!.write(data, first * BLOCK, fua);
    } catch (err) {
      emit(['X', ++clock, id, message(err)]);
      return; // its blocks stay busy: the write is in flight for ever as far as anyone knows
    }
    emit(['A', ++clock, id]);
    r.acked++;
    for (let i = 0; i < n; i++) b.delete(first + i);
    if (rnd() < cfg.flushShare) {
      const f = k * 1_000_000 + ++fid;
      emit(['F', ++clock, f]);
      try {
        await r.clients[dev]!.flush();
      } catch (err) {
        emit(['Y', ++clock, f, message(err)]);
        return;
      }
      emit(['G', ++clock, f]);
    }
  }
}

async function start(cfg: WriterRound): Promise<void> {
  const clients = await Promise.all(cfg.uris.map((u) => NbdClient.connect(u, { reconnectTimeoutMs: 0, blockStatus: false })));
  const r: Run = { stopping: false, done: Promise.resolve(), clients, submitted: 0, acked: 0 };
  const busy = cfg.uris.map(() => new Set<number>());
  const ids = { next: 0 };
  r.done = Promise.all(Array.from({ length: cfg.lanes }, (_, k) => lane(r, cfg, k, busy, ids))).then(() => undefined);
  run = r;
  send({ ev: 'ready' });
}

async function stop(): Promise<void> {
  const r = run;
  if (!r) return;
  r.stopping = true;
  await r.done;
  await Promise.all(r.clients.map((c) => c.close().catch(() => undefined)));
  run = null;
  flushEvents();
  send({ ev: 'end', submitted: r.submitted, acked: r.acked });
}

process.on('message', (m: ToChild) => {
  const fail = (err: unknown): void => send({ ev: 'fatal', message: message(err) });
  if (m.op === 'start') void start(m.round).catch(fail);
  else if (m.op === 'stop') void stop().catch(fail);
  else {
    clearInterval(ticker);
    process.disconnect?.();
    process.exit(0);
  }
});
process.on('disconnect', () => process.exit(0));
