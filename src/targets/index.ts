/** The built-in target types, registered by every engine. */
import type { TargetType } from '../core/types.ts';
import { linear } from './linear.ts';
import { zero } from './zero.ts';
import { error } from './error.ts';

export const builtinTargets: readonly TargetType[] = [linear, zero, error];
