/**
 * The daemon's HTTP listener (`dmkit daemon --http-listen HOST:PORT`, docs/metrics.md and
 * docs/web.md), built on fastify:
 *
 *   GET  /metrics                     Prometheus text format (metrics.ts)
 *   GET  /api/status                  every device as `dmkit info --json` shows it, and the daemon
 *   GET  /api/devices/:name           one device
 *   GET  /api/devices/:name/heatmap   each remote site's dirty regions, in at most `cells` cells
 *   GET  /api/events                  server-sent events: the state of everything, then every change (`dmkit events`)
 *   POST /api/devices/:name/message   {sector, args}: a target message          } need the token
 *   POST /api/devices/:name/promote   {force}                                   } (--http-token FILE)
 *   POST /api/devices/:name/demote    {discard}                                 }
 *   GET  /                            the status page (page.ts)
 *
 * Read-only unless the daemon was given a token file: a request that would change state
 * gets 403 without one configured, 401 without the right `Authorization: Bearer <token>`.
 * Ops run through `runOp`, as on the control socket, so their checks and messages are the
 * same; an engine error becomes a status code from its errno (errors below).
 */
import crypto from 'node:crypto';
import type { ServerResponse } from 'node:http';
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import type { DeviceEvent } from '../core/device-events.ts';
import { log } from '../core/log.ts';
import { existing } from '../daemon/events.ts';
import { runOp } from '../daemon/ops.ts';
import type { ServerContext } from '../daemon/server.ts';
import { heatmap } from './heatmap.ts';
import { DaemonMetrics } from './metrics.ts';
import { registerPage } from './page.ts';

export interface HttpAppOptions {
  /** the token that allows changes; null: read-only */
  token: Buffer | null;
  /** most event streams open at once (default 64) */
  maxStreams?: number;
}

/** errno → HTTP status for engine errors */
const STATUS: Record<string, number> = {
  ENOENT: 404, ENXIO: 404, ENODEV: 404, EINVAL: 400, ERANGE: 400, E2BIG: 413, EBADMSG: 400, ENOSYS: 400,
  EEXIST: 409, EBUSY: 409, EAGAIN: 409, EPERM: 403, EACCES: 403, EROFS: 409, ENOSPC: 409, ETIMEDOUT: 504, ECANCELED: 409,
};

function httpError(reply: FastifyReply, err: unknown): FastifyReply {
  const code = (err as { code?: unknown })?.code;
  const status = typeof code === 'string' && STATUS[code] ? STATUS[code] : 500;
  return reply.code(status).send({ error: { code: typeof code === 'string' ? code : 'EIO', message: (err as Error)?.message ?? String(err) } });
}

/** constant-time comparison of a presented token with the configured one */
function tokenMatches(presented: string, token: Buffer): boolean {
  const a = crypto.createHash('sha256').update(presented).digest();
  const b = crypto.createHash('sha256').update(token).digest();
  return crypto.timingSafeEqual(a, b);
}

const NAME = { type: 'string', minLength: 1, maxLength: 127, pattern: '^[^/\\u0000]+$' } as const;
const BODY_LIMIT = 64 * 1024;

