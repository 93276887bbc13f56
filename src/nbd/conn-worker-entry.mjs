// A connection thread starts here (conn-threads.ts): from the bundle tools/build.mjs made
// while it is fresh, else from the TypeScript sources through tsx (a worker thread does not
// inherit the parent's loader).
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { bundleIsFresh, root } from '../../tools/bundle-fresh.mjs';

if (bundleIsFresh('conn-worker.mjs')) {
  await import(pathToFileURL(path.join(root, 'dist', 'conn-worker.mjs')).href);
} else {
  const { register } = await import('tsx/esm/api');
  register();
  await import('./conn-worker.ts');
}
