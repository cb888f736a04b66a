/**
 * Builds the native addon in the installed package (what `npx ppo-max build` runs).
 * Prefers cmake-js (CMake; compiles the CUDA backend when nvcc is found; headers come
 * from the npm registry's node-api-headers, so no other download), and falls back to
 * node-gyp (CPU only; npm's own node-gyp).
 */
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';

import { PpoMaxError } from './errors';
import { packageRoot } from './native';

export interface BuildOptions {
  /** 'cmake' (cmake-js), 'gyp' (node-gyp), or 'auto' (cmake when CMake is found). */
  tool?: 'auto' | 'cmake' | 'gyp';
  /** Compile the CUDA backend: 'auto' when nvcc is found (cmake only). */
  cuda?: 'auto' | 'on' | 'off';
  /** Also build the C++ tests and benchmarks (cmake only). */
  tests?: boolean;
  /** Parallel compile jobs (default: CPU count). */
  jobs?: number;
}

function commandWorks(command: string, args: string[]): boolean {
  const r = spawnSync(command, args, { stdio: 'ignore' });
  return r.status === 0;
}

function npmNodeGyp(): string | undefined {
  const candidates = [
    process.env.npm_config_node_gyp,
    path.join(path.dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'),
  ];
  try {
    candidates.push(require.resolve('node-gyp/bin/node-gyp.js'));
  } catch {
    // not installed locally
  }
  return candidates.find((p): p is string => !!p && fs.existsSync(p));
}

/** Builds the addon; returns the path of the built .node file. Output goes to the terminal. */
export function buildAddon(options: BuildOptions = {}): string {
  const root = packageRoot();
  const tool = options.tool ?? 'auto';
  const jobs = String(options.jobs ?? Math.max(1, require('os').cpus().length));
  const useCmake = tool === 'cmake' || (tool === 'auto' && commandWorks('cmake', ['--version']));
  if (useCmake) {
    const cmakeJs = require.resolve('cmake-js/bin/cmake-js', { paths: [root] });
    const cuda = { auto: 'AUTO', on: 'ON', off: 'OFF' }[options.cuda ?? 'auto'];
    const tests = options.tests ? 'ON' : 'OFF';
    const args = [cmakeJs, 'compile', '--out', 'build-cmake', `--CDPPO_CUDA=${cuda}`, `--CDPPO_BUILD_TESTS=${tests}`, `--CDPPO_BUILD_BENCH=${tests}`, '--parallel', jobs];
    const r = spawnSync(process.execPath, args, { cwd: root, stdio: 'inherit' });
    if (r.status !== 0) {
      throw new PpoMaxError('ERR_NATIVE_NOT_BUILT', `cmake-js failed (exit ${r.status}); see the output above`);
    }
    return path.join(root, 'build-cmake', 'Release', 'ppo_max.node');
  }
  const gyp = npmNodeGyp();
  if (!gyp) {
    throw new PpoMaxError(
      'ERR_NATIVE_NOT_BUILT',
      'neither CMake nor node-gyp was found: install CMake (recommended, enables CUDA) or node-gyp, then run `npx ppo-max build` again',
    );
  }
  const r = spawnSync(process.execPath, [gyp, 'rebuild', '-j', jobs], { cwd: root, stdio: 'inherit' });
  if (r.status !== 0) {
    throw new PpoMaxError('ERR_NATIVE_NOT_BUILT', `node-gyp failed (exit ${r.status}); see the output above`);
  }
  return path.join(root, 'build', 'Release', 'ppo_max.node');
}
