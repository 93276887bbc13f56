/**
 * The sending end of one `tcp` slink: one connection to the receiving daemon carrying the
 * IO of every device of the group that the slink reaches.
 *
 * - Requests are pipelined; each keeps its frame parts until acknowledged, so a RESEND (the
 *   receiver found a payload CRC wrong) or a reconnect re-sends exactly what is unanswered.
 * - A broken connection (reset, a corrupted header, no answer for `ioTimeoutMs`) is re-made
 *   with backoff for up to `reconnectMs`; the devices are opened again and unanswered
 *   requests re-sent (the receiver skips what it applied already). Past that budget every
 *   request fails with ECONNRESET, the link is `down`, and the replicator retests it.
 * - A write tagged with the CRC its log entry was sealed with goes, to a receiver with the
 *   feature 'entry-crc', as a seeded IO frame: its payload CRC is derived from the log's,
 *   the data is not read again here, and the site checks the bytes against what was logged.
 * - A request the receiver asks for again more than MAX_RESENDS times (its payload keeps
 *   failing its CRC: with the log's CRC, data damaged here since it was logged) fails with
 *   EIO, and with it every log entry not yet answered; the connection is re-made. A RESTART
 *   asked for again more than MAX_RESENDS times is given up the same way (#giveUp).
 * - A refused authentication is not retried by itself: the link is `auth-failed` until
 *   a retest of the replicator gets in (it stays `auth-failed` while a retest tries). A
 *   failed TLS handshake counts as refused only once a second one, made at once, fails too:
 *   one damaged on the way fails with the same alerts as different secrets (#handshake).
 */
import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Bio } from '../core/bio.ts';
import { BlockError, DmError, toBlockError, type ErrnoCode } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import type { PayloadCrc } from '../replog/types.ts';
import { compress } from './compress.ts';
import type { Frame, FrameCounters, FrameSocket } from './frame-socket.ts';
import { TlsHandshakeError, clientHandshake, type Authenticated, type Secret } from './handshake.ts';
import type { CertTls } from './tls-certs.ts';
import type { Announcement, SitePosition, SlinkRoles } from '../slink/types.ts';
import type { Needs } from './roles.ts';
import {
  Codec, DIGEST_SIZE, ENTRY_CRC, FrameType, IO_FUA, IO_NOUNMAP, IoOp, MAX_DATA, MAX_DIGEST_SECTORS, MAX_PAYLOAD, decodeJson, encodeDigest, encodeIo,
  ProtocolError, encodeJson, encodeRestart, str, uint,
  type FrameHeader,
} from './protocol.ts';

export type PeerState = 'connecting' | 'connected' | 'down' | 'auth-failed';

export interface PeerOptions {
  readonly host: string;
  readonly port: number;
  readonly secret: Secret;
  readonly tls: boolean;
  /** TLS with certificates instead of the PSK (tls-ca=, tls-cert=, tls-key=) */
  readonly certs?: CertTls;
  readonly crc: boolean;
  readonly codec: Codec;
  /** no answer to an outstanding request or ping for this long: the connection is dead */
  readonly ioTimeoutMs: number;
  /** how long to keep re-making a lost connection before requests fail */
  readonly reconnectMs: number;
  /** the sender's stream: its log's uuid and the slink number */
  readonly groupId: string;
  readonly slink: number;
  /** for messages and the receiver's log */
  readonly name: string;
  readonly log: Logger;
  /** the link's state changed */
  readonly changed: () => void;
  /** the group's roles: generation ids in OPEN, the site's verdict back (absent: none sent) */
  readonly roles?: SlinkRoles;
  /**
   * the group's judgement of the position the site gives at connect (SlinkContext.judge):
   * null, or where to set it back (REWIND) because the site holds entries our log lost
   */
  readonly judge?: (site: SitePosition) => Promise<{ seq: number; epoch: number } | null>;
}

interface Req {
  readonly id: number;
  /** the attachment (addDevice's key) it is for */
  readonly dev: number;
  readonly io: { op: IoOp; flags: number; seq: number; epoch: number; sector: number; sectors: number };
  /** what goes after the sub-header (compressed or not), and its codec */
  data: Buffer;
  codec: Codec;
  readonly rawBytes: number;
  /** reads: where the data goes (digests: where the digests go) */
  readonly into: Buffer | null;
  /** a DIGEST request (of `io.sector`, `io.sectors`) in blocks of this many sectors; 0: an IO */
  readonly blockSectors?: number;
  readonly resolve: () => void;
  readonly reject: (err: Error) => void;
  sentAt: number;
  /** its payload is ready to go (compression done) */
  ready: boolean;
  /** a write of a log entry's whole payload: the CRC the log sealed it with (sent seeded while uncompressed) */
  payloadCrc?: PayloadCrc;
  /** times the receiver asked for it again */
  resends: number;
  /** its last frame went seeded */
  seeded: boolean;
}

/** the RESTART of a shipping generation (Peer.restart) */
interface RestartFrame {
  readonly seq: number;
  readonly generation: number;
  readonly id: number;
  /** sent on this connection */
  sent: boolean;
  /** no log entry sent after it was answered with an error (#restartStale) */
  valid: boolean;
  /** times the receiver asked for it again */
  resends: number;
}

interface Dev {
  readonly devNr: number;
  readonly name: string;
  readonly sectors: number;
  handle: number;
}

