/**
 * The GPT-2 engine: a typed, async TypeScript API over the native transformer
 * (csrc/model/gpt.h). A Model holds GPT-2's weights (created from a config with a seed,
 * or loaded from a Hugging Face-compatible checkpoint directory), runs forward passes
 * over batches of right-padded variable-length sequences, backpropagates the LM loss,
 * a loss of the log-probs/entropy (the PPO policy loss) or of the value head (the
 * critic), takes AdamW steps, and generates with a KV cache.
 *
 * Every heavy method runs on a worker thread and returns a promise; the event loop stays
 * free. Calls on one model are queued and run one after another in call order, so
 * `Promise.all([m.forward(a), m.step(o)])` is safe. Inputs are validated and copied when
 * the method is called: the caller may reuse its arrays at once.
 */
import { Device, resolveDevice } from './device';
import { ErrorCode, PpoMaxError, fromNative, invalidArgument, outOfRange, shapeMismatch } from './errors';
import { NativeModelConfig, NativeModelHandle, NativeModelMemory, NativeNewModel, native } from './native';
import { booleanOption, describe, float32, isArrayLike, numberOption, objectArgument, positiveInteger } from './validate';

// ---- public types ---------------------------------------------------------------------------

/**
 * A model's hyperparameters (Hugging Face's config.json, in camelCase). GPT-2 by default;
 * `modelType: 'llama'` selects the Llama family (RMSNorm, rotary positions, SwiGLU,
 * grouped-query attention, no biases), whose Llama-only fields follow. For Llama, nEmbd is
 * hidden_size, nLayer num_hidden_layers, nHead num_attention_heads and nPositions
 * max_position_embeddings.
 */
export interface GPT2Config {
  /** 'gpt2' (default) or 'llama'. */
  modelType?: 'gpt2' | 'llama';
  /** V: the number of token ids (50257 for GPT-2). */
  vocabSize: number;
  /** The context length: the longest sequence the model takes (1024 for GPT-2). */
  nPositions: number;
  /** C: the width (768 for GPT-2 124M). */
  nEmbd: number;
  /** The number of transformer blocks (12). */
  nLayer: number;
  /** The number of attention heads (12); nEmbd must be divisible by it. */
  nHead: number;
  /** LayerNorm's epsilon (default 1e-5). */
  layerNormEpsilon?: number;
  /** A scalar value head on the final hidden states (the critic, a reward model). Default false. */
  valueHead?: boolean;
  /** Default: vocabSize - 1 (GPT-2's <|endoftext|>, 50256, for its vocabulary). */
  bosTokenId?: number;
  /** Default: vocabSize - 1. */
  eosTokenId?: number;
  /** Llama: key/value heads of grouped-query attention (default nHead); nHead must be a multiple. */
  nKvHead?: number;
  /** Llama: the SwiGLU MLP's width (default 4 * nEmbd). */
  intermediateSize?: number;
  /** Llama: RMSNorm's epsilon (default 1e-6). */
  rmsNormEps?: number;
  /** Llama: the rotary base (default 10000). */
  ropeTheta?: number;
  /** Llama: linear rotary scaling, positions divided by this factor (default 1: none). */
  ropeScaling?: number;
  /** Llama: the LM head is the token embedding (default false: an lm_head of its own). */
  tieWordEmbeddings?: boolean;
}

/** A Llama-family config. */
export type LlamaConfig = GPT2Config & { modelType: 'llama' };

type LlamaOnlyField = 'nKvHead' | 'intermediateSize' | 'rmsNormEps' | 'ropeTheta' | 'ropeScaling' | 'tieWordEmbeddings';
/** A model's config with every default filled in; the Llama-only fields are there on Llama models. */
export type ResolvedModelConfig = Required<Omit<GPT2Config, LlamaOnlyField>> & Pick<GPT2Config, LlamaOnlyField>;

/** Where a model runs (resolved: never 'auto'). */
export type ModelDevice = 'cpu' | 'cuda';

export interface CreateModelOptions {
  /** Seeds the initialization: same seed, same weights (default 0). */
  seed?: number;
  /**
   * 'auto' (the default: CUDA when it can be used, else the CPU), 'cpu' or 'cuda'
   * (ERR_CUDA_UNAVAILABLE, with the reason, when it cannot run). Parameters, gradients,
   * optimizer state, activations and the KV cache live on that device.
   */
  device?: Device;
  /** false: a frozen model (reference, reward model): no gradients, no optimizer (default true). */
  trainable?: boolean;
}

export interface LoadModelOptions {
  device?: Device;
  trainable?: boolean;
}

/** A batch in the [batch, steps] layout: row b is valid on [0, lengths[b]) (right padding). */
export interface TokenBatch {
  /** [batch * steps] token ids, row-major; any value at padded positions. */
  tokens: Int32Array | ArrayLike<number>;
  batch: number;
  steps: number;
  /** [batch] the number of valid tokens of each row, in [1, steps] (default: all steps). */
  lengths?: ArrayLike<number>;
}

/** A TokenBatch, or an array of token sequences (right-padded into [batch, longest]). */
export type TokenBatchInput = TokenBatch | ArrayLike<number>[];

/** A [batch * steps] array of numbers. */
export type FloatInput = Float32Array | ArrayLike<number>;

export interface ForwardOptions {
  /** [batch * steps * vocab]: logits[b, t] predicts token t + 1. */
  logits?: boolean;
  /** [batch * steps]: log p(tokens[b, t] | tokens[b, < t]) for 1 <= t < length; 0 elsewhere. */
  logprobs?: boolean;
  /** [batch * steps]: the entropy of the distribution token t was drawn from (same positions). */
  entropy?: boolean;
  /** [batch * steps]: the value head at every valid position (needs config.valueHead). */
  values?: boolean;
  /** The mean LM cross-entropy over the target positions. */
  lmLoss?: boolean;
  /** [batch * steps] of 0/1: the positions logprobs, entropy and lmLoss are computed at (default all). */
  targetMask?: FloatInput;
  /** Keep the activations for a following backward() (trainable models only). */
  retain?: boolean;
}

