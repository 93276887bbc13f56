/** The built-in target types, registered by every engine. */
import type { TargetType } from '../core/types.ts';
import { linear } from './linear.ts';
import { striped } from './striped.ts';
import { zero } from './zero.ts';
import { error } from './error.ts';
import { delay } from './delay.ts';
import { flakey } from './flakey.ts';
import { mirror } from './mirror.ts';
import { replicator } from './replicator.ts';
import { replicatorDev } from './replicator-dev.ts';

export const builtinTargets: readonly TargetType[] = [linear, striped, zero, error, delay, flakey, mirror, replicator, replicatorDev];