export interface PeerStats {
  /** write payload bytes before compression, and as sent (compressed or not) */
  rawBytes: number;
  wireBytes: number;
  /** every frame sent and received after the handshakes, over all connections: headers, writes, DIGEST requests and answers, replies */
  frames: FrameCounters;
  /** frames the receiver asked for again (their payload CRC failed there) */
  resends: number;
  /** replies that failed their CRC or broke the framing here, and handshakes that did (the connection is re-made), or whose TLS failed and the next got in (#handshake) */
  badReplies: number;
  /** connections made after the first */
  reconnects: number;
  /** connections the receiver closed with an ERROR (a frame it could not frame or accept) */
  peerErrors: number;
  appliedAtConnect: number;
  /** positions set back at the site (REWIND): it held entries our log lost */
  rewinds: number;
  /** DIGEST requests the receiver answered */
  digests: number;
}

/**
 * the times a request is sent again for RESENDs; one more RESEND fails it (a payload that
 * fails its CRC every time: the log's CRC no longer matching the data, or a link that damages
 * the same frame again and again)
 */
export const MAX_RESENDS = 3;

const OPS: Record<Bio['op'], IoOp> = { write: IoOp.WRITE, discard: IoOp.DISCARD, 'write-zeroes': IoOp.WRITE_ZEROES, flush: IoOp.FLUSH, read: IoOp.READ };

export class Peer {
  readonly opts: PeerOptions;
  state: PeerState = 'down';
  /**
   * why the last connection attempt failed or the connection was lost, naming the slink and
   * the site once (`repl slink 1: 10.0.0.2:7788: …`); '' once connected, and when the group's
   * role changes (#setLastError)
   */
  lastError = '';
  /** the site refused the stream for its role (peer-primary, split-brain, unrelated); null when it took it */
  refusal: string | null = null;
  /** what the group last told the site (re-sent after every connect) */
  #announced: Announcement | null = null;
  /**
   * writes (write, discard, write-zeroes) submitted, settled (answered or failed), and settled
   * before a FLUSH the receiver acknowledged: a FLUSH with nothing written since is answered
   * here (#vacuousFlush)
   */
  readonly #writes = { submitted: 0, settled: 0, durable: 0 };
  readonly #settled = (): void => void this.#writes.settled++;
  readonly stats: PeerStats = { rawBytes: 0, wireBytes: 0, frames: { sent: 0, received: 0 }, resends: 0, badReplies: 0, reconnects: 0, peerErrors: 0, appliedAtConnect: 0, rewinds: 0, digests: 0 };
  #connects = 0;
  readonly #devs = new Map<number, Dev>();
  readonly #reqs = new Map<number, Req>();
  #frames: FrameSocket | null = null;
  /** the optional features of the connection (handshake.ts): 'digest' */
  #features: readonly string[] = [];
  #nextId = 1;
  #nextKey = 1;
  #connecting: Promise<void> | null = null;
  #opens = new Map<number, { resolve: (f: Frame) => void; reject: (e: Error) => void }>();
  #lastHeard = 0;
  #timer: NodeJS.Timeout | null = null;
  #closed = false;
  #reconnecting = false;
  /** when the last connection attempt failed (0: none yet) */
  #failedAt = 0;
  /** log entries (seq > 0) not yet sent, in log order (#pump) */
  #unsent: Req[] = [];
  /** a connection is opening its devices again: log entries wait for all of them */
  #reopening = false;
  /** the site's position was judged on this connection (its first OPEN_OK) */
  #judged = false;
  /**
   * The RESTART of the shipper's current generation (feature 'pipeline'): sent before the
   * next log entry, and again first on a new connection as long as no log entry sent after
   * it was answered with an error (`valid`: after one, telling the receiver again would let
   * later epochs pass the failed entry).
   */
  #restart: RestartFrame | null = null;

  constructor(opts: PeerOptions) {
    this.opts = opts;
  }

  get address(): string {
    return `${this.opts.host}:${this.opts.port}`;
  }

