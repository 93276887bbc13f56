/**
 * `tcp` slink: dmkit's own replication protocol to a `dmkit daemon --replication-listen` at
 * the remote site (docs/formats/replication-protocol.md). The receiving devices are that
 * daemon's devices, named in the replicator-dev tuple.
 *
 *   replicator:      tcp <#params> <slink#> [<policy> [<fallbehind>]] peer=HOST:PORT secret=FILE
 *                        [tls=on|off [tls-ca=FILE tls-cert=FILE tls-key=FILE]]
 *                        [integrity=crc32c|none] [compress=zstd|lz4|none]
 *                        [io-timeout=<seconds>] [retest=<seconds>]
 *   replicator-dev:  <slink#> 1 <remote-device-name> <dlog_type> …
 *
 * One connection per slink carries every device of the group; entries carry their log seq
 * and epoch, so the receiver applies each once and in order across reconnects and crashes.
 * A site that cannot be reached when the table loads is `down`, not an error: the volume
 * comes up and the site catches up once it answers. A device the receiver does not have,
 * or one too small, fails the table (the site answered, and said no).
 */
import type { Bio } from '../core/bio.ts';
import { TargetArgError, type DmError } from '../core/errors.ts';
import { escapeArg } from '../core/table-parse.ts';
import type { StatusType } from '../core/types.ts';
import { parseListen } from '../daemon/listen.ts';
import { CODECS, type CompressName } from '../replication/compress.ts';
import { loadSecret, type Secret } from '../replication/handshake.ts';
import { Peer } from '../replication/sender.ts';
import { loadCerts, type CertTls } from '../replication/tls-certs.ts';
import { optionsTable, readDeviceParam, testDevice } from './common.ts';
import { readOptions, readRetest, readSeconds } from './options.ts';
import type { Announcement, RemoteDevice, ShipTag, SiteLink, SiteLinkType, SlinkContext, SlinkDeviceContext } from './types.ts';

const KNOWN_OPTIONS = ['peer', 'secret', 'tls', 'tls-ca', 'tls-cert', 'tls-key', 'integrity', 'compress', 'io-timeout', 'retest'] as const;
const DEFAULT_TIMEOUT_MS = 10_000;
/** answers from the receiver that mean the table is wrong, not that the site is away */
const CONFIG_ERRORS = new Set(['ENOENT', 'ENOSPC', 'EBUSY', 'EROFS', 'EINVAL']);

class TcpRemote implements RemoteDevice {
  readonly devNr: number;
  readonly sectors: number;
  readonly ref: string;
  readonly #peer: Peer;
  readonly #name: string;
  /** the peer's key for this attachment */
  readonly #key: number;

  constructor(peer: Peer, key: number, devNr: number, name: string, sectors: number) {
    this.#peer = peer;
    this.#key = key;
    this.devNr = devNr;
    this.#name = name;
    this.sectors = sectors;
    this.ref = `tcp://${peer.address}/${name}`;
  }

  submit(bio: Bio, tag?: ShipTag): Promise<void> {
    return this.#peer.submit(this.#key, bio, tag?.seq ?? 0, tag?.epoch ?? 0, tag?.payloadCrc);
  }

  /** connected to a receiver with the feature 'pipeline': it orders epochs and holds them back after a failure */
  get ordersEpochs(): boolean {
    return this.#peer.pipelined;
  }

  /** one RESTART per generation for the slink's stream (sender.ts) */
  restart(seq: number, generation: number): void {
    this.#peer.restart(seq, generation);
  }

  /** computed by the receiving daemon (DIGEST frames); ENOTSUP from a receiver without them */
  digest(sector: number, sectors: number, blockSectors: number): Promise<Buffer> {
    return this.#peer.digest(this.#key, sector, sectors, blockSectors);
  }

  /** connect if need be, then a flush and a read of sector 0 at the site */
  async test(): Promise<void> {
    await this.#peer.connect();
    await testDevice((bio) => this.submit(bio));
  }