export interface ForwardResult {
  logits?: Float32Array;
  logprobs?: Float32Array;
  entropy?: Float32Array;
  values?: Float32Array;
  lmLoss?: number;
  /** The number of target positions the LM loss averages over. */
  lmTokens?: number;
}

/** d loss / d (each output of the retained forward); gradients accumulate. */
export interface BackwardGradients {
  gradLogprobs?: FloatInput;
  gradEntropy?: FloatInput;
  gradValues?: FloatInput;
  /** d loss / d lmLoss (default 0). */
  lmLossScale?: number;
}

export interface LmLossResult {
  loss: number;
  /** The number of target positions. */
  tokens: number;
}

export interface StepOptions {
  /** The learning rate (>= 0). */
  lr: number;
  beta1?: number; // default 0.9, in [0, 1)
  beta2?: number; // default 0.999, in [0, 1)
  eps?: number; // default 1e-8, > 0
  /** Decoupled weight decay on the dense weights and the value head (default 0). */
  weightDecay?: number;
  /** Also decay the token and position embeddings (default false). */
  decayEmbeddings?: boolean;
  /** Also decay biases and LayerNorm parameters (default false). */
  decayBiasesAndNorms?: boolean;
  /** > 0: clip the global gradient norm to this before the step (default 0: off). */
  maxGradNorm?: number;
}

export interface StepResult {
  /** The global L2 norm of the gradients, before clipping. */
  gradNorm: number;
  clipped: boolean;
  /** AdamW steps taken so far, this one included. */
  step: number;
}

export interface GenerateOptions {
  /** The most new tokens per row (>= 1); prompt length + maxNewTokens <= nPositions. */
  maxNewTokens: number;
  /** Argmax decoding; temperature, topK and topP are then ignored (default false). */
  greedy?: boolean;
  /** > 0 (default 1). */
  temperature?: number;
  /** Keep the k most likely tokens (default 0: off). */
  topK?: number;
  /** Nucleus sampling, in (0, 1] (default 1: off). */
  topP?: number;
  /** > 0 (default 1: off; > 1 discourages repeats): a positive logit is divided by it, a negative one multiplied. */
  repetitionPenalty?: number;
  /** Also penalize the prompt's tokens (default false: only generated ones). */
  penalizePrompt?: boolean;
  /** A row ends after generating one of these (it is included in the row's tokens). */
  stopTokens?: ArrayLike<number>;
  /** Same seed, same tokens (default 0). Each row has its own random stream. */
  seed?: number;
  /** Called on the main thread after each decoding step. If it throws, generation stops and rejects with that error. */
  onProgress?: (done: number, total: number) => void;
}

export interface GenerateResult {
  /** Per row: its new tokens only (a stop token included). */
  tokens: Int32Array[];
  /** Per row: log p(token | prefix) of each new token under the model (temperature 1, no truncation). */
  logprobs: Float32Array[];
  /** [batch]: the number of new tokens of each row. */
  lengths: Int32Array;
  /** Per row: true when it ended with a stop token. */
  stopped: boolean[];
}

/** Bytes of native memory a model holds. */
export type ModelMemory = NativeModelMemory;

// ---- validation ---------------------------------------------------------------------------

const MAX_INT32 = 2147483647;

// The C++ engine names arguments in snake_case.
const MODEL_ARGUMENT_NAMES: Record<string, string> = {
  vocab_size: 'config.vocabSize',
  n_positions: 'config.nPositions',
  n_embd: 'config.nEmbd',
  n_layer: 'config.nLayer',
  n_head: 'config.nHead',
  layer_norm_epsilon: 'config.layerNormEpsilon',
  bos_token_id: 'config.bosTokenId',
  eos_token_id: 'config.eosTokenId',
  target_mask: 'targetMask',
  grad_values: 'gradValues',
  lm_loss_scale: 'lmLossScale',
  max_new_tokens: 'maxNewTokens',
  top_k: 'topK',
  top_p: 'topP',
  repetition_penalty: 'repetitionPenalty',
  stop_tokens: 'stopTokens',
  weight_decay: 'weightDecay',
  max_grad_norm: 'maxGradNorm',
};

/**
 * Where a model runs: the same rule as the kernels' (resolveDevice): 'auto' is CUDA when
 * it can be used, else the CPU; 'cuda' that cannot run is ERR_CUDA_UNAVAILABLE.
 */
export function resolveModelDevice(device: unknown): ModelDevice {
  if (device === undefined || device === 'auto' || device === 'cpu' || device === 'cuda') return resolveDevice(device);
  throw invalidArgument('device', `device must be 'cpu', 'cuda' or 'auto', got ${describe(device)}`);
}

const CONFIG_FIELDS: readonly (keyof GPT2Config)[] = [
  'vocabSize',
  'nPositions',
  'nEmbd',
  'nLayer',
  'nHead',
  'layerNormEpsilon',
  'valueHead',
  'bosTokenId',
  'eosTokenId',
  'modelType',
  'nKvHead',
  'intermediateSize',
  'rmsNormEps',
  'ropeTheta',
  'ropeScaling',
  'tieWordEmbeddings',
];

function integerIn(name: string, value: unknown, min: number, max: number, code: ErrorCode = 'ERR_INVALID_ARGUMENT'): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
    throw new PpoMaxError(code, `${name} must be an integer in [${min}, ${max}], got ${describe(value)}`, name);
  }
  return value;
}

