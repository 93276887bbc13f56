// dmkit's live status page (docs/web.md). Plain browser JavaScript, no build step, no
// inline script or style (the daemon sends Content-Security-Policy: default-src 'self').
//
// It holds no state of its own: it reads api/status and each replication group's
// api/devices/NAME/heatmap, and follows api/events (server-sent events). Every event
// schedules a re-read, at most about 4 per second; while background work runs (a resync,
// a verify, a backlog to ship) it also re-reads every 2 s, otherwise every 10 s. The page
// is never reloaded. Everything is built with DOM calls (textContent), never from HTML
// text, so a device name cannot inject markup.
//
// Stable hooks for tests and scripts (data attributes):
//   #conn[data-state]                  connecting | live | lost
//   [data-group=REPL]                  a replication group: data-role, data-split-brain
//   [data-site="REPL/SLINK"]           a remote site: data-state, data-mode, data-consistent,
//                                      data-connection, data-lag-ios; its progress bar
//                                      [data-progress] with data-work, data-done, data-total
//   [data-heat="DEV/SLINK"]            a heat map: data-out-of-sync, data-regions; its cells
//                                      [data-cell], dirty ones with [data-dirty]
//   [data-node=NAME]                   a device in the stack tree (nested: what it sits on);
//                                      its row [data-device=NAME] with data-state, data-role
//   [data-alert]                       split-brain, connection
//   #events li[data-seq]               the recent events

const API = 'api/';
const MIN_REFRESH_MS = 250; // at most ~4 re-reads per second
const BUSY_POLL_MS = 2000; // while a resync/verify runs or a backlog is shipped
const IDLE_POLL_MS = 10000;
const HEAT_CELLS = 256;
const HEAT_COLUMNS = 64;
const MAX_EVENTS = 40;
const SSE_KINDS = ['exists', 'create', 'change', 'destroy'];

/** what the page knows; rendered from here */
const model = {
  status: null,
  /** replicator name → heat map reply */
  heat: new Map(),
  /** connection to the event stream: connecting | live | lost */
  conn: 'connecting',
  lostSince: null,
  reconnects: 0,
  /** when the stream came back after being lost */
  restoredAt: 0,
  /** the last re-read failed: its message */
  apiError: null,
  updated: null,
  /** recent change/create/destroy events, newest first */
  events: [],
};

// ---------------------------------------------------------------- DOM helpers

/** h('tr', {class: 'x', 'data-site': 'r/1'}, child…): children are nodes, strings or arrays */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'title') el.title = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

function badge(text, cls, attrs) {
  return h('span', { class: `badge ${cls ?? ''}`.trim(), ...attrs }, text);
}

// ---------------------------------------------------------------- formatting

function bytes(n) {
  if (n === null || n === undefined || !Number.isFinite(n)) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${v} B` : `${v < 10 ? v.toFixed(1) : Math.round(v)} ${units[i]}`;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return '–';
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}:${String(s % 60).padStart(2, '0')}`;
  return `${Math.floor(m / 60)}:${String(m % 60).padStart(2, '0')}:${String(s % 60).padStart(2, '0')}`;
}

function age(ms) {
  if (!ms) return '0 s';
  return ms < 1000 ? `${ms} ms` : duration(ms / 1000);
}

function clock(d) {
  return d.toLocaleTimeString([], { hour12: false });
}

function basename(p) {
  const i = p.lastIndexOf('/');
  return i >= 0 && i < p.length - 1 ? p.slice(i + 1) : p;
}

// ---------------------------------------------------------------- reading the API

async function getJson(path) {
  const res = await fetch(API + path, { cache: 'no-store', headers: { accept: 'application/json' } });
  const body = await res.json().catch(() => null);
  if (!res.ok) {
    const err = new Error(body?.error?.message ?? `${res.status} ${res.statusText}`);
    err.status = res.status;
    throw err;
  }
  return body;
}

function groupsOf(status) {
  return status.devices.filter((d) => d.types.includes('replicator') && d.replication && Array.isArray(d.replication.sites));
}

async function refresh() {
  const status = await getJson('status');
  const heat = new Map();
  await Promise.all(groupsOf(status).map(async (g) => {
    try {
      heat.set(g.name, await getJson(`devices/${encodeURIComponent(g.name)}/heatmap?cells=${HEAT_CELLS}`));
    } catch (err) {
      if (err.status !== 404) throw err; // removed meanwhile: the next re-read drops it
    }
  }));
  model.status = status;
  model.heat = heat;
  model.apiError = null;
  model.updated = new Date();
}