  /**
   * A device of the group reaches this site as the receiver's device `name`: opened now if
   * the site answers. Returns the attachment's key for submit and removeDevice; `opened`
   * rejects with the receiver's refusal (ENOENT, ENOSPC, EBUSY …) or why it could not be
   * reached. The device stays added either way (removeDevice undoes it). A device may be
   * attached twice at once (a table reload attaches before the old table detaches).
   */
  addDevice(devNr: number, name: string, sectors: number): { key: number; opened: Promise<void> } {
    const key = this.#nextKey++;
    this.#devs.set(key, { devNr, name, sectors, handle: 0 });
    // a site that just failed to answer is not tried again for every device a table restore
    // attaches (each would wait up to io-timeout): they attach down, the retest reconnects
    const recent = this.state !== 'connected' && Date.now() - this.#failedAt < this.opts.ioTimeoutMs;
    const opened = this.state === 'connected' ? this.#openDevice(key)
      : recent ? Promise.reject(this.#linkError('ECONNRESET'))
      : this.connect();
    return { key, opened };
  }

  /** forget attachment `key`; `release`: tell the receiver (CLOSE), which makes its device writable again */
  async removeDevice(key: number, release = true): Promise<void> {
    const d = this.#devs.get(key);
    this.#devs.delete(key);
    // its requests not yet answered fail now: nobody will send them any more
    for (const r of [...this.#reqs.values()]) {
      if (r.dev !== key) continue;
      this.#reqs.delete(r.id);
      if (r.io.seq > 0) this.#restartStale();
      r.reject(new BlockError('ESHUTDOWN', `${this.opts.name}: device detached from the slink`));
    }
    if (!release || !d || this.state !== 'connected' || d.handle === 0) return;
    await this.#control(FrameType.CLOSE, { handle: d.handle }).catch(() => undefined);
  }

  /**
   * connect (or wait for the attempt running); rejects with why it failed. A failed attempt
   * outside the reconnect loop fails every request waiting for it (submitted while it ran):
   * nobody would send them.
   */
  connect(): Promise<void> {
    if (this.state === 'connected') return Promise.resolve();
    return this.#attempt().catch((err: DmError) => {
      if (!this.#reconnecting && this.state !== 'connected') {
        const code: ErrnoCode = err.code === 'EACCES' ? 'EACCES' : 'ECONNRESET';
        this.#setState(code === 'EACCES' ? 'auth-failed' : 'down');
        if (this.#reqs.size > 0) this.#failAll(this.#linkError(code));
      }
      throw toBlockError(err);
    });
  }

  /** the error of a request that cannot go: the link's last error (it names the slink and the site) */
  #linkError(code: ErrnoCode): BlockError {
    return new BlockError(code, this.lastError || `${this.opts.name}: ${this.address}: not connected`);
  }