/** A complete config (defaults filled in), checked field by field. */
/** @internal */
export function normalizeConfig(value: unknown): NativeModelConfig {
  const c = objectArgument('config', value);
  for (const key of Object.keys(c)) {
    if (!(CONFIG_FIELDS as readonly string[]).includes(key)) {
      throw invalidArgument(`config.${key}`, `config.${key} is not a GPT2Config field (the fields: ${CONFIG_FIELDS.join(', ')})`);
    }
  }
  const size = (key: keyof GPT2Config) => integerIn(`config.${key}`, c[key], 1, MAX_INT32);
  const vocabSize = size('vocabSize');
  const nPositions = size('nPositions');
  const nEmbd = size('nEmbd');
  const nLayer = size('nLayer');
  const nHead = size('nHead');
  if (nEmbd % nHead !== 0) {
    throw invalidArgument('config.nHead', `config.nEmbd (${nEmbd}) must be divisible by config.nHead (${nHead})`);
  }
  const tokenId = (key: 'bosTokenId' | 'eosTokenId') =>
    c[key] === undefined ? vocabSize - 1 : integerIn(`config.${key}`, c[key], 0, vocabSize - 1, 'ERR_OUT_OF_RANGE');
  const modelType = c.modelType === undefined ? 'gpt2' : c.modelType;
  if (modelType !== 'gpt2' && modelType !== 'llama') {
    throw invalidArgument('config.modelType', `config.modelType must be 'gpt2' or 'llama', got ${describe(c.modelType)}`);
  }
  const nKvHead = c.nKvHead === undefined ? nHead : integerIn('config.nKvHead', c.nKvHead, 1, nHead);
  if (modelType === 'llama') {
    if (nHead % nKvHead !== 0) throw invalidArgument('config.nKvHead', `config.nHead (${nHead}) must be a multiple of config.nKvHead (${nKvHead})`);
    if ((nEmbd / nHead) % 2 !== 0) throw invalidArgument('config.nHead', `the head size nEmbd / nHead (${nEmbd / nHead}) must be even for rotary positions`);
  }
  const positive = (key: keyof GPT2Config, fallback: number) => numberOption(`config.${key}`, c[key], fallback, { min: 0, minExclusive: true });
  const llama =
    modelType === 'llama'
      ? {
          nKvHead,
          intermediateSize: c.intermediateSize === undefined ? 4 * nEmbd : integerIn('config.intermediateSize', c.intermediateSize, 1, MAX_INT32),
          rmsNormEps: positive('rmsNormEps', 1e-6),
          ropeTheta: positive('ropeTheta', 10000),
          ropeScaling: positive('ropeScaling', 1),
          tieWordEmbeddings: booleanOption('config.tieWordEmbeddings', c.tieWordEmbeddings, false),
        }
      : {};
  return {
    modelType,
    ...llama,
    vocabSize,
    nPositions,
    nEmbd,
    nLayer,
    nHead,
    layerNormEpsilon: numberOption('config.layerNormEpsilon', c.layerNormEpsilon, 1e-5, { min: 0, minExclusive: true }),
    valueHead: booleanOption('config.valueHead', c.valueHead, false),
    bosTokenId: tokenId('bosTokenId'),
    eosTokenId: tokenId('eosTokenId'),
  };
}

/** A seed: an integer in [0, 2^53). */
function seedOption(value: unknown): number {
  if (value === undefined) return 0;
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
    throw invalidArgument('seed', `seed must be an integer in [0, 2^53), got ${describe(value)}`);
  }
  return value;
}

/** A batch as the addon takes it: copied, padded positions made valid int32 values. */
/** @internal A checked batch (trainers use it too). */
export interface Batch {
  batch: number;
  steps: number;
  tokens: Int32Array;
  /** null: every row is full. */
  lengths: Int32Array | null;
  shape: string;
}

function rowLength(b: Batch, row: number): number {
  return b.lengths === null ? b.steps : b.lengths[row];
}

function checkToken(x: unknown, vocab: number, where: string): number {
  if (typeof x !== 'number' || !Number.isInteger(x)) {
    throw invalidArgument('tokens', `${where} must be an integer token id, got ${describe(x)}`);
  }
  if (x < 0 || x >= vocab) {
    throw outOfRange('tokens', `${where} is ${x}: token ids must be in [0, vocabSize=${vocab})`);
  }
  return x;
}

// Whatever sits at a padded position is never read by the engine: any int32 is passed
// as is, anything else (NaN, 1.5, 1e12) becomes 0.
function paddingValue(x: unknown): number {
  return typeof x === 'number' && Number.isInteger(x) && x >= -2147483648 && x <= MAX_INT32 ? x : 0;
}

