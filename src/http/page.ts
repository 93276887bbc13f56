/**
 * The status page: static files in src/http/page/ (index.html, its script and style),
 * served by @fastify/static at `/`. The page reads /api/status and /api/devices/:name/heatmap
 * and follows /api/events; it holds no state of its own.
 */
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import fastifyStatic from '@fastify/static';
import type { FastifyInstance } from 'fastify';

const ROOT = path.join(path.dirname(fileURLToPath(import.meta.url)), 'page');

export function registerPage(app: FastifyInstance): void {
  void app.register(fastifyStatic, { root: ROOT, prefix: '/', index: ['index.html'], dotfiles: 'deny', cacheControl: false });
}
