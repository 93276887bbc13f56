/**
 * One module for every error dmkit raises. Every error carries a stable `code`:
 * errno names on the I/O path (NBD replies carry errno values), `E…`-style names elsewhere.
 */

/** errno-style codes used on the I/O path and by the control protocol. */
export type ErrnoCode =
  | 'EIO' | 'EINVAL' | 'ENOSPC' | 'EROFS' | 'EPERM' | 'ENODEV' | 'ENXIO' | 'EBUSY'
  | 'EEXIST' | 'ENOENT' | 'ENOTSUP' | 'ESHUTDOWN' | 'EAGAIN' | 'ENOMEM' | 'EOVERFLOW'
  | 'ETIMEDOUT' | 'ECONNRESET' | 'EACCES';

export class DmError extends Error {
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = new.target.name;
  }
}

/** A failed bio. Never thrown past the core: it rejects the bio's promise. */
export class BlockError extends DmError {
  declare readonly code: ErrnoCode;
  constructor(code: ErrnoCode, message: string = code, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}

/** A table that cannot be loaded: names device, line, target type and argument. */
export class TableError extends DmError {
  readonly device: string;
  readonly line: number;
  readonly target: string | undefined;
  constructor(device: string, line: number, target: string | undefined, detail: string) {
    super('EINVAL', `${device}: line ${line}: ${target ? `${target}: ` : ''}${detail}`);
    this.device = device;
    this.line = line;
    this.target = target;
  }
}

/** A target constructor refusing its arguments; the table loader adds device and line. */
export class TargetArgError extends DmError {
  constructor(message: string, code = 'EINVAL') {
    super(code, message);
  }
}

/** Errors about mapped devices as a whole (unknown device, busy, exists…). */
export class DeviceError extends DmError {}

const KNOWN: ReadonlySet<string> = new Set([
  'EIO', 'EINVAL', 'ENOSPC', 'EROFS', 'EPERM', 'ENODEV', 'ENXIO', 'EBUSY', 'EEXIST', 'ENOENT',
  'ENOTSUP', 'ESHUTDOWN', 'EAGAIN', 'ENOMEM', 'EOVERFLOW', 'ETIMEDOUT', 'ECONNRESET', 'EACCES',
]);

/** Turn anything (a Node system error, a DmError, a string) into a BlockError; unknown → EIO. */
export function toBlockError(err: unknown): BlockError {
  if (err instanceof BlockError) return err;
  const code = (err as { code?: unknown })?.code;
  const message = err instanceof Error ? err.message : String(err);
  if (typeof code === 'string' && KNOWN.has(code)) return new BlockError(code as ErrnoCode, message, { cause: err });
  if (code === 'EDQUOT' || code === 'EFBIG') return new BlockError('ENOSPC', message, { cause: err });
  return new BlockError('EIO', message, { cause: err });
}