/** @internal */
export function prepareBatch(input: unknown, vocab: number, nPositions: number, what: string): Batch {
  if (Array.isArray(input)) return batchFromSequences(input, vocab, nPositions, what);
  if (ArrayBuffer.isView(input) || input === null || typeof input !== 'object') {
    throw invalidArgument(
      what,
      `${what} must be { tokens, batch, steps, lengths? } or an array of token sequences, got ${describe(input)}`,
    );
  }
  const i = input as Record<string, unknown>;
  const batch = positiveInteger('batch', i.batch);
  const steps = positiveInteger('steps', i.steps);
  if (steps > nPositions) {
    throw outOfRange('steps', `steps=${steps} exceeds the context length nPositions=${nPositions}`);
  }
  const shape = `[batch=${batch}, steps=${steps}]`;
  const rows = batch * steps;
  const src = i.tokens;
  if (src === undefined || src === null) throw invalidArgument('tokens', `tokens is required (an Int32Array of ${shape})`);
  if (!isArrayLike(src)) {
    throw invalidArgument('tokens', `tokens must be an Int32Array or an array of integers, got ${describe(src)}`);
  }
  if (src.length !== rows) throw shapeMismatch('tokens', `tokens has ${src.length} elements, expected ${rows} (${shape})`);

  let lengths: Int32Array | null = null;
  if (i.lengths !== undefined && i.lengths !== null) {
    const l = i.lengths;
    if (!isArrayLike(l)) throw invalidArgument('lengths', `lengths must be an array of ${batch} integers, got ${describe(l)}`);
    if (l.length !== batch) throw shapeMismatch('lengths', `lengths has ${l.length} elements, expected ${batch} ([batch=${batch}])`);
    lengths = new Int32Array(batch);
    for (let b = 0; b < batch; b++) {
      const n = l[b];
      if (typeof n !== 'number' || !Number.isInteger(n) || n < 1 || n > steps) {
        throw outOfRange('lengths', `lengths[${b}] is ${describe(n)}: each length must be an integer in [1, steps=${steps}]`);
      }
      lengths[b] = n;
    }
  }

  const tokens = new Int32Array(rows);
  for (let b = 0; b < batch; b++) {
    const n = lengths === null ? steps : lengths[b];
    const base = b * steps;
    for (let t = 0; t < steps; t++) {
      const x = src[base + t];
      tokens[base + t] = t < n ? checkToken(x, vocab, `tokens[${base + t}] (row ${b}, position ${t})`) : paddingValue(x);
    }
  }
  return { batch, steps, tokens, lengths, shape };
}

function batchFromSequences(seqs: unknown[], vocab: number, nPositions: number, what: string): Batch {
  if (seqs.length === 0) throw invalidArgument(what, `${what} needs at least one sequence`);
  let steps = 0;
  seqs.forEach((s, b) => {
    if (!isArrayLike(s)) {
      throw invalidArgument('tokens', `${what}[${b}] must be an array of token ids, got ${describe(s)}`);
    }
    if (s.length === 0) throw outOfRange('lengths', `${what}[${b}] is empty: every sequence needs at least one token`);
    if (s.length > nPositions) {
      throw outOfRange('tokens', `${what}[${b}] has ${s.length} tokens, more than the context length nPositions=${nPositions}`);
    }
    steps = Math.max(steps, s.length);
  });
  const batch = seqs.length;
  const tokens = new Int32Array(batch * steps);
  const lengths = new Int32Array(batch);
  seqs.forEach((s, b) => {
    const seq = s as ArrayLike<unknown>;
    lengths[b] = seq.length;
    for (let t = 0; t < seq.length; t++) {
      tokens[b * steps + t] = checkToken(seq[t], vocab, `${what}[${b}][${t}]`);
    }
  });
  return { batch, steps, tokens, lengths, shape: `[batch=${batch}, steps=${steps}]` };
}

/** The same batch with steps cut to its longest row (generation continues each row). */
function trimBatch(b: Batch): Batch {
  if (b.lengths === null) return b;
  const longest = b.lengths.reduce((m, n) => Math.max(m, n), 0);
  if (longest === b.steps) return b;
  const tokens = new Int32Array(b.batch * longest);
  for (let r = 0; r < b.batch; r++) tokens.set(b.tokens.subarray(r * b.steps, r * b.steps + longest), r * longest);
  return { batch: b.batch, steps: longest, tokens, lengths: b.lengths, shape: `[batch=${b.batch}, steps=${longest}]` };
}

/** The [batch, steps] layout of a checked batch (what float arrays are read against). */
interface Shape {
  batch: number;
  steps: number;
  /** null: every row is full. */
  lengths: Int32Array | null;
}

/**
 * A [batch * steps] float array, copied. Like the engine, it checks only what is read:
 * 'grad': finite at the valid positions (t < length); 'mask': 0 or 1 at the predicted
 * positions (1 <= t < length). Padded positions may hold anything.
 */
function rowFloats(name: string, value: unknown, b: Shape, kind: 'grad' | 'mask'): Float32Array {
  const converted = float32(name, value, b.batch * b.steps, `[batch=${b.batch}, steps=${b.steps}]`);
  const out = converted === value ? converted.slice() : converted;
  for (let r = 0; r < b.batch; r++) {
    const n = b.lengths === null ? b.steps : b.lengths[r];
    for (let t = kind === 'mask' ? 1 : 0; t < n; t++) {
      const i = r * b.steps + t;
      const x = out[i];
      if (!Number.isFinite(x)) {
        throw new PpoMaxError('ERR_NON_FINITE', `${name}[${i}] (row ${r}, position ${t}) is ${x}: ${name} must be finite`, name);
      }
      if (kind === 'mask' && x !== 0 && x !== 1) {
        throw outOfRange(name, `${name}[${i}] (row ${r}, position ${t}) is ${x}: ${name} must hold 0 or 1`);
      }
    }
  }
  return out;
}

function optionalRowFloats(name: string, value: unknown, b: Shape, kind: 'grad' | 'mask'): Float32Array | null {
  return value === undefined || value === null ? null : rowFloats(name, value, b, kind);
}

function finiteNumber(name: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isFinite(value)) {
    throw invalidArgument(name, `${name} must be a finite number, got ${describe(value)}`);
  }
  return value;
}

function belowOne(name: string, value: unknown, fallback: number): number {
  const x = numberOption(name, value, fallback, { min: 0 });
  if (x >= 1) throw invalidArgument(name, `${name} must be in [0, 1), got ${x}`);
  return x;
}

/** The shape and outputs of the forward a backward() will go through. */
interface Retained extends Shape {
  logprobs: boolean;
  entropy: boolean;
  values: boolean;
  lmLoss: boolean;
}

/** What a forward call computes, and (for the one-call backward forms) its gradients. */
interface ForwardCall {
  options: ForwardOptions;
  gradients?: (b: Batch) => { gradLogprobs?: Float32Array | null; gradEntropy?: Float32Array | null; gradValues?: Float32Array; lmLossScale?: number };
}