  /** `why`, naming the slink and the site once */
  #setLastError(why: string): void {
    this.lastError = why.startsWith(`${this.opts.name}: `) ? why : `${this.opts.name}: ${this.address}: ${why}`;
  }

  /** one connection attempt (or the one running) */
  #attempt(): Promise<void> {
    this.#connecting ??= this.#connectOnce().finally(() => (this.#connecting = null));
    return this.#connecting;
  }

  /**
   * Connected to a receiver that orders pipelined epochs and takes RESTART (feature
   * 'pipeline'): the shipper need not drain an epoch before it sends the next.
   */
  get pipelined(): boolean {
    return this.state === 'connected' && this.#features.includes('pipeline');
  }

  /**
   * The shipper's generation `generation` starts with entry `seq`, every entry it sent
   * before being answered (RemoteDevice.restart): RESTART goes before the next log entry,
   * once per generation (the devices of the slink share the stream).
   */
  restart(seq: number, generation: number): void {
    if (this.#restart?.generation === generation) return;
    if ([...this.#reqs.values()].some((r) => r.io.seq > 0)) {
      // not the shipper's contract: a RESTART now could let a later epoch pass an entry still unanswered
      this.opts.log.warn(`${this.opts.name}: shipping restarts at entry ${seq} with log entries unanswered; no RESTART sent`);
      this.#restart = null;
      return;
    }
    this.#restart = { seq, generation, id: this.#nextId++, sent: false, valid: true, resends: 0 };
    this.#pump();
  }

  /**
   * One IO for attachment `key` (sectors relative to its device); see RemoteDevice.submit.
   * `payloadCrc`: a write's data is a log entry's payload, crc32c(data, seed) = crc
   * (ShipTag.payloadCrc); the frame carries that CRC instead of one computed here.
   */
  submit(key: number, bio: Bio, seq: number, epoch: number, payloadCrc?: PayloadCrc): Promise<void> {
    const refused = this.#refusal(key);
    if (refused) return refused.code !== 'ESHUTDOWN' && bio.op === 'flush' && seq === 0 && this.#vacuousFlush() ? Promise.resolve() : Promise.reject(refused);
    const max = MAX_DATA / 512;
    if ((bio.op === 'write' || bio.op === 'read') && bio.sectors > max) {
      const parts: Promise<void>[] = [];
      for (let s = 0; s < bio.sectors; s += max) {
        const n = Math.min(max, bio.sectors - s);
        parts.push(this.submit(key, { ...bio, sector: bio.sector + s, sectors: n, data: bio.data.subarray(s * 512, (s + n) * 512) }, seq, epoch));
      }
      return Promise.all(parts).then(() => undefined); // the parts are not the entry's payload: no payloadCrc
    }
    let flags = bio.flags.fua ? IO_FUA : 0;
    if (bio.flags.noUnmap) flags |= IO_NOUNMAP;
    const isWrite = bio.op === 'write';
    return this.#countWrites(bio.op, new Promise<void>((resolve, reject) => {
      const req: Req = {
        id: this.#nextId++, dev: key, io: { op: OPS[bio.op], flags, seq, epoch, sector: bio.sector, sectors: bio.sectors },
        data: isWrite ? bio.data : EMPTY_BUF, codec: Codec.NONE, rawBytes: isWrite ? bio.data.length : 0,
        into: bio.op === 'read' ? bio.data : null, resolve, reject, sentAt: 0, ready: true,
        payloadCrc: isWrite ? payloadCrc : undefined, resends: 0, seeded: false,
      };
      this.#reqs.set(req.id, req);
      const go = seq > 0 ? () => this.#pump() : () => this.#send(req);
      if (seq > 0) this.#unsent.push(req);
      if (isWrite && this.opts.codec !== Codec.NONE) {
        req.ready = false;
        void compress(this.opts.codec, bio.data).then((c) => {
          if (c) {
            req.data = c;
            req.codec = this.opts.codec;
          }
          req.ready = true;
          go();
        }, () => {
          req.ready = true;
          go();
        });
      } else {
        go();
      }
    }));
  }

  /**
   * Nothing written since the receiver acknowledged a FLUSH (every write submitted was
   * answered before one was sent): a FLUSH while the link is down has nothing to make
   * durable, and succeeds without it — a dirty log recording regions in sync (a promotion
   * starting the bitmaps afresh) does not depend on a site that is not connected. A log
   * entry's flush always goes (it takes its place in the stream).
   */
  #vacuousFlush(): boolean {
    return this.#writes.durable === this.#writes.submitted;
  }

  /** `p`, one IO of op `op`, counted in #writes (a FLUSH marks what settled before it durable once answered) */
  #countWrites(op: Bio['op'], p: Promise<void>): Promise<void> {
    const w = this.#writes;
    if (op === 'flush') {
      const upTo = w.settled === w.submitted ? w.submitted : -1; // a write in flight: not covered
      if (upTo >= 0) void p.then(() => (w.durable = Math.max(w.durable, upTo)), () => undefined);
    } else if (op !== 'read') {
      w.submitted++;
      void p.then(this.#settled, this.#settled);
    }
    return p;
  }

  /**
   * The digests (16 bytes per block, the last block may be short) of `sectors` sectors from
   * `sector` of attachment `key`, in blocks of `blockSectors` (a power of two, 8 …
   * MAX_DIGEST_SECTORS), computed by the receiver. Rejects with ENOTSUP when the receiver
   * does not offer the 'digest' feature (the caller reads and hashes the blocks itself),
   * EINVAL when it refuses the request, or as `submit` does when the link fails. Re-sent
   * after a reconnect like any request.
   */
  digest(key: number, sector: number, sectors: number, blockSectors: number): Promise<Buffer> {
    if (this.state === 'connected' && !this.#features.includes('digest')) return Promise.reject(this.#noDigests());
    const parts: Promise<Buffer>[] = [];
    for (let s = 0; s < sectors; s += MAX_DIGEST_SECTORS) { // MAX_DIGEST_SECTORS is a multiple of any block size
      const n = Math.min(MAX_DIGEST_SECTORS, sectors - s);
      const into = Buffer.allocUnsafe(Math.ceil(n / blockSectors) * DIGEST_SIZE);
      parts.push(this.#request(key, { op: IoOp.READ, flags: 0, seq: 0, epoch: 0, sector: sector + s, sectors: n }, into, blockSectors).then(() => into));
    }
    return Promise.all(parts).then((p) => (p.length === 1 ? p[0]! : Buffer.concat(p)));
  }

  /** why a request for attachment `key` fails at once (closed, detached, link down), or null */
  #refusal(key: number): BlockError | null {
    if (this.#closed) return new BlockError('ESHUTDOWN', `${this.opts.name}: slink closed`);
    if (!this.#devs.has(key)) return new BlockError('ESHUTDOWN', `${this.opts.name}: device detached from the slink`);
    if (this.state === 'down' || this.state === 'auth-failed') {
      return this.#linkError(this.state === 'auth-failed' ? 'EACCES' : 'ECONNRESET');
    }
    return null;
  }

  #noDigests(): BlockError {
    return new BlockError('ENOTSUP', `${this.opts.name}: ${this.address}: the receiver does not offer digests`);
  }

  /** queue a DIGEST request (sent once connected and the device is open) */
  #request(key: number, io: Req['io'], into: Buffer, blockSectors: number): Promise<void> {
    const refused = this.#refusal(key);
    if (refused) return Promise.reject(refused);
    return new Promise<void>((resolve, reject) => {
      const req: Req = {
        id: this.#nextId++, dev: key, io, data: EMPTY_BUF, codec: Codec.NONE, rawBytes: 0, into, blockSectors, resolve, reject, sentAt: 0, ready: true,
        resends: 0, seeded: false,
      };
      this.#reqs.set(req.id, req);
      this.#send(req);
    });
  }

  /**
   * tell the site the group's generation and role (STATE); again after every connect. A
   * demoted group sends nothing: a refusal of its stream (it was primary) and the link's
   * last error are no longer the case.
   */
  announce(a: Announcement): void {
    this.#announced = a;
    if (a.role === 'secondary') {
      this.refusal = null;
      this.lastError = '';
    }
    if (this.state === 'connected' && this.#frames && this.#features.includes('roles')) this.#frames.send(FrameType.STATE, 0, [encodeJson(a)]);
  }

  /** close the connection; outstanding requests fail with ESHUTDOWN */
  async close(): Promise<void> {
    this.#closed = true;
    this.#stopTimer();
    this.#frames?.destroy();
    this.#frames = null;
    this.#failAll(new BlockError('ESHUTDOWN', `${this.opts.name}: slink closed`));
  }

  /**
   * Send the log entries waiting (#unsent) in log order: one whose compression is not done,
   * or whose device is not open, holds back every later one. The receiver applies
   * epochs in the order it reads them (pipelined epochs, stream.ts), so an entry must never
   * overtake an earlier one, through compression or a reconnect. (A RESEND goes out at once:
   * the receiver holds what follows the damaged frame until it has it again.)
   */
  #pump(): void {
    if (!this.#frames || this.state !== 'connected' || this.#reopening) return;
    const rs = this.#restart;
    // the stream exists at the receiver once a device is open (a RESTART before any OPEN breaks the protocol)
    if (rs && !rs.sent && rs.valid && [...this.#devs.values()].some((d) => d.handle > 0)) {
      rs.sent = true;
      if (this.#features.includes('pipeline')) this.#frames.send(FrameType.RESTART, rs.id, [encodeRestart(rs.seq)], !this.opts.crc);
    }
    const q = this.#unsent;
    let i = 0;
    for (; i < q.length; i++) {
      const r = q[i]!;
      if (!this.#reqs.has(r.id) || r.sentAt !== 0) continue; // answered, failed, or sent already
      if (!r.ready) break;
      const d = this.#devs.get(r.dev);
      // not open (yet): an entry must not overtake it (a device whose OPEN failed holds the
      // stream until the next connection, as the shipper's wait for it did before)
      if (d && d.handle === 0) break;
      this.#send(r);
    }
    if (i > 0) q.splice(0, i);
  }

  #send(req: Req): void {
    const f = this.#frames;
    const d = this.#devs.get(req.dev);
    if (!req.ready) return; // sent once compressed
    if (!d && this.#reqs.delete(req.id)) return req.reject(new BlockError('ESHUTDOWN', `${this.opts.name}: device detached from the slink`));
    if (!f || this.state !== 'connected' || !this.#reqs.has(req.id) || !d || d.handle === 0) return; // sent after (re)connecting
    if (req.blockSectors) {
      if (!this.#features.includes('digest') && this.#reqs.delete(req.id)) return req.reject(this.#noDigests());
      req.sentAt = Date.now();
      f.send(FrameType.DIGEST, req.id, [encodeDigest({ handle: d.handle, sector: req.io.sector, sectors: req.io.sectors, blockSectors: req.blockSectors })]);
      return;
    }
    // the log's CRC stands for the data only as logged: uncompressed, and with a CRC on the frame
    const pc = req.payloadCrc && req.codec === Codec.NONE && this.opts.crc && this.#features.includes(ENTRY_CRC) ? req.payloadCrc : undefined;
    req.seeded = pc !== undefined;
    const sub = encodeIo({ handle: d.handle, ...req.io, codec: req.codec, rawBytes: req.rawBytes, ...(pc ? { seed: pc.seed } : {}) });
    req.sentAt = Date.now();
    f.send(FrameType.IO, req.id, req.data.length ? [sub, req.data] : [sub], !this.opts.crc, pc?.crc);
    this.stats.rawBytes += req.rawBytes;
    this.stats.wireBytes += req.data.length;
  }

  async #connectOnce(): Promise<void> {
    const o = this.opts;
    const where = `${o.name}: ${this.address}`;
    // not a failure of the link (lastError stays): a secondary connects to nobody
    if (o.roles?.secondary()) throw new DmError('EAGAIN', `${where}: the group is secondary: it sends nothing until promoted`);
    // a link refused for its secret stays `auth-failed` while the retest tries again, and one
    // whose stream the site refused for its role stays `down` (neither flaps through
    // `connecting` every retest); it says `connected` once let in
    const refused = this.state === 'down' && this.refusal !== null;
    if (this.state !== 'auth-failed' && !refused) this.#setState('connecting');
    let sock: net.Socket | null = null;
    let answered = false; // the handshake succeeded: a failure after it is the receiver refusing a device
    try {
      const a = await this.#handshake(where);
      sock = a.sock;
      answered = true;
      a.frames.maxPayload = MAX_PAYLOAD;
      a.frames.counters = this.stats.frames;
      this.#frames = a.frames;
      this.#features = a.features;
      this.#lastHeard = Date.now();
      a.frames.handle({
        frame: (f) => this.#frame(f), corrupt: (h) => this.#corrupt(h),
        closed: (err) => {
          if ((err as DmError).code === 'EPROTO' && a.frames === this.#frames) this.stats.badReplies++; // a header that broke the framing
          this.#lost(err, a.frames);
        },
      });
      // opening devices needs the connection up; requests wait for their handle (a refused
      // link: sent once the devices are let in)
      if (!refused) this.#setState('connected');
      this.#reopening = true; // log entries wait until every device is open again, then go in log order
      // liveness from here on: a receiver that answers no OPEN (nor a PING) is dropped after
      // io-timeout like any silent one, failing the OPEN waited for (the attempt used to hang)
      this.#startTimer();
      this.#judged = false;
      for (const key of this.#devs.keys()) await this.#openDevice(key);
      this.#reopening = false;
      this.#setState('connected');
      if (this.#announced && a.features.includes('roles')) a.frames.send(FrameType.STATE, 0, [encodeJson(this.#announced)]);
      if (this.#connects++ > 0) this.stats.reconnects++;
      this.lastError = '';
      const unsent = [...this.#reqs.values()].filter((r) => r.sentAt === 0).sort((x, y) => x.id - y.id);
      this.#unsent = unsent.filter((r) => r.io.seq > 0);
      if (!this.#features.includes('pipeline') && new Set(this.#unsent.map((r) => r.io.epoch)).size > 1) {
        // sent pipelined to a receiver that now lacks the feature: it would not hold a later
        // epoch back after a failed entry; they fail here and the shipper starts over, draining
        const err = new BlockError('ECONNRESET', `${o.name}: ${this.address}: the receiver no longer takes pipelined epochs`);
        for (const r of this.#unsent) if (this.#reqs.delete(r.id)) r.reject(err);
        this.#unsent = [];
        this.#restartStale();
      }
      for (const req of unsent) if (req.io.seq === 0) this.#send(req);
      this.#pump();
    } catch (err) {
      this.#reopening = false;
      sock?.destroy();
      this.#frames?.destroy();
      this.#frames = null;
      this.#stopTimer();
      const e = err as DmError;
      if (!answered) this.#failedAt = Date.now();
      if (e.code === 'EPROTO') this.stats.badReplies++; // a handshake frame damaged one way or the other
      this.#setLastError(e.message);
      if (this.state === 'connected') this.#setState('connecting');
      this.opts.log.limited(`tcp-connect:${where}`, this.lastError);
      throw e;
    }
  }

  /**
   * A TCP connection to the site and the handshake on it; made again at once, once, when its
   * TLS handshake fails (EACCES): OpenSSL fails one damaged on the way (a flipped bit in a
   * random or a Finished) exactly as it fails two different secrets, so only a second
   * failure is taken as a refusal (its error is the attempt's). If the second gets in, the
   * first was damage: counted in badReplies and logged as such, not as a wrong secret. A
   * link already `auth-failed` (a retest) makes one handshake: its secrets are what they were.
   */
  async #handshake(where: string): Promise<Dialed> {
    let first: DmError;
    try {
      return await this.#dial(where);
    } catch (err) {
      first = err as DmError;
      // a TLS failure looks like another secret; a handshake frame that failed its CRC (EPROTO)
      // is damage too: either is tried again at once, once, before the link is said to fail
      const tlsFailed = err instanceof TlsHandshakeError && first.code === 'EACCES';
      if ((!tlsFailed && first.code !== 'EPROTO') || this.state === 'auth-failed' || this.#closed) throw err;
    }
    const second = await this.#dial(where);
    this.stats.badReplies++;
    const what = first instanceof TlsHandshakeError
      ? 'a TLS handshake failed and the next one, made at once, got in: the first was damaged on the way (not a different secret)'
      : `a handshake failed (${first.message.replace(`${where}: `, '')}) and the next one, made at once, got in: the first was damaged on the way`;
    this.opts.log.limited(`tcp-damaged:${where}`, `${where}: ${what}`);
    return second;
  }

  /** connect and handshake (handshake.ts); on failure the socket is destroyed */
  async #dial(where: string): Promise<Dialed> {
    const o = this.opts;
    const sock = net.connect({ host: o.host, port: o.port, noDelay: true }); // small frames wait for replies: no Nagle
    sock.on('error', () => {});
    try {
      await new Promise<void>((resolve, reject) => {
        const t = setTimeout(() => reject(new DmError('ETIMEDOUT', `${where}: connect timed out after ${o.ioTimeoutMs / 1000} s`)), o.ioTimeoutMs);
        sock.once('connect', () => { clearTimeout(t); resolve(); });
        sock.once('error', (e) => { clearTimeout(t); reject(new DmError((e as { code?: string }).code ?? 'ECONNREFUSED', `${where}: ${e.message}`)); });
      });
      return { ...(await clientHandshake(sock, { secret: o.secret, tls: o.tls, certs: o.certs, timeoutMs: o.ioTimeoutMs, name: o.name, where })), sock };
    } catch (err) {
      sock.destroy();
      throw err;
    }
  }

  async #openDevice(key: number): Promise<void> {
    const d = this.#devs.get(key);
    if (!d) return;
    d.handle = 0;
    const roles = this.opts.roles;
    let o: Record<string, unknown>;
    try {
      o = decodeJson((await this.#control(FrameType.OPEN, {
        stream: this.opts.groupId, slink: this.opts.slink, device: d.name, devNr: d.devNr, sectors: d.sectors,
        ...(roles ? { gens: roles.gens(this.opts.slink) } : {}),
      })).payload, 'OPEN_OK');
    } catch (err) {
      const verdict = (err as { verdict?: string }).verdict;
      if (verdict) {
        this.refusal = verdict;
        roles?.refused(this.opts.slink, verdict, (err as Error).message);
      }
      throw err;
    }
    if (this.#devs.get(key) !== d) return this.#pump();
    const handle = uint(o, 'handle', 'OPEN_OK');
    this.stats.appliedAtConnect = uint(o, 'applied', 'OPEN_OK');
    this.refusal = null;
    // the connection's first OPEN_OK (in the reconnect loop or not): judged before any log
    // entry goes on it (the handle is set only after: nothing is sent for the device
    // meanwhile) and before the group hears of the site (it may announce it consistent then)
    if (!this.#judged) {
      this.#judged = true;
      await this.#judgePosition(o);
      if (this.#devs.get(key) !== d) return this.#pump();
    }
    d.handle = handle;
    if (roles) roles.opened(this.opts.slink, d.devNr, resyncOf(o), needsOf(o));
    for (const req of this.#reqs.values()) if (req.dev === key && req.sentAt === 0 && req.io.seq === 0) this.#send(req);
    this.#pump();
  }

  /**
   * The first OPEN_OK of a connection, before any log entry goes out on it: the group judges
   * the site's position (applied, epoch); if the site holds entries our log lost, its
   * position is set back (REWIND) so that the entries numbered anew are applied, not skipped.
   */
  async #judgePosition(o: Record<string, unknown>): Promise<void> {
    const judge = this.opts.judge;
    if (!judge || !this.#features.includes('rewind') || o.epoch === undefined) return;
    const applied = uint(o, 'applied', 'OPEN_OK');
    const started = o.started === undefined ? applied : uint(o, 'started', 'OPEN_OK');
    const to = await judge({ applied, epoch: uint(o, 'epoch', 'OPEN_OK'), started });
    if (!to) return;
    const r = decodeJson((await this.#control(FrameType.REWIND, to)).payload, 'REWIND');
    if (uint(r, 'applied', 'REWIND') !== to.seq) throw new ProtocolError(`REWIND: the site answered position ${String(r.applied)}, not ${to.seq}`);
    this.stats.rewinds++;
    this.opts.log.warn(`${this.opts.name}: ${this.address}: the site began entries up to ${started} (applied ${applied}) that this log lost; its position is set back to ${to.seq}`);
  }

  #control(type: FrameType, body: unknown): Promise<Frame> {
    const f = this.#frames;
    if (!f) return Promise.reject(new BlockError('ECONNRESET', `${this.opts.name}: not connected`));
    const id = this.#nextId++;
    return new Promise<Frame>((resolve, reject) => {
      this.#opens.set(id, { resolve, reject });
      f.send(type, id, [encodeJson(body)]);
    });
  }

  #frame(f: Frame): void {
    this.#lastHeard = Date.now();
    const id = f.h.id;
    const ctl = this.#opens.get(id);
    if (ctl) {
      // a control frame the receiver could not read: start over on a new connection
      if (f.h.type === FrameType.RESEND) return this.#lost(new DmError('EPROTO', `control frame ${id} arrived damaged`));
      this.#opens.delete(id);
      if (f.h.type === FrameType.ERROR) ctl.reject(errorOf(f, `${this.opts.name}: ${this.address}`));
      else ctl.resolve(f);
      return;
    }
    if (f.h.type === FrameType.PONG) return;
    if (f.h.type === FrameType.ERROR && id === 0) {
      this.stats.peerErrors++;
      return this.#lost(errorOf(f, `${this.opts.name}: receiver ${this.address}`));
    }
    const rs = this.#restart;
    if (rs && id === rs.id && f.h.type === FrameType.RESEND) {
      // the receiver holds what follows it until it has it (nothing after it can have failed there)
      this.stats.resends++;
      if (++rs.resends > MAX_RESENDS) return this.#giveUp(rs);
      return void this.#frames?.send(FrameType.RESTART, rs.id, [encodeRestart(rs.seq)], !this.opts.crc);
    }
    const req = this.#reqs.get(id);
    if (!req) return; // answered before a reconnect, or never ours
    switch (f.h.type) {
      case FrameType.ACK:
        this.#reqs.delete(id);
        return req.resolve();
      case FrameType.DATA:
        if (!req.into || f.payload.length !== req.into.length) return this.#lost(new DmError('EPROTO', `DATA of ${f.payload.length} bytes for request ${id}`));
        f.payload.copy(req.into);
        if (req.blockSectors) this.stats.digests++;
        this.#reqs.delete(id);
        return req.resolve();
      case FrameType.RESEND:
        this.stats.resends++;
        if (++req.resends > MAX_RESENDS) return this.#giveUp(req);
        this.opts.log.limited(`tcp-resend:${this.address}`, `${this.opts.name}: ${this.address}: receiver asked for frame ${id} again (CRC mismatch)`);
        return this.#send(req);
      case FrameType.ERROR:
        this.#reqs.delete(id);
        if (req.io.seq > 0) this.#restartStale();
        return req.reject(toBlockError(errorOf(f, `${this.opts.name}: ${this.address}`)));
      default:
        return this.#lost(new DmError('EPROTO', `unexpected frame type ${f.h.type} from the receiver`));
    }
  }

  /**
   * The receiver asked for a request or the RESTART again more than MAX_RESENDS times: a
   * request fails (EIO); the RESTART is not sent again, on any connection (#restartStale).
   * A log entry or the RESTART takes every log entry not yet answered with it (sent after
   * it, they must not reach the site without it: the shipper ships them again after its
   * retest, from the oldest one the site still needs, behind its next generation's RESTART),
   * and the connection is re-made: the receiver holds every frame read after the one it
   * asked for, and drops them when the connection ends.
   */
  #giveUp(f: Req | RestartFrame): void {
    const where = `${this.opts.name}: ${this.address}`;
    const req = 'io' in f ? f : null;
    const what = !('io' in f) ? `RESTART at entry ${f.seq} (frame ${f.id})` : f.io.seq > 0 ? `log entry ${f.io.seq} (request ${f.id})` : `request ${f.id}`;
    const why = req?.seeded
      ? 'its data does not match the CRC the replication log sealed it with (damaged at the sender since it was logged?)'
      : 'its payload keeps failing its CRC on the way';
    const err = new BlockError('EIO', `${where}: ${what} failed its CRC at the receiver ${f.resends} times: ${why}; not sent again`);
    if (req) {
      this.#reqs.delete(req.id);
      req.reject(err);
    }
    if (!req || req.io.seq > 0) {
      this.#restartStale();
      const after = new BlockError('EIO', `${where}: not sent: ${what} failed before it (${why})`);
      for (const r of [...this.#reqs.values()]) {
        if (r.io.seq > 0 && this.#reqs.delete(r.id)) r.reject(after);
      }
    }
    this.opts.log.warn(err.message);
    this.#lost(new DmError('EIO', `${what} given up after ${f.resends} RESENDs`));
  }

  /** a reply whose payload failed its CRC: the connection cannot tell which data it was; start over */
  #corrupt(h: FrameHeader): void {
    this.stats.badReplies++;
    this.#lost(new DmError('EPROTO', `reply ${h.id} failed its CRC`));
  }

  /** the connection broke: re-make it within the budget, or fail what is outstanding */
  #lost(err: Error, frames: FrameSocket | null = this.#frames): void {
    if (frames !== this.#frames || this.#closed) return;
    this.#frames?.destroy();
    this.#frames = null;
    this.#stopTimer();
    for (const c of this.#opens.values()) c.reject(err);
    this.#opens.clear();
    for (const r of this.#reqs.values()) r.sentAt = 0;
    this.#unsent = []; // rebuilt in log order once connected again
    if (this.#restart) this.#restart.sent = false; // first again on the next connection, if still valid
    this.#setLastError(err.message);
    this.opts.log.limited(`tcp-lost:${this.address}`, `${this.opts.name}: ${this.address}: connection lost: ${err.message}`);
    this.#setState('connecting');
    void this.#reconnect();
  }

  async #reconnect(): Promise<void> {
    if (this.#reconnecting) return;
    this.#reconnecting = true;
    const deadline = Date.now() + this.opts.reconnectMs;
    let refused = false;
    try {
      for (let delay = 50; !this.#closed; delay = Math.min(delay * 2, 1000)) {
        try {
          await this.#attempt();
          return;
        } catch (err) {
          refused = (err as DmError).code === 'EACCES';
          // answered and refused (its secret, or our stream for its role): the retest tries again
          if (refused || (err as { verdict?: string }).verdict || Date.now() + delay > deadline) break;
          await sleep(delay);
        }
      }
    } finally {
      this.#reconnecting = false;
    }
    if (this.#closed) return;
    this.#setState(refused ? 'auth-failed' : 'down');
    this.#failAll(this.#linkError(refused ? 'EACCES' : 'ECONNRESET'));
  }

  /**
   * A log entry failed (answered with an error, or failed here): the current RESTART must
   * not go again on a new connection, where it would let later epochs pass that entry.
   */
  #restartStale(): void {
    if (this.#restart) this.#restart.valid = false;
  }

  #failAll(err: Error): void {
    this.#restartStale();
    const reqs = [...this.#reqs.values()];
    this.#reqs.clear();
    for (const r of reqs) r.reject(err);
  }

  /** liveness: ping when idle, drop a connection that answers nothing for ioTimeoutMs */
  #startTimer(): void {
    this.#stopTimer();
    // a quarter of io-timeout, and at most 30 s: the receiver closes a connection silent for 120 s
    const every = Math.max(100, Math.min(30_000, Math.floor(this.opts.ioTimeoutMs / 4)));
    this.#timer = setInterval(() => {
      const f = this.#frames;
      if (!f) return;
      const silent = Date.now() - this.#lastHeard;
      if (silent > this.opts.ioTimeoutMs) return this.#lost(new DmError('ETIMEDOUT', `no answer for ${Math.round(silent / 1000)} s`));
      if (silent >= every) f.send(FrameType.PING, 0);
    }, every);
    this.#timer.unref();
  }

  #stopTimer(): void {
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = null;
  }

  #setState(s: PeerState): void {
    if (this.state === s) return;
    this.state = s;
    this.opts.changed();
  }
}

const EMPTY_BUF = Buffer.alloc(0);

/** a handshake done, and the TCP socket under it */
type Dialed = Authenticated & { readonly sock: net.Socket };

/** OPEN_OK's `resync` (a receiver without roles sends none) */
function resyncOf(o: Record<string, unknown>): 'none' | 'partial' | 'full' {
  const r = o.resync;
  return r === 'partial' || r === 'full' ? r : 'none';
}

/** OPEN_OK's `needs`: { regionSectors, bits (base64) }, checked */
function needsOf(o: Record<string, unknown>): Needs | null {
  const n = o.needs as { regionSectors?: unknown; bits?: unknown } | undefined | null;
  if (!n) return null;
  if (!Number.isSafeInteger(n.regionSectors) || (n.regionSectors as number) < 1 || typeof n.bits !== 'string') {
    throw new ProtocolError('OPEN_OK: needs must be { regionSectors, bits }');
  }
  return { regionSectors: n.regionSectors as number, bits: Buffer.from(n.bits, 'base64') };
}

function errorOf(f: Frame, where: string): DmError {
  try {
    const o = decodeJson(f.payload, 'ERROR');
    const e = new DmError(str(o, 'code', 'ERROR', 32), `${where}: ${str(o, 'message', 'ERROR', 2048)}`);
    if (typeof o.verdict === 'string' && o.verdict.length <= 32) (e as DmError & { verdict?: string }).verdict = o.verdict;
    return e;
  } catch {
    return new DmError('EPROTO', `${where}: malformed ERROR frame`);
  }
}
