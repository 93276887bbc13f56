/**
 * A writer for the write-order-fidelity rounds: a child process (repl-writer-child.ts, run
 * with tsx, using the project's NbdClient) that writes to every device of a replication
 * group over NBD with several writes in flight, and reports every event to the parent over
 * its IPC channel, stamped with its own event counter:
 *
 *   S t id dev offset blocks fua   write `id` is about to be sent (its bytes: writeData)
 *   A t id                          its reply arrived: acknowledged
 *   X t id message                  it failed (in flight when the daemon died)
 *   F t fid / G t fid / Y t fid     a flush sent / acknowledged / failed
 *
 * Every 4 KiB block of every write has bytes of its own (a header naming round, write,
 * device and block, then a stream seeded by them), and the child never has two writes to
 * one block in flight, as the checker (replication-checker.ts) needs. One child serves many
 * rounds (`start` connects, `stop` ends the round), so tsx starts once.
 */
import { fork, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { WriteRecord } from './replication-checker.ts';
import { blockDigest } from './replication-checker.ts';
import { fillXorshift } from './nbd-writer.ts';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const CHILD = path.join(ROOT, 'test', 'helpers', 'repl-writer-child.ts');

export const BLOCK = 4096;
const MAGIC = 0x31464f57; // 'WOF1'

export interface WriterRound {
  /** NBD URI of each device of the group */
  uris: string[];
  round: number;
  seed: number;
  /** writes in flight at once */
  lanes: number;
  /** blocks each write may start in: [0, span) per device */
  span: number;
  /** 1 … maxBlocks blocks per write */
  maxBlocks: number;
  /** this share of the writes goes to the first `hot` blocks of a device (overwrites, dependency chains) */
  hot: number;
  hotShare: number;
  /** stop issuing after this many writes (then idle until `stop`) */
  maxWrites: number;
  /** per write: chance of a flush after it, of FUA on it */
  flushShare: number;
  fuaShare: number;
}

export type WriterEvent =
  | ['S', number, number, number, number, number, number]
  | ['A', number, number]
  | ['X', number, number, string]
  | ['F', number, number]
  | ['G', number, number]
  | ['Y', number, number, string];

export type ToChild = { op: 'start'; round: WriterRound } | { op: 'stop' } | { op: 'exit' };
export type FromChild =
  | { ev: 'ready' }
  | { ev: 'events'; list: WriterEvent[] }
  | { ev: 'end'; submitted: number; acked: number }
  | { ev: 'fatal'; message: string };

/** one block of write `id`: header, then xorshift32 seeded by it */
export function blockData(round: number, id: number, dev: number, block: number): Buffer {
  const buf = Buffer.allocUnsafe(BLOCK);
  buf.writeUInt32LE(MAGIC, 0);
  buf.writeUInt32LE(round, 4);
  buf.writeUInt32LE(id, 8);
  buf.writeUInt32LE(dev, 12);
  buf.writeUInt32LE(block, 16);
  fillXorshift(buf, 20, (Math.imul(round + 1, 0x9e3779b1) ^ Math.imul(id + 1, 0x85ebca6b) ^ Math.imul(block + 1, 0xc2b2ae35) ^ dev) >>> 0 || 1);
  return buf;
}

/** the bytes of a write of `blocks` blocks from byte `offset` */
export function writeData(round: number, id: number, dev: number, offset: number, blocks: number): Buffer {
  const first = offset / BLOCK;
  return Buffer.concat(Array.from({ length: blocks }, (_, i) => blockData(round, id, dev, first + i)));
}

/** what a block's header says, for failure reports */
export function describeBlock(block: Buffer): string {
  if (block.every((b) => b === 0)) return 'zeroes';
  if (block.readUInt32LE(0) !== MAGIC) return `no header (${block.subarray(0, 8).toString('hex')}…)`;
  const [round, id, dev, blk] = [4, 8, 12, 16].map((o) => block.readUInt32LE(o));
  const whole = blockData(round!, id!, dev!, blk!).equals(block);
  return `round ${round} write ${id} (device ${dev} block ${blk})${whole ? '' : ', torn'}`;
}

export interface WriteInfo {
  id: number;
  dev: number;
  offset: number;
  blocks: number;
  fua: boolean;
  submitTime: number;
  ackTime: number | null;
  error: string | null;
}

/** a round's history, built from the events */
export class History {
  readonly round: number;
  readonly writes = new Map<number, WriteInfo>();
  flushes = 0;
  flushesAcked = 0;
  errors: string[] = [];

  constructor(round: number) {
    this.round = round;
  }

  add(e: WriterEvent): void {
    switch (e[0]) {
      case 'S':
        this.writes.set(e[2], { id: e[2], dev: e[3], offset: e[4], blocks: e[5], fua: e[6] === 1, submitTime: e[1], ackTime: null, error: null });
        return;
      case 'A':
        this.writes.get(e[2])!.ackTime = e[1];
        return;
      case 'X':
        this.writes.get(e[2])!.error = e[3];
        if (this.errors.length < 5) this.errors.push(e[3]);
        return;
      case 'F':
        this.flushes++;
        return;
      case 'G':
        this.flushesAcked++;
        return;
      case 'Y':
        if (this.errors.length < 5) this.errors.push(`flush: ${e[3]}`);
    }
  }

  get acked(): number {
    let n = 0;
    for (const w of this.writes.values()) if (w.ackTime !== null) n++;
    return n;
  }

  /** the checker's records: digests of every block of every write */
  records(): WriteRecord[] {
    return [...this.writes.values()].map((w) => ({
      id: w.id, dev: w.dev, offset: w.offset, submitTime: w.submitTime, ackTime: w.ackTime,
      digests: Array.from({ length: w.blocks }, (_, i) => blockDigest(blockData(this.round, w.id, w.dev, w.offset / BLOCK + i))),
    }));
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** children of this process, killed when it exits whatever happens */
const children = new Set<ChildProcess>();
process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL');
});

/** the parent's handle on the child */
export class ReplWriter {
  readonly #child: ChildProcess;
  #history: History | null = null;
  #ready = false;
  #ended: { submitted: number; acked: number } | null = null;
  #fatal: string | null = null;
  #stderr = '';
  #exited = false;

  constructor() {
    this.#child = fork(CHILD, [], { cwd: ROOT, execArgv: ['--import', 'tsx'], stdio: ['ignore', 'ignore', 'pipe', 'ipc'] });
    this.#child.stderr!.on('data', (d: Buffer) => (this.#stderr = (this.#stderr + d.toString()).slice(-4000)));
    this.#child.on('message', (m: FromChild) => this.#onMessage(m));
    this.#child.on('exit', () => {
      this.#exited = true;
      children.delete(this.#child);
    });
    children.add(this.#child);
  }

  #onMessage(m: FromChild): void {
    if (m.ev === 'ready') this.#ready = true;
    else if (m.ev === 'events') for (const e of m.list) this.#history?.add(e);
    else if (m.ev === 'end') this.#ended = { submitted: m.submitted, acked: m.acked };
    else this.#fatal = m.message;
  }

  #check(): void {
    if (this.#fatal) throw new Error(`writer: ${this.#fatal}`);
    if (this.#exited) throw new Error(`writer exited; stderr: ${this.#stderr}`);
  }

  get history(): History {
    return this.#history!;
  }

  /** connect to the round's devices and start writing; resolves once connected */
  async start(round: WriterRound, limitMs = 30_000): Promise<History> {
    this.#history = new History(round.round);
    this.#ready = false;
    this.#ended = null;
    this.#child.send({ op: 'start', round } satisfies ToChild);
    for (const end = Date.now() + limitMs; !this.#ready; await sleep(5)) {
      this.#check();
      if (Date.now() > end) throw new Error(`writer not connected within ${limitMs} ms; stderr: ${this.#stderr}`);
    }
    return this.#history;
  }

  /** resolves once `cond(history)` holds (polled) or `limitMs` passed (then false) */
  async until(cond: (h: History) => boolean, limitMs: number): Promise<boolean> {
    for (const end = Date.now() + limitMs; ; await sleep(2)) {
      this.#check();
      if (cond(this.#history!)) return true;
      if (Date.now() > end) return false;
    }
  }

  /** end the round: the child stops issuing, waits for what is in flight (failed when the daemon is gone), disconnects */
  async stop(limitMs = 30_000): Promise<History> {
    this.#child.send({ op: 'stop' } satisfies ToChild);
    for (const end = Date.now() + limitMs; !this.#ended; await sleep(5)) {
      this.#check();
      if (Date.now() > end) throw new Error(`writer did not end its round within ${limitMs} ms; stderr: ${this.#stderr}`);
    }
    const h = this.#history!;
    if (h.writes.size !== this.#ended.submitted || h.acked !== this.#ended.acked) {
      throw new Error(`writer: events lost (child: ${this.#ended.submitted} submitted, ${this.#ended.acked} acknowledged; parent saw ${h.writes.size}, ${h.acked})`);
    }
    return h;
  }

  async close(): Promise<void> {
    if (this.#exited) return;
    const gone = new Promise<void>((r) => this.#child.once('exit', () => r()));
    this.#child.send({ op: 'exit' } satisfies ToChild);
    await Promise.race([gone, sleep(5000)]);
    if (!this.#exited) this.#child.kill('SIGKILL');
  }
}