  params(): string[] {
    return [escapeArg(this.#name)];
  }

  /** tells the receiver the device is no longer replicated (it becomes writable there), unless the engine is only stopping */
  async detach(closing = false): Promise<void> {
    await this.#peer.removeDevice(this.#key, !closing).catch(() => undefined);
  }
}

class TcpSlink implements SiteLink {
  readonly type = 'tcp';
  readonly slink: number;
  readonly retestMs: number;
  readonly #peer: Peer;
  readonly #options: readonly string[];
  readonly #compress: CompressName;

  constructor(slink: number, retestMs: number, peer: Peer, options: readonly string[], compress: CompressName) {
    this.slink = slink;
    this.retestMs = retestMs;
    this.#peer = peer;
    this.#options = options;
    this.#compress = compress;
  }

  async attach(ctx: SlinkDeviceContext, devNr: number, params: readonly string[]): Promise<RemoteDevice> {
    const name = readDeviceParam(this.slink, 'tcp', '<remote-device-name>', params);
    const { key, opened } = this.#peer.addDevice(devNr, name, ctx.length);
    try {
      await opened;
    } catch (err) {
      const code = (err as DmError).code;
      if (CONFIG_ERRORS.has(code)) {
        await this.#peer.removeDevice(key);
        throw new TargetArgError(`slink ${this.slink}: ${(err as Error).message}`, code);
      }
      // unreachable or refused: the site is down for now; the replicator retests it
    }
    return new TcpRemote(this.#peer, key, devNr, name, ctx.length);
  }

  options(): string[] {
    return [...this.#options];
  }

  /** info: the connection's state (connected, connecting, down, auth-failed) */
  status(type: StatusType): string {
    return type === 'info' ? this.#peer.state : optionsTable(this.#options);
  }

  statusJson(): Record<string, unknown> {
    const p = this.#peer;
    const { rawBytes, wireBytes } = p.stats;
    return {
      peer: p.address, connection: p.state, lastError: p.lastError || null, tls: p.opts.tls,
      tlsMode: p.opts.tls ? (p.opts.certs ? 'certificates' : 'psk') : null, integrity: p.opts.crc ? 'crc32c' : 'none',
      // bytesOnWire/bytesReceived: every frame both ways (writes, DIGEST requests and answers, replies);
      // payloadBytes/compressedBytes: the writes' data before and after compression
      compress: this.#compress, bytesOnWire: p.stats.frames.sent, bytesReceived: p.stats.frames.received,
      payloadBytes: rawBytes, compressedBytes: wireBytes,
      compressionRatio: wireBytes > 0 ? Math.round((rawBytes / wireBytes) * 100) / 100 : null,
      resends: p.stats.resends, badReplies: p.stats.badReplies, peerErrors: p.stats.peerErrors, reconnects: p.stats.reconnects,
      digests: p.stats.digests,
      refusal: p.refusal,
    };
  }

  announce(a: Announcement): void {
    this.#peer.announce(a);
  }

  destroy(): Promise<void> {
    return this.#peer.close();
  }
}

function choice<T extends string>(slink: number, key: string, value: string | undefined, allowed: readonly T[], dflt: T): T {
  if (value === undefined) return dflt;
  if (!(allowed as readonly string[]).includes(value)) {
    throw new TargetArgError(`slink ${slink}: invalid ${key} '${value}' (expected ${allowed.join(' or ')})`);
  }
  return value as T;
}

/** `tls-ca=`, `tls-cert=`, `tls-key=`: all three (with tls=on) for TLS with certificates, or none for the PSK */
function readCerts(slink: number, tls: boolean, opts: Map<string, string>): CertTls | undefined {
  const [ca, cert, key] = [opts.get('tls-ca'), opts.get('tls-cert'), opts.get('tls-key')];
  if (ca === undefined && cert === undefined && key === undefined) return undefined;
  if (ca === undefined || cert === undefined || key === undefined) {
    throw new TargetArgError(`slink ${slink}: TLS with certificates needs tls-ca=, tls-cert= and tls-key= together`);
  }
  if (!tls) throw new TargetArgError(`slink ${slink}: tls-ca=, tls-cert= and tls-key= need tls=on`);
  try {
    return loadCerts({ ca, cert, key }, `slink ${slink}`);
  } catch (err) {
    throw new TargetArgError((err as Error).message, (err as DmError).code);
  }
}

/** The `tcp` transport. */
export const tcpSlink: SiteLinkType = {
  name: 'tcp',
  create(ctx: SlinkContext, slink: number, options: readonly string[]): SiteLink {
    const opts = readOptions(slink, 'tcp', options, KNOWN_OPTIONS);
    const retestMs = readRetest(slink, opts.get('retest'));
    const peerSpec = opts.get('peer');
    if (!peerSpec) throw new TargetArgError(`slink ${slink}: tcp needs peer=HOST:PORT (the receiving daemon's --replication-listen)`);
    let peer: { host: string; port: number };
    try {
      peer = parseListen(peerSpec, `slink ${slink}: peer`);
    } catch (err) {
      throw new TargetArgError((err as Error).message);
    }
    if (peer.port === 0) throw new TargetArgError(`slink ${slink}: peer '${peerSpec}' needs a port other than 0`);
    const secretFile = opts.get('secret');
    if (!secretFile) throw new TargetArgError(`slink ${slink}: tcp needs secret=FILE (the shared secret of the receiving daemon, mode 0600)`);
    let secret: Secret;
    try {
      secret = loadSecret(secretFile);
    } catch (err) {
      throw new TargetArgError(`slink ${slink}: ${(err as Error).message}`, (err as DmError).code);
    }
    const tls = choice(slink, 'tls', opts.get('tls'), ['on', 'off'] as const, 'off') === 'on';
    const certs = readCerts(slink, tls, opts);
    const crc = choice(slink, 'integrity', opts.get('integrity'), ['crc32c', 'none'] as const, 'crc32c') === 'crc32c';
    const compress = choice(slink, 'compress', opts.get('compress'), ['zstd', 'lz4', 'none'] as const, 'none');
    const timeoutMs = readSeconds(slink, 'io-timeout', opts.get('io-timeout'), DEFAULT_TIMEOUT_MS);
    const p = new Peer({
      host: peer.host, port: peer.port, secret, tls, certs, crc, codec: CODECS[compress], ioTimeoutMs: timeoutMs, reconnectMs: timeoutMs,
      groupId: ctx.groupId, slink, name: `${ctx.device} slink ${slink}`, log: ctx.log, changed: () => ctx.event(), roles: ctx.roles,
      judge: ctx.judge ? (site) => ctx.judge!(slink, site) : undefined,
    });
    return new TcpSlink(slink, retestMs, p, [...options], compress);
  },
};