// one re-read at a time, at most one per MIN_REFRESH_MS; requests meanwhile fold into one
let refreshing = false;
let pending = false;
let lastRefresh = 0;
let refreshTimer = null;
let pollTimer = null;

function scheduleRefresh() {
  pending = true;
  if (refreshing || refreshTimer) return;
  refreshTimer = setTimeout(runRefresh, Math.max(0, lastRefresh + MIN_REFRESH_MS - Date.now()));
}

async function runRefresh() {
  refreshTimer = null;
  pending = false;
  refreshing = true;
  lastRefresh = Date.now();
  try {
    await refresh();
  } catch (err) {
    model.apiError = err.message || String(err);
  } finally {
    refreshing = false;
  }
  render();
  if (pending) scheduleRefresh();
  schedulePoll();
}

/** background work or a backlog: its progress and lag move without events */
function busy() {
  if (!model.status || model.apiError) return true;
  for (const d of model.status.devices) {
    if (d.progress) return true;
    for (const s of d.replication?.sites ?? []) {
      if (s.resync || s.mode === 'dirty-log' || (s.lag && s.lag.ios > 0)) return true;
    }
  }
  return false;
}

function schedulePoll() {
  clearTimeout(pollTimer);
  pollTimer = setTimeout(scheduleRefresh, busy() ? BUSY_POLL_MS : IDLE_POLL_MS);
}

// ---------------------------------------------------------------- the event stream

let source = null;
let restoredTimer = null;

function connect() {
  source = new EventSource(`${API}events`);
  source.addEventListener('open', () => {
    const wasLost = model.conn === 'lost';
    model.conn = 'live';
    model.lostSince = null;
    if (wasLost) {
      model.reconnects++;
      model.restoredAt = Date.now();
      clearTimeout(restoredTimer);
      restoredTimer = setTimeout(renderConn, 10100);
    }
    renderConn();
    scheduleRefresh();
  });
  source.addEventListener('error', () => {
    if (model.conn !== 'lost') {
      model.conn = 'lost';
      model.lostSince = new Date();
      renderConn();
    }
    // the browser retries by itself while CONNECTING; a refusal (e.g. 503: too many
    // streams) closes the stream for good: open a new one later
    if (source.readyState === EventSource.CLOSED) {
      source = null;
      setTimeout(connect, 3000);
    }
  });
  for (const kind of SSE_KINDS) {
    source.addEventListener(kind, (msg) => {
      let ev;
      try {
        ev = JSON.parse(msg.data);
      } catch {
        return;
      }
      if (ev.kind !== 'exists') noteEvent(ev);
      scheduleRefresh();
    });
  }
}

function noteEvent(ev) {
  // a replicator's site events are repeated on each of its replicator-devs: keep the group's
  const dev = model.status?.devices.find((d) => d.name === ev.name);
  if (ev.object === 'site' && dev?.types.includes('replicator-dev')) return;
  model.events.unshift(ev);
  model.events.length = Math.min(model.events.length, MAX_EVENTS);
  renderEvents();
}

// ---------------------------------------------------------------- rendering

/** what each section was last built from */
const builtFrom = new WeakMap();

/** replace `el`'s children only when what they show changed */
function update(el, key, build) {
  if (builtFrom.get(el) === key) return;
  builtFrom.set(el, key);
  el.replaceChildren(...[build()].flat());
}

function render() {
  renderHeader();
  renderConn();
  renderAlerts();
  if (!model.status) return;
  const groups = groupsOf(model.status);
  update(document.getElementById('groups'), JSON.stringify([groups, [...model.heat], model.status.devices.map((d) => d.replication?.replicator ?? '')]), () => renderGroups(groups));
  update(document.getElementById('devices'), JSON.stringify(model.status.devices), () => renderDevices(model.status.devices));
  document.title = `${problems().length ? '⚠ ' : ''}dmkit status`;
}

function renderHeader() {
  renderAuth();
  const d = model.status?.daemon;
  const el = document.getElementById('daemon');
  el.textContent = d ? `daemon ${d.version}, pid ${d.pid}${d.readOnly ? ', read-only over HTTP' : ''}` : 'daemon: …';
  document.getElementById('updated').textContent = model.updated ? `updated ${clock(model.updated)}` : '';
}

