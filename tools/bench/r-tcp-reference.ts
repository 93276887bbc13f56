/**
 * The plain-Node references of R1-tcp and R2: what a user-space replicator over TCP must do
 * at least, with no replication engine. Primitives as R1's reference (positional fs.write /
 * fs.writev with callbacks, no promise per request) plus one net.Socket.
 *
 * Wire format (little-endian): a request is a 32-byte header and its payload,
 *
 *    0 u8 op (1 write, 2 flush)   1 u8 flags (1: crc valid)   2 u16 0   4 u32 payload bytes
 *    8 f64 id                    16 f64 byte position         24 u32 CRC32C of the payload  28 u32 0
 *
 * and the answer to each is 16 bytes: f64 id, u32 status (0 ok, 1 failed), u32 0. Requests
 * are pipelined on the one connection; answers come in completion order.
 *
 * Receiver (`startRefReceiver`, in the receiving process): cuts frames out of what arrives
 * (the payload a slice of the socket's chunk when it fits in one, else copied once), checks
 * the CRC when asked to, writes each payload with one fs.write at its position (callback),
 * and answers once written. A flush: fdatasync of the file, then a 512-byte pwrite of the
 * highest id seen into a position file and fdatasync of that: the same two fdatasyncs the
 * engine's receiver makes per FLUSH (the device, then its stream position file).
 *
 * Sender (`TcpReplica`, in the sending worker; `factory(steps)`):
 *   R1: append the payload behind a 512-byte header to a log file used as a ring (one
 *       writev), then in parallel write it to the local file and send it; the request
 *       completes when the local write is done and the receiver has answered.
 *   R2: in parallel the local write and the send; completes when both are done (a second
 *       R2 reference does the log append first, as R1's).
 *   Checkpoints (`checkpoints: true`, r-ref-checkpoints.ts): the engine's on files of this
 *       machine: a flush sent to the receiver (answered after its two fdatasyncs), then a
 *       4 KiB checkpoint record written `O_DSYNC` into the log's header area; every 200 ms
 *       when something was appended, and at once at half a ring; appends wait for ring space
 *       that a finished checkpoint covers.
 */
import fs from 'node:fs';
import net from 'node:net';
import { crc32c } from '@node-rs/crc32';
import type { Done, IoFactory } from './workload.ts';
import { takeBytes } from '../../src/core/chunks.ts';
import { RefCheckpoints } from './r-ref-checkpoints.ts';

const HDR = 32;
const ACK = 16;
const OP_WRITE = 1;
const OP_FLUSH = 2;
const FLAG_CRC = 1;
/** the ring starts after a 12 KiB header area (header and two checkpoint slots, as the engine's log) */
const LOG_DATA = 12 << 10;

type FsCb = (err: NodeJS.ErrnoException | null, n?: number) => void;

/** count fdatasync calls (the engine's FileDev and position files call fs.fdatasync at run time) */
export function countFdatasyncs(): { count(): number } {
  let n = 0;
  const cb = fs.fdatasync;
  const sync = fs.fdatasyncSync;
  (fs as { fdatasync: typeof fs.fdatasync }).fdatasync = ((fd: number, done: fs.NoParamCallback) => {
    n++;
    return cb(fd, done);
  }) as typeof fs.fdatasync;
  (fs as { fdatasyncSync: typeof fs.fdatasyncSync }).fdatasyncSync = (fd: number) => {
    n++;
    return sync(fd);
  };
  return { count: () => n };
}

/**
 * Experiment only (`--opt engineNoDelay=1`): every socket the engine makes or accepts in
 * this process gets TCP_NODELAY (src/replication does not set it), by wrapping net.connect
 * and net.createServer, which the engine calls at run time.
 */
export function patchNoDelay(): void {
  const connect = net.connect;
  (net as { connect: typeof net.connect }).connect = ((...args: Parameters<typeof net.connect>) => {
    const s = connect(...args);
    s.setNoDelay(true);
    return s;
  }) as typeof net.connect;
  const createServer = net.createServer;
  (net as { createServer: typeof net.createServer }).createServer = ((...args: unknown[]) => {
    const listener = args.find((a) => typeof a === 'function') as ((s: net.Socket) => void) | undefined;
    const opts = args.find((a) => typeof a === 'object') as net.ServerOpts | undefined;
    return createServer(opts ?? {}, (sock) => {
      sock.setNoDelay(true);
      listener?.(sock);
    });
  }) as typeof net.createServer;
}

// ---- receiver ----

export interface RefReceiverSpec {
  file: string;
  posFile: string;
  crc: boolean;
  noDelay: boolean;
}

export interface RefReceiver {
  port: number;
  /** flush requests answered since start */
  readonly flushes: number;
}

