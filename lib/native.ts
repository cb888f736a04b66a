/**
 * Loads the native addon, lazily, on first use. Looked up in order:
 *   1. the path in the PPO_MAX_ADDON environment variable;
 *   2. build-cmake/Release/ppo_max.node (cmake-js build, CUDA when nvcc was found);
 *   3. build/Release/ppo_max.node (node-gyp build, CPU only).
 * When none exists, the error says how to build it (`npx ppo-max build`).
 */
import * as fs from 'fs';
import * as path from 'path';

import { PpoMaxError } from './errors';

export interface NativeMoments {
  count: number;
  mean: number;
  m2: number;
}

/** The raw addon: each op takes one object of arguments and an async flag. */
export interface NativeAddon {
  cudaCompiled(): boolean;
  cudaAvailable(): boolean;
  cudaUnavailableReason(): string;
  cpuThreads(): number;
  napiVersion: number;
  logprobsFromLogits(args: object, async: boolean): unknown;
  logprobsBackward(args: object, async: boolean): unknown;
  klPenalizedRewards(args: object, async: boolean): unknown;
  batchMoments(args: object, async: boolean): unknown;
  mergeMoments(a: NativeMoments, b: NativeMoments): NativeMoments & { std: number };
  normalizeScores(args: object, async: boolean): unknown;
  gae(args: object, async: boolean): unknown;
  whiten(args: object, async: boolean): unknown;
  clipMasked(args: object, async: boolean): unknown;
  policyLoss(args: object, async: boolean): unknown;
  valueLoss(args: object, async: boolean): unknown;
}

/** The directory holding ppo-max's package.json (works from lib/ and dist/lib/). */
export function packageRoot(): string {
  let dir = __dirname;
  for (;;) {
    const manifest = path.join(dir, 'package.json');
    if (fs.existsSync(manifest)) {
      try {
        if (JSON.parse(fs.readFileSync(manifest, 'utf8')).name === 'ppo-max') return dir;
      } catch {
        // not ours, keep walking up
      }
    }
    const parent = path.dirname(dir);
    if (parent === dir) return path.resolve(__dirname, '..');
    dir = parent;
  }
}

/** Candidate addon paths, in the order they are tried. */
export function addonCandidates(): string[] {
  const root = packageRoot();
  const list = [
    path.join(root, 'build-cmake', 'Release', 'ppo_max.node'),
    path.join(root, 'build', 'Release', 'ppo_max.node'),
  ];
  const explicit = process.env.PPO_MAX_ADDON;
  return explicit ? [path.resolve(explicit)] : list;
}

let loaded: { addon: NativeAddon; path: string } | undefined;

/** The loaded addon and where it came from; throws ERR_NATIVE_NOT_BUILT if absent. */
export function loadNative(): { addon: NativeAddon; path: string } {
  if (loaded) return loaded;
  const candidates = addonCandidates();
  const found = candidates.find((p) => fs.existsSync(p));
  if (!found) {
    throw new PpoMaxError(
      'ERR_NATIVE_NOT_BUILT',
      `ppo-max's native addon is not built (looked for ${candidates.join(', ')}). ` +
        'Build it once with `npx ppo-max build` (needs a C++17 compiler and CMake or ' +
        'Python for node-gyp; CUDA is used when nvcc is found). npm 11 does not run ' +
        "a dependency's install script unless the project allows it.",
    );
  }
  try {
    // eslint-disable-next-line @typescript-eslint/no-var-requires
    const addon = require(found) as NativeAddon;
    loaded = { addon, path: found };
    return loaded;
  } catch (e) {
    throw new PpoMaxError(
      'ERR_NATIVE_NOT_BUILT',
      `ppo-max's native addon at ${found} could not be loaded (${(e as Error).message}). ` +
        'Rebuild it with `npx ppo-max build`.',
    );
  }
}

export function native(): NativeAddon {
  return loadNative().addon;
}
