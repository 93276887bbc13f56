/**
 * A minimal NBD client over a raw socket for protocol tests: it sends exactly the bytes a
 * test asks for and decodes what comes back, independently of the server's own code.
 */
import { connect, type Socket } from 'node:net';

export const MAGIC = {
  nbd: 0x4e42444d41474943n,
  opt: 0x49484156454f5054n,
  optReply: 0x0003e889045565a9n,
  request: 0x25609513,
  simple: 0x67446698,
  chunk: 0x668e33ef,
};

/** the option and command numbers the tests send */
export const OPT = { go: 7, structuredReply: 8, setMetaContext: 10 } as const;
export const CMD = { read: 0, write: 1 } as const;

export interface OptReply { opt: number; type: number; data: Buffer }
export type Reply =
  | { kind: 'simple'; cookie: bigint; errno: number; data: Buffer }
  | { kind: 'chunk'; cookie: bigint; flags: number; type: number; data: Buffer };

export class RawNbd {
  readonly socket: Socket;
  #chunks: Buffer[] = [];
  #have = 0;
  #waiter: (() => void) | null = null;
  #want = 0;
  #ended = false;
  /** cookie → READ length, for decoding simple READ replies */
  readonly #reads = new Map<bigint, number>();
  #nextCookie = 1n;