export function startRefReceiver(spec: RefReceiverSpec): Promise<RefReceiver> {
  const fd = fs.openSync(spec.file, 'r+');
  const posFd = fs.openSync(spec.posFile, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
  const posBuf = Buffer.alloc(512);
  const state = { flushes: 0, port: 0 };
  const server = net.createServer((sock) => {
    if (spec.noDelay) sock.setNoDelay(true);
    sock.on('error', () => sock.destroy());
    let chunks: Buffer[] = [];
    let have = 0;
    let hdr: Buffer | null = null;
    let maxId = 0;
    const answer = (id: number, status: number): void => {
      const a = Buffer.allocUnsafe(ACK);
      a.writeDoubleLE(id, 0);
      a.writeUInt32LE(status, 8);
      a.writeUInt32LE(0, 12);
      sock.write(a);
    };
    const take = (n: number): Buffer => {
      have -= n;
      return takeBytes(chunks, n);
    };
    const request = (h: Buffer, payload: Buffer): void => {
      const op = h.readUInt8(0);
      const id = h.readDoubleLE(8);
      if (op === OP_WRITE) {
        if (id > maxId) maxId = id;
        if ((h.readUInt8(1) & FLAG_CRC) !== 0 && (crc32c(payload) >>> 0) !== h.readUInt32LE(24)) return answer(id, 1);
        fs.write(fd, payload, 0, payload.length, h.readDoubleLE(16), (err, n) => answer(id, err || n !== payload.length ? 1 : 0));
        return;
      }
      // flush: the file, then the position record
      fs.fdatasync(fd, (err) => {
        if (err) return answer(id, 1);
        posBuf.writeDoubleLE(maxId, 0);
        fs.write(posFd, posBuf, 0, 512, 0, (e2) => {
          if (e2) return answer(id, 1);
          fs.fdatasync(posFd, (e3) => {
            state.flushes++;
            answer(id, e3 ? 1 : 0);
          });
        });
      });
    };
    sock.on('data', (chunk: Buffer) => {
      chunks.push(chunk);
      have += chunk.length;
      for (;;) {
        if (!hdr) {
          if (have < HDR) return;
          hdr = take(HDR);
        }
        const len = hdr.readUInt32LE(4);
        if (have < len) return;
        const payload = len === 0 ? Buffer.alloc(0) : take(len);
        const h = hdr;
        hdr = null;
        request(h, payload);
      }
    });
    sock.on('close', () => {
      chunks = [];
      have = 0;
    });
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      state.port = (server.address() as net.AddressInfo).port;
      resolve({
        get port() { return state.port; },
        get flushes() { return state.flushes; },
      });
    });
  });
}

// ---- sender ----

export interface TcpReplicaSpec {
  port: number;
  /** log file (ring after a 12 KiB header area) and its size in bytes; '' for none */
  log: string;
  logBytes: number;
  local: string;
  crc: boolean;
  noDelay: boolean;
  /** engine-like checkpoints (see the file's comment) */
  checkpoints: boolean;
}

interface Pending {
  resolve: (status: number) => void;
}

export class TcpReplica {
  readonly #spec: TcpReplicaSpec;
  readonly #sock: net.Socket;
  readonly #logFd: number;
  readonly #localFd: number;
  readonly #ring: number;
  #logPos = 0;
  #nextId = 1;
  #seq = 0;
  readonly #pending = new Map<number, (status: number) => void>();
  #rxChunks: Buffer[] = [];
  #rxHave = 0;
  /** engine-like checkpoints (null: none) */
  readonly #cps: RefCheckpoints | null;

