/**
 * An application writing to an NBD export from its own process (nbd-writer-child.ts, run
 * with tsx, using the project's NbdClient), for e2e tests that reload, fail or kill things
 * underneath it. The child appends one line to an ack log per completed request:
 *
 *   W <offset> <length> <seed>   a write was acknowledged; its bytes are writeData(seed, length)
 *   F <writes>                   a flush issued after the first <writes> W lines was acknowledged
 *   E <message>                  a request failed (the child exits 2 at stop)
 *   L done                       list mode: every listed write (and the flush) completed
 *
 * The test rebuilds what the export must hold by replaying the W lines over the initial
 * content (`replay`): an independent reference model, sharing only the data generator.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const CHILD = path.join(ROOT, 'test', 'helpers', 'nbd-writer-child.ts');

/** `lanes` sequential writers; lane k writes only blocks ≡ k (mod lanes), so no two overlap */
export interface RandomWrites {
  kind: 'random';
  seed: number;
  lanes: number;
  blockBytes: number;
  sizeBytes: number;
  /** a flush after every this many writes of a lane (0 = never) */
  flushEvery: number;
}

/** every write issued at once; then a flush if asked; then idle until stopped or killed */
export interface ListedWrites {
  kind: 'list';
  writes: Array<{ offset: number; length: number; seed: number }>;
  flush: boolean;
}

export interface WriterConfig {
  uri: string;
  log: string;
  work: RandomWrites | ListedWrites;
}

export interface AckedWrite {
  offset: number;
  length: number;
  seed: number;
}

export interface AckLog {
  writes: AckedWrite[];
  /** the W count covered by the last acknowledged flush */
  flushed: number;
  errors: string[];
  /** list mode: every listed write (and its flush) completed */
  listed: boolean;
}

/** the bytes of a write: xorshift32 from `seed`, the same in the child and the model */
export function writeData(seed: number, length: number): Buffer {
  const buf = Buffer.alloc(length);
  fillXorshift(buf, 0, (seed ^ 0x9e3779b9) >>> 0 || 1);
  return buf;
}

/** fill buf[from…] (a multiple of 4 bytes) with xorshift32 words from state `x` (non-zero) */
export function fillXorshift(buf: Buffer, from: number, x: number): void {
  for (let i = from; i < buf.length; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    buf.writeUInt32LE(x, i);
  }
}

export function readAckLog(file: string): AckLog {
  const log: AckLog = { writes: [], flushed: 0, errors: [], listed: false };
  let text = '';
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    return log;
  }
  for (const line of text.split('\n')) {
    if (line.startsWith('W ')) {
      const [offset, length, seed] = line.slice(2).split(' ').map(Number) as [number, number, number];
      log.writes.push({ offset, length, seed });
    } else if (line.startsWith('F ')) log.flushed = Math.max(log.flushed, Number(line.slice(2)));
    else if (line.startsWith('E ')) log.errors.push(line.slice(2));
    else if (line === 'L done') log.listed = true;
  }
  return log;
}

/** `initial` with every acknowledged write applied in log order */
export function replay(initial: Buffer, writes: readonly AckedWrite[]): Buffer {
  const model = Buffer.from(initial);
  for (const w of writes) writeData(w.seed, w.length).copy(model, w.offset);
  return model;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export class NbdWriter {
  readonly log: string;
  readonly child: ChildProcess;
  readonly #exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  #stderr = '';
  #stdout = '';

  constructor(cfg: WriterConfig) {
    this.log = cfg.log;
    fs.writeFileSync(cfg.log, '');
    this.child = spawn(process.execPath, ['--import', 'tsx', CHILD, JSON.stringify(cfg)], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    this.child.stdout!.on('data', (d: Buffer) => (this.#stdout += d.toString()));
    this.child.stderr!.on('data', (d: Buffer) => (this.#stderr += d.toString()));
    this.#exited = new Promise((resolve) => this.child.on('exit', (code, signal) => resolve({ code, signal })));
    process.once('exit', () => this.child.kill('SIGKILL'));
  }

  /** resolves once the child is connected and writing (it prints READY) */
  async ready(limitMs = 30_000): Promise<void> {
    for (const end = Date.now() + limitMs; !this.#stdout.includes('READY\n'); ) {
      if (this.child.exitCode !== null || this.child.signalCode !== null) throw new Error(`writer exited: ${this.#stderr}`);
      if (Date.now() > end) throw new Error(`writer not ready within ${limitMs} ms: ${this.#stderr}`);
      await sleep(20);
    }
  }

  /** list mode: resolves once every listed write (and the flush, if asked) was acknowledged */
  async listed(limitMs = 30_000): Promise<AckLog> {
    for (const end = Date.now() + limitMs; ; ) {
      const log = this.acks();
      if (log.errors.length) throw new Error(`writer got errors: ${log.errors.join('; ')}`);
      if (log.listed) return log;
      if (this.child.exitCode !== null || this.child.signalCode !== null) throw new Error(`writer exited: ${this.#stderr}`);
      if (Date.now() > end) throw new Error(`writer did not complete its list within ${limitMs} ms; stderr: ${this.#stderr}`);
      await sleep(20);
    }
  }

  acks(): AckLog {
    return readAckLog(this.log);
  }

  /** poll the ack log until it holds at least `n` writes (fails if the writer exits or errs) */
  async waitWrites(n: number, limitMs = 30_000): Promise<AckLog> {
    for (const end = Date.now() + limitMs; ; ) {
      const log = this.acks();
      if (log.errors.length) throw new Error(`writer got errors: ${log.errors.join('; ')}`);
      if (log.writes.length >= n) return log;
      if (this.child.exitCode !== null || this.child.signalCode !== null) throw new Error(`writer exited: ${this.#stderr}`);
      if (Date.now() > end) throw new Error(`writer acknowledged ${log.writes.length} of ${n} writes within ${limitMs} ms; stderr: ${this.#stderr}`);
      await sleep(20);
    }
  }

  /** SIGTERM: the child finishes its writes in flight, flushes and exits; its exit code is asserted 0 */
  async stop(): Promise<AckLog> {
    await this.ready();
    this.child.kill('SIGTERM');
    const { code, signal } = await this.#exited;
    if (code !== 0) throw new Error(`writer exited with ${code ?? signal}; stderr: ${this.#stderr}; stdout: ${this.#stdout}`);
    return this.acks();
  }

  async kill(): Promise<AckLog> {
    this.child.kill('SIGKILL');
    await this.#exited;
    return this.acks();
  }
}