function renderConn() {
  const el = document.getElementById('conn');
  el.dataset.state = model.conn;
  el.dataset.reconnects = String(model.reconnects);
  let text;
  if (model.conn === 'connecting') text = 'connecting…';
  else if (model.conn === 'lost') text = `connection lost at ${clock(model.lostSince)}, retrying…`;
  else if (model.restoredAt && Date.now() - model.restoredAt < 10000) text = `live (connection restored at ${clock(new Date(model.restoredAt))})`;
  else text = 'live';
  el.textContent = text;
  document.body.classList.toggle('stale', model.conn === 'lost' || !!model.apiError);
  renderAlerts();
}

function problems() {
  const out = [];
  for (const g of model.status ? groupsOf(model.status) : []) {
    if (g.replication.splitBrain) out.push({ kind: 'split-brain', group: g.name, text: g.replication.splitBrain });
  }
  return out;
}

function renderAlerts() {
  const el = document.getElementById('alerts');
  const items = [];
  if (model.conn === 'lost') {
    items.push(h('div', { class: 'alert warn', 'data-alert': 'connection' },
      h('strong', null, 'Connection to the daemon lost'), ` at ${clock(model.lostSince)}; retrying. What is shown below may be out of date.`));
  } else if (model.apiError) {
    items.push(h('div', { class: 'alert warn', 'data-alert': 'api' }, h('strong', null, 'Reading the status failed: '), model.apiError));
  }
  for (const p of problems()) {
    items.push(h('div', { class: 'alert critical', 'data-alert': p.kind, 'data-group': p.group },
      h('strong', null, `SPLIT BRAIN in group ${p.group}`), ': ', p.text));
  }
  update(el, JSON.stringify(items.map((i) => i.outerHTML)), () => items);
}

function renderEvents() {
  const el = document.getElementById('events');
  el.replaceChildren(...model.events.map((ev) => h('li', { 'data-seq': ev.seq, 'data-name': ev.name, 'data-state': ev.state },
    h('time', { datetime: ev.time }, clock(new Date(ev.time))), ' ',
    h('span', { class: 'ev-name' }, ev.object === 'site' ? `${ev.name}/${ev.slink}` : ev.name), ' ',
    stateBadge(ev.state), ' ',
    h('span', { class: 'ev-text' }, ev.text || ev.op || ev.kind))));
  if (!model.events.length) el.replaceChildren(h('li', { class: 'empty' }, 'none yet'));
}

const STATE_CLASS = {
  active: 'ok', suspended: 'warn', removed: 'off',
  synchronous: 'ok', asynchronous: 'ok', 'forced-synchronous': 'warn', 'pulled-ahead': 'warn',
  resyncing: 'busy', down: 'bad', local: 'off', 'in-sync': 'ok',
};

function stateBadge(state, attrs) {
  return badge(state, `state-${STATE_CLASS[state] ?? 'off'}`, attrs);
}

// ---- replication groups

function renderGroups(groups) {
  if (!groups.length) return h('p', { class: 'empty' }, 'No replication groups (no replicator device).');
  return groups.map(renderGroup);
}

function roleOf(repl) {
  return repl?.role ?? null;
}