interface ForwardFlags {
  logits: boolean;
  logprobs: boolean;
  entropy: boolean;
  values: boolean;
  lmLoss: boolean;
}

/** An error thrown by the user's own callback: rejected as is, not wrapped. */
/** @internal An error thrown by a user callback, rethrown as is. */
export class UserError {
  constructor(readonly error: unknown) {}
}

function disposedError(): PpoMaxError {
  return new PpoMaxError('ERR_DISPOSED', 'this model was disposed (dispose() was called): create or load another one', 'model');
}

const noop = (): void => undefined;

// ---- the model --------------------------------------------------------------------------------

/** A GPT-2 model held in native memory. Create one with Model.create or Model.load. */
export class Model {
  /** The model's hyperparameters, every field filled in. */
  readonly config: Readonly<ResolvedModelConfig>;
  /** Where it runs (a clone runs where its source does). */
  readonly device: ModelDevice;
  /** false for a frozen model: backward and step are refused. */
  readonly trainable: boolean;

  private handle: NativeModelHandle | null;
  private readonly count: number;
  // The calls of this model run one after another: each waits for this promise.
  private tail: Promise<void> = Promise.resolve();
  private closing = false;
  private disposal: Promise<void> | null = null;
  // What the most recently queued forward retained, in call order (the addon checks the
  // same at run time, in case a queued forward fails).
  private retained: Retained | null = null;

  private constructor(made: NativeNewModel, trainable: boolean) {
    this.handle = made.handle;
    this.config = Object.freeze({ ...made.config });
    this.count = made.parameterCount;
    this.device = made.device;
    this.trainable = trainable;
  }

  /** A new model with GPT-2's initialization (same seed, same weights). */
  static async create(config: GPT2Config, options: CreateModelOptions = {}): Promise<Model> {
    const callSite = new Error();
    try {
      const cfg = normalizeConfig(config);
      const o = objectArgument('options', options);
      const seed = seedOption(o.seed);
      const device = resolveModelDevice(o.device);
      const trainable = booleanOption('trainable', o.trainable, true);
      const made = await native().modelCreate({ config: cfg, seed, device, trainable });
      return new Model(made, trainable);
    } catch (e) {
      throw fromNative(e, callSite, MODEL_ARGUMENT_NAMES);
    }
  }

  /**
   * Loads a checkpoint directory (config.json and model.safetensors, as Hugging Face's
   * GPT-2 writes them). Missing files: ERR_NOT_FOUND; unparseable ones: ERR_CORRUPT_FILE.
   */
  static async load(dir: string, options: LoadModelOptions = {}): Promise<Model> {
    const callSite = new Error();
    try {
      if (typeof dir !== 'string' || dir === '') throw invalidArgument('dir', `dir must be a non-empty path, got ${describe(dir)}`);
      const o = objectArgument('options', options);
      const device = resolveModelDevice(o.device);
      const trainable = booleanOption('trainable', o.trainable, true);
      const made = await native().modelLoad({ dir, device, trainable });
      return new Model(made, trainable);
    } catch (e) {
      throw fromNative(e, callSite, MODEL_ARGUMENT_NAMES);
    }
  }

  /** The number of parameters a model of this config has (no model is made). */
  static parameterCount(config: GPT2Config): number {
    try {
      return native().modelParameterCount(normalizeConfig(config));
    } catch (e) {
      throw fromNative(e, undefined, MODEL_ARGUMENT_NAMES);
    }
  }

  /** The number of parameters (value head included). */
  parameterCount(): number {
    return this.count;
  }

  /** True from the moment dispose() is called. */
  get disposed(): boolean {
    return this.closing;
  }

  /** Bytes of native memory held, as of the last completed call (all 0 once disposed). */
  memory(): ModelMemory {
    if (this.handle === null) return { params: 0, grads: 0, optimizer: 0, activations: 0, kvCache: 0 };
    return native().modelMemory(this.handle);
  }

  /** Writes config.json and model.safetensors into dir (created if needed). */
  async save(dir: string): Promise<void> {
    const callSite = new Error();
    return this.schedule(callSite, () => {
      if (typeof dir !== 'string' || dir === '') throw invalidArgument('dir', `dir must be a non-empty path, got ${describe(dir)}`);
      return (handle) => native().modelSave(handle, { dir });
    });
  }

  /**
   * A new model with a copy of this one's parameters (config included), trainable or
   * frozen; no gradients or optimizer state are copied. The reference of PPO is a frozen
   * clone of the SFT policy; PPO-max's critic a trainable clone of the reward model.
   * `valueHead: true` on a model without a head adds one, zero-initialized (a reward model
   * started from the SFT model, as in the paper); `false` drops it (an LM again).
   */
  clone(options: { trainable?: boolean; valueHead?: boolean } = {}): Promise<Model> {
    const callSite = new Error();
    let trainable = true;
    return this.schedule(callSite, () => {
      const o = objectArgument('options', options);
      trainable = booleanOption('trainable', o.trainable, true);
      const valueHead = booleanOption('valueHead', o.valueHead, Boolean(this.config.valueHead));
      return (handle) => native().modelClone(handle, { trainable, valueHead });
    }).then((made) => new Model(made, trainable));
  }

  /** A forward pass computing the outputs asked for (see ForwardOptions for alignment). */
  async forward(batch: TokenBatchInput, options: ForwardOptions = {}): Promise<ForwardResult> {
    return this.forwardCall(new Error(), batch, () => ({ options }));
  }

  /** [batch * steps * vocab] logits (logits[b, t] predicts token t + 1). */
  async logits(batch: TokenBatchInput): Promise<Float32Array> {
    const r = await this.forwardCall(new Error(), batch, () => ({ options: { logits: true } }));
    return r.logits as Float32Array;
  }

