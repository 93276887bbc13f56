/**
 * One authenticated connection at the receiver (receiver.ts): OPEN and CLOSE of the
 * daemon's devices (each receiving device secondary, its role persisted), IO frames applied
 * in the stream's order (stream.ts) and acknowledged, RESEND for a damaged payload, PING.
 * Anything that breaks the protocol closes the connection with an ERROR saying why.
 */
import type { Bio, BioFlags } from '../core/bio.ts';
import { EMPTY } from '../core/bio.ts';
import { digestFilled } from '../core/digest.ts';
import { DmError } from '../core/errors.ts';
import type { MappedDevice } from '../core/mapped-device.ts';
import type { BlockDev } from '../core/types.ts';
import { decompress } from './compress.ts';
import type { Frame, FrameSocket } from './frame-socket.ts';
import {
  FLAG_SEEDED, FrameType, IO_FUA, IO_NOUNMAP, IoOp, ProtocolError, decodeDigest, decodeIo, decodeJson, decodeRestart, digestProblem, encodeError, encodeJson, ioHeaderSize, str, uint,
  type FrameHeader, type IoRequest,
} from './protocol.ts';
import type { ReplicationReceiver } from './receiver.ts';
import { receivingHolder } from './handshake.ts';
import { DEMOTED, ROLE, replicatedDevice, roleOf, type ReplicatedDevice } from './roles.ts';
import type { GenIds } from '../targets/replicator-role.ts';
import type { Stream } from './stream.ts';

/** DIGEST requests a connection may have waiting before it is told EAGAIN */
const MAX_DIGESTS_QUEUED = 256;
/**
 * DIGEST requests of a connection answered at once: two, so both digest threads work and
 * one range's read overlaps the other's hash (one at a time, a checksum resync over tcp
 * hashed on one thread at the site); a connection holds at most this many ranges for them
 */
export const DIGESTS_AT_ONCE = 2;

const FLUSH_BIO: Bio = { op: 'flush', sector: 0, sectors: 0, data: EMPTY, flags: {} };

interface Opened {
  readonly name: string;
  readonly dev: MappedDevice;
  readonly writer: BlockDev;
  /** who holds `dev` open, for its busy message (receivingHolder): closed with the same text */
  readonly holder: string;
}

/** a stream refused for the receiving group's role: EPERM, with the verdict for the sender */
class RoleRefusal extends DmError {
  readonly verdict: string;
  constructor(verdict: string, message: string) {
    super('EPERM', message);
    this.verdict = verdict;
  }
}

/** OPEN's `gens` (a sender without roles sends none: judged as an unknown generation) */
function gensOf(o: Record<string, unknown>): GenIds {
  const g = o.gens as { current?: unknown; peer?: unknown; history?: unknown; unplannedFrom?: unknown } | undefined;
  const id = (x: unknown): x is string => typeof x === 'string' && /^[0-9a-f]{16}$/.test(x);
  if (!g) return { current: '', peer: null, history: [] };
  const from = g.unplannedFrom;
  if (!id(g.current) || (g.peer !== null && !id(g.peer)) || !Array.isArray(g.history) || g.history.length > 64 || !g.history.every(id) || (from != null && !id(from))) {
    throw new ProtocolError('OPEN: gens must be { current, peer, history, unplannedFrom? } of 16-hex-digit ids');
  }
  return { current: g.current, peer: g.peer as string | null, history: g.history as string[], unplannedFrom: (from as string | null | undefined) ?? null };
}

/** One authenticated connection. */
export class Session {
  readonly peer: string;
  readonly #rx: ReplicationReceiver;
  readonly #frames: FrameSocket;
  readonly #maxInflight: number;
  /** the sender pipelines epochs and says when it starts over (feature 'pipeline': RESTART) */
  readonly #pipelined: boolean;
  /** the sender may set the stream's position back (feature 'rewind') */
  readonly #rewinds: boolean;
  #stream: Stream | null = null;
  /** the replicated groups whose devices this connection took (STATE applies to them) */
  readonly #groups = new Set<ReplicatedDevice>();
  readonly #handles = new Map<number, Opened>();
  #nextHandle = 1;
  #inflightBytes = 0;
  #paused = false;
  /** reading paused while more than maxInflight bytes of replies wait to be sent (a peer that does not read) */
  #outPaused = false;
  #closed = false;
  #heard = Date.now();
  #idleTimer: NodeJS.Timeout | null = null;
  /** DIGEST requests waiting for one of the DIGESTS_AT_ONCE places (#digest) */
  readonly #digestsWaiting: Array<() => Promise<void>> = [];
  #digestsRunning = 0;
  /**
   * IO and RESTART frames in the order read since one failed its CRC (#hold): the ones asked for again
   * (RESEND) keep their place, empty until they come back; emptied from the front.
   */
  #held: Array<{ id: number; f: Frame | null }> = [];
  /** ids of the held places still empty */
  readonly #resending = new Set<number>();
  #heldBytes = 0;

