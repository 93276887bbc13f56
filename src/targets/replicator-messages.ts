/**
 * The replicator's messages (REPLICATION.md "Messages"), sent to the control device:
 * `dmkit message <repl> 0 <verb> …`.
 */
import { ArgReader } from '../core/args.ts';
import { parseFallBehind, parsePolicy } from '../slink/params.ts';
import type { ReplicatorGroup } from './replicator-group.ts';
import type { Site } from './replicator-site.ts';

const USAGE = 'policy <slink#> <policy>, fallbehind <slink#> <spec>|none, slink suspend|resume <slink#>, resync <slink#> [full] [checksum], verify <slink#>, clear-bitmap <slink#>, statistics on|off|reset, replog resize <sectors>, resync-rate auto|<bytes/s>[k|m|g], forget <dev#>';

function remote(g: ReplicatorGroup, r: ArgReader): Site {
  const n = r.uint('slink number');
  if (n === g.local.slink) r.fail(`slink ${n} is the local site (expected a remote slink: ${g.sites.map((s) => s.slink).join(', ') || 'none'})`);
  const s = g.siteOf(n);
  if (!s) r.fail(`no slink ${n} in this replicator (remote slinks: ${g.sites.map((x) => x.slink).join(', ') || 'none'})`);
  return s;
}

export async function groupMessage(g: ReplicatorGroup, args: string[]): Promise<string | void> {
  const r = new ArgReader(args, 'replicator');
  const verb = r.next('message');
  switch (verb) {
    case 'policy': {
      const s = remote(g, r);
      const word = r.next('policy');
      r.expectEnd();
      const p = parsePolicy(word, s.slink);
      s.setPolicy(p, word);
      return;
    }
    case 'fallbehind': {
      const s = remote(g, r);
      const words: string[] = [];
      while (!r.atEnd()) words.push(r.next('fall-behind'));
      if (words.length === 1 && words[0] === 'none') return s.setFallBehind(null, null);
      if (s.policy.mode === 'sync') r.fail(`slink ${s.slink}: sync slink takes no fall-behind (got '${words.join(' ')}')`);
      return s.setFallBehind(parseFallBehind(words, s.slink), words.join(' '));
    }
    case 'slink': {
      const action = r.oneOf('slink action', ['suspend', 'resume'] as const);
      const s = remote(g, r);
      r.expectEnd();
      if (action === 'suspend') s.pause();
      else s.unpause();
      return;
    }
    case 'resync': {
      const s = remote(g, r);
      const options = new Set<string>();
      while (!r.atEnd()) {
        const o = r.oneOf('resync option', ['full', 'checksum'] as const);
        if (options.has(o)) r.fail(`resync option '${o}' given twice`);
        options.add(o);
      }
      s.requestResync(options.has('full'), options.has('checksum'));
      return;
    }
    case 'verify': {
      const s = remote(g, r);
      r.expectEnd();
      if (!s.up || s.paused) r.fail(`slink ${s.slink} is ${s.paused ? 'suspended' : 'down'}: nothing to verify against`);
      void s.verify().catch((err: Error) => g.logger.warn(`${g.ctx.device}: verify of slink ${s.slink} failed: ${err.message}`));
      return 'verify started';
    }
    case 'clear-bitmap': {
      const s = remote(g, r);
      r.expectEnd();
      g.refuseUnbound(`clear-bitmap ${s.slink}`);
      await s.clearBitmap();
      return;
    }
    case 'statistics': {
      const what = r.oneOf('statistics action', ['on', 'off', 'reset'] as const);
      r.expectEnd();
      if (what === 'reset') Object.assign(g.stats, { writes: 0, writeBytes: 0, flushes: 0, overflows: 0 });
      else g.stats.enabled = what === 'on';
      return;
    }
    case 'replog': {
      r.oneOf('replog action', ['resize'] as const);
      const sectors = r.uint('replog size', { min: 1 });
      r.expectEnd();
      await g.checkpointNow();
      await g.log.resize(sectors);
      g.event(`replication log resized to ${sectors} sectors`);
      return;
    }
    case 'resync-rate': {
      const word = r.next('resync rate (auto, or bytes per second: <N>[k|m|g])');
      r.expectEnd();
      try {
        g.resyncControl.set(word);
      } catch (err) {
        r.fail((err as Error).message);
      }
      return;
    }
    case 'forget': {
      const devNr = r.uint('device number', { max: 255 });
      r.expectEnd();
      const why = g.forgetRefusal(devNr);
      if (why) r.fail(why);
      await g.forget(devNr);
      return;
    }
    default:
      r.fail(`unknown message '${verb}' (expected ${USAGE})`);
  }
}
