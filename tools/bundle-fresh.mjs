// Is a bundle in dist/ (tools/build.mjs) newer than package.json and every file under src/
// and tools/? Its users (bin/dmkit.js, src/nbd/conn-worker-entry.mjs) run a fresh bundle and
// fall back to the TypeScript sources through tsx otherwise, so an edit never runs stale code.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

function newerThan(dir, t) {
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory() ? newerThan(p, t) : fs.statSync(p).mtimeMs > t) return true;
  }
  return false;
}

/** `name` is a file in dist/; true if it exists and is newer than every source */
export function bundleIsFresh(name) {
  try {
    const t = fs.statSync(path.join(root, 'dist', name)).mtimeMs;
    return fs.statSync(path.join(root, 'package.json')).mtimeMs <= t
      && !newerThan(path.join(root, 'src'), t) && !newerThan(path.join(root, 'tools'), t);
  } catch {
    return false;
  }
}