function renderGroup(g) {
  const r = g.replication;
  const members = model.status.devices.filter((d) => d.replication?.replicator === `dm:${g.name}`);
  const heat = model.heat.get(g.name);
  const log = r.replog ?? {};
  const used = log.sizeSectors ? log.usedSectors / log.sizeSectors : 0;
  return h('article', { class: `group${r.splitBrain ? ' split-brain' : ''}`, 'data-group': g.name, 'data-role': r.role, 'data-split-brain': r.splitBrain ? 'true' : 'false' },
    h('header', null,
      h('h3', null, g.name),
      badge(r.role ?? '?', `role role-${r.role}`, { 'data-role': r.role }),
      g.state === 'SUSPENDED' ? stateBadge('suspended') : null,
      r.fresh ? badge('fresh', 'off', { title: 'never written as primary' }) : null,
      r.role === 'secondary' ? badge(r.consistent ? 'consistent' : 'inconsistent', r.consistent ? 'state-ok' : 'state-bad') : null,
      r.discardMyData ? badge('discard-my-data', 'state-warn', { title: 'the next primary to connect overwrites this side\'s changes' }) : null,
      h('span', { class: 'gen muted', title: 'generation id' }, `generation ${r.generation ?? '–'}`),
      canChange() ? h('span', { class: 'actions' },
        r.role === 'secondary' ? actionButton('promote', g.name, null, 'Promote', 'make this group primary (dmkit promote)')
          : actionButton('demote', g.name, null, 'Demote', 'make this group secondary (dmkit demote)')) : null),
    r.splitBrain ? h('p', { class: 'alert critical' }, h('strong', null, 'Split brain: '), r.splitBrain) : null,
    h('dl', { class: 'facts' },
      h('dt', null, 'devices'), h('dd', null, members.length ? members.map((m, i) => [i ? ', ' : '', m.name, h('span', { class: 'muted' }, ` (dev ${m.replication.devNr})`)]) : '–'),
      h('dt', null, 'log'), h('dd', null, `${log.type ?? '?'}: `, meter(used, `${bytes(log.usedSectors * 512)} of ${bytes(log.sizeSectors * 512)} used`), ` ${Math.round(used * 100)}% of ${bytes(log.sizeSectors * 512)}`),
      h('dt', null, 'writes'), h('dd', null, r.statistics ? `${r.statistics.writes} (${bytes(r.statistics.writeBytes)}), ${r.statistics.overflows} log overflow(s)` : '–'),
      h('dt', null, 'resync pace'), h('dd', null, r.resyncControl ? (r.resyncControl.mode === 'auto' ? 'auto' : r.resyncControl.limit ? `${bytes(r.resyncControl.limit)}/s` : 'unlimited') : '–')),
    renderSites(g, r),
    renderHeat(g.name, heat));
}

function meter(fraction, title) {
  return h('meter', { min: 0, max: 1, low: 0.7, high: 0.9, optimum: 0, value: Math.min(1, Math.max(0, fraction)), title });
}

function connectionOf(s) {
  if (s.link?.connection) return s.link.connection; // tcp
  if (s.link?.state) return s.link.state; // nbd
  if (s.transport) return s.transport;
  if (s.state === 'suspended') return 'suspended';
  return s.state === 'down' ? 'unreachable' : 'attached';
}

function renderSites(g, r) {
  const sites = r.sites.filter((s) => s.state !== 'local');
  const local = r.sites.find((s) => s.state === 'local');
  if (!sites.length) return h('p', { class: 'empty' }, 'No remote sites.');
  return h('table', { class: 'sites' },
    h('caption', null, `Remote sites (slink 0, ${local?.type ?? 'local'}: this site)`),
    h('thead', null, h('tr', null, ['site', 'state', 'connection', 'policy', 'consistent', 'lag', 'shipped', 'resync / verify', 'errors', canChange() ? 'actions' : null]
      .filter(Boolean).map((t) => h('th', { scope: 'col' }, t)))),
    h('tbody', null, sites.map((s) => renderSite(g, s))));
}

function renderSite(g, s) {
  const conn = connectionOf(s);
  const peer = s.link?.peer ? ` ${s.link.peer}` : '';
  const verify = s.lastVerify ? `last verify: ${s.lastVerify.differing} of ${s.lastVerify.regions} region(s) differed` : null;
  return h('tr', {
    'data-site': `${g.name}/${s.slink}`, 'data-state': s.state, 'data-mode': s.mode, 'data-consistent': String(!!s.consistent),
    'data-connection': conn, 'data-lag-ios': s.lag?.ios ?? 0, class: `site state-row-${STATE_CLASS[s.state] ?? 'off'}`,
  },
  h('th', { scope: 'row' }, `slink ${s.slink}`, h('div', { class: 'muted small' }, s.type)),
  h('td', null, stateBadge(s.state, { 'data-role': 'state' }), h('div', { class: 'muted small' }, s.mode)),
  h('td', null, h('span', { class: `conn conn-${conn}` }, conn), peer ? h('div', { class: 'muted small' }, peer) : null,
    s.link?.tls ? h('div', { class: 'muted small' }, `TLS (${s.link.tlsMode})`) : null),
  h('td', null, s.policy ?? '–', s.fallBehind ? h('div', { class: 'muted small' }, `fall-behind ${s.fallBehind}`) : null),
  h('td', null, s.consistent ? badge('yes', 'state-ok') : badge('no', 'state-bad', { title: 'the site\'s image is not an in-order copy until the resync ends' })),
  h('td', { class: 'num' }, s.lag ? [`${s.lag.ios} io, ${bytes(s.lag.bytes)}`, h('div', { class: 'muted small' }, `oldest ${age(s.lag.ageMs)}`)] : '–'),
  h('td', { class: 'num' }, s.shipped ? [`${s.shipped.ios} io`, h('div', { class: 'muted small' }, bytes(s.shipped.bytes))] : '–',
    s.resyncedBytes ? h('div', { class: 'muted small' }, `resynced ${bytes(s.resyncedBytes)}`) : null),
  h('td', { class: 'work' }, renderWork(g, s), verify ? h('div', { class: 'muted small' }, verify) : null),
  h('td', null, String(s.errors ?? 0), s.lastError ? h('div', { class: 'error small', title: s.lastError }, s.lastError) : null),
  canChange() ? h('td', { class: 'actions' },
    s.state === 'suspended' ? actionButton('resume', g.name, s.slink, 'Resume', `slink resume ${s.slink}`)
      : actionButton('suspend', g.name, s.slink, 'Suspend', `slink suspend ${s.slink}: stop shipping to this site`),
    actionButton('resync', g.name, s.slink, 'Resync', `resync ${s.slink}: copy the regions out of sync now`),
    actionButton('verify', g.name, s.slink, 'Verify', `verify ${s.slink}: compare the site with this one by digests`)) : null);
}

