/**
 * The RLHF kernels of PPO-max (see ppo-max.md), over batches of variable-length
 * sequences in a [batch, steps] layout. Every op has an async form (runs on a worker
 * thread, resolves a promise, leaves the event loop free) and a Sync twin. Inputs are
 * kept alive by the native call while it runs; do not modify them until it resolves.
 */
import { Device, resolveDevice } from './device';
import { PreparedOp, runAsync, runSync } from './call';
import { invalidArgument } from './errors';
import {
  FloatArray,
  SequenceShape,
  TokenArray,
  booleanOption,
  choiceOption,
  float32,
  numberOption,
  objectArgument,
  positiveInteger,
  sequenceMask,
  tokenIds,
} from './validate';

export interface OpOptions {
  /** Where the op runs: 'cpu', 'cuda', or 'auto' (the default: CUDA when usable). */
  device?: Device;
}

interface Sequences {
  batch: number;
  steps: number;
  mask: Float32Array | null;
  shape: string;
}

function sequences(input: Record<string, unknown>): Sequences {
  const batch = positiveInteger('batch', input.batch);
  const steps = positiveInteger('steps', input.steps);
  const mask = sequenceMask(input as unknown as SequenceShape);
  return { batch, steps, mask, shape: `[batch=${batch}, steps=${steps}]` };
}

function seqArray(name: string, input: Record<string, unknown>, s: Sequences): Float32Array {
  return float32(name, input[name], s.batch * s.steps, s.shape);
}

function deviceOf(options: OpOptions): 'cpu' | 'cuda' {
  return resolveDevice(options.device);
}

// ---- log-probs and entropy ------------------------------------------------------------------

export interface LogprobsInput extends SequenceShape {
  /** [batch * steps * vocab] logits; -Infinity allowed for banned tokens, never NaN. */
  logits: FloatArray;
  /** [batch * steps] token ids whose log-probs to gather, in [0, vocab). */
  tokens: TokenArray;
  vocab: number;
}
export interface LogprobsOptions extends OpOptions {
  /** Logits are divided by it before the softmax (default 1). */
  temperature?: number;
  /** Also return the per-position entropy of the softmax (default false). */
  entropy?: boolean;
}
export interface LogprobsResult {
  /** [batch * steps] log p(tokens[b,t]); 0 at padded positions. */
  logprobs: Float32Array;
  /** [batch * steps] entropy -sum p log p, when options.entropy; 0 at padded positions. */
  entropy?: Float32Array;
}

function prepareLogprobs(input: LogprobsInput, options: LogprobsOptions, grads?: LogprobsGradients) {
  const i = objectArgument('input', input);
  const o = objectArgument('options', options);
  const s = sequences(i);
  const vocab = positiveInteger('vocab', i.vocab);
  const rows = s.batch * s.steps;
  return {
    batch: s.batch,
    steps: s.steps,
    vocab,
    logits: float32('logits', i.logits, rows * vocab, `[batch=${s.batch}, steps=${s.steps}, vocab=${vocab}]`),
    tokens: tokenIds('tokens', i.tokens, rows, s.shape),
    mask: s.mask,
    temperature: numberOption('temperature', o.temperature, 1, { min: 0, minExclusive: true }),
    entropy: booleanOption('entropy', o.entropy, false),
    device: deviceOf(o as OpOptions),
    ...(grads
      ? {
          gradLogprobs: grads.gradLogprobs == null ? null : float32('gradLogprobs', grads.gradLogprobs, rows, s.shape),
          gradEntropy: grads.gradEntropy == null ? null : float32('gradEntropy', grads.gradEntropy, rows, s.shape),
        }
      : {}),
  };
}

function logprobsOp(input: LogprobsInput, options: LogprobsOptions = {}): PreparedOp<LogprobsResult> {
  const args = prepareLogprobs(input, options);
  return {
    name: 'logprobsFromLogits',
    args,
    finish: (raw) => {
      const out: LogprobsResult = { logprobs: raw.logprobs as Float32Array };
      if (args.entropy) out.entropy = raw.entropy as Float32Array;
      return out;
    },
  };
}

/** log_softmax(logits / temperature) gathered at the taken tokens, and optionally the entropy. */
export async function logprobsFromLogits(input: LogprobsInput, options?: LogprobsOptions): Promise<LogprobsResult> {
  return runAsync(() => logprobsOp(input, options), new Error());
}
export function logprobsFromLogitsSync(input: LogprobsInput, options?: LogprobsOptions): LogprobsResult {
  return runSync(() => logprobsOp(input, options));
}

