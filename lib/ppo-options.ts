/**
 * Every switch of the PPO-max recipe (../shared/ppo-max.md) as a typed option, the presets
 * users start from (`ppoMax`, `vanilla`, `ppoPtx`: plain objects to spread and change),
 * and their validation.
 */
import { invalidArgument, outOfRange } from './errors';
import { booleanOption, choiceOption, describe, numberOption, objectArgument } from './validate';

export type LrSchedule = 'constant' | 'warmupInverseSqrt' | 'warmupLinearDecay';

/** AdamW with global gradient-norm clipping and a learning-rate schedule. */
export interface OptimizerOptions {
  /** The peak learning rate. */
  lr: number;
  beta1?: number;
  beta2?: number;
  eps?: number;
  /** Decoupled weight decay on the weight matrices and the value head (default 0). */
  weightDecay?: number;
  /** 'warmupInverseSqrt' (the recipe's): lr·s/W for s ≤ W, then lr·sqrt(W/s). Default 'constant'. */
  schedule?: LrSchedule;
  /** W, in optimizer steps. Default: warmupFraction × totalSteps when totalSteps is set, else 0. */
  warmupSteps?: number;
  /** The recipe's 10%: the share of totalSteps spent warming up (default 0.1). */
  warmupFraction?: number;
  /** Optimizer steps the run will take (sets W; 'warmupLinearDecay' reaches 0 there). */
  totalSteps?: number | null;
  /** Clip the global gradient norm to this (null: no clipping). */
  maxGradNorm?: number | null;
}

export type KlEstimator = 'k1' | 'k2' | 'k3';

/** The PPO trainer's options: every flag of ppo-max.md with the ppoMax default. */
export interface PpoOptions {
  // ---- rollout (step 1)
  /** Longest response (default 32). */
  maxNewTokens: number;
  temperature: number;
  topP: number;
  /** 0: off. */
  topK: number;
  /** On tokens already generated in the response (not the prompt). */
  repetitionPenalty: number;
  /** Generation of a response ends after one of these (default: the policy's eos token). */
  stopTokens: number[] | null;
  // ---- reward (steps 3 and 5)
  /** η of the token-level KL penalty (the start value when klTarget is set). */
  klCoef: number;
  klEstimator: KlEstimator;
  /** A target KL per sequence for the adaptive controller (Ziegler et al.); null: fixed klCoef. */
  klTarget: number | null;
  /** The controller's horizon, in samples. */
  klHorizon: number;
  /** r̃ = (r − μ)/σ on running moments of every score seen. */
  rewardNorm: boolean;
  /** r̃ = r/σ (no mean subtracted); an alternative to rewardNorm. */
  rewardScaling: boolean;
  /** δ: clip r̃ to [−δ, δ] (null: off). */
  rewardClip: number | null;
  // ---- GAE (step 6)
  gamma: number;
  lam: number;
  // ---- update (step 7)
  /** Whiten advantages over each mini-batch's response tokens. */
  advantageNorm: boolean;
  advantageClip: number | null;
  /** ε of the clipped surrogate. */
  policyClip: number;
  /** ε_v of the clipped value loss (null: plain squared error). */
  valueClip: number | null;
  valueLossCoef: number;
  /** c_H of the entropy bonus (0: off; the paper finds it fragile). */
  entropyCoef: number;
  /** λ_ptx of the pretraining loss (needs ptxData; 0: off). */
  ptxCoef: number;
  /** ptx sequences per experience sample in each mini-batch. */
  ptxBatchRatio: number;
  /** Samples per experience buffer: prompts drawn per step by train(). */
  numRollouts: number;
  miniBatchSize: number;
  ppoEpochs: number;
  /** Rows per generation/evaluation chunk (0: the whole buffer at once). */
  forwardBatchSize: number;
  policyOptimizer: OptimizerOptions;
  criticOptimizer: OptimizerOptions;
  // ---- critic pre-training (step 8)
  criticPretrain: boolean;
  /** The most critic passes before PPO starts. */
  criticPretrainSteps: number;
  /** Stop pre-training once the value loss is below this. */
  criticPretrainLossTarget: number;
  /** Passes over one cached buffer of rollouts before fresh ones are generated. */
  criticPretrainPassesPerRollout: number;
  /** Seeds generation, shuffling and ptx sampling. */
  seed: number;
}