function renderWork(g, s) {
  const w = s.resync;
  if (!w) return h('span', { class: 'muted' }, s.mode === 'dirty-log' ? 'waits for the site' : 'idle');
  const pct = w.total ? Math.floor((w.done / w.total) * 100) : 0;
  // the site's own measured rate; else the group device's (one run at a time)
  let rate = s.resyncFlow?.rate ?? 0;
  if (!rate && g.progress?.work === w.work) rate = g.progress.rate;
  const left = (w.total - w.done) * 512;
  const eta = rate > 0 ? left / rate : null;
  const running = s.state === 'resyncing' || w.work === 'verify';
  return h('div', { class: 'progress' },
    h('progress', { max: w.total || 1, value: w.done, 'data-progress': `${g.name}/${s.slink}`, 'data-work': w.work, 'data-done': w.done, 'data-total': w.total }),
    h('div', { class: 'small' }, `${w.work} ${pct}% (${bytes(w.done * 512)} of ${bytes(w.total * 512)})`),
    h('div', { class: 'muted small', 'data-rate': Math.round(rate) }, running ? (rate > 0 ? `${bytes(rate)}/s, ETA ${duration(eta)}` : 'measuring rate…') : `paused while ${s.state}`));
}

// ---- changes (only when the daemon has --http-token; each asks for the token)

function canChange() {
  return model.status?.daemon && model.status.daemon.readOnly === false;
}

function actionButton(action, device, slink, label, title) {
  return h('button', { type: 'button', class: 'action', 'data-action': action, 'data-target': slink === null ? device : `${device}/${slink}`, title }, label);
}

/** what each button sends: its route and body */
const ACTIONS = {
  promote: (dev) => ({ path: `devices/${encodeURIComponent(dev)}/promote`, body: {}, confirm: `Promote group ${dev} to primary?` }),
  demote: (dev) => ({ path: `devices/${encodeURIComponent(dev)}/demote`, body: {}, confirm: `Demote group ${dev} to secondary? Its devices stop taking writes.` }),
  suspend: (dev, slink) => ({ path: `devices/${encodeURIComponent(dev)}/message`, body: { sector: 0, args: ['slink', 'suspend', String(slink)] } }),
  resume: (dev, slink) => ({ path: `devices/${encodeURIComponent(dev)}/message`, body: { sector: 0, args: ['slink', 'resume', String(slink)] } }),
  resync: (dev, slink) => ({ path: `devices/${encodeURIComponent(dev)}/message`, body: { sector: 0, args: ['resync', String(slink)] } }),
  verify: (dev, slink) => ({ path: `devices/${encodeURIComponent(dev)}/message`, body: { sector: 0, args: ['verify', String(slink)] } }),
};

function showResult(ok, text) {
  const el = document.getElementById('action-result');
  el.dataset.result = ok ? 'ok' : 'error';
  el.textContent = text;
}

