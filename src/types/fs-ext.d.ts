declare module 'fs-ext' {
  type FlockFlag = 'sh' | 'ex' | 'shnb' | 'exnb' | 'un';
  export function flockSync(fd: number, flags: FlockFlag): void;
  export function flock(fd: number, flags: FlockFlag, cb: (err: NodeJS.ErrnoException | null) => void): void;
  export function seekSync(fd: number, offset: number, whence: number): number;
  /** `cmd` may be a number (passed to fcntl(2) as is); returns fcntl's result */
  export function fcntlSync(fd: number, cmd: string | number, arg?: number): number;
  const _default: { flockSync: typeof flockSync; flock: typeof flock; seekSync: typeof seekSync; fcntlSync: typeof fcntlSync };
  export default _default;
}