const recipeOptimizer = (lr: number, eps: number): OptimizerOptions => ({
  lr,
  beta1: 0.9,
  beta2: 0.95,
  eps,
  weightDecay: 0,
  schedule: 'warmupInverseSqrt',
  warmupFraction: 0.1,
  totalSteps: null,
  maxGradNorm: 1.0,
});

/**
 * The paper's recipe. Learning rates are the paper's 7B ones (policy 5e-7, critic
 * 1.65e-6): small models need far larger rates, so set them for yours.
 */
export const ppoMax: Readonly<PpoOptions> = Object.freeze({
  maxNewTokens: 32,
  temperature: 0.8,
  topP: 0.9,
  topK: 0,
  repetitionPenalty: 1.1,
  stopTokens: null,
  klCoef: 0.05,
  klEstimator: 'k1' as KlEstimator,
  klTarget: null,
  klHorizon: 10000,
  rewardNorm: true,
  rewardScaling: false,
  rewardClip: 0.8,
  gamma: 1.0,
  lam: 0.9,
  advantageNorm: false,
  advantageClip: null,
  policyClip: 0.2,
  valueClip: 0.2,
  valueLossCoef: 1.0,
  entropyCoef: 0,
  ptxCoef: 0,
  ptxBatchRatio: 1,
  numRollouts: 128,
  miniBatchSize: 32,
  ppoEpochs: 1,
  forwardBatchSize: 0,
  policyOptimizer: recipeOptimizer(5e-7, 1e-6),
  criticOptimizer: recipeOptimizer(1.65e-6, 1e-8),
  criticPretrain: true,
  criticPretrainSteps: 50,
  criticPretrainLossTarget: 0.05,
  criticPretrainPassesPerRollout: 4,
  seed: 0,
});

/** Plain PPO with the tricks off (no KL penalty, no reward normalization or clipping, no value clipping, no gradient clipping, no critic pre-training), for comparison. */
export const vanilla: Readonly<PpoOptions> = Object.freeze({
  ...ppoMax,
  klCoef: 0,
  rewardNorm: false,
  rewardClip: null,
  valueClip: null,
  criticPretrain: false,
  policyOptimizer: { ...ppoMax.policyOptimizer, maxGradNorm: null },
  criticOptimizer: { ...ppoMax.criticOptimizer, maxGradNorm: null },
});

/** ppoMax with the pretraining loss on (PPO-ptx): give the trainer ptxData. */
export const ppoPtx: Readonly<PpoOptions> = Object.freeze({ ...ppoMax, ptxCoef: 1.0 });

const OPTIMIZER_KEYS = ['lr', 'beta1', 'beta2', 'eps', 'weightDecay', 'schedule', 'warmupSteps', 'warmupFraction', 'totalSteps', 'maxGradNorm'];

/** A resolved optimizer: every field set, warmup computed. */
export interface ResolvedOptimizer {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  schedule: LrSchedule;
  warmupSteps: number;
  totalSteps: number;
  maxGradNorm: number;
}

function nonNegativeInteger(name: string, value: unknown, fallback: number): number {
  const x = numberOption(name, value, fallback, { min: 0 });
  if (!Number.isInteger(x)) throw invalidArgument(name, `${name} must be an integer, got ${x}`);
  return x;
}

function positiveInt(name: string, value: unknown, fallback: number): number {
  const x = nonNegativeInteger(name, value, fallback);
  if (x < 1) throw invalidArgument(name, `${name} must be >= 1, got ${x}`);
  return x;
}

function optionalPositive(name: string, value: unknown, fallback: number | null): number | null {
  if (value === undefined) return fallback;
  if (value === null || value === 0) return null;
  return numberOption(name, value, 0, { min: 0, minExclusive: true });
}

function rejectUnknown(name: string, o: Record<string, unknown>, known: readonly string[]): void {
  for (const key of Object.keys(o)) {
    if (!known.includes(key)) {
      throw invalidArgument(`${name}.${key}`, `${name} has no option '${key}' (known: ${known.join(', ')})`);
    }
  }
}