  readonly #onData = (c: Buffer): void => {
    this.#chunks.push(c);
    this.#have += c.length;
    if (this.#have >= this.#want) this.#wake();
  };
  readonly #onEnd = (): void => {
    this.#ended = true;
    this.#wake();
  };

  private constructor(socket: Socket) {
    this.socket = socket;
    socket.on('data', this.#onData);
    socket.on('end', this.#onEnd);
    socket.on('close', this.#onEnd);
    socket.on('error', this.#onEnd);
  }

  /** a client over an already-connected socket (e.g. a TLS socket after STARTTLS) */
  static over(socket: Socket): RawNbd {
    return new RawNbd(socket);
  }

  /** stop reading (before handing the socket to TLS); unread bytes must be none */
  detach(): Socket {
    this.socket.off('data', this.#onData);
    this.socket.off('end', this.#onEnd);
    this.socket.off('close', this.#onEnd);
    this.socket.off('error', this.#onEnd);
    if (this.#have !== 0) throw new Error(`${this.#have} unread bytes at detach`);
    return this.socket;
  }

  static connect(path: string): Promise<RawNbd> {
    return new Promise((resolve, reject) => {
      const s = connect(path);
      s.once('connect', () => resolve(new RawNbd(s)));
      s.once('error', reject);
    });
  }

  #wake(): void {
    const w = this.#waiter;
    this.#waiter = null;
    w?.();
  }

  /** true once the server closed the connection */
  get ended(): boolean {
    return this.#ended;
  }

  async read(n: number): Promise<Buffer> {
    while (this.#have < n) {
      if (this.#ended) throw new Error(`connection closed (wanted ${n}, have ${this.#have})`);
      this.#want = n;
      await new Promise<void>((r) => { this.#waiter = r; });
    }
    this.#want = 0;
    const all = this.#chunks.length === 1 ? this.#chunks[0]! : Buffer.concat(this.#chunks, this.#have);
    const out = all.subarray(0, n);
    this.#chunks = all.length > n ? [all.subarray(n)] : [];
    this.#have -= n;
    return out;
  }

  /** resolves when the server has closed the connection */
  async closed(): Promise<void> {
    while (!this.#ended) await new Promise<void>((r) => { this.#waiter = r; });
  }

  write(b: Buffer): void {
    this.socket.write(b);
  }

  // ---------------------------------------------------------------- handshake

  /** read the greeting and send client flags; returns the server handshake flags */
  async greet(clientFlags = 3): Promise<number> {
    const g = await this.read(18);
    if (g.readBigUInt64BE(0) !== MAGIC.nbd || g.readBigUInt64BE(8) !== MAGIC.opt) throw new Error('bad greeting');
    const f = Buffer.alloc(4);
    f.writeUInt32BE(clientFlags);
    this.write(f);
    return g.readUInt16BE(16);
  }

  /** an option header claiming `length` data bytes; any magic, for hostile input */
  static optionHeader(opt: number, length: number, magic = MAGIC.opt): Buffer {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(magic, 0);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(length >>> 0, 12);
    return h;
  }

  /** a whole option: header and data */
  static option(opt: number, data: Buffer = Buffer.alloc(0)): Buffer {
    return Buffer.concat([RawNbd.optionHeader(opt, data.length), data]);
  }

  sendOption(opt: number, data: Buffer = Buffer.alloc(0)): void {
    this.write(RawNbd.option(opt, data));
  }

  async readOptReply(): Promise<OptReply> {
    const h = await this.read(20);
    if (h.readBigUInt64BE(0) !== MAGIC.optReply) throw new Error('bad option reply magic');
    const len = h.readUInt32BE(16);
    return { opt: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await this.read(len) };
  }

  /** replies to one option, up to and including the final ACK or error */
  async optionReplies(): Promise<OptReply[]> {
    const out: OptReply[] = [];
    for (;;) {
      const r = await this.readOptReply();
      out.push(r);
      if (r.type === 1 || r.type >= 0x80000000) return out;
    }
  }

  static nameData(name: string, tail: Buffer): Buffer {
    const n = Buffer.from(name);
    const len = Buffer.alloc(4);
    len.writeUInt32BE(n.length);
    return Buffer.concat([len, n, tail]);
  }

  static goData(name: string, infos: number[] = []): Buffer {
    const t = Buffer.alloc(2 + 2 * infos.length);
    t.writeUInt16BE(infos.length, 0);
    infos.forEach((x, i) => t.writeUInt16BE(x, 2 + 2 * i));
    return RawNbd.nameData(name, t);
  }

  static metaData(name: string, queries: string[]): Buffer {
    const parts: Buffer[] = [Buffer.alloc(4)];
    parts[0]!.writeUInt32BE(queries.length);
    for (const q of queries) {
      const l = Buffer.alloc(4);
      l.writeUInt32BE(Buffer.byteLength(q));
      parts.push(l, Buffer.from(q));
    }
    return RawNbd.nameData(name, Buffer.concat(parts));
  }

  /** greet, optionally negotiate SR and base:allocation, then GO; returns size and flags */
  async open(name: string, opts: { sr?: boolean; meta?: boolean } = {}): Promise<{ size: number; flags: number }> {
    await this.greet();
    if (opts.sr) {
      this.sendOption(OPT.structuredReply);
      expectAck(await this.optionReplies());
    }
    if (opts.meta) {
      this.sendOption(OPT.setMetaContext, RawNbd.metaData(name, ['base:allocation']));
      expectAck(await this.optionReplies());
    }
    this.sendOption(OPT.go, RawNbd.goData(name));
    const replies = await this.optionReplies();
    expectAck(replies);
    const info = replies.find((r) => r.type === 3 && r.data.readUInt16BE(0) === 0);
    if (!info) throw new Error('no INFO_EXPORT');
    return { size: Number(info.data.readBigUInt64BE(2)), flags: info.data.readUInt16BE(10) };
  }

  // ---------------------------------------------------------------- transmission

  static request(type: number, flags: number, cookie: bigint, offset: number | bigint, length: number): Buffer {
    const b = Buffer.alloc(28);
    b.writeUInt32BE(MAGIC.request, 0);
    b.writeUInt16BE(flags, 4);
    b.writeUInt16BE(type, 6);
    b.writeBigUInt64BE(cookie, 8);
    b.writeBigUInt64BE(BigInt(offset), 16);
    b.writeUInt32BE(length >>> 0, 24);
    return b;
  }

  /** encode a request (and payload) without sending it; READs are remembered for decoding */
  encode(type: number, opts: { flags?: number; offset?: number | bigint; length?: number; payload?: Buffer; cookie?: bigint } = {}): { cookie: bigint; bytes: Buffer } {
    const cookie = opts.cookie ?? this.#nextCookie++;
    const length = opts.length ?? opts.payload?.length ?? 0;
    if (type === CMD.read) this.#reads.set(cookie, length);
    const hdr = RawNbd.request(type, opts.flags ?? 0, cookie, opts.offset ?? 0, length);
    return { cookie, bytes: opts.payload ? Buffer.concat([hdr, opts.payload]) : hdr };
  }

  send(type: number, opts: Parameters<RawNbd['encode']>[1] = {}): bigint {
    const { cookie, bytes } = this.encode(type, opts);
    this.write(bytes);
    return cookie;
  }

  async readReply(): Promise<Reply> {
    const m = (await this.read(4)).readUInt32BE(0);
    if (m === MAGIC.simple) {
      const h = await this.read(12);
      const errno = h.readUInt32BE(0);
      const cookie = h.readBigUInt64BE(4);
      const rlen = this.#reads.get(cookie);
      this.#reads.delete(cookie);
      const data = errno === 0 && rlen !== undefined ? await this.read(rlen) : Buffer.alloc(0);
      return { kind: 'simple', cookie, errno, data };
    }
    if (m === MAGIC.chunk) {
      const h = await this.read(16);
      const flags = h.readUInt16BE(0);
      const cookie = h.readBigUInt64BE(4);
      const data = await this.read(h.readUInt32BE(12));
      if (flags & 1) this.#reads.delete(cookie);
      return { kind: 'chunk', cookie, flags, type: h.readUInt16BE(2), data };
    }
    throw new Error(`bad reply magic 0x${m.toString(16)}`);
  }

  /** read replies until every cookie in `cookies` is complete; returns them grouped */
  async collect(cookies: bigint[]): Promise<Map<bigint, Reply[]>> {
    const out = new Map<bigint, Reply[]>(cookies.map((c) => [c, []]));
    const open = new Set(cookies);
    while (open.size > 0) {
      const r = await this.readReply();
      const list = out.get(r.cookie);
      if (!list) throw new Error(`reply for unexpected cookie ${r.cookie}`);
      list.push(r);
      if (r.kind === 'simple' || (r.flags & 1) !== 0) open.delete(r.cookie);
    }
    return out;
  }

  async roundTrip(type: number, opts: Parameters<RawNbd['encode']>[1] = {}): Promise<Reply[]> {
    const c = this.send(type, opts);
    return (await this.collect([c])).get(c)!;
  }

  destroy(): void {
    this.socket.destroy();
  }
}

export function expectAck(replies: OptReply[]): void {
  const last = replies[replies.length - 1];
  if (!last || last.type !== 1) {
    throw new Error(`expected ACK, got 0x${last?.type.toString(16)} ${last?.data.toString()}`);
  }
}

/** the errno of a reply list: simple errno, or the ERROR chunk's value, or 0 */
export function replyErrno(replies: Reply[]): number {
  for (const r of replies) {
    if (r.kind === 'simple') return r.errno;
    if (r.type & 0x8000) return r.data.readUInt32BE(0);
  }
  return 0;
}

/** reassemble a structured READ's OFFSET_DATA chunks (or a simple reply) into one buffer */
export function readData(replies: Reply[], offset: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  let covered = 0;
  for (const r of replies) {
    if (r.kind === 'simple') return r.data;
    if (r.type === 1) {
      const at = Number(r.data.readBigUInt64BE(0)) - offset;
      r.data.copy(out, at, 8);
      covered += r.data.length - 8;
    }
  }
  if (covered !== length) throw new Error(`chunks cover ${covered} of ${length} bytes`);
  return out;
}