  constructor(rx: ReplicationReceiver, frames: FrameSocket, peer: string, maxInflight: number, idleMs: number, features: readonly string[]) {
    this.#rx = rx;
    this.#pipelined = features.includes('pipeline');
    this.#rewinds = features.includes('rewind');
    this.#frames = frames;
    this.peer = peer;
    this.#maxInflight = maxInflight;
    this.#idleTimer = setInterval(() => {
      if (Date.now() - this.#heard > idleMs) this.#fatal(new DmError('ETIMEDOUT', `nothing received for ${Math.round(idleMs / 1000)} s`));
    }, Math.max(100, Math.floor(idleMs / 4)));
    this.#idleTimer.unref();
  }

  deviceNames(): string[] {
    return [...this.#handles.values()].map((o) => o.name);
  }

  start(): void {
    this.#frames.handle({
      frame: (f) => this.#frame(f),
      corrupt: (h) => this.#corrupt(h),
      closed: (err) => this.#close(err),
    });
  }

  #frame(f: Frame): void {
    if (this.#closed) return; // frames read before the close (a kick, a replacement) are not acted on
    this.#heard = Date.now();
    try {
      this.#bound();
      switch (f.h.type) {
        case FrameType.IO:
        case FrameType.RESTART: return this.#held.length > 0 ? this.#hold(f) : this.#ordered(f);
        case FrameType.OPEN: return void this.#open(f).catch((err: Error) => this.#error(f.h.id, err));
        case FrameType.CLOSE: return void this.#closeDevice(f).catch((err: Error) => this.#error(f.h.id, err));
        case FrameType.PING: return void this.#frames.send(FrameType.PONG, f.h.id);
        case FrameType.DIGEST: return this.#digest(f);
        case FrameType.STATE: return this.#state(f);
        case FrameType.REWIND: return void this.#rewind(f).catch((err: Error) => this.#error(f.h.id, err));
        default: throw new ProtocolError(`unexpected frame type ${f.h.type} after the handshake`);
      }
    } catch (err) {
      this.#fatal(err as Error);
    }
  }

  #corrupt(h: FrameHeader): void {
    this.#rx.log.limited(`rx-crc:${this.peer}`, `replication: ${this.peer}: frame ${h.id} failed its CRC; asked for it again`);
    if ((h.type === FrameType.IO || h.type === FrameType.RESTART) && !this.#resending.has(h.id)) {
      this.#resending.add(h.id);
      this.#held.push({ id: h.id, f: null });
    }
    this.#frames.send(FrameType.RESEND, h.id);
  }

  /**
   * An IO frame read while a RESEND is outstanding. The sender sends log entries in log
   * order and the next epoch's without waiting for the previous one's acknowledgements, so
   * the damaged frame may belong to an epoch that frames read after it would close: they
   * are held, in the order read, and a frame asked for again takes the place of the damaged
   * one when it comes back; frames are taken from the front up to the first place still
   * empty. Reading goes on meanwhile (the frames asked for come after these); past
   * `maxInflightBytes` held, the connection is closed and the sender re-sends everything
   * unanswered, in log order, on a new one.
   */
  #hold(f: Frame): void {
    if (this.#resending.delete(f.h.id)) {
      this.#held.find((x) => x.id === f.h.id && x.f === null)!.f = f;
    } else {
      this.#held.push({ id: f.h.id, f });
    }
    this.#heldBytes += f.payload.length;
    while (this.#held.length > 0 && this.#held[0]!.f && !this.#closed) {
      const next = this.#held.shift()!.f!;
      this.#heldBytes -= next.payload.length;
      this.#ordered(next);
    }
    if (this.#heldBytes > this.#maxInflight) {
      this.#fatal(new DmError('ENOBUFS', `more than ${this.#maxInflight} bytes held while frames asked for again are outstanding`));
    }
  }

  async #open(f: Frame): Promise<void> {
    const o = decodeJson(f.payload, 'OPEN');
    const groupId = str(o, 'stream', 'OPEN', 32);
    const slink = uint(o, 'slink', 'OPEN');
    const name = str(o, 'device', 'OPEN', 128);
    const sectors = uint(o, 'sectors', 'OPEN');
    if (!/^[0-9a-f]{32}$/.test(groupId)) throw new ProtocolError(`OPEN: 'stream' must be a 16-byte hex log uuid`);
    const stream = this.#rx.stream(groupId, slink);
    if (this.#stream && this.#stream !== stream) throw new ProtocolError('OPEN: one connection carries one stream');
    if (stream.owner && stream.owner !== this) {
      // a reconnect: the old connection goes, and its writes finish before ours start
      (stream.owner as Session).#fatal(new DmError('ECONNRESET', `replaced by a new connection from ${this.peer}`));
    }
    stream.owner = this;
    this.#stream = stream;
    await stream.idle();
    if (this.#closed) return; // gone (or replaced) while waiting: open nothing, #close ran already
    this.#notPromoting(name);
    const dev = this.#rx.device(name);
    if (dev.sectors < sectors) throw new DmError('ENOSPC', `device too small for target: ${name} has ${dev.sectors} sectors at the receiving site, needs ${sectors}`);
    const judged = this.#judge(name, dev, o);
    const writer = await this.#takeRole(name, dev, stream);
    if (this.#closed) return;
    // a device may be open twice (a table reload at the sender attaches again before the old
    // table detaches): each handle holds its own open, and CLOSE releases one
    const handle = this.#nextHandle++;
    const holder = receivingHolder(this.#frames);
    dev.open(holder);
    this.#handles.set(handle, { name, dev, writer, holder });
    stream.devices.set(name, writer);
    this.#frames.send(FrameType.OPEN_OK, f.h.id, [encodeJson({ handle, applied: stream.pos.applied, epoch: stream.pos.epoch, started: stream.started, sectors: dev.sectors, ...judged })]);
  }

  /**
   * A receiving device that is itself replicated (a replicator-dev: its group has a role)
   * takes a stream only as judged from the generation ids (replicator-role.ts): refused with
   * EPERM and a verdict (peer-primary, split-brain, unrelated), or taken with what it asks
   * to be resynced. Other devices take any stream (no ids, nothing to judge).
   */
  #judge(name: string, dev: MappedDevice, o: Record<string, unknown>): Record<string, unknown> {
    const rep = replicatedDevice(dev);
    if (!rep) return {};
    const v = rep.role.judge(gensOf(o));
    if (!v.ok) {
      if (v.verdict === 'split-brain') {
        rep.role.noteSplitBrain(`from ${this.peer}: ${v.why}`);
        this.#rx.log.warn(`replication: ${name}: ${this.peer}: ${v.why}`);
        dev.event(`split-brain: ${v.why}`);
      }
      throw new RoleRefusal(v.verdict, `${rep.group}: ${v.why}`);
    }
    const needs = rep.needs();
    rep.role.accepted(v.resync === 'full' || needs !== null);
    this.#groups.add(rep);
    return {
      resync: v.resync, generation: rep.role.current,
      needs: needs ? { regionSectors: needs.regionSectors, bits: needs.bits.toString('base64') } : null,
    };
  }

  /** STATE from the sender: our devices hold its generation in order (or not), or it was demoted */
  #state(f: Frame): void {
    const o = decodeJson(f.payload, 'STATE');
    const gen = str(o, 'gen', 'STATE', 16);
    if (!/^[0-9a-f]{16}$/.test(gen)) throw new ProtocolError('STATE: gen must be 8 bytes of hex');
    if (this.#stream) {
      this.#stream.senderRole = o.role === 'secondary' ? 'secondary' : 'primary';
      this.#stream.senderAllInSync = o.role === 'secondary' && o.allInSync === true;
    }
    if (o.role === 'secondary') return; // a demoted sender says nothing of our image: it stopped sending
    for (const rep of this.#groups) {
      if (!rep.role.secondary) continue; // promoted here since: the sender's generation is not ours
      if (o.consistent !== true) {
        rep.role.syncing();
        continue;
      }
      if (rep.role.inSync(gen)) this.#rx.log.info(`replication: ${rep.group}: consistent with ${this.peer} at generation ${gen}`);
      void rep.clearNeeds().catch((err: Error) => this.#rx.log.warn(`replication: ${rep.group}: ${err.message}`));
    }
  }

  /**
   * Device `name` receives `stream` from now on (secondary, persisted). A device receives one
   * stream at a time: another stream's device is refused (EBUSY) while that stream is
   * connected, and taken over (with a warning) when it is not — a sender that made a new
   * log, say; both hold the site's secret.
   */
  async #takeRole(name: string, dev: MappedDevice, stream: Stream): Promise<BlockDev> {
    const mine = roleOf(stream.id);
    if (dev.secondary !== null && dev.secondary !== mine) {
      if (dev.secondary !== DEMOTED) {
        // a demoted group's stream no longer sends: the new primary's takes its place
        const other = dev.secondary.slice(ROLE.length);
        const peer = this.#rx.connected(other);
        if (peer && this.#rx.senderRole(other) === 'primary') throw new DmError('EBUSY', `device ${name} receives stream ${other} (connected from ${peer}); one stream per device`);
        this.#rx.log.warn(`replication: ${name}: stream ${stream.id} from ${this.peer} takes over from stream ${other}, ${peer ? 'whose sender was demoted' : 'which is not connected'}`);
        if (peer) await this.#rx.kick(other, `${name} receives from ${this.peer} now`);
      }
      await dev.clearSecondary();
    }
    // (checked where nothing can run before the device is marked: a promotion fences first)
    this.#notPromoting(name);
    const writer = await dev.setSecondary(mine);
    this.#rx.setRole(name, stream.id);
    return writer;
  }

  /** the sender stopped replicating this device: it is writable again */
  async #closeDevice(f: Frame): Promise<void> {
    const handle = uint(decodeJson(f.payload, 'CLOSE'), 'handle', 'CLOSE');
    const o = this.#handles.get(handle);
    if (!o) throw new DmError('EBADF', `CLOSE: no open handle ${handle}`);
    this.#handles.delete(handle);
    await this.#stream?.idle();
    const lastHandle = ![...this.#handles.values()].some((x) => x.dev === o.dev);
    // durable before it leaves the stream's devices: a later flush (the durable position) no longer covers it
    if (lastHandle) await o.writer.submit(FLUSH_BIO);
    o.dev.close(o.holder);
    if (lastHandle) {
      await o.dev.clearSecondary();
      this.#rx.setRole(o.name, null);
      this.#stream?.devices.delete(o.name);
    }
    this.#frames.send(FrameType.ACK, f.h.id);
  }

  /**
   * REWIND {seq, epoch} (feature 'rewind'): the sender found, from the position OPEN_OK
   * gave it, that this site applied entries its log lost (a power loss there before they
   * were flushed), and will number new entries from `seq + 1` again: the stream's position
   * goes back to `seq`, durably (stream.ts). Answered with REWIND {applied, epoch}: the
   * position now. The sender sends it before any log entry on the connection.
   */
  async #rewind(f: Frame): Promise<void> {
    if (!this.#rewinds) throw new ProtocolError('REWIND on a connection without the feature rewind');
    const o = decodeJson(f.payload, 'REWIND');
    const seq = uint(o, 'seq', 'REWIND');
    const epoch = uint(o, 'epoch', 'REWIND');
    const stream = this.#stream;
    if (!stream) throw new ProtocolError('REWIND before any OPEN');
    await stream.idle();
    if (this.#closed) return;
    const was = await stream.rewind(seq, epoch);
    if (was !== seq) {
      this.#rx.log.warn(`replication: stream ${stream.id}: the sender ${this.peer} holds no entry this site began after entry ${seq} (lost there: a power loss before its log was flushed?); position set from ${was} to ${seq}, and the sender verifies this site`);
    }
    this.#frames.send(FrameType.REWIND, f.h.id, [encodeJson({ applied: stream.pos.applied, epoch: stream.pos.epoch })]);
  }

  /** an IO or RESTART frame, in the order the sender sent them */
  #ordered(f: Frame): void {
    if (f.h.type === FrameType.IO) return this.#io(f);
    this.#restart(f);
  }

  /**
   * RESTART (feature 'pipeline'): the sender ships again from a seq on, knowing the fate of
   * everything it sent before; a failed entry stops holding later epochs back (stream.ts).
   * It is never answered.
   */
  #restart(f: Frame): void {
    if (!this.#pipelined) throw new ProtocolError('RESTART on a connection without the feature pipeline');
    const seq = decodeRestart(f.payload);
    if (!this.#stream) throw new ProtocolError('RESTART before any OPEN');
    if (this.#stream.restart(seq)) this.#rx.log.info(`replication: ${this.peer}: the sender starts over at entry ${seq}; a failed entry no longer holds later epochs back`);
  }

  #io(f: Frame): void {
    const r = decodeIo(f.payload, (f.h.flags & FLAG_SEEDED) !== 0);
    const o = this.#handles.get(r.handle);
    if (!o) return this.#error(f.h.id, new DmError('EBADF', `IO on handle ${r.handle}, which is not open`));
    const stream = this.#stream!;
    // the memory it takes: a READ's buffer, a WRITE's data once decompressed, or the frame
    const bytes = Math.max(f.payload.length, r.op === IoOp.READ || r.op === IoOp.WRITE ? r.sectors * 512 : 0);
    this.#inflightBytes += bytes;
    if (this.#inflightBytes > this.#maxInflight && !this.#paused) {
      this.#paused = true;
      this.#frames.pause();
    }
    const data = f.payload.subarray(ioHeaderSize(r));
    let done: Promise<unknown>;
    if (r.op === IoOp.READ) {
      const buf = Buffer.alloc(r.sectors * 512);
      done = o.writer.submit({ op: 'read', sector: r.sector, sectors: r.sectors, data: buf, flags: {} })
        .then(() => {
          this.#frames.send(FrameType.DATA, f.h.id, [buf]);
          this.#bound();
        });
    } else {
      const apply = (): Promise<void> => this.#apply(o, r, data);
      const applied = r.seq > 0 ? stream.submit(this, r.seq, r.epoch, apply, this.#pipelined) : apply().then(() => 'applied' as const);
      done = applied.then(async (how) => {
        if (r.op === IoOp.FLUSH) {
          // every device of the stream, then the position: durable together (a duplicate too)
          if (r.seq > 0 && how === 'applied') stream.flushedEntry(r.seq, r.epoch);
          await stream.sync();
        }
        this.#frames.send(FrameType.ACK, f.h.id);
      });
    }
    done.catch((err: Error) => (err instanceof ProtocolError ? this.#fatal(err) : this.#error(f.h.id, err))).finally(() => {
      this.#inflightBytes -= bytes;
      if (this.#paused && this.#inflightBytes <= this.#maxInflight / 2) {
        this.#paused = false;
        if (!this.#outPaused) this.#frames.resume();
      }
    });
  }

  async #apply(o: Opened, r: IoRequest, wire: Buffer): Promise<void> {
    const flags: BioFlags = (r.flags & IO_FUA) !== 0 ? { fua: true } : {};
    switch (r.op) {
      case IoOp.WRITE: {
        const data = await decompress(r.codec, wire, r.rawBytes);
        return o.writer.submit({ op: 'write', sector: r.sector, sectors: r.sectors, data, flags });
      }
      case IoOp.DISCARD:
        return o.writer.submit({ op: 'discard', sector: r.sector, sectors: r.sectors, data: EMPTY, flags });
      case IoOp.WRITE_ZEROES:
        return o.writer.submit({ op: 'write-zeroes', sector: r.sector, sectors: r.sectors, data: EMPTY, flags: { ...flags, noUnmap: (r.flags & IO_NOUNMAP) !== 0 } });
      case IoOp.FLUSH: // takes its place in the stream's order; the devices are flushed once it has (#io)
        return Promise.resolve();
      default:
        throw new ProtocolError(`IO op ${r.op} cannot be applied`);
    }
  }

  /**
   * DIGEST (feature 'digest'): read the range and answer its block digests (DATA), hashed on
   * the digest threads. DIGESTS_AT_ONCE per connection, each answered when it is done (the
   * answer carries the request's id), so a connection holds at most that many ranges (4 MiB
   * each) for them; past MAX_DIGESTS_QUEUED waiting, EAGAIN. A request this device cannot
   * answer (block size, length, range) gets ERROR EINVAL; the connection stays. Requests
   * still waiting when the connection closes are dropped.
   */
  #digest(f: Frame): void {
    const r = decodeDigest(f.payload);
    const o = this.#handles.get(r.handle);
    if (!o) return this.#error(f.h.id, new DmError('EBADF', `DIGEST on handle ${r.handle}, which is not open`));
    const problem = digestProblem(r, o.dev.sectors);
    if (problem) return this.#error(f.h.id, new DmError('EINVAL', `${o.name}: ${problem}`));
    if (this.#digestsWaiting.length >= MAX_DIGESTS_QUEUED) return this.#error(f.h.id, new DmError('EAGAIN', `more than ${MAX_DIGESTS_QUEUED} DIGEST requests waiting`));
    this.#digestsWaiting.push(async () => {
      try {
        const bytes = r.sectors * 512;
        const digests = await digestFilled(bytes, r.blockSectors * 512, (data) => o.writer.submit({ op: 'read', sector: r.sector, sectors: r.sectors, data, flags: {} }));
        this.#frames.send(FrameType.DATA, f.h.id, [digests]);
      } catch (err) {
        this.#error(f.h.id, err as Error);
      }
    });
    this.#nextDigests();
  }

  /** start waiting DIGEST requests while fewer than DIGESTS_AT_ONCE run */
  #nextDigests(): void {
    while (this.#digestsRunning < DIGESTS_AT_ONCE && this.#digestsWaiting.length > 0 && !this.#closed) {
      const answer = this.#digestsWaiting.shift()!;
      this.#digestsRunning++;
      void answer().finally(() => {
        this.#digestsRunning--;
        this.#nextDigests();
      });
    }
  }

  /** a request failed: tell the sender, keep the connection */
  #error(id: number, err: Error): void {
    if (err instanceof ProtocolError) return this.#fatal(err);
    const code = (err as { code?: string }).code ?? 'EIO';
    this.#rx.log.limited(`rx-err:${this.peer}:${code}`, `replication: ${this.peer}: request ${id} failed: ${err.message}`);
    this.#frames.send(FrameType.ERROR, id, [encodeError(code, err.message, (err as { verdict?: string }).verdict)]);
  }

  /**
   * Replies waiting to be sent are bounded too: past maxInflight bytes (a peer that sends
   * PINGs, FLUSHes or READs and does not read the answers), reading stops until they drain.
   */
  #bound(): void {
    const s = this.#frames.socket;
    if (this.#outPaused || this.#closed || s.writableLength <= this.#maxInflight) return;
    this.#outPaused = true;
    this.#frames.pause();
    s.once('drain', () => {
      this.#outPaused = false;
      if (!this.#paused && !this.#closed) this.#frames.resume();
    });
  }

  /** a device being promoted here (ReplicationReceiver.fence) takes no stream: EBUSY */
  #notPromoting(name: string): void {
    if (this.#rx.promoting(name)) throw new DmError('EBUSY', `${name} is being promoted at the receiving site: it takes no stream`);
  }

  /** the receiving site closes the connection (its device was promoted) */
  kick(why: string): void {
    this.#fatal(new DmError('ECONNRESET', why));
  }

  /** the peer broke the protocol (or a new connection replaced this one): say why and close */
  #fatal(err: Error): void {
    if (this.#closed) return;
    this.#rx.log.warn(`replication: ${this.peer}: closing: ${err.message}`);
    this.#frames.send(FrameType.ERROR, 0, [encodeError((err as { code?: string }).code ?? 'EPROTO', err.message)]);
    this.#frames.end();
    this.#close(err);
  }

  #close(err: Error): void {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#idleTimer) clearInterval(this.#idleTimer);
    if (err instanceof ProtocolError) this.#rx.log.warn(`replication: ${this.peer}: dropped: ${err.message}`);
    const s = this.#stream;
    if (s) {
      s.drop(this, err);
      if (s.owner === this) s.owner = null;
    }
    // devices stay secondary (the sender will be back); only CLOSE makes them writable
    const handles = [...this.#handles.values()];
    this.#handles.clear();
    this.#held = [];
    this.#heldBytes = 0;
    this.#resending.clear();
    void (s?.idle() ?? Promise.resolve()).then(() => { for (const o of handles) o.dev.close(o.holder); });
  }
}