export function resolveOptimizer(name: string, value: unknown, fallback?: OptimizerOptions): ResolvedOptimizer {
  const o = { ...(fallback ?? {}), ...objectArgument(name, value) } as Record<string, unknown>;
  rejectUnknown(name, o, OPTIMIZER_KEYS);
  if (o.lr === undefined) throw invalidArgument(`${name}.lr`, `${name}.lr (the learning rate) is required`);
  const lr = numberOption(`${name}.lr`, o.lr, 0, { min: 0 });
  const beta1 = numberOption(`${name}.beta1`, o.beta1, 0.9, { min: 0 });
  const beta2 = numberOption(`${name}.beta2`, o.beta2, 0.95, { min: 0 });
  if (beta1 >= 1) throw invalidArgument(`${name}.beta1`, `${name}.beta1 must be in [0, 1), got ${beta1}`);
  if (beta2 >= 1) throw invalidArgument(`${name}.beta2`, `${name}.beta2 must be in [0, 1), got ${beta2}`);
  const eps = numberOption(`${name}.eps`, o.eps, 1e-8, { min: 0, minExclusive: true });
  const weightDecay = numberOption(`${name}.weightDecay`, o.weightDecay, 0, { min: 0 });
  const schedule = choiceOption(`${name}.schedule`, o.schedule, ['constant', 'warmupInverseSqrt', 'warmupLinearDecay'] as const, 'constant');
  // null, undefined or 0: not known
  const totalSteps = o.totalSteps === null || o.totalSteps === undefined ? 0 : nonNegativeInteger(`${name}.totalSteps`, o.totalSteps, 0);
  const fraction = numberOption(`${name}.warmupFraction`, o.warmupFraction, 0.1, { min: 0, max: 1 });
  const warmupSteps =
    o.warmupSteps !== undefined ? nonNegativeInteger(`${name}.warmupSteps`, o.warmupSteps, 0) : Math.ceil(fraction * totalSteps);
  if (schedule === 'warmupLinearDecay' && totalSteps <= warmupSteps) {
    throw invalidArgument(`${name}.totalSteps`, `${name}.schedule 'warmupLinearDecay' needs totalSteps > warmupSteps (${warmupSteps})`);
  }
  const maxGradNorm = optionalPositive(`${name}.maxGradNorm`, o.maxGradNorm, null) ?? 0;
  return { lr, beta1, beta2, eps, weightDecay, schedule, warmupSteps, totalSteps, maxGradNorm };
}

export function nativeOptimizer(o: ResolvedOptimizer): object {
  return { ...o, schedule: ['constant', 'warmupInverseSqrt', 'warmupLinearDecay'].indexOf(o.schedule) };
}

/** Options as the trainer holds them: every field set and checked. */
export interface ResolvedPpoOptions extends Omit<PpoOptions, 'policyOptimizer' | 'criticOptimizer'> {
  policyOptimizer: ResolvedOptimizer;
  criticOptimizer: ResolvedOptimizer;
}

const PPO_KEYS = Object.keys(ppoMax);

/**
 * Checks options (a preset, spread and changed) and fills what is missing from ppoMax.
 * Unknown keys, wrong types and out-of-range values throw a PpoMaxError naming the option.
 */
