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

/** An opaque handle to a native model (a tagged External); only lib/model.ts uses it. */
export interface NativeModelHandle {
  readonly __ppoMaxModelHandle: never;
}

/** A model's config as the addon reports it (camelCase, every field present). */
export interface NativeModelConfig {
  modelType: 'gpt2' | 'llama';
  // Llama only:
  nKvHead?: number;
  intermediateSize?: number;
  rmsNormEps?: number;
  ropeTheta?: number;
  ropeScaling?: number;
  tieWordEmbeddings?: boolean;
  vocabSize: number;
  nPositions: number;
  nEmbd: number;
  nLayer: number;
  nHead: number;
  layerNormEpsilon: number;
  valueHead: boolean;
  bosTokenId: number;
  eosTokenId: number;
}

/** What modelCreate and modelLoad resolve to. */
export interface NativeNewModel {
  handle: NativeModelHandle;
  config: NativeModelConfig;
  parameterCount: number;
  device: 'cpu' | 'cuda';
}

export interface NativeModelMemory {
  params: number;
  grads: number;
  optimizer: number;
  activations: number;
  kvCache: number;
}

export interface NativeGenerateResult {
  batch: number;
  maxNewTokens: number;
  /** [batch, maxNewTokens]: each row's new tokens, then -1. */
  tokens: Int32Array;
  /** [batch, maxNewTokens]: their log-probs, then 0. */
  logprobs: Float32Array;
  lengths: Int32Array;
  /** [batch] 1 when the row ended with a stop token. */
  stopped: Uint8Array;
}

/**
 * The raw addon: each op takes one object of arguments and an async flag. The model
 * functions (model*) take a handle first; all but modelParameterCount and modelMemory
 * return promises, and a second overlapping call on one model is refused (ERR_BUSY).
 */
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
  // Property syntax (not methods) so that these never match NativeOpName in call.ts.
  modelParameterCount: (config: NativeModelConfig) => number;
  modelCreate: (args: { config: NativeModelConfig; seed: number; device: 'cpu' | 'cuda'; trainable: boolean }) => Promise<NativeNewModel>;
  modelLoad: (args: { dir: string; device: 'cpu' | 'cuda'; trainable: boolean }) => Promise<NativeNewModel>;
  modelSave: (handle: NativeModelHandle, args: { dir: string }) => Promise<void>;
  modelClone: (handle: NativeModelHandle, args: { trainable: boolean; valueHead?: boolean }) => Promise<NativeNewModel>;
  modelForward: (handle: NativeModelHandle, args: object) => Promise<Record<string, unknown>>;
  modelBackward: (handle: NativeModelHandle, args: object) => Promise<void>;
  modelZeroGrad: (handle: NativeModelHandle) => Promise<void>;
  modelGradNorm: (handle: NativeModelHandle) => Promise<number>;
  modelStep: (handle: NativeModelHandle, args: object) => Promise<{ gradNorm: number; clipped: boolean; step: number }>;
  modelGenerate: (
    handle: NativeModelHandle,
    args: object,
    onProgress?: (done: number, total: number) => void,
  ) => Promise<NativeGenerateResult>;
  modelMemory: (handle: NativeModelHandle) => NativeModelMemory;
  modelDispose: (handle: NativeModelHandle) => Promise<void>;
  // ---- trainers (csrc/addon/trainer_bindings.cpp; lib/trainers.ts is the only caller) ----
  ppoTrainerCreate: (args: object) => NativeTrainerHandle;
  ppoTrainerSetOptions: (t: NativeTrainerHandle, options: object) => void;
  ppoTrainerGetState: (t: NativeTrainerHandle) => NativePpoState;
  ppoTrainerSetState: (t: NativeTrainerHandle, state: NativePpoState) => void;
  ppoTrainerSetPtx: (t: NativeTrainerHandle, data: object) => void;
  ppoTrainerRollout: (t: NativeTrainerHandle, prompts: object, onProgress?: NativeStageProgress) => Promise<NativeTrainerResult>;
  ppoTrainerScore: (t: NativeTrainerHandle, experience: object) => Promise<NativeTrainerResult>;
  ppoTrainerShape: (t: NativeTrainerHandle, experience: object, options: object) => Promise<NativeTrainerResult>;
  ppoTrainerUpdate: (t: NativeTrainerHandle, experience: object, onProgress?: NativeStageProgress) => Promise<NativeTrainerResult>;
  ppoTrainerStep: (t: NativeTrainerHandle, prompts: object, onProgress?: NativeStageProgress) => Promise<NativeTrainerResult>;
  ppoTrainerStepWithScores: (
    t: NativeTrainerHandle,
    experience: object,
    options: object,
    onProgress?: NativeStageProgress,
  ) => Promise<NativeTrainerResult>;
  ppoTrainerPretrainCritic: (
    t: NativeTrainerHandle,
    experience: object,
    passes: number,
    onProgress?: NativeStageProgress,
  ) => Promise<NativeTrainerResult>;
  sftStep: (m: NativeModelHandle, batch: object, options: object) => Promise<Record<string, number>>;
  lmEval: (m: NativeModelHandle, batch: object, options: object) => Promise<Record<string, number>>;
  rewardModelStep: (m: NativeModelHandle, pairs: object, options: object) => Promise<Record<string, number>>;
  rewardModelEval: (
    m: NativeModelHandle,
    pairs: object,
    options: object,
  ) => Promise<{ stats: Record<string, number>; chosenScores: Float32Array; rejectedScores: Float32Array }>;
  scoreSequences: (m: NativeModelHandle, batch: object, options: object) => Promise<Float32Array>;
  modelSaveOptimizer: (m: NativeModelHandle, args: { path: string }) => Promise<{ steps: number }>;
  modelLoadOptimizer: (m: NativeModelHandle, args: { path: string; steps: number }) => Promise<void>;
  estimateModelMemory: (args: object) => NativeModelMemory;
}

/** An opaque handle to a native PPO trainer. */
export interface NativeTrainerHandle {
  readonly __ppoMaxTrainerHandle: never;
}

export interface NativePpoState {
  count: number;
  mean: number;
  m2: number;
  klCoef: number;
  rollouts: number;
  updates: number;
  criticPretrainSteps: number;
}

export type NativeStageProgress = (done: number, total: number, stage?: string) => void;

export interface NativeTrainerResult {
  stats?: Record<string, number>;
  experience?: Record<string, unknown>;
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