export interface LogprobsGradients {
  /** [batch * steps] d loss / d logprobs, or omitted for zeros. */
  gradLogprobs?: FloatArray | null;
  /** [batch * steps] d loss / d entropy, or omitted for zeros. */
  gradEntropy?: FloatArray | null;
}

function logprobsBackwardOp(
  input: LogprobsInput,
  grads: LogprobsGradients,
  options: Omit<LogprobsOptions, 'entropy'> = {},
): PreparedOp<{ gradLogits: Float32Array }> {
  objectArgument('grads', grads);
  const args = prepareLogprobs(input, options, grads);
  return { name: 'logprobsBackward', args, finish: (raw) => ({ gradLogits: raw.gradLogits as Float32Array }) };
}

/** Backward of logprobsFromLogits: d loss / d logits [batch * steps * vocab] (0 on padded rows). */
export async function logprobsBackward(
  input: LogprobsInput,
  grads: LogprobsGradients,
  options?: Omit<LogprobsOptions, 'entropy'>,
): Promise<{ gradLogits: Float32Array }> {
  return runAsync(() => logprobsBackwardOp(input, grads, options), new Error());
}
export function logprobsBackwardSync(
  input: LogprobsInput,
  grads: LogprobsGradients,
  options?: Omit<LogprobsOptions, 'entropy'>,
): { gradLogits: Float32Array } {
  return runSync(() => logprobsBackwardOp(input, grads, options));
}

// ---- KL-penalized rewards -------------------------------------------------------------------

export type KlEstimator = 'k1' | 'k2' | 'k3';

export interface KlRewardsInput extends SequenceShape {
  /** [batch * steps] log-probs of the responses under the policy at rollout. */
  logprobs: FloatArray;
  /** [batch * steps] log-probs of the same tokens under the frozen reference. */
  refLogprobs: FloatArray;
  /** [batch] the sequence scores (e.g. reward model, normalized), added at the last valid token. */
  scores: FloatArray;
}
export interface KlRewardsOptions extends OpOptions {
  /** The KL coefficient eta (default 0.05, the ppoMax preset). */
  klCoef?: number;
  /** Per-token KL estimate of d = logprobs - refLogprobs: k1 = d, k2 = d^2/2, k3 = e^-d - 1 + d. */
  estimator?: KlEstimator;
}
export interface KlRewardsResult {
  /** [batch * steps] r_t = -klCoef * kl_t + [t last] * score; 0 at padded positions. */
  rewards: Float32Array;
  /** [batch * steps] the per-token KL estimate; 0 at padded positions. */
  kl: Float32Array;
}

function klRewardsOp(input: KlRewardsInput, options: KlRewardsOptions = {}): PreparedOp<KlRewardsResult> {
  const i = objectArgument('input', input);
  const o = objectArgument('options', options);
  const s = sequences(i);
  return {
    name: 'klPenalizedRewards',
    args: {
      batch: s.batch,
      steps: s.steps,
      logprobs: seqArray('logprobs', i, s),
      refLogprobs: seqArray('refLogprobs', i, s),
      scores: float32('scores', i.scores, s.batch, `[batch=${s.batch}]`),
      mask: s.mask,
      klCoef: numberOption('klCoef', o.klCoef, 0.05, { min: 0 }),
      estimator: choiceOption('estimator', o.estimator, ['k1', 'k2', 'k3'] as const, 'k1'),
      device: deviceOf(o),
    },
    finish: (raw) => ({ rewards: raw.rewards as Float32Array, kl: raw.kl as Float32Array }),
  };
}

/** The token-level KL-penalized reward of PPO-max (ppo-max.md step 5). */
export async function klPenalizedRewards(input: KlRewardsInput, options?: KlRewardsOptions): Promise<KlRewardsResult> {
  return runAsync(() => klRewardsOp(input, options), new Error());
}
export function klPenalizedRewardsSync(input: KlRewardsInput, options?: KlRewardsOptions): KlRewardsResult {
  return runSync(() => klRewardsOp(input, options));
}

// ---- GAE -------------------------------------------------------------------------------------

export interface GaeInput extends SequenceShape {
  /** [batch * steps] per-token rewards. */
  rewards: FloatArray;
  /** [batch * steps] critic values V(s_t) at rollout. */
  values: FloatArray;
}
export interface GaeOptions extends OpOptions {
  /** Discount, in [0, 1] (default 1, the ppoMax preset). */
  gamma?: number;
  /** GAE lambda, in [0, 1] (default 0.95). */
  lambda?: number;
}
export interface GaeResult {
  /** [batch * steps] advantages A_t; 0 at padded positions. */
  advantages: Float32Array;
  /** [batch * steps] returns A_t + V_t; 0 at padded positions. */
  returns: Float32Array;
}

