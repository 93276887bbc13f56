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
import type { DeviceMapper } from '../core/device-manager.ts';
import { DmError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import type { MappedDevice } from '../core/mapped-device.ts';
import { serverHandshake, type Secret } from './handshake.ts';
import type { CertTls } from './tls-certs.ts';
import { PositionFile } from './position.ts';
import { MAX_PAYLOAD } from './protocol.ts';
import { DEMOTED, ROLE, readRoles, replicatedDevice, roleOf, writeRoles } from './roles.ts';
import { Session } from './session.ts';
import { Stream } from './stream.ts';

export interface ReceiverOptions {
  readonly host: string;
  readonly port: number;
  readonly secret: Secret;
  /** refuse senders that do not use TLS */
  readonly requireTls?: boolean;
  /** TLS with certificates, for senders that ask for it */
  readonly certs?: CertTls;
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

export class ReplicationReceiver {
  readonly #dm: DeviceMapper;
  readonly #opts: Required<Omit<ReceiverOptions, 'certs'>> & Pick<ReceiverOptions, 'certs'>;
  readonly #log: Logger;
  readonly #server: Server;
  readonly #sockets = new Set<Socket>();
  readonly #streams = new Map<string, Stream>();
  /** device name → the stream it receives (roles.json) */
  readonly #roles: Map<string, string>;
  /** devices being promoted (fence) */
  readonly #promoting = new Set<string>();
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
    // devices of a demoted group that received nothing yet: secondary too (their group's role file says so)
    for (const d of this.#dm.list()) {
      const dev = this.#dm.get(d.name);
      if (dev.secondary === null && replicatedDevice(dev)?.role.secondary) {
        await dev.setSecondary(DEMOTED);
        this.#log.info(`replication: ${d.name} is secondary again (its group is demoted)`);
      }
    }
  }

  /**
   * Device `name` stops receiving (it is promoted): the connection of the stream it
   * receives is closed (its writes in flight finish first), unless that sender is connected
   * and still primary — then EBUSY, or with `force` it is cut off anyway. The device stays
   * marked secondary; the caller clears that once the group is primary.
   */
  async release(name: string, force: boolean): Promise<void> {
    const st = this.#streamOf(name);
    if (!st) return;
    const owner = st.owner as Session | null;
    if (owner && st.senderRole === 'primary' && !force) {
      throw new DmError('EBUSY', `${name}: receives from ${owner.peer}, which is connected and primary: demote it first (or promote with --force to cut it off)`);
    }
    owner?.kick(`${name} was promoted at this site`);
    // the writes of a connection already gone (a broken link) finish too: none lands after the promotion
    await st.idle();
  }

  /**
   * Devices `names` are being promoted (role-ops.ts): a connection's OPEN of one is refused
   * (EBUSY) until `unfence`, so that a sender reconnecting meanwhile takes nothing back
   */
  fence(names: readonly string[]): void {
    for (const n of names) this.#promoting.add(n);
  }

  unfence(names: readonly string[]): void {
    for (const n of names) this.#promoting.delete(n);
  }

  /** @internal is device `name` being promoted? (Session: OPEN refused) */
  promoting(name: string): boolean {
    return this.#promoting.has(name);
  }

  /** @internal device `name` receives stream `id` (null: it is primary again); persisted */
  setRole(name: string, id: string | null): void {
    if (id === null) this.#roles.delete(name);
    else this.#roles.set(name, id);
    fs.mkdirSync(this.#opts.stateDir, { recursive: true, mode: 0o700 });
    writeRoles(path.join(this.#opts.stateDir, 'roles.json'), this.#roles);
  }

  /**
   * @internal was device `name`'s sender last heard demoting with every one of its sites in
   * sync (so promoting `name` is a planned move)? false when it receives nothing, or after
   * a restart of this daemon (not persisted: the conservative answer)
   */
  plannedMove(name: string): boolean {
    const st = this.#streamOf(name);
    return st?.senderRole === 'secondary' && st.senderAllInSync;
  }

  /** the stream device `name` receives (its secondary mark), if any */
  #streamOf(name: string): Stream | undefined {
    const label = this.#dm.get(name).secondary;
    return label?.startsWith(ROLE) ? this.#streams.get(label.slice(ROLE.length)) : undefined;
  }

  /** @internal the role the sender of stream `id` last announced */
  senderRole(id: string): 'primary' | 'secondary' {
    return this.#streams.get(id)?.senderRole ?? 'primary';
  }

  /** @internal close the connection of stream `id`; resolves once its writes in flight are done */
  async kick(id: string, why: string): Promise<void> {
    const st = this.#streams.get(id);
    (st?.owner as Session | null | undefined)?.kick(why);
    await st?.idle();
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
    sock.setNoDelay(true); // acks are small and the sender waits for them: no Nagle
    if (this.#sockets.size >= this.#opts.maxConnections) {
      this.#refuse(peer, `connection cap of ${this.#opts.maxConnections} reached`);
      sock.destroy();
      return;
    }
    this.#sockets.add(sock);
    sock.once('close', () => this.#sockets.delete(sock));
    const auth = { secret: this.#opts.secret, requireTls: this.#opts.requireTls, certs: this.#opts.certs, timeoutMs: this.#opts.handshakeTimeoutMs };
    serverHandshake(sock, auth, `replication from ${peer}`).then(
      (a) => {
        a.frames.maxPayload = MAX_PAYLOAD;
        this.#log.info(`replication: ${peer} (${a.name}) authenticated${a.tls ? ' over TLS' : ''}`);
        new Session(this, a.frames, peer, this.#opts.maxInflightBytes, this.#opts.idleTimeoutMs, a.features).start();
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

/** `<state>/replication`: where a daemon's receiver keeps its stream positions */
export function positionsDir(stateDir: string): string {
  return path.join(stateDir, 'replication');
}
