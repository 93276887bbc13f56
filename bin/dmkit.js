#!/usr/bin/env node
// Entry point for `npx dmkit`: registers tsx's loader in-process and runs the TypeScript CLI.
import { register } from 'tsx/esm/api';

register();
await import('../tools/dmkit.ts');
