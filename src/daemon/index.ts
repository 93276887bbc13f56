/** The daemon side of dmkit: start one in-process, or talk to one over its control socket. */
export { startDaemon, registerDaemonExtension, Daemon } from './daemon.ts';
export type { DaemonOptions, DaemonExtension, ExtensionFactory } from './daemon.ts';
export { ControlClient } from './client.ts';
export type { Stream } from './client.ts';
export { runtimeDir, stateDir, runtimePaths, stateFile } from './paths.ts';
export * from './protocol.ts';