async function runAction(button) {
  const action = button.dataset.action;
  const [dev, slink] = button.dataset.target.split('/');
  const spec = ACTIONS[action]?.(dev, slink === undefined ? null : Number(slink));
  if (!spec) return;
  const tokenField = document.getElementById('token');
  const token = tokenField.value.trim();
  if (!token) {
    showResult(false, 'Enter the HTTP token (the daemon\'s --http-token file) first.');
    tokenField.focus();
    return;
  }
  if (spec.confirm && !window.confirm(spec.confirm)) return;
  const what = `${action} ${button.dataset.target}`;
  showResult(true, `${what}…`);
  try {
    const res = await fetch(API + spec.path, {
      method: 'POST', cache: 'no-store',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
      body: JSON.stringify(spec.body),
    });
    const body = await res.json().catch(() => null);
    if (!res.ok) throw new Error(body?.error?.message ?? `${res.status} ${res.statusText}`);
    const reply = typeof body?.reply === 'string' ? body.reply.trim() : typeof body?.role === 'string' ? `now ${body.role}` : '';
    showResult(true, `${what}: done${reply ? ` (${reply})` : ''}`);
  } catch (err) {
    showResult(false, `${what}: ${err.message || err}`);
  }
  scheduleRefresh();
}

// Enter in the token field must not submit the form: that would load another page
document.getElementById('auth').addEventListener('submit', (e) => e.preventDefault());

document.addEventListener('click', (e) => {
  const button = e.target instanceof Element ? e.target.closest('button[data-action]') : null;
  if (button) void runAction(button);
});

function renderAuth() {
  document.getElementById('auth').hidden = !canChange();
}

// ---- heat map

function renderHeat(group, heat) {
  if (!heat) return null;
  const blocks = [];
  for (const dev of heat.devices) {
    for (const site of dev.sites) {
      const cells = site.cells;
      const cols = Math.min(HEAT_COLUMNS, cells.length);
      const per = site.regions / cells.length;
      const grid = h('div', { class: 'heat-grid', role: 'img', 'aria-label': `${dev.device} at slink ${site.slink}: ${site.outOfSync} of ${site.regions} regions out of sync` });
      grid.style.gridTemplateColumns = `repeat(${cols}, 1fr)`; // CSSOM: allowed by the CSP
      for (let i = 0; i < cells.length; i++) {
        const f = cells[i];
        const level = f <= 0 ? 0 : Math.min(4, Math.ceil(f * 4));
        const first = Math.floor(i * per) * site.regionSectors;
        const last = Math.floor((i + 1) * per) * site.regionSectors;
        grid.append(h('div', {
          class: `cell l${level}`, 'data-cell': i, 'data-dirty': f > 0 ? 'true' : null,
          title: `sectors ${first}–${last - 1}: ${Math.round(f * 100)}% out of sync`,
        }));
      }
      blocks.push(h('figure', { class: 'heat', 'data-heat': `${dev.device}/${site.slink}`, 'data-out-of-sync': site.outOfSync, 'data-regions': site.regions },
        h('figcaption', null, h('strong', null, dev.device), ` → slink ${site.slink}: `,
          site.outOfSync ? h('span', { class: 'dirty-count' }, `${site.outOfSync} of ${site.regions} regions out of sync (${bytes(site.outOfSync * site.regionSectors * 512)})`)
            : h('span', { class: 'clean' }, `in sync (${site.regions} regions of ${bytes(site.regionSectors * 512)})`)),
        grid));
    }
  }
  if (!blocks.length) return null;
  return h('section', { class: 'heatmaps' },
    h('h4', null, 'Dirty regions per device and site ', h('span', { class: 'legend' },
      h('span', { class: 'cell l0' }), ' in sync ', h('span', { class: 'cell l2' }), ' partly ', h('span', { class: 'cell l4' }), ' all out of sync')),
    blocks);
}

// ---- devices: the stack tree

function renderDevices(devices) {
  if (!devices.length) return h('p', { class: 'empty' }, 'No devices.');
  const byName = new Map(devices.map((d) => [d.name, d]));
  const below = (d) => d.deps.filter((x) => x.startsWith('dm:') && byName.has(x.slice(3))).map((x) => x.slice(3));
  const held = new Set(devices.flatMap(below));
  let roots = devices.filter((d) => !held.has(d.name));
  if (!roots.length) roots = devices; // a cycle cannot be built, but never show nothing
  const seen = new Set();
  return h('table', { class: 'devices' },
    h('thead', null, h('tr', null, ['device', 'state', 'size', 'table', 'open', 'I/O since created', 'role', ''].map((t) => h('th', { scope: 'col' }, t)))),
    h('tbody', null, roots.map((d) => renderNode(d, 0, byName, below, seen))));
}

