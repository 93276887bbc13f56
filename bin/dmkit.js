#!/usr/bin/env node
// Entry point for `npx dmkit`. Runs the bundled CLI (dist/dmkit.mjs, built by `npm ci` /
// `npm run build`) while it is newer than every source file; otherwise, and for the daemon
// (whose plugins may import dmkit's TypeScript sources), registers tsx and runs the sources.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { bundleIsFresh } from '../tools/bundle-fresh.mjs';

const bin = fileURLToPath(import.meta.url);
const root = path.resolve(path.dirname(bin), '..');
const bundle = path.join(root, 'dist', 'dmkit.mjs');
globalThis.DMKIT_BIN = bin; // how the CLI re-runs itself to start a daemon

if (!process.argv.slice(2).includes('daemon') && bundleIsFresh('dmkit.mjs')) {
  await import(pathToFileURL(bundle).href);
} else {
  const { register } = await import('tsx/esm/api');
  register();
  await import('../tools/dmkit.ts');
}
