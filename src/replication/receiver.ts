/**
 * The receiving site of `tcp` slinks: `dmkit daemon --replication-listen HOST:PORT
 * --replication-secret FILE`. Senders authenticate (handshake.ts), open the daemon's own
 * devices by name (each becomes secondary: EROFS for its other writers), and send IO
 * frames that are applied in each stream's order (stream.ts) and acknowledged.
 *
 * Limits against hostile or broken peers: a connection cap, a handshake deadline,
 * control frames of at most 64 KiB until authenticated, data frames of at most 4 MiB, at
 * most `maxInflightBytes` of writes in flight per connection (reading pauses beyond), and
 * any frame that breaks the protocol closes that connection with an ERROR saying why. No
 * frame from a peer can stop the daemon.
 */
import fs from 'node:fs';
import net, { type Server, type Socket } from 'node:net';
import path from 'node:path';
import type { Bio, BioFlags } from '../core/bio.ts';
import { EMPTY } from '../core/bio.ts';
import type { DeviceMapper } from '../core/device-manager.ts';
import { DmError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import type { MappedDevice } from '../core/mapped-device.ts';
import type { BlockDev } from '../core/types.ts';
import { decompress } from './compress.ts';
import type { Frame, FrameSocket } from './frame-socket.ts';
import { serverHandshake, type Secret } from './handshake.ts';
import { PositionFile } from './position.ts';
import {
  FrameType, IO_FUA, IO_HEADER, IO_NOUNMAP, IoOp, MAX_PAYLOAD, ProtocolError, decodeIo, decodeJson, encodeError, encodeJson, str, uint,
  type FrameHeader, type IoRequest,
} from './protocol.ts';
import { Stream } from './stream.ts';

export interface ReceiverOptions {
  readonly host: string;
  readonly port: number;
  readonly secret: Secret;
  /** refuse senders that do not use TLS */
  readonly requireTls?: boolean;
  /** where stream positions live (`<state>/replication`) */
  readonly stateDir: string;
  readonly maxConnections?: number;
  readonly handshakeTimeoutMs?: number;
  readonly maxInflightBytes?: number;
  /** an authenticated connection that sends nothing for this long is closed (senders ping; default 120 s) */
  readonly idleTimeoutMs?: number;
}

/** What `status` shows of one stream. */
export interface StreamStatus {
  readonly stream: string;
  readonly peer: string | null;
  readonly devices: string[];
  readonly applied: number;
  readonly duplicates: number;
}

const FLUSH_BIO: Bio = { op: 'flush', sector: 0, sectors: 0, data: EMPTY, flags: {} };

export class ReplicationReceiver {
  readonly #dm: DeviceMapper;
  readonly #opts: Required<ReceiverOptions>;
  readonly #log: Logger;
  readonly #server: Server;
  readonly #sockets = new Set<Socket>();
  readonly #streams = new Map<string, Stream>();
  /** device name → the stream it receives (roles.json) */
  readonly #roles: Map<string, string>;
  /** refused connections (authentication, limits), for status */
  refused = 0;
  lastRefusal = '';

  constructor(dm: DeviceMapper, opts: ReceiverOptions, log: Logger) {
    this.#dm = dm;
    this.#opts = { requireTls: false, maxConnections: 64, handshakeTimeoutMs: 10_000, maxInflightBytes: 64 << 20, idleTimeoutMs: 120_000, ...opts };
    this.#log = log;
    this.#server = net.createServer((s) => this.#accept(s));
    this.#roles = readRoles(path.join(this.#opts.stateDir, 'roles.json'), log);
  }

  /**
   * Devices that were receiving when the daemon stopped are secondary again before anything
   * listens (roles.json in the state dir): their other writers must not diverge from the
   * sender between a restart and the sender's reconnect.
   */
  async #restoreRoles(): Promise<void> {
    for (const [name, id] of this.#roles) {
      if (!this.#dm.has(name)) continue;
      await this.#dm.get(name).setSecondary(roleOf(id));
      this.#log.info(`replication: ${name} is secondary again (it receives stream ${id})`);
    }
  }

  /** @internal device `name` receives stream `id` (null: it is primary again); persisted */
  setRole(name: string, id: string | null): void {
    if (id === null) this.#roles.delete(name);
    else this.#roles.set(name, id);
    const file = path.join(this.#opts.stateDir, 'roles.json');
    fs.mkdirSync(this.#opts.stateDir, { recursive: true, mode: 0o700 });
    fs.writeFileSync(`${file}.tmp`, `${JSON.stringify(Object.fromEntries(this.#roles), null, 1)}\n`, { mode: 0o600 });
    fs.renameSync(`${file}.tmp`, file);
  }

  /** @internal is stream `id` connected now? */
  connected(id: string): string | null {
    return (this.#streams.get(id)?.owner as Session | null | undefined)?.peer ?? null;
  }

  async listen(): Promise<{ host: string; port: number }> {
    await this.#restoreRoles();
    return new Promise((resolve, reject) => {
      this.#server.once('error', reject);
      this.#server.listen(this.#opts.port, this.#opts.host, () => {
        this.#server.off('error', reject);
        const a = this.#server.address() as net.AddressInfo;
        resolve({ host: this.#opts.host, port: a.port });
      });
    });
  }

  async close(): Promise<void> {
    // the server's close callback waits for every connection to end: end them first
    const closed = new Promise<void>((r) => this.#server.close(() => r()));
    for (const s of this.#sockets) s.destroy();
    await closed;
    for (const st of this.#streams.values()) {
      await st.idle();
      st.pos.close();
    }
    this.#streams.clear();
  }

  status(): StreamStatus[] {
    return [...this.#streams.values()].map((s) => ({
      stream: s.id, peer: (s.owner as Session | null)?.peer ?? null, devices: [...((s.owner as Session | null)?.deviceNames() ?? [])],
      applied: s.pos.applied, duplicates: s.duplicates,
    }));
  }

  #accept(sock: Socket): void {
    const peer = `${sock.remoteAddress}:${sock.remotePort}`;
    sock.on('error', () => {});
    if (this.#sockets.size >= this.#opts.maxConnections) {
      this.#refuse(peer, `connection cap of ${this.#opts.maxConnections} reached`);
      sock.destroy();
      return;
    }
    this.#sockets.add(sock);
    sock.once('close', () => this.#sockets.delete(sock));
    const auth = { secret: this.#opts.secret, requireTls: this.#opts.requireTls, timeoutMs: this.#opts.handshakeTimeoutMs };
    serverHandshake(sock, auth, `replication from ${peer}`).then(
      (a) => {
        a.frames.maxPayload = MAX_PAYLOAD;
        this.#log.info(`replication: ${peer} (${a.name}) authenticated${a.tls ? ' over TLS' : ''}`);
        new Session(this, a.frames, peer, this.#opts.maxInflightBytes, this.#opts.idleTimeoutMs).start();
      },
      (err: Error) => {
        this.#refuse(peer, err.message);
        sock.destroy();
      },
    );
  }

  #refuse(peer: string, why: string): void {
    this.refused++;
    this.lastRefusal = `${peer}: ${why}`;
    this.#log.warn(`replication: refused ${peer}: ${why}`);
  }

  /** @internal the stream of a sender's log and slink, its position read from the state dir */
  stream(groupId: string, slink: number): Stream {
    const id = `${groupId}.${slink}`;
    let s = this.#streams.get(id);
    if (!s) {
      s = new Stream(id, PositionFile.open(this.#opts.stateDir, groupId, slink));
      this.#streams.set(id, s);
    }
    return s;
  }

  /** @internal */
  device(name: string): MappedDevice {
    if (!this.#dm.has(name)) throw new DmError('ENOENT', `no device '${name}' at this site`);
    return this.#dm.get(name);
  }

  /** @internal */
  get log(): Logger {
    return this.#log;
  }
}

interface Opened {
  readonly name: string;
  readonly dev: MappedDevice;
  readonly writer: BlockDev;
}

/** One authenticated connection. */
class Session {
  readonly peer: string;
  readonly #rx: ReplicationReceiver;
  readonly #frames: FrameSocket;
  readonly #maxInflight: number;
  #stream: Stream | null = null;
  readonly #handles = new Map<number, Opened>();
  #nextHandle = 1;
  #inflightBytes = 0;
  #paused = false;
  #closed = false;
  #heard = Date.now();
  #idleTimer: NodeJS.Timeout | null = null;

  constructor(rx: ReplicationReceiver, frames: FrameSocket, peer: string, maxInflight: number, idleMs: number) {
    this.#rx = rx;
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
    this.#heard = Date.now();
    try {
      switch (f.h.type) {
        case FrameType.IO: return this.#io(f);
        case FrameType.OPEN: return void this.#open(f).catch((err: Error) => this.#error(f.h.id, err));
        case FrameType.CLOSE: return void this.#closeDevice(f).catch((err: Error) => this.#error(f.h.id, err));
        case FrameType.PING: return void this.#frames.send(FrameType.PONG, f.h.id);
        default: throw new ProtocolError(`unexpected frame type ${f.h.type} after the handshake`);
      }
    } catch (err) {
      this.#fatal(err as Error);
    }
  }

  #corrupt(h: FrameHeader): void {
    this.#rx.log.limited(`rx-crc:${this.peer}`, `replication: ${this.peer}: frame ${h.id} failed its CRC; asked for it again`);
    this.#frames.send(FrameType.RESEND, h.id);
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
    const dev = this.#rx.device(name);
    if (dev.sectors < sectors) throw new DmError('ENOSPC', `device too small for target: ${name} has ${dev.sectors} sectors at the receiving site, needs ${sectors}`);
    const writer = await this.#takeRole(name, dev, stream);
    if (this.#closed) return;
    // a device may be open twice (a table reload at the sender attaches again before the old
    // table detaches): each handle holds its own open, and CLOSE releases one
    const handle = this.#nextHandle++;
    dev.open();
    this.#handles.set(handle, { name, dev, writer });
    this.#frames.send(FrameType.OPEN_OK, f.h.id, [encodeJson({ handle, applied: stream.pos.applied, sectors: dev.sectors })]);
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
      const other = dev.secondary.slice(ROLE.length);
      const peer = this.#rx.connected(other);
      if (peer) throw new DmError('EBUSY', `device ${name} receives stream ${other} (connected from ${peer}); one stream per device`);
      this.#rx.log.warn(`replication: ${name}: stream ${stream.id} from ${this.peer} takes over from stream ${other}, which is not connected`);
      await dev.clearSecondary();
    }
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
    o.dev.close();
    if (![...this.#handles.values()].some((x) => x.dev === o.dev)) {
      await o.dev.clearSecondary();
      this.#rx.setRole(o.name, null);
    }
    this.#frames.send(FrameType.ACK, f.h.id);
  }

  #io(f: Frame): void {
    const r = decodeIo(f.payload);
    const o = this.#handles.get(r.handle);
    if (!o) return this.#error(f.h.id, new DmError('EBADF', `IO on handle ${r.handle}, which is not open`));
    const stream = this.#stream!;
    const bytes = f.payload.length;
    this.#inflightBytes += bytes;
    if (this.#inflightBytes > this.#maxInflight && !this.#paused) {
      this.#paused = true;
      this.#frames.pause();
    }
    const data = f.payload.subarray(IO_HEADER);
    let done: Promise<unknown>;
    if (r.op === IoOp.READ) {
      const buf = Buffer.alloc(r.sectors * 512);
      done = o.writer.submit({ op: 'read', sector: r.sector, sectors: r.sectors, data: buf, flags: {} })
        .then(() => void this.#frames.send(FrameType.DATA, f.h.id, [buf]));
    } else {
      const apply = (): Promise<void> => this.#apply(o, r, data);
      const applied = r.seq > 0 ? stream.submit(this, r.seq, r.epoch, apply) : apply().then(() => 'applied' as const);
      done = applied.then(async (how) => {
        if (r.op === IoOp.FLUSH) {
          // every device of the stream, then the position: durable together (a duplicate too)
          await this.#flushAll();
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
        this.#frames.resume();
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

  /** flush every device this connection has open */
  async #flushAll(): Promise<void> {
    const devs = new Map<MappedDevice, BlockDev>();
    for (const o of this.#handles.values()) devs.set(o.dev, o.writer);
    await Promise.all([...devs.values()].map((w) => w.submit(FLUSH_BIO)));
  }

  /** a request failed: tell the sender, keep the connection */
  #error(id: number, err: Error): void {
    if (err instanceof ProtocolError) return this.#fatal(err);
    const code = (err as { code?: string }).code ?? 'EIO';
    this.#rx.log.limited(`rx-err:${this.peer}:${code}`, `replication: ${this.peer}: request ${id} failed: ${err.message}`);
    this.#frames.send(FrameType.ERROR, id, [encodeError(code, err.message)]);
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
    void (s?.idle() ?? Promise.resolve()).then(() => { for (const o of handles) o.dev.close(); });
  }
}

const ROLE = 'replication stream ';
/** a secondary device's owner label for stream `id` (MappedDevice.secondary) */
function roleOf(id: string): string {
  return `${ROLE}${id}`;
}

function readRoles(file: string, log: Logger): Map<string, string> {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    return new Map();
  }
  try {
    const o = JSON.parse(text) as Record<string, unknown>;
    return new Map(Object.entries(o).filter((e): e is [string, string] => typeof e[1] === 'string'));
  } catch (err) {
    log.error(`replication: ${file}: unreadable (${(err as Error).message}); no device is secondary until its sender reconnects`);
    return new Map();
  }
}

/** `<state>/replication`: where a daemon's receiver keeps its stream positions */
export function positionsDir(stateDir: string): string {
  return path.join(stateDir, 'replication');
}