  private constructor(spec: TcpReplicaSpec, sock: net.Socket) {
    this.#spec = spec;
    this.#sock = sock;
    this.#logFd = spec.log ? fs.openSync(spec.log, 'r+') : -1;
    this.#localFd = fs.openSync(spec.local, 'r+');
    this.#ring = spec.logBytes - LOG_DATA;
    this.#cps = spec.checkpoints && spec.log
      ? new RefCheckpoints({ ringBytes: this.#ring, log: spec.log, slotsAt: 4096, flushRemote: () => this.#flushRemote() })
      : null;
    sock.on('data', (c: Buffer) => this.#answers(c));
  }

  static connect(spec: TcpReplicaSpec): Promise<TcpReplica> {
    return new Promise((resolve, reject) => {
      const sock = net.connect({ host: '127.0.0.1', port: spec.port });
      sock.once('error', reject);
      sock.once('connect', () => {
        sock.off('error', reject);
        sock.on('error', () => {});
        if (spec.noDelay) sock.setNoDelay(true);
        resolve(new TcpReplica(spec, sock));
      });
    });
  }

  get files(): string[] {
    return this.#spec.log ? [this.#spec.log, this.#spec.local] : [this.#spec.local];
  }

  #answers(c: Buffer): void {
    this.#rxChunks.push(c);
    this.#rxHave += c.length;
    while (this.#rxHave >= ACK) {
      let a = this.#rxChunks[0]!;
      if (a.length < ACK) {
        a = Buffer.concat(this.#rxChunks);
        this.#rxChunks = [a];
      }
      const id = a.readDoubleLE(0);
      const status = a.readUInt32LE(8);
      if (a.length === ACK) this.#rxChunks.shift();
      else this.#rxChunks[0] = a.subarray(ACK);
      this.#rxHave -= ACK;
      const p = this.#pending.get(id);
      if (p) {
        this.#pending.delete(id);
        p(status);
      }
    }
  }

  /** send one request (header + payload in one corked write); `answered` gets its status */
  #send(op: number, payload: Buffer | null, pos: number, hdr: Buffer, answered: (status: number) => void): void {
    const id = this.#nextId++;
    hdr.writeUInt8(op, 0);
    hdr.writeUInt8(this.#spec.crc && payload ? FLAG_CRC : 0, 1);
    hdr.writeUInt16LE(0, 2);
    hdr.writeUInt32LE(payload ? payload.length : 0, 4);
    hdr.writeDoubleLE(id, 8);
    hdr.writeDoubleLE(pos, 16);
    hdr.writeUInt32LE(this.#spec.crc && payload ? crc32c(payload) >>> 0 : 0, 24);
    hdr.writeUInt32LE(0, 28);
    this.#pending.set(id, answered);
    const s = this.#sock;
    if (payload) {
      s.cork();
      s.write(hdr);
      s.write(payload);
      s.uncork();
    } else {
      s.write(hdr);
    }
  }

  /** the next log position for `need` bytes (wrapping), and checkpoint bookkeeping */
  #logAt(need: number): number {
    if (this.#logPos + need > this.#ring) this.#logPos = 0;
    const at = LOG_DATA + this.#logPos;
    this.#logPos += need;
    this.#cps?.appended(need, this.#seq + 1);
    return at;
  }

  #fillLogHeader(hdr: Buffer, buf: Buffer, pos: number): void {
    hdr.writeUInt32LE(0x454b4d44, 0);
    hdr.writeDoubleLE(++this.#seq, 8);
    hdr.writeDoubleLE(pos, 16);
    hdr.writeUInt32LE(buf.length, 24);
    if (this.#spec.crc) hdr.writeUInt32LE(crc32c(buf), 28);
  }

  /**
   * One request's steps: the log append first (when `log`), then the local write and the
   * send in parallel (each when asked), or one after the other (`serial`: BENCH.md's R2
   * reference read literally, "local write + one loopback round trip + remote write"); done
   * when all are. R1's reference is all three, R2's `local` + `send`; the others are
   * R1-tcp/R2's diagnostics (`send` alone: the round trip with the remote write; `log` +
   * `local`: what a writer pays without the network).
   */
  factory(steps: { log: boolean; local: boolean; send: boolean; serial?: boolean }): IoFactory {
    if (steps.log && this.#logFd < 0) throw new Error('this replica has no log');
    return (buf) => {
      const logHdr = Buffer.alloc(512);
      const iov = [logHdr, buf];
      const need = 512 + buf.length;
      const netHdr = Buffer.alloc(HDR);
      let done: Done = () => {};
      let left = 0;
      let failure: unknown;
      let pos = 0;
      const part = (err: unknown): void => {
        if (err) failure ??= err;
        if (--left === 0) done(failure);
      };
      const local: FsCb = (err, n) => part(err ?? (n !== buf.length ? new Error(`short local write: ${n}`) : undefined));
      const remote = (status: number): void => part(status === 0 ? undefined : new Error('remote write failed'));
      const afterLocal: FsCb = (err, n) => {
        if (err || n !== buf.length) return done(err ?? new Error(`short local write: ${n}`));
        this.#send(OP_WRITE, buf, pos, netHdr, remote);
      };
      const fanOut = (): void => {
        if (steps.serial && steps.local && steps.send) {
          left = 1;
          return void fs.write(this.#localFd, buf, 0, buf.length, pos, afterLocal);
        }
        left = (steps.local ? 1 : 0) + (steps.send ? 1 : 0);
        if (left === 0) return done();
        if (steps.local) fs.write(this.#localFd, buf, 0, buf.length, pos, local);
        if (steps.send) this.#send(OP_WRITE, buf, pos, netHdr, remote);
      };
      const logged: FsCb = (err, n) => (err || n !== need ? done(err ?? new Error(`short log write: ${n} of ${need}`)) : fanOut());
      const append = (): void => {
        const at = this.#logAt(need);
        this.#fillLogHeader(logHdr, buf, pos);
        fs.writev(this.#logFd, iov, at, logged);
      };
      const cps = steps.log ? this.#cps : null;
      return (p, d) => {
        done = cps ? (err) => {
          cps.done(need);
          d(err);
        } : d;
        failure = undefined;
        pos = p;
        if (!steps.log) return fanOut();
        if (cps) cps.reserve(need, append);
        else append();
      };
    };
  }

  #flushRemote(): Promise<void> {
    return new Promise((res, rej) => this.#send(OP_FLUSH, null, 0, Buffer.alloc(HDR), (s) => (s === 0 ? res() : rej(new Error('remote flush failed')))));
  }

  /** checkpoints run since start */
  get checkpoints(): number {
    return this.#cps?.count ?? 0;
  }

  startRun(): void {
    this.#cps?.start();
  }

  /** stop the checkpoint timer and wait for a checkpoint running */
  async stopRun(): Promise<void> {
    await this.#cps?.stop();
  }
}