function gaeOp(input: GaeInput, options: GaeOptions = {}): PreparedOp<GaeResult> {
  const i = objectArgument('input', input);
  const o = objectArgument('options', options);
  const s = sequences(i);
  return {
    name: 'gae',
    args: {
      batch: s.batch,
      steps: s.steps,
      rewards: seqArray('rewards', i, s),
      values: seqArray('values', i, s),
      mask: s.mask,
      gamma: numberOption('gamma', o.gamma, 1, { min: 0, max: 1 }),
      lambda: numberOption('lambda', o.lambda, 0.95, { min: 0, max: 1 }),
      device: deviceOf(o),
    },
    finish: (raw) => ({ advantages: raw.advantages as Float32Array, returns: raw.returns as Float32Array }),
  };
}

/**
 * Generalized advantage estimation over the valid positions of each row, the state
 * after a row's last valid token terminal (ppo-max.md step 6).
 */
export async function gae(input: GaeInput, options?: GaeOptions): Promise<GaeResult> {
  return runAsync(() => gaeOp(input, options), new Error());
}
export function gaeSync(input: GaeInput, options?: GaeOptions): GaeResult {
  return runSync(() => gaeOp(input, options));
}

// ---- whitening and clipping --------------------------------------------------------------------

export interface MaskedValuesInput extends SequenceShape {
  /** [batch * steps] values (e.g. advantages). */
  values: FloatArray;
}
export interface WhitenOptions extends OpOptions {
  /** Subtract the mean (default true); false adds it back after scaling. */
  shiftMean?: boolean;
  /** Added to the variance before the square root (default 1e-8). */
  eps?: number;
  /** Clip the whitened values to [-clip, clip] (default: no clipping). */
  clip?: number;
}

function whitenOp(input: MaskedValuesInput, options: WhitenOptions = {}): PreparedOp<Float32Array> {
  const i = objectArgument('input', input);
  const o = objectArgument('options', options);
  const s = sequences(i);
  return {
    name: 'whiten',
    args: {
      batch: s.batch,
      steps: s.steps,
      values: seqArray('values', i, s),
      mask: s.mask,
      shiftMean: booleanOption('shiftMean', o.shiftMean, true),
      eps: numberOption('eps', o.eps, 1e-8, { min: 0, max: 1, minExclusive: true }),
      clip: o.clip === undefined ? 0 : numberOption('clip', o.clip, 0, { min: 0, minExclusive: true }),
      device: deviceOf(o),
    },
    finish: (raw) => raw.values as Float32Array,
  };
}

/**
 * Masked whitening over all valid positions of the batch: (x - mean) / sqrt(var + eps),
 * var Bessel-corrected; padded positions get 0.
 */
export async function whiten(input: MaskedValuesInput, options?: WhitenOptions): Promise<Float32Array> {
  return runAsync(() => whitenOp(input, options), new Error());
}
export function whitenSync(input: MaskedValuesInput, options?: WhitenOptions): Float32Array {
  return runSync(() => whitenOp(input, options));
}

function clipOp(input: MaskedValuesInput, options: { clip: number } & OpOptions): PreparedOp<Float32Array> {
  const i = objectArgument('input', input);
  const o = objectArgument('options', options);
  const s = sequences(i);
  if (o.clip === undefined) throw invalidArgument('clip', 'clip is required (a positive number)');
  return {
    name: 'clipMasked',
    args: {
      batch: s.batch,
      steps: s.steps,
      values: seqArray('values', i, s),
      mask: s.mask,
      clip: numberOption('clip', o.clip, 0, { min: 0, minExclusive: true }),
      device: deviceOf(o),
    },
    finish: (raw) => raw.values as Float32Array,
  };
}

/** Advantage clipping: values clipped to [-clip, clip]; padded positions get 0. */
export async function clipAdvantages(input: MaskedValuesInput, options: { clip: number } & OpOptions): Promise<Float32Array> {
  return runAsync(() => clipOp(input, options), new Error());
}
export function clipAdvantagesSync(input: MaskedValuesInput, options: { clip: number } & OpOptions): Float32Array {
  return runSync(() => clipOp(input, options));
}

// ---- losses -------------------------------------------------------------------------------------