  /** log p(tokens[b, t] | tokens[b, < t]), and optionally the entropy, at the target positions. */
  async logprobs(
    batch: TokenBatchInput,
    options: { entropy?: boolean; targetMask?: FloatInput } = {},
  ): Promise<{ logprobs: Float32Array; entropy?: Float32Array }> {
    const r = await this.forwardCall(new Error(), batch, () => {
      const o = objectArgument('options', options);
      return { options: { logprobs: true, entropy: o.entropy as boolean | undefined, targetMask: o.targetMask as FloatInput } };
    });
    return r.entropy ? { logprobs: r.logprobs as Float32Array, entropy: r.entropy } : { logprobs: r.logprobs as Float32Array };
  }

  /** [batch * steps] the value head at every valid position (needs config.valueHead). */
  async values(batch: TokenBatchInput): Promise<Float32Array> {
    const r = await this.forwardCall(new Error(), batch, () => ({ options: { values: true } }));
    return r.values as Float32Array;
  }

  /** The mean LM cross-entropy over the target positions (every predicted position by default). */
  async lmLoss(batch: TokenBatchInput, options: { targetMask?: FloatInput } = {}): Promise<LmLossResult> {
    const r = await this.forwardCall(new Error(), batch, () => {
      const o = objectArgument('options', options);
      return { options: { lmLoss: true, targetMask: o.targetMask as FloatInput } };
    });
    return { loss: r.lmLoss as number, tokens: r.lmTokens as number };
  }

  /** Forward and backward of scale * lmLoss (scale default 1) in one call; gradients accumulate. */
  async lmLossBackward(batch: TokenBatchInput, options: { targetMask?: FloatInput; scale?: number } = {}): Promise<LmLossResult> {
    const r = await this.forwardCall(new Error(), batch, () => {
      const o = objectArgument('options', options);
      const lmLossScale = o.scale === undefined ? 1 : finiteNumber('scale', o.scale);
      return { options: { lmLoss: true, targetMask: o.targetMask as FloatInput }, gradients: () => ({ lmLossScale }) };
    });
    return { loss: r.lmLoss as number, tokens: r.lmTokens as number };
  }

  /**
   * Forward of the log-probs (and the entropy, when gradEntropy is given), then backward
   * of a loss whose gradients with respect to them are gradLogprobs and gradEntropy.
   */
  async logprobsBackward(
    batch: TokenBatchInput,
    options: { gradLogprobs: FloatInput; gradEntropy?: FloatInput; targetMask?: FloatInput },
  ): Promise<{ logprobs: Float32Array; entropy?: Float32Array }> {
    const r = await this.forwardCall(new Error(), batch, () => {
      const o = objectArgument('options', options);
      const withEntropy = o.gradEntropy !== undefined && o.gradEntropy !== null;
      return {
        options: { logprobs: true, entropy: withEntropy, targetMask: o.targetMask as FloatInput },
        gradients: (b: Batch) => {
          if (o.gradLogprobs === undefined || o.gradLogprobs === null) {
            throw invalidArgument('gradLogprobs', `gradLogprobs is required (a Float32Array of ${b.shape})`);
          }
          return {
            gradLogprobs: rowFloats('gradLogprobs', o.gradLogprobs, b, 'grad'),
            gradEntropy: optionalRowFloats('gradEntropy', o.gradEntropy, b, 'grad'),
          };
        },
      };
    });
    return r.entropy ? { logprobs: r.logprobs as Float32Array, entropy: r.entropy } : { logprobs: r.logprobs as Float32Array };
  }

  /** Forward of the value head, then backward of a loss whose gradient with respect to the values is gradValues. */
  async valuesBackward(batch: TokenBatchInput, options: { gradValues: FloatInput }): Promise<{ values: Float32Array }> {
    const r = await this.forwardCall(new Error(), batch, () => {
      const o = objectArgument('options', options);
      return {
        options: { values: true },
        gradients: (b: Batch) => {
          if (o.gradValues === undefined || o.gradValues === null) {
            throw invalidArgument('gradValues', `gradValues is required (a Float32Array of ${b.shape})`);
          }
          return { gradValues: rowFloats('gradValues', o.gradValues, b, 'grad') };
        },
      };
    });
    return { values: r.values as Float32Array };
  }

  /**
   * Backpropagates through the previous call's forward(batch, { ..., retain: true }):
   * for losses computed in JS from the forward's outputs (the PPO loss). Gradients
   * accumulate until zeroGrad(); backward may be called again on the same forward.
   */
  async backward(gradients: BackwardGradients): Promise<void> {
    const callSite = new Error();
    return this.schedule(callSite, () => {
      this.requireTrainable();
      const r = this.retained;
      if (r === null) {
        throw invalidArgument('backward', 'backward() needs the previous call on this model to be forward(batch, { ..., retain: true })');
      }
      const g = objectArgument('gradients', gradients);
      const grad = (name: 'gradLogprobs' | 'gradEntropy' | 'gradValues', output: 'logprobs' | 'entropy' | 'values') => {
        const value = g[name];
        if (value === undefined || value === null) return null;
        if (!r[output]) throw invalidArgument(name, `${name} needs ${output}: true in the retained forward`);
        return rowFloats(name, value, r, 'grad');
      };
      const args = {
        batch: r.batch,
        steps: r.steps,
        gradLogprobs: grad('gradLogprobs', 'logprobs'),
        gradEntropy: grad('gradEntropy', 'entropy'),
        gradValues: grad('gradValues', 'values'),
        lmLossScale: g.lmLossScale === undefined ? 0 : finiteNumber('lmLossScale', g.lmLossScale),
      };
      if (args.lmLossScale !== 0 && !r.lmLoss) throw invalidArgument('lmLossScale', 'lmLossScale needs lmLoss: true in the retained forward');
      if (!args.gradLogprobs && !args.gradEntropy && !args.gradValues && args.lmLossScale === 0) {
        throw invalidArgument('gradients', 'backward() needs at least one of gradLogprobs, gradEntropy, gradValues or lmLossScale');
      }
      return (handle) => native().modelBackward(handle, args);
    });
  }

