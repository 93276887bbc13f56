/**
 * Direct socket reads for the transmission phase. A plain net.Socket allocates a fresh
 * 64 KiB buffer for every read, and a WRITE payload spanning reads must then be copied into
 * one buffer: under 1 MiB writes that copy and the allocations' page faults were a third of
 * the main thread. Node's `onread` option (a caller-chosen buffer for each read) removes
 * both: requests are read into one reused staging buffer, and the rest of a large WRITE
 * payload is read by the kernel straight into the payload's own buffer.
 *
 * Node only offers `onread` for sockets it creates itself, so a connection accepted by
 * net.Server is re-wrapped: its stream handle moves to a new Socket built with `onread`
 * (the handle and its file descriptor stay the same; nothing is read or written twice).
 * That uses Node's socket internals (`_handle`, `_server`, the `handle` option), so it is
 * attempted only when everything it needs is there and the old socket has nothing buffered
 * either way; otherwise the connection keeps its plain socket and the copying path.
 * TLS sockets are never re-wrapped.
 */
import { Socket } from 'node:net';

export interface DirectReader {
  /** the buffer the next read goes into (called after every read, and once at the start) */
  buffer(): Buffer;
  /** `n` bytes arrived at the start of `buf`; return false to stop reading (pause) */
  data(n: number, buf: Buffer): boolean;
}

interface SocketInternals {
  _handle?: { readStop?: () => number; useUserBuffer?: unknown; reading?: boolean } | null;
  _server?: unknown;
  server?: unknown;
  encrypted?: boolean;
}

/**
 * The same connection as `old`, now reading through `reader`; `old` is left without a
 * handle (destroying it does nothing). Null when it cannot be done safely: the caller keeps
 * using `old`. The new socket starts paused: call resume().
 */
export function rewrapForDirectReads(old: Socket, reader: DirectReader): Socket | null {
  const o = old as unknown as SocketInternals;
  const handle = o._handle;
  if (!handle || typeof handle.useUserBuffer !== 'function' || typeof handle.readStop !== 'function') return null;
  if (o.encrypted || old.destroyed || old.connecting || !old.readable || !old.writable) return null;
  // bytes read but not delivered, or replies not yet handed to the kernel: keep the old socket
  if (old.readableLength > 0 || old.writableLength > 0) return null;
  handle.readStop();
  handle.reading = false;
  let s: Socket;
  try {
    s = new Socket({
      handle, pauseOnCreate: true, allowHalfOpen: false, readable: true, writable: true,
      onread: { buffer: () => reader.buffer(), callback: (n: number, buf: Uint8Array) => reader.data(n, buf as Buffer) },
    } as ConstructorParameters<typeof Socket>[0]);
  } catch {
    return null;
  }
  // the new socket owns the handle and the server's connection count from now on
  const n = s as unknown as SocketInternals;
  n._server = o._server;
  n.server = o.server;
  o._server = null;
  o._handle = null;
  old.removeAllListeners('data');
  return s;
}