export interface PolicyLossInput extends SequenceShape {
  /** [batch * steps] log-probs under the policy being trained. */
  logprobs: FloatArray;
  /** [batch * steps] log-probs at rollout. */
  oldLogprobs: FloatArray;
  /** [batch * steps] advantages. */
  advantages: FloatArray;
}
export interface PolicyLossOptions extends OpOptions {
  /** The ratio clip epsilon (default 0.2). */
  clip?: number;
}
export interface PolicyLossResult {
  /** Token-level masked mean of max(-A ratio, -A clip(ratio, 1 - clip, 1 + clip)). */
  loss: number;
  /** [batch * steps] d loss / d logprobs (0 at padded positions). */
  gradLogprobs: Float32Array;
  /** Share of valid tokens where the clipped term was the larger (its gradient is 0). */
  clipFraction: number;
  /** Masked mean of (ratio - 1) - log ratio: the approximate KL to the rollout policy. */
  approxKl: number;
  /** Number of valid tokens averaged over. */
  tokens: number;
}

function policyLossOp(input: PolicyLossInput, options: PolicyLossOptions = {}): PreparedOp<PolicyLossResult> {
  const i = objectArgument('input', input);
  const o = objectArgument('options', options);
  const s = sequences(i);
  return {
    name: 'policyLoss',
    args: {
      batch: s.batch,
      steps: s.steps,
      logprobs: seqArray('logprobs', i, s),
      oldLogprobs: seqArray('oldLogprobs', i, s),
      advantages: seqArray('advantages', i, s),
      mask: s.mask,
      clip: numberOption('clip', o.clip, 0.2, { min: 0, minExclusive: true }),
      device: deviceOf(o),
    },
    finish: (raw) => ({
      loss: raw.loss as number,
      gradLogprobs: raw.gradLogprobs as Float32Array,
      clipFraction: raw.clipFraction as number,
      approxKl: raw.approxKl as number,
      tokens: raw.tokens as number,
    }),
  };
}

/** The clipped surrogate objective of PPO and its gradient (ppo-max.md step 7). */
export async function policyLoss(input: PolicyLossInput, options?: PolicyLossOptions): Promise<PolicyLossResult> {
  return runAsync(() => policyLossOp(input, options), new Error());
}
export function policyLossSync(input: PolicyLossInput, options?: PolicyLossOptions): PolicyLossResult {
  return runSync(() => policyLossOp(input, options));
}

export interface ValueLossInput extends SequenceShape {
  /** [batch * steps] values under the critic being trained. */
  values: FloatArray;
  /** [batch * steps] values at rollout. */
  oldValues: FloatArray;
  /** [batch * steps] GAE returns. */
  returns: FloatArray;
}
export interface ValueLossOptions extends OpOptions {
  /** Value clip epsilon (default 0.2, the ppoMax preset); null turns clipping off. */
  clip?: number | null;
}
export interface ValueLossResult {
  /** Token-level masked mean of 0.5 max((V - R)^2, (Vclip - R)^2). */
  loss: number;
  /** [batch * steps] d loss / d values (0 at padded positions). */
  gradValues: Float32Array;
  /** Share of valid tokens where the clipped term was the larger. */
  clipFraction: number;
  tokens: number;
}

function valueLossOp(input: ValueLossInput, options: ValueLossOptions = {}): PreparedOp<ValueLossResult> {
  const i = objectArgument('input', input);
  const o = objectArgument('options', options);
  const s = sequences(i);
  return {
    name: 'valueLoss',
    args: {
      batch: s.batch,
      steps: s.steps,
      values: seqArray('values', i, s),
      oldValues: seqArray('oldValues', i, s),
      returns: seqArray('returns', i, s),
      mask: s.mask,
      clip: o.clip === null ? null : numberOption('clip', o.clip, 0.2, { min: 0, minExclusive: true }),
      device: deviceOf(o),
    },
    finish: (raw) => ({
      loss: raw.loss as number,
      gradValues: raw.gradValues as Float32Array,
      clipFraction: raw.clipFraction as number,
      tokens: raw.tokens as number,
    }),
  };
}

/** The clipped value loss and its gradient (ppo-max.md step 7). */
export async function valueLoss(input: ValueLossInput, options?: ValueLossOptions): Promise<ValueLossResult> {
  return runAsync(() => valueLossOp(input, options), new Error());
}
export function valueLossSync(input: ValueLossInput, options?: ValueLossOptions): ValueLossResult {
  return runSync(() => valueLossOp(input, options));
}