  /** Sets the accumulated gradients to zero. */
  async zeroGrad(): Promise<void> {
    return this.schedule(new Error(), () => (handle) => native().modelZeroGrad(handle));
  }

  /** The global L2 norm of the accumulated gradients (0 before any backward). */
  async gradNorm(): Promise<number> {
    return this.schedule(new Error(), () => (handle) => native().modelGradNorm(handle));
  }

  /** One AdamW step (after clipping the gradient norm to maxGradNorm, when > 0). */
  async step(options: StepOptions): Promise<StepResult> {
    const callSite = new Error();
    return this.schedule(callSite, () => {
      this.requireTrainable();
      const o = objectArgument('options', options);
      if (o.lr === undefined) throw invalidArgument('lr', 'lr is required (the learning rate, >= 0)');
      const args = {
        lr: numberOption('lr', o.lr, 0, { min: 0 }),
        beta1: belowOne('beta1', o.beta1, 0.9),
        beta2: belowOne('beta2', o.beta2, 0.999),
        eps: numberOption('eps', o.eps, 1e-8, { min: 0, minExclusive: true }),
        weightDecay: numberOption('weightDecay', o.weightDecay, 0, { min: 0 }),
        decayEmbeddings: booleanOption('decayEmbeddings', o.decayEmbeddings, false),
        decayBiasesAndNorms: booleanOption('decayBiasesAndNorms', o.decayBiasesAndNorms, false),
        maxGradNorm: numberOption('maxGradNorm', o.maxGradNorm, 0, { min: 0 }),
      };
      return async (handle) => {
        const r = await native().modelStep(handle, args);
        return { gradNorm: r.gradNorm, clipped: r.clipped, step: r.step };
      };
    });
  }

  /** Continues each prompt by up to maxNewTokens tokens (KV cache; each row its own length). */
  async generate(prompts: TokenBatchInput, options: GenerateOptions): Promise<GenerateResult> {
    const callSite = new Error();
    return this.schedule(callSite, () => {
      const o = objectArgument('options', options);
      const cfg = this.config;
      const b = trimBatch(prepareBatch(prompts, cfg.vocabSize, cfg.nPositions, 'prompts'));
      if (o.maxNewTokens === undefined) throw invalidArgument('maxNewTokens', 'maxNewTokens is required (a positive integer)');
      const maxNewTokens = positiveInteger('maxNewTokens', o.maxNewTokens);
      for (let r = 0; r < b.batch; r++) {
        const n = rowLength(b, r);
        if (n + maxNewTokens > cfg.nPositions) {
          throw outOfRange(
            'maxNewTokens',
            `prompt ${r} has ${n} tokens: ${n} + maxNewTokens (${maxNewTokens}) exceeds the context length nPositions=${cfg.nPositions}`,
          );
        }
      }
      let stopTokens = new Int32Array(0);
      if (o.stopTokens !== undefined && o.stopTokens !== null) {
        const s = o.stopTokens;
        if (!isArrayLike(s)) throw invalidArgument('stopTokens', `stopTokens must be an array of token ids, got ${describe(s)}`);
        stopTokens = Int32Array.from({ length: s.length }, (_, i) => integerIn(`stopTokens[${i}]`, s[i], 0, cfg.vocabSize - 1, 'ERR_OUT_OF_RANGE'));
      }
      const onProgress = o.onProgress;
      if (onProgress !== undefined && onProgress !== null && typeof onProgress !== 'function') {
        throw invalidArgument('onProgress', `onProgress must be a function, got ${describe(onProgress)}`);
      }
      const topP = numberOption('topP', o.topP, 1, { min: 0, minExclusive: true, max: 1 });
      const args = {
        batch: b.batch,
        steps: b.steps,
        tokens: b.tokens,
        lengths: b.lengths,
        maxNewTokens,
        greedy: booleanOption('greedy', o.greedy, false),
        temperature: numberOption('temperature', o.temperature, 1, { min: 0, minExclusive: true }),
        topK: o.topK === undefined ? 0 : integerIn('topK', o.topK, 0, MAX_INT32),
        topP,
        repetitionPenalty: numberOption('repetitionPenalty', o.repetitionPenalty, 1, { min: 0, minExclusive: true }),
        penalizePrompt: booleanOption('penalizePrompt', o.penalizePrompt, false),
        stopTokens,
        seed: seedOption(o.seed),
      };
      this.retained = null;
      return async (handle) => {
        let thrown: UserError | null = null;
        const progress =
          typeof onProgress === 'function'
            ? (done: number, total: number) => {
                try {
                  (onProgress as (done: number, total: number) => void)(done, total);
                } catch (e) {
                  thrown = new UserError(e);
                  throw e;
                }
              }
            : undefined;
        let raw;
        try {
          raw = await native().modelGenerate(handle, args, progress);
        } catch (e) {
          throw thrown ?? e;
        }
        const tokens: Int32Array[] = [];
        const logprobs: Float32Array[] = [];
        const stopped: boolean[] = [];
        for (let r = 0; r < raw.batch; r++) {
          const start = r * raw.maxNewTokens;
          tokens.push(raw.tokens.slice(start, start + raw.lengths[r]));
          logprobs.push(raw.logprobs.slice(start, start + raw.lengths[r]));
          stopped.push(raw.stopped[r] !== 0);
        }
        return { tokens, logprobs, lengths: raw.lengths, stopped };
      };
    });
  }