export function resolvePpoOptions(value: unknown, vocabSize?: number): ResolvedPpoOptions {
  const given = objectArgument('options', value ?? {});
  rejectUnknown('options', given, PPO_KEYS);
  const o = { ...ppoMax, ...given } as Record<string, unknown>;
  const num = (k: string, range: { min?: number; max?: number; minExclusive?: boolean } = {}) =>
    numberOption(k, o[k], (ppoMax as unknown as Record<string, number>)[k], range);
  const flag = (k: string) => booleanOption(k, o[k], (ppoMax as unknown as Record<string, boolean>)[k]);
  let stopTokens: number[] | null = null;
  if (o.stopTokens !== null && o.stopTokens !== undefined) {
    if (!Array.isArray(o.stopTokens)) throw invalidArgument('stopTokens', `stopTokens must be an array of token ids or null, got ${describe(o.stopTokens)}`);
    stopTokens = o.stopTokens.map((t, i) => {
      if (typeof t !== 'number' || !Number.isInteger(t) || t < 0 || (vocabSize !== undefined && t >= vocabSize)) {
        throw outOfRange('stopTokens', `stopTokens[${i}] must be a token id in [0, ${vocabSize ?? 'vocab'}), got ${describe(t)}`);
      }
      return t;
    });
  }
  const resolved: ResolvedPpoOptions = {
    maxNewTokens: positiveInt('maxNewTokens', o.maxNewTokens, 32),
    temperature: num('temperature', { min: 0, minExclusive: true }),
    topP: num('topP', { min: 0, minExclusive: true, max: 1 }),
    topK: nonNegativeInteger('topK', o.topK, 0),
    repetitionPenalty: num('repetitionPenalty', { min: 0, minExclusive: true }),
    stopTokens,
    klCoef: num('klCoef', { min: 0 }),
    klEstimator: choiceOption('klEstimator', o.klEstimator, ['k1', 'k2', 'k3'] as const, 'k1'),
    klTarget: optionalPositive('klTarget', o.klTarget, null),
    klHorizon: num('klHorizon', { min: 0, minExclusive: true }),
    rewardNorm: flag('rewardNorm'),
    rewardScaling: flag('rewardScaling'),
    rewardClip: optionalPositive('rewardClip', o.rewardClip, null),
    gamma: num('gamma', { min: 0, max: 1 }),
    lam: num('lam', { min: 0, max: 1 }),
    advantageNorm: flag('advantageNorm'),
    advantageClip: optionalPositive('advantageClip', o.advantageClip, null),
    policyClip: num('policyClip', { min: 0, minExclusive: true }),
    valueClip: optionalPositive('valueClip', o.valueClip, null),
    valueLossCoef: num('valueLossCoef', { min: 0 }),
    entropyCoef: num('entropyCoef'),
    ptxCoef: num('ptxCoef', { min: 0 }),
    ptxBatchRatio: num('ptxBatchRatio', { min: 0, minExclusive: true }),
    numRollouts: positiveInt('numRollouts', o.numRollouts, 128),
    miniBatchSize: positiveInt('miniBatchSize', o.miniBatchSize, 32),
    ppoEpochs: positiveInt('ppoEpochs', o.ppoEpochs, 1),
    forwardBatchSize: nonNegativeInteger('forwardBatchSize', o.forwardBatchSize, 0),
    policyOptimizer: resolveOptimizer('policyOptimizer', o.policyOptimizer),
    criticOptimizer: resolveOptimizer('criticOptimizer', o.criticOptimizer),
    criticPretrain: flag('criticPretrain'),
    criticPretrainSteps: nonNegativeInteger('criticPretrainSteps', o.criticPretrainSteps, 50),
    criticPretrainLossTarget: num('criticPretrainLossTarget', { min: 0 }),
    criticPretrainPassesPerRollout: positiveInt('criticPretrainPassesPerRollout', o.criticPretrainPassesPerRollout, 4),
    seed: nonNegativeInteger('seed', o.seed, 0),
  };
  if (resolved.rewardNorm && resolved.rewardScaling) {
    throw invalidArgument('rewardScaling', 'rewardNorm and rewardScaling are alternatives: turn one off');
  }
  if (resolved.seed > Number.MAX_SAFE_INTEGER) throw invalidArgument('seed', 'seed must be below 2^53');
  return resolved;
}

/** The options object the addon reads. */
export function nativePpoOptions(o: ResolvedPpoOptions): object {
  return {
    ...o,
    stopTokens: o.stopTokens ? Int32Array.from(o.stopTokens) : null,
    klEstimator: { k1: 1, k2: 2, k3: 3 }[o.klEstimator],
    klTarget: o.klTarget ?? 0,
    rewardClip: o.rewardClip ?? 0,
    advantageClip: o.advantageClip ?? 0,
    valueClip: o.valueClip ?? 0,
    policyOptimizer: nativeOptimizer(o.policyOptimizer),
    criticOptimizer: nativeOptimizer(o.criticOptimizer),
  };
}