export function buildHttpApp(ctx: ServerContext, opts: HttpAppOptions): { app: FastifyInstance; closeStreams(): void } {
  const l = log('http');
  const metrics = new DaemonMetrics(ctx.dm);
  const streams = new Set<ServerResponse>();
  const maxStreams = opts.maxStreams ?? 64;
  const app = Fastify({
    logger: false,
    bodyLimit: BODY_LIMIT,
    maxParamLength: 256,
    requestTimeout: 30_000,
    forceCloseConnections: true,
    return503OnClosing: true,
    // a body with a property the schema does not name is refused (fastify's default strips it and goes on)
    ajv: { customOptions: { removeAdditional: false } },
  });
  const op = (name: string, args: Record<string, unknown>): Promise<unknown> => {
    const ac = new AbortController();
    return runOp(name, args, { ...ctx, signal: ac.signal, emit: () => {} }, l);
  };

  app.addHook('onSend', async (_req, reply) => {
    reply.header('x-content-type-options', 'nosniff');
    reply.header('content-security-policy', "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'");
    reply.header('referrer-policy', 'no-referrer');
  });

  // changes need the token; reads never do
  app.addHook('onRequest', async (req: FastifyRequest, reply: FastifyReply) => {
    if (req.method === 'GET' || req.method === 'HEAD') return;
    if (!opts.token) {
      return reply.code(403).send({ error: { code: 'EPERM', message: 'read-only: this daemon was started without --http-token FILE, so nothing can be changed over HTTP' } });
    }
    const m = /^Bearer\s+(\S+)$/i.exec(req.headers.authorization ?? '');
    if (!m || !tokenMatches(m[1]!, opts.token)) {
      l.warn(`${req.method} ${req.url} from ${req.ip}: ${m ? 'wrong token' : 'no token'}: refused`);
      return reply.code(401).header('www-authenticate', 'Bearer realm="dmkit"')
        .send({ error: { code: 'EACCES', message: m ? 'wrong token' : 'a change needs Authorization: Bearer <token> (the --http-token file of the daemon)' } });
    }
  });

  app.setNotFoundHandler((req, reply) => reply.code(404).send({ error: { code: 'ENOENT', message: `no such resource: ${req.method} ${req.url.slice(0, 200)}` } }));
  app.setErrorHandler((err: { statusCode?: number; code?: string; message: string }, _req, reply) => {
    // fastify's own refusals (bad JSON, body too large, schema) keep their 4xx status
    if (err.statusCode && err.statusCode < 500) return reply.code(err.statusCode).send({ error: { code: err.code ?? 'EINVAL', message: err.message } });
    return httpError(reply, err);
  });

  app.get('/metrics', async (_req, reply) => {
    const text = await metrics.scrape();
    return reply.type(metrics.contentType).send(text);
  });

  app.get('/api/status', async () => {
    const { devices } = (await op('list', {})) as { devices: unknown[] };
    const h = ctx.hello();
    return { daemon: { version: h.version, pid: h.pid, nbdTcp: h.nbdTcp, replicationTcp: h.replicationTcp, readOnly: !opts.token }, devices };
  });

  // an engine error thrown by a handler reaches the error handler above, which maps its errno
  app.get<{ Params: { name: string } }>('/api/devices/:name', { schema: { params: { type: 'object', properties: { name: NAME } } } },
    async (req) => op('info', { name: req.params.name }));

  app.get<{ Params: { name: string }; Querystring: { cells?: number } }>('/api/devices/:name/heatmap', {
    schema: {
      params: { type: 'object', properties: { name: NAME } },
      querystring: { type: 'object', properties: { cells: { type: 'integer', minimum: 1, maximum: 4096 } } },
    },
  }, async (req) => heatmap(ctx.dm, req.params.name, req.query.cells ?? 256));

  app.post<{ Params: { name: string }; Body: { sector?: number; args: string[] } }>('/api/devices/:name/message', {
    schema: {
      params: { type: 'object', properties: { name: NAME } },
      body: {
        type: 'object', required: ['args'], additionalProperties: false,
        properties: { sector: { type: 'integer', minimum: 0 }, args: { type: 'array', minItems: 1, maxItems: 64, items: { type: 'string', maxLength: 4096 } } },
      },
    },
  }, async (req) => op('message', { name: req.params.name, sector: req.body.sector ?? 0, args: req.body.args }));

  for (const verb of ['promote', 'demote'] as const) {
    const flag = verb === 'promote' ? 'force' : 'discard';
    app.post<{ Params: { name: string }; Body: Record<string, boolean> | undefined }>(`/api/devices/:name/${verb}`, {
      schema: {
        params: { type: 'object', properties: { name: NAME } },
        body: { type: 'object', additionalProperties: false, properties: { [flag]: { type: 'boolean' } } },
      },
    }, async (req) => op(verb, { name: req.params.name, [flag]: !!req.body?.[flag] }));
  }

  app.get('/api/events', (req, reply) => {
    if (streams.size >= maxStreams) {
      return reply.code(503).header('retry-after', '5').send({ error: { code: 'EBUSY', message: `too many event streams open (${maxStreams})` } });
    }
    reply.hijack();
    const res = reply.raw;
    res.writeHead(200, {
      'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-store', connection: 'keep-alive',
      'x-content-type-options': 'nosniff',
    });
    streams.add(res);
    const send = (ev: DeviceEvent): void => {
      if (!res.writableEnded) res.write(`id: ${ev.seq}\nevent: ${ev.kind}\ndata: ${JSON.stringify(ev)}\n\n`);
    };
    const items = existing(ctx.dm);
    ctx.dm.on('device-event', send);
    for (const it of items) send(it);
    res.write(': end of snapshot\n\n');
    const ping = setInterval(() => res.write(': keep-alive\n\n'), 15_000);
    ping.unref();
    const done = (): void => {
      clearInterval(ping);
      ctx.dm.off('device-event', send);
      streams.delete(res);
    };
    req.raw.on('close', done);
    res.on('error', done);
  });

  registerPage(app);
  return {
    app,
    closeStreams: () => {
      for (const r of streams) r.end();
    },
  };
}