  /**
   * Frees the native memory once the calls already queued have run. Calls made after
   * dispose() reject with ERR_DISPOSED; disposing again returns the same promise.
   */
  dispose(): Promise<void> {
    if (this.disposal) return this.disposal;
    const callSite = new Error();
    this.closing = true;
    this.retained = null;
    this.disposal = this.tail.then(async () => {
      const handle = this.handle;
      if (handle === null) return;
      try {
        await native().modelDispose(handle);
      } catch (e) {
        throw fromNative(e, callSite, MODEL_ARGUMENT_NAMES);
      }
      this.handle = null;
    });
    this.tail = this.disposal.then(noop, noop);
    return this.disposal;
  }

  // ---- internals ----------------------------------------------------------------------------

  /**
   * @internal Runs `run` with the native handles of several models (a trainer's call)
   * once the calls already queued on each have settled; later calls on any of them wait
   * for it. `prepare` runs now (validation, copies), as in schedule(); the trainer's
   * forwards replace whatever forward the models retained.
   */
  static exclusive<R>(
    models: readonly Model[],
    callSite: Error,
    argumentNames: Record<string, string>,
    prepare: () => (handles: NativeModelHandle[]) => Promise<R>,
  ): Promise<R> {
    return Model.enqueue(models, callSite, argumentNames, () => {
      const run = prepare();
      for (const m of models) m.retained = null;
      return run;
    });
  }

  /** @internal The native handle, for synchronous trainer setup (null once disposed). */
  nativeHandle(): NativeModelHandle | null {
    return this.closing ? null : this.handle;
  }

  /**
   * Queues a call: `prepare` runs now (validation and copies, in call order; a throw
   * rejects at once), the returned function when the calls before it have settled.
   */
  private schedule<R>(callSite: Error, prepare: () => (handle: NativeModelHandle) => Promise<R>): Promise<R> {
    return Model.enqueue([this], callSite, MODEL_ARGUMENT_NAMES, () => {
      const run = prepare();
      return (handles) => run(handles[0]);
    });
  }

  /** The queue under schedule() and exclusive(): one call over `models`, in call order. */
  private static enqueue<R>(
    models: readonly Model[],
    callSite: Error,
    argumentNames: Record<string, string>,
    prepare: () => (handles: NativeModelHandle[]) => Promise<R>,
  ): Promise<R> {
    let run: (handles: NativeModelHandle[]) => Promise<R>;
    try {
      if (models.some((m) => m.closing)) throw disposedError();
      run = prepare();
    } catch (e) {
      return Promise.reject(fromNative(e, callSite, argumentNames));
    }
    const before = models.length === 1 ? models[0].tail : Promise.all(models.map((m) => m.tail));
    const result = before.then(async () => {
      try {
        const handles = models.map((m) => m.handle);
        if (handles.some((h) => h === null)) throw disposedError();
        return await run(handles as NativeModelHandle[]);
      } catch (e) {
        if (e instanceof UserError) throw e.error;
        throw fromNative(e, callSite, argumentNames);
      }
    });
    for (const m of models) m.tail = result.then(noop, noop);
    return result;
  }

  private requireTrainable(): void {
    if (!this.trainable) {
      throw invalidArgument('trainable', 'this model is frozen (created or loaded with trainable: false): it has no gradients');
    }
  }

  /**
   * A forward, or (with `gradients`) a retained forward and backward in one native call.
   * `describeCall` runs at call time (its errors reject the call); `gradients` builds
   * the backward's inputs from the checked batch.
   */
  private forwardCall(callSite: Error, batch: TokenBatchInput, describeCall: () => ForwardCall): Promise<ForwardResult> {
    return this.schedule(callSite, () => {
      const call = describeCall();
      const o = objectArgument('options', call.options);
      const gradients = call.gradients ?? null;
      const cfg = this.config;
      const b = prepareBatch(batch, cfg.vocabSize, cfg.nPositions, 'batch');
      const want: ForwardFlags = {
        logits: booleanOption('logits', o.logits, false),
        logprobs: booleanOption('logprobs', o.logprobs, false),
        entropy: booleanOption('entropy', o.entropy, false),
        values: booleanOption('values', o.values, false),
        lmLoss: booleanOption('lmLoss', o.lmLoss, false),
      };
      if (!want.logits && !want.logprobs && !want.entropy && !want.values && !want.lmLoss) {
        throw invalidArgument('options', 'forward computes nothing: ask for at least one of logits, logprobs, entropy, values or lmLoss');
      }
      if (want.values && !cfg.valueHead) {
        throw invalidArgument('values', 'this model has no value head (create it with config.valueHead: true)');
      }
      const retain = gradients !== null || booleanOption('retain', o.retain, false);
      if (retain) this.requireTrainable();
      const targetMask = optionalRowFloats('targetMask', o.targetMask, b, 'mask');
      const backward = gradients === null ? undefined : gradients(b);
      this.retained = retain ? { batch: b.batch, steps: b.steps, lengths: b.lengths, ...want } : null;
      const args = {
        batch: b.batch,
        steps: b.steps,
        tokens: b.tokens,
        lengths: b.lengths,
        targetMask,
        ...want,
        retain,
        backward,
      };
      return async (handle) => {
        const raw = await native().modelForward(handle, args);
        const out: ForwardResult = {};
        if (want.logits) out.logits = raw.logits as Float32Array;
        if (want.logprobs) out.logprobs = raw.logprobs as Float32Array;
        if (want.entropy) out.entropy = raw.entropy as Float32Array;
        if (want.values) out.values = raw.values as Float32Array;
        if (want.lmLoss) {
          out.lmLoss = raw.lmLoss as number;
          out.lmTokens = raw.lmTokens as number;
        }
        return out;
      };
    });
  }
}