/** reads and writes since the device was created */
function ioText(io) {
  const r = io?.ops?.read;
  const w = io?.ops?.write;
  if (!r || !w) return '–';
  const errors = Object.values(io.ops).reduce((n, o) => n + (o.errors ?? 0), 0);
  return [`read ${bytes(r.bytes)}, written ${bytes(w.bytes)}`, errors ? h('div', { class: 'error' }, `${errors} failed`) : null];
}

function groupRole(d, byName) {
  const r = d.replication;
  if (!r) return null;
  if (r.role) return r.role; // a replicator
  const g = r.replicator ? byName.get(r.replicator.replace(/^dm:/, '')) : null;
  return roleOf(g?.replication);
}

/** rows of one device and, indented below it, what it sits on */
function renderNode(d, depth, byName, below, seen) {
  const indent = (el, n = depth) => {
    el.classList.add(`depth-${Math.min(n, 8)}`);
    return el;
  };
  if (seen.has(d.name)) {
    return [h('tr', { class: 'ref', 'data-node': d.name, 'data-depth': depth },
      indent(h('td', { class: 'name' }, h('span', { class: 'tree' }, depth ? '└ ' : ''), d.name)),
      h('td', { colspan: 7, class: 'muted' }, 'shown above'))];
  }
  seen.add(d.name);
  const role = groupRole(d, byName);
  const state = d.state === 'SUSPENDED' ? 'suspended' : 'active';
  const extra = [];
  if (d.readOnly) extra.push(badge('read-only', 'off'));
  if (d.inactive) extra.push(badge('inactive table loaded', 'state-warn'));
  if (!d.live) extra.push(badge('no table', 'off'));
  if (d.deferredRemove) extra.push(badge('deferred remove', 'state-warn'));
  if (d.progress) {
    extra.push(h('span', { class: 'small' }, h('progress', { max: d.progress.totalSectors || 1, value: d.progress.doneSectors }),
      ` ${d.progress.work} ${d.progress.percent}%`));
  }
  const siteOfDep = new Map((d.replication?.sites ?? []).filter((s) => s.device).map((s) => [s.device, s]));
  const rows = [h('tr', { 'data-node': d.name, 'data-device': d.name, 'data-state': state, 'data-role': role, 'data-depth': depth, class: 'dev' },
    indent(h('td', { class: 'name' }, h('span', { class: 'tree' }, depth ? '└ ' : ''), h('strong', null, d.name))),
    h('td', null, stateBadge(state)),
    h('td', { class: 'num', title: `${d.sectors} sectors` }, bytes(d.sectors * 512)),
    h('td', null, d.types.length ? d.types.join(', ') : '–', h('span', { class: 'muted small' }, ` ${d.targets} target${d.targets === 1 ? '' : 's'}`)),
    h('td', { class: 'num' }, String(d.openCount)),
    h('td', { class: 'num small' }, ioText(d.io)),
    h('td', null, role ? badge(role, `role role-${role}`) : ''),
    h('td', null, extra))];
  for (const dep of d.deps) {
    if (dep.startsWith('dm:') && byName.has(dep.slice(3))) {
      rows.push(...renderNode(byName.get(dep.slice(3)), depth + 1, byName, below, seen));
    } else {
      const s = siteOfDep.get(dep);
      const logOf = (d.replication?.sites ?? []).find((x) => typeof x.dirtyLog === 'string' && x.dirtyLog.split(' ').includes(dep));
      let what = '';
      if (s) what = s.slink === 0 ? 'local copy (slink 0)' : `site slink ${s.slink}: ${s.state}${s.regions ? `, ${s.inSyncRegions}/${s.regions} regions in sync` : ''}`;
      else if (logOf) what = `dirty log of slink ${logOf.slink}`;
      else if (d.types.includes('replicator')) what = 'replication log';
      rows.push(h('tr', { class: 'file', 'data-file': dep },
        indent(h('td', { class: 'name', title: dep }, h('span', { class: 'tree' }, '└ '), basename(dep)), depth + 1),
        h('td', { colspan: 7, class: 'muted small' }, dep, what ? ` — ${what}` : '')));
    }
  }
  return rows;
}

// ---------------------------------------------------------------- start

render();
renderEvents();
scheduleRefresh();
connect();
