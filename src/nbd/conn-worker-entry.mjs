// A connection thread starts here (conn-threads.ts). dmkit runs from its TypeScript sources
// through tsx, and a worker thread does not inherit the parent's loader: register it first.
import { register } from 'tsx/esm/api';

register();
await import('./conn-worker.ts');
