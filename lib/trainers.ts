/**
 * The trainers: SFT, the reward model and PPO-max (../shared/ppo-max.md). Each step is one
 * awaited native call (trainer/trainer.h) that holds its models for its whole duration:
 * the calls queued on those models before it run first, the ones after it wait.
 *
 *   const trainer = await PpoTrainer.create({ policy, reference, critic, rewardModel, options: { ...ppoMax, maxNewTokens: 24 } });
 *   const { stats, alarms } = await trainer.step(prompts);
 */
import { EventEmitter } from 'events';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

import { PpoMaxError, fromNative, invalidArgument, shapeMismatch } from './errors';
import { Device } from './device';
import { Batch, GPT2Config, Model, ModelMemory, TokenBatchInput, UserError, normalizeConfig, prepareBatch } from './model';
import { Alarm, AlarmMonitor, JsonlLog, MonitorState, ProgressBar } from './monitor';
import { NativeModelHandle, NativePpoState, NativeTrainerHandle, NativeTrainerResult, native } from './native';
import {
  OptimizerOptions,
  PpoOptions,
  ResolvedOptimizer,
  ResolvedPpoOptions,
  nativeOptimizer,
  nativePpoOptions,
  resolveOptimizer,
  resolvePpoOptions,
} from './ppo-options';
import { mulberry32 } from './random';
import { describe, float32, isArrayLike, numberOption, objectArgument } from './validate';

const TRAINER_ARGUMENT_NAMES: Record<string, string> = {
  max_new_tokens: 'maxNewTokens',
  top_p: 'topP',
  repetition_penalty: 'repetitionPenalty',
};

// ---- shared types ---------------------------------------------------------------------------

/** One buffer of rollouts, [batch × steps] arrays aligned with the sequence tokens (prompt then response). */
export interface Experience {
  batch: number;
  steps: number;
  tokens: Int32Array;
  lengths: Int32Array;
  promptLengths: Int32Array;
  responseLengths: Int32Array;
  /** 1 where the response hit maxNewTokens without a stop token. */
  truncated: Uint8Array;
  /** 1 at response tokens. */
  mask: Float32Array;
  /** log π(token | prefix) at rollout time (temperature 1), at response tokens. */
  logprobs: Float32Array;
  refLogprobs: Float32Array;
  entropy: Float32Array;
  /** V(s_t): the critic's value of the state before each response token. */
  values: Float32Array;
  /** Raw scores (reward model or reward function), after score(). */
  scores?: Float32Array;
  /** After shape(): the reparameterized scores, token rewards, KL, advantages, returns. */
  normalizedScores?: Float32Array;
  rewards?: Float32Array;
  kl?: Float32Array;
  advantages?: Float32Array;
  returns?: Float32Array;
}

/** A sample as a reward function sees it. */
export interface RewardSample {
  prompt: Int32Array;
  response: Int32Array;
  /** Whether the response ended with a stop token (false: cut at maxNewTokens). */
  stopped: boolean;
  /** The decoded texts, when the trainer was given `decode`. */
  promptText?: string;
  responseText?: string;
}

/** A reward computed in JavaScript: one finite score per sample. */
export type RewardFunction = (samples: RewardSample[]) => ArrayLike<number> | Promise<ArrayLike<number>>;

/** Named statistics of a step (see the README for the list). */
export type Stats = Record<string, number>;

export interface ProgressOptions {
  /** Called as stages advance: (stage, done, total). */
  onProgress?: (stage: string, done: number, total: number) => void;
}

// ---- helpers ----------------------------------------------------------------------------------

function nativeBatch(b: Batch, targetMask?: Float32Array | null): object {
  return { batch: b.batch, steps: b.steps, tokens: b.tokens, lengths: b.lengths, targetMask: targetMask ?? null };
}

/** A [batch × steps] 0/1 mask from per-row [start, end) spans (e.g. the response tokens). */
function spanMask(b: Batch, starts: ArrayLike<number>): Float32Array {
  const m = new Float32Array(b.batch * b.steps);
  for (let r = 0; r < b.batch; r++) {
    const n = b.lengths ? b.lengths[r] : b.steps;
    for (let t = Math.max(1, starts[r]); t < n; t++) m[r * b.steps + t] = 1;
  }
  return m;
}

/** Prompt + response pairs as one padded batch and its response mask. */
export interface PromptResponse {
  prompt: ArrayLike<number>;
  response: ArrayLike<number>;
}

function joinPairs(what: string, examples: unknown, vocab: number, nPositions: number): { batch: Batch; mask: Float32Array } {
  if (!Array.isArray(examples) || examples.length === 0) {
    throw invalidArgument(what, `${what} must be a non-empty array of { prompt, response } token arrays, got ${describe(examples)}`);
  }
  const seqs: number[][] = [];
  const starts: number[] = [];
  examples.forEach((ex, i) => {
    const e = objectArgument(`${what}[${i}]`, ex);
    if (!isArrayLike(e.prompt) || !isArrayLike(e.response)) {
      throw invalidArgument(`${what}[${i}]`, `${what}[${i}] needs prompt and response arrays of token ids`);
    }
    if ((e.response as ArrayLike<number>).length === 0) throw invalidArgument(`${what}[${i}].response`, `${what}[${i}].response is empty`);
    const p = Array.from(e.prompt as ArrayLike<number>), r = Array.from(e.response as ArrayLike<number>);
    seqs.push([...p, ...r]);
    starts.push(Math.max(p.length, 1));
  });
  const batch = prepareBatch(seqs, vocab, nPositions, what);
  return { batch, mask: spanMask(batch, starts) };
}

function toExperience(raw: Record<string, unknown> | undefined): Experience {
  if (!raw) throw new PpoMaxError('ERR_INTERNAL', 'the native trainer returned no experience');
  return raw as unknown as Experience;
}

function checkExperience(value: unknown): Experience {
  const e = objectArgument('experience', value);
  for (const key of ['batch', 'steps', 'tokens', 'lengths', 'promptLengths', 'responseLengths', 'mask', 'logprobs', 'refLogprobs', 'values']) {
    if (e[key] === undefined) throw invalidArgument(`experience.${key}`, `experience.${key} is missing: pass what rollout() returned`);
  }
  return e as unknown as Experience;
}

function stageProgress(o: ProgressOptions | undefined, bar: ProgressBar | null) {
  const cb = o?.onProgress;
  if (!cb && !bar) return undefined;
  return (done: number, total: number, stage?: string) => {
    const s = stage ?? 'work';
    bar?.update(s, done, total);
    if (cb) {
      try {
        cb(s, done, total);
      } catch (e) {
        throw new UserError(e);
      }
    }
  };
}

// ---- memory ------------------------------------------------------------------------------------

export interface TrainerMemoryEstimate {
  /** Bytes per model and kind. */
  models: Record<string, ModelMemory>;
  /** The copies of policy and critic (parameters and moments) an update keeps to undo a non-finite step. */
  snapshots: number;
  /** All of it, in bytes. */
  total: number;
}

/**
 * What a PPO configuration will hold (parameters, gradients, optimizer states, activations,
 * KV caches of all four models) for prompts of up to `maxPromptLength` tokens, computed
 * before anything is allocated.
 */
export function estimatePpoMemory(args: {
  policy: GPT2Config;
  critic: GPT2Config;
  reward?: GPT2Config | null;
  options?: Partial<PpoOptions>;
  maxPromptLength: number;
  /** Where the models run (default 'cpu'): CUDA keeps less for attention's backward. */
  device?: 'cpu' | 'cuda';
}): TrainerMemoryEstimate {
  const a = objectArgument('args', args) as unknown as typeof args;
  const o = resolvePpoOptions(a.options ?? {});
  const promptLength = numberOption('maxPromptLength', a.maxPromptLength, 1, { min: 1 });
  const T = promptLength + o.maxNewTokens;
  // Rollout and evaluation run over chunks of `rows` sequences (no gradients); the update over
  // mini-batches with gradients (activations retained for backward).
  const rows = o.forwardBatchSize > 0 ? Math.min(o.forwardBatchSize, o.numRollouts) : o.numRollouts;
  const est = (config: GPT2Config, trainable: boolean, generates: boolean): ModelMemory => {
    const m = native().estimateModelMemory({
      config: normalizeConfig(config),
      trainable,
      batch: trainable ? Math.min(o.miniBatchSize, o.numRollouts) : 0,
      steps: trainable ? T : 0,
      generateBatch: rows,
      generateSteps: T,
      device: a.device === 'cuda' ? 'cuda' : 'cpu',
    });
    return generates ? m : { ...m, kvCache: 0 };
  };
  const models: Record<string, ModelMemory> = {
    policy: est(a.policy, true, true),
    reference: est(a.policy, false, false),
    critic: est(a.critic, true, false),
  };
  if (a.reward) models.reward = est(a.reward, false, false);
  const snapshots = models.policy.params + models.policy.optimizer + models.critic.params + models.critic.optimizer;
  const total = Object.values(models).reduce((s, m) => s + m.params + m.grads + m.optimizer + m.activations + m.kvCache, snapshots);
  return { models, snapshots, total };
}

function gib(bytes: number): string {
  return `${(bytes / 2 ** 30).toFixed(2)} GiB`;
}

// ---- PPO --------------------------------------------------------------------------------------

// ---- checkpoints of trainers -------------------------------------------------------------------

/**
 * Writes a trainer checkpoint directory atomically: `fill` writes into a temp directory
 * beside it, trainer.json (written last, fsynced) marks it complete, and a rename swaps it
 * in. An interrupted save leaves the previous checkpoint as it was.
 */
async function saveTrainerDirectory(dir: string, callSite: Error, fill: (tmp: string) => Promise<Record<string, unknown>>): Promise<void> {
  if (typeof dir !== 'string' || dir === '') throw invalidArgument('dir', `dir must be a non-empty path, got ${describe(dir)}`);
  const target = path.resolve(dir);
  const tmp = `${target}.saving-${process.pid}-${Date.now()}`;
  try {
    fs.mkdirSync(tmp, { recursive: true });
    const meta = await fill(tmp);
    const metaPath = path.join(tmp, 'trainer.json');
    fs.writeFileSync(metaPath, `${JSON.stringify({ format: 'ppo-max-trainer', version: 1, ...meta }, null, 2)}\n`);
    const fd = fs.openSync(metaPath, 'r');
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    const old = `${target}.old-${process.pid}-${Date.now()}`;
    const existed = fs.existsSync(target);
    if (existed) fs.renameSync(target, old);
    fs.renameSync(tmp, target);
    if (existed) fs.rmSync(old, { recursive: true, force: true });
  } catch (e) {
    fs.rmSync(tmp, { recursive: true, force: true });
    throw fromNative(e, callSite);
  }
}

/** Reads trainer.json of a checkpoint of this kind ('ppo', 'sft', 'rewardModel'). */
function readTrainerMeta<T>(dir: string, kind: string, callSite: Error): T & { step: number } {
  const metaPath = path.join(dir, 'trainer.json');
  if (!fs.existsSync(metaPath)) throw fromNative(new PpoMaxError('ERR_NOT_FOUND', `${metaPath}: no trainer checkpoint here`, 'dir'), callSite);
  let meta: { format?: unknown; kind?: unknown; step?: unknown };
  try {
    meta = JSON.parse(fs.readFileSync(metaPath, 'utf8'));
  } catch (e) {
    throw fromNative(new PpoMaxError('ERR_CORRUPT_FILE', `${metaPath}: not valid JSON (${(e as Error).message})`, 'dir'), callSite);
  }
  if (meta.format !== 'ppo-max-trainer' || meta.kind !== kind || typeof meta.step !== 'number') {
    throw fromNative(new PpoMaxError('ERR_CORRUPT_FILE', `${metaPath}: not a ppo-max ${kind} trainer checkpoint`, 'dir'), callSite);
  }
  return meta as T & { step: number };
}

/** Writes a model's AdamW moments; returns its optimizer step count. */
async function saveOptimizerState(model: Model, file: string, callSite: Error): Promise<number> {
  const r = await Model.exclusive([model], callSite, {}, () => (h: NativeModelHandle[]) => native().modelSaveOptimizer(h[0], { path: file }));
  return r.steps;
}

async function loadOptimizerState(model: Model, file: string, steps: number, callSite: Error): Promise<void> {
  await Model.exclusive([model], callSite, {}, () => (h: NativeModelHandle[]) => native().modelLoadOptimizer(h[0], { path: file, steps }));
}

/** Saves a one-model trainer (SFT, reward model): the model, its AdamW moments, step count and options. */
function saveModelTrainer(dir: string, kind: string, model: Model, step: number, options: object): Promise<void> {
  const callSite = new Error();
  return saveTrainerDirectory(dir, callSite, async (tmp) => {
    await model.save(path.join(tmp, 'model'));
    const optimizerSteps = await saveOptimizerState(model, path.join(tmp, 'optimizer.safetensors'), callSite);
    return { kind, step, options: savedOptions(options), optimizerSteps };
  });
}

/** Loads what saveModelTrainer wrote: the model with its optimizer state, the saved options and step. */
async function loadModelTrainer<O>(dir: string, kind: string, device?: Device): Promise<{ model: Model; options: O; step: number }> {
  const callSite = new Error();
  const meta = readTrainerMeta<{ options: O; optimizerSteps: number }>(dir, kind, callSite);
  const model = await Model.load(path.join(dir, 'model'), { device });
  await loadOptimizerState(model, path.join(dir, 'optimizer.safetensors'), meta.optimizerSteps, callSite);
  return { model, options: meta.options, step: meta.step };
}

/** Trainer options as saved: JSON values only (callbacks and log files are given again on resume). */
function savedOptions(o: object): Record<string, unknown> {
  return Object.fromEntries(Object.entries(o).filter(([k, v]) => typeof v !== 'function' && k !== 'logFile'));
}

export interface PpoTrainerArgs {
  /** Trainable, initialized from the SFT model. */
  policy: Model;
  /** The SFT model, frozen. Default: a frozen clone of the policy as it is now. */
  reference?: Model;
  /** Trainable with a value head. Default: a trainable clone of rewardModel (PPO-max's init). */
  critic?: Model;
  /** A frozen model with a value head whose last-token value is the reward... */
  rewardModel?: Model;
  /** ...or a JavaScript reward function (token ids or texts in, one score per sample out). */
  reward?: RewardFunction;
  /** Turns token ids into text for the reward function and the logs. */
  decode?: (tokens: Int32Array) => string;
  options?: Partial<PpoOptions>;
  /** Pretraining or SFT sequences for the ptx loss (ptxCoef > 0). */
  ptxData?: TokenBatchInput;
  /** Append each step's statistics (and alarms) as a JSON line to this file. */
  logFile?: string;
  /** Called with each step's statistics. */
  onStats?: (stats: Stats, step: number) => void;
  /** Called with each alarm as it is raised. */
  onAlarm?: (alarm: Alarm) => void;
  /** A progress bar on stderr: true, false, or 'auto' (when stderr is a terminal; default). */
  progressBar?: boolean | 'auto';
  /** Refuse configurations whose estimate exceeds this many bytes (default: the machine's total memory). */
  memoryLimit?: number;
}

export interface PpoStepResult {
  stats: Stats;
  alarms: Alarm[];
  experience: Experience;
}

export interface CriticPretrainResult {
  /** Critic passes taken. */
  passes: number;
  valueLossFirst: number;
  valueLoss: number;
  /** Whether the value loss reached criticPretrainLossTarget. */
  reachedTarget: boolean;
  rollouts: number;
}

/**
 * PPO over four models: policy and critic trained, reference and reward model frozen.
 * Stages can run alone (rollout → score → shape → update) or together (step).
 * Events: 'stats' (stats, step), 'alarm' (alarm).
 */
export class PpoTrainer extends EventEmitter {
  private resolved: Readonly<ResolvedPpoOptions>;
  private handle: NativeTrainerHandle;
  private readonly models: Model[];
  private readonly monitor: AlarmMonitor;
  private readonly log: JsonlLog | null;
  private readonly bar: ProgressBar | null;
  private steps = 0;

  private constructor(
    readonly policy: Model,
    readonly reference: Model,
    readonly critic: Model,
    readonly rewardModel: Model | null,
    private readonly rewardFn: RewardFunction | null,
    private readonly decode: ((tokens: Int32Array) => string) | null,
    options: ResolvedPpoOptions,
    private readonly args: PpoTrainerArgs,
  ) {
    super();
    this.resolved = Object.freeze(options);
    this.models = [policy, reference, critic, ...(rewardModel ? [rewardModel] : [])];
    const handles = this.models.map((m) => m.nativeHandle());
    if (handles.some((h) => h === null)) throw new PpoMaxError('ERR_DISPOSED', 'one of the models was disposed', 'models');
    this.handle = native().ppoTrainerCreate({
      policy: handles[0],
      reference: handles[1],
      critic: handles[2],
      reward: rewardModel ? handles[3] : null,
      options: nativePpoOptions(options),
    });
    this.monitor = new AlarmMonitor(options.maxNewTokens);
    this.log = args.logFile ? new JsonlLog(args.logFile) : null;
    this.bar = ProgressBar.enabled(args.progressBar) ? new ProgressBar() : null;
    if (args.onStats) this.on('stats', args.onStats);
    if (args.onAlarm) this.on('alarm', args.onAlarm);
  }

  /** Checks the models and options, estimates memory, and makes the trainer. */
  static async create(args: PpoTrainerArgs): Promise<PpoTrainer> {
    const callSite = new Error();
    try {
      const a = { ...(objectArgument('args', args) as unknown as PpoTrainerArgs) };
      if (!(a.policy instanceof Model)) throw invalidArgument('policy', `policy must be a Model, got ${describe(a.policy)}`);
      if (a.reference === undefined) a.reference = await a.policy.clone({ trainable: false });
      if (a.critic === undefined) {
        if (!(a.rewardModel instanceof Model)) throw invalidArgument('critic', 'give a critic (a Model with a value head), or a rewardModel to initialize it from');
        a.critic = await a.rewardModel.clone({ trainable: true });
      }
      for (const key of ['policy', 'reference', 'critic'] as const) {
        if (!(a[key] instanceof Model)) throw invalidArgument(key, `${key} must be a Model, got ${describe(a[key])}`);
      }
      if (a.rewardModel !== undefined && !(a.rewardModel instanceof Model)) {
        throw invalidArgument('rewardModel', `rewardModel must be a Model, got ${describe(a.rewardModel)}`);
      }
      if ((a.rewardModel === undefined) === (a.reward === undefined)) {
        throw invalidArgument('reward', 'give exactly one of rewardModel (a Model) and reward (a function)');
      }
      if (a.reward !== undefined && typeof a.reward !== 'function') throw invalidArgument('reward', 'reward must be a function');
      if (a.decode !== undefined && typeof a.decode !== 'function') throw invalidArgument('decode', 'decode must be a function');
      if (!a.policy.trainable) throw invalidArgument('policy', 'the policy must be trainable');
      if (!a.critic.trainable) throw invalidArgument('critic', 'the critic must be trainable');
      if (!a.critic.config.valueHead) throw invalidArgument('critic', 'the critic needs a value head (config.valueHead: true)');
      const vocab = a.policy.config.vocabSize;
      for (const [name, m] of [['reference', a.reference], ['critic', a.critic], ['rewardModel', a.rewardModel]] as const) {
        if (m && m.config.vocabSize !== vocab) {
          throw shapeMismatch(name, `the ${name}'s vocabulary (${m.config.vocabSize}) differs from the policy's (${vocab}): they must share a tokenizer (use a reward function otherwise)`);
        }
      }
      const options = resolvePpoOptions(a.options ?? {}, vocab);
      const estimate = estimatePpoMemory({
        policy: a.policy.config,
        critic: a.critic.config,
        reward: a.rewardModel?.config ?? null,
        options: { ...a.options },
        maxPromptLength: Math.max(1, a.policy.config.nPositions - options.maxNewTokens),
        device: a.policy.device,
      });
      const limit = a.memoryLimit === undefined ? os.totalmem() : numberOption('memoryLimit', a.memoryLimit, 0, { min: 0 });
      if (estimate.total > limit) {
        throw new PpoMaxError(
          'ERR_OUT_OF_MEMORY',
          `this configuration needs about ${gib(estimate.total)} (${Object.entries(estimate.models)
            .map(([k, m]) => `${k} ${gib(m.params + m.grads + m.optimizer + m.activations + m.kvCache)}`)
            .join(', ')}, undo snapshots ${gib(estimate.snapshots)}), more than the limit of ${gib(limit)}: lower numRollouts, forwardBatchSize or miniBatchSize`,
          'options',
        );
      }
      const trainer = new PpoTrainer(a.policy, a.reference as Model, a.critic as Model, a.rewardModel ?? null, a.reward ?? null, a.decode ?? null, options, a);
      if (a.ptxData !== undefined) trainer.setPtxData(a.ptxData);
      return trainer;
    } catch (e) {
      throw fromNative(e, callSite, TRAINER_ARGUMENT_NAMES);
    }
  }

  /** The options in force, every field resolved. */
  get options(): Readonly<ResolvedPpoOptions> {
    return this.resolved;
  }

  /**
   * Changes options between steps (e.g. learning rates or klCoef): `changes` is merged over
   * the options in force and validated. Changing klCoef or klTarget restarts the KL
   * controller at klCoef. Runs after the calls already queued.
   */
  setOptions(changes: Partial<PpoOptions>): Promise<void> {
    return this.call(new Error(), () => {
      const next = resolvePpoOptions({ ...this.resolved, ...objectArgument('changes', changes) }, this.policy.config.vocabSize);
      return async (t) => {
        native().ppoTrainerSetOptions(t, nativePpoOptions(next));
        this.resolved = Object.freeze(next);
      };
    });
  }

  /** The running reward moments, KL coefficient and counters. */
  state(): NativePpoState & { step: number } {
    return { ...native().ppoTrainerGetState(this.handle), step: this.steps };
  }

  /** Sequences for the ptx loss (their every token is a target). */
  setPtxData(data: TokenBatchInput): void {
    const b = prepareBatch(data, this.policy.config.vocabSize, this.policy.config.nPositions, 'ptxData');
    native().ppoTrainerSetPtx(this.handle, nativeBatch(b));
  }

  private prompts(prompts: TokenBatchInput): Batch {
    if (Array.isArray(prompts) && prompts.length === 0) throw invalidArgument('prompts', 'prompts is empty: give at least one prompt');
    const b = prepareBatch(prompts, this.policy.config.vocabSize, this.policy.config.nPositions, 'prompts');
    const longest = b.lengths ? Math.max(...b.lengths) : b.steps;
    if (longest + this.options.maxNewTokens > this.policy.config.nPositions) {
      throw invalidArgument(
        'prompts',
        `a prompt of ${longest} tokens plus maxNewTokens ${this.options.maxNewTokens} exceeds the policy's context of ${this.policy.config.nPositions} positions`,
      );
    }
    return b;
  }

  private call<R>(callSite: Error, prepare: () => (t: NativeTrainerHandle) => Promise<R>): Promise<R> {
    return Model.exclusive(this.models, callSite, TRAINER_ARGUMENT_NAMES, () => {
      const run = prepare();
      return () => run(this.handle);
    });
  }

  /** Step 1 and 4: one response per prompt, with rollout log-probs, reference log-probs and values. */
  rollout(prompts: TokenBatchInput, o?: ProgressOptions): Promise<Experience> {
    return this.call(new Error(), () => {
      const b = this.prompts(prompts);
      return async (t) => toExperience((await native().ppoTrainerRollout(t, nativeBatch(b), stageProgress(o, this.bar))).experience);
    });
  }

  /** Step 2: the raw scores, from the reward model or the reward function. */
  async score(experience: Experience): Promise<Float32Array> {
    const callSite = new Error();
    const e = checkExperience(experience);
    if (this.rewardFn) return this.callReward(e, callSite);
    const r = await this.call(callSite, () => (t) => native().ppoTrainerScore(t, e));
    return toExperience(r.experience).scores as Float32Array;
  }

  private async callReward(e: Experience, callSite: Error): Promise<Float32Array> {
    const samples: RewardSample[] = [];
    for (let b = 0; b < e.batch; b++) {
      const row = e.tokens.subarray(b * e.steps, b * e.steps + e.lengths[b]);
      const prompt = row.slice(0, e.promptLengths[b]);
      const response = row.slice(e.promptLengths[b]);
      const s: RewardSample = { prompt, response, stopped: !e.truncated[b] };
      if (this.decode) {
        s.promptText = this.decode(prompt);
        s.responseText = this.decode(response);
      }
      samples.push(s);
    }
    // What the user's function throws is rethrown as is.
    const out = await (this.rewardFn as RewardFunction)(samples);
    try {
      if (!isArrayLike(out) || out.length !== e.batch) {
        throw shapeMismatch('reward', `the reward function must return ${e.batch} scores (one per sample), got ${describe(out)}`);
      }
      const scores = float32('reward', out, e.batch, `[${e.batch}]`);
      const bad = scores.findIndex((x) => !Number.isFinite(x));
      if (bad >= 0) throw new PpoMaxError('ERR_NON_FINITE', `the reward function returned ${scores[bad]} for sample ${bad}`, 'reward');
      return scores;
    } catch (err) {
      throw fromNative(err, callSite);
    }
  }

  /** Steps 3, 5, 6: reparameterized scores, KL-penalized token rewards, GAE. */
  async shape(experience: Experience, scores?: ArrayLike<number>, o: { updateMoments?: boolean } = {}): Promise<{ experience: Experience; stats: Stats }> {
    const e = checkExperience(experience);
    const s = scores === undefined ? e.scores : float32('scores', scores, e.batch, `[${e.batch}]`);
    if (!s) throw invalidArgument('scores', 'the experience has no scores: call score() first or pass scores');
    const r = await this.call(new Error(), () => (t) => native().ppoTrainerShape(t, { ...e, scores: s }, { scores: s, updateMoments: o.updateMoments ?? true }));
    return { experience: toExperience(r.experience), stats: r.stats as Stats };
  }

  /** Step 7: the PPO update of policy and critic over a shaped experience. */
  async update(experience: Experience, o?: ProgressOptions): Promise<Stats> {
    const e = checkExperience(experience);
    if (!e.advantages) throw invalidArgument('experience', 'the experience has no advantages: shape() it first');
    const r = await this.call(new Error(), () => (t) => native().ppoTrainerUpdate(t, e, stageProgress(o, this.bar)));
    return r.stats as Stats;
  }

  /**
   * One PPO step on these prompts: rollout, score, shape and update. Statistics go to the
   * 'stats' event, the log file and onStats; alarms to 'alarm' and onAlarm.
   */
  async step(prompts: TokenBatchInput, o?: ProgressOptions): Promise<PpoStepResult> {
    const callSite = new Error();
    let r: NativeTrainerResult;
    if (this.rewardModel) {
      r = await this.call(callSite, () => {
        const b = this.prompts(prompts);
        return (t) => native().ppoTrainerStep(t, nativeBatch(b), stageProgress(o, this.bar));
      });
    } else {
      const t0 = Date.now();
      const e = await this.rollout(prompts, o);
      const rolloutSeconds = (Date.now() - t0) / 1000;
      const t1 = Date.now();
      const scores = await this.callReward(e, callSite);
      const rewardSeconds = (Date.now() - t1) / 1000;
      r = await this.call(callSite, () => (t) => native().ppoTrainerStepWithScores(t, e, { scores }, stageProgress(o, this.bar)));
      const generated = e.responseLengths.reduce((s, n) => s + n, 0);
      (r.stats as Stats).seconds_rollout = rolloutSeconds;
      (r.stats as Stats).seconds_score = rewardSeconds;
      (r.stats as Stats).rollout_tokens_per_second = rolloutSeconds > 0 ? generated / rolloutSeconds : 0;
    }
    return this.record(r.stats as Stats, toExperience(r.experience));
  }

  private record(stats: Stats, experience: Experience): PpoStepResult {
    this.steps += 1;
    stats.step = this.steps;
    const alarms = this.monitor.check(this.steps, stats);
    if (this.log) this.log.write({ kind: 'ppo', time: new Date().toISOString(), ...stats, alarms });
    this.emit('stats', stats, this.steps);
    for (const a of alarms) this.emit('alarm', a);
    return { stats, alarms, experience };
  }

  /**
   * Runs `steps` PPO steps, each on numRollouts prompts drawn (seeded) from the pool;
   * critic pre-training first when the options ask for it and it has not run yet.
   */
  async train(promptPool: ArrayLike<number>[], o: { steps: number } & ProgressOptions): Promise<PpoStepResult[]> {
    if (!Array.isArray(promptPool) || promptPool.length === 0) throw invalidArgument('promptPool', 'promptPool must be a non-empty array of prompts');
    const steps = numberOption('steps', o.steps, 1, { min: 0 });
    const pick = mulberry32((this.options.seed * 7919 + this.steps + 1) >>> 0 || 0x9e3779b9);
    const draw = () => Array.from({ length: this.options.numRollouts }, () => promptPool[Math.floor(pick() * promptPool.length)]);
    if (this.options.criticPretrain && this.state().criticPretrainSteps === 0) await this.pretrainCritic(draw, o);
    const results: PpoStepResult[] = [];
    for (let i = 0; i < steps; i++) results.push(await this.step(draw(), o));
    return results;
  }

  /**
   * Step 8: critic pre-training on cached rollouts. Rollouts are made once per
   * criticPretrainPassesPerRollout passes and the critic fitted to their returns (values
   * and GAE recomputed with the current critic each pass) until the value loss falls below
   * criticPretrainLossTarget or criticPretrainSteps passes are taken.
   */
  async pretrainCritic(prompts: TokenBatchInput | (() => TokenBatchInput), o?: ProgressOptions): Promise<CriticPretrainResult> {
    const callSite = new Error();
    const opt = this.options;
    let passes = 0, rollouts = 0, first = NaN, last = NaN;
    while (passes < opt.criticPretrainSteps) {
      const p = typeof prompts === 'function' ? prompts() : prompts;
      let e = await this.rollout(p, o);
      rollouts += 1;
      const scores = await this.score(e);
      e = (await this.shape(e, scores)).experience;
      for (let k = 0; k < opt.criticPretrainPassesPerRollout && passes < opt.criticPretrainSteps; k++) {
        const r = await this.call(callSite, () => (t) => native().ppoTrainerPretrainCritic(t, e, 1, stageProgress(o, this.bar)));
        e = toExperience(r.experience);
        const s = r.stats as Stats;
        passes += 1;
        if (Number.isNaN(first)) first = s.value_loss;
        last = s.value_loss;
        if (this.log) this.log.write({ kind: 'criticPretrain', time: new Date().toISOString(), pass: passes, ...s });
        if (s.skipped === 1) {
          this.emit('alarm', { kind: 'nonFinite', step: this.steps, message: 'critic pre-training met a non-finite loss: pass skipped', values: { pass: passes } });
          return { passes, valueLossFirst: first, valueLoss: last, reachedTarget: false, rollouts };
        }
        if (s.value_loss < opt.criticPretrainLossTarget) return { passes, valueLossFirst: first, valueLoss: last, reachedTarget: true, rollouts };
      }
    }
    return { passes, valueLossFirst: first, valueLoss: last, reachedTarget: last < opt.criticPretrainLossTarget, rollouts };
  }

  // ---- save and resume ---------------------------------------------------------------------------

  /**
   * Saves everything a resumed run needs into `dir`: the four models (safetensors and
   * config.json), both optimizers' moments, the running moments, the KL controller, the
   * counters (which seed generation and shuffling) and the alarms' state. Written into a
   * temporary directory and swapped in by rename: an interrupted save leaves the previous
   * checkpoint intact.
   */
  async save(dir: string): Promise<void> {
    const callSite = new Error();
    await saveTrainerDirectory(dir, callSite, async (tmp) => {
      await this.policy.save(path.join(tmp, 'policy'));
      await this.reference.save(path.join(tmp, 'reference'));
      await this.critic.save(path.join(tmp, 'critic'));
      if (this.rewardModel) await this.rewardModel.save(path.join(tmp, 'reward'));
      const policySteps = await saveOptimizerState(this.policy, path.join(tmp, 'policy.optimizer.safetensors'), callSite);
      const criticSteps = await saveOptimizerState(this.critic, path.join(tmp, 'critic.optimizer.safetensors'), callSite);
      const state = await this.call(callSite, () => async (t) => native().ppoTrainerGetState(t));
      return {
        kind: 'ppo',
        step: this.steps,
        options: this.options,
        state,
        optimizerSteps: { policy: policySteps, critic: criticSteps },
        monitor: this.monitor.state(),
        rewardModel: this.rewardModel !== null,
      };
    });
  }

  /**
   * Resumes a run saved by save(): models, optimizers and trainer state restored, so the
   * next steps are the ones the uninterrupted run would have taken. A reward function (and
   * decode) must be given again when the run used one; callbacks and the log file too.
   */
  static async resume(
    dir: string,
    args: Omit<PpoTrainerArgs, 'policy' | 'reference' | 'critic' | 'rewardModel' | 'options'> & {
      /** Where the loaded models run (default 'auto'). */
      device?: Device;
    } = {},
  ): Promise<PpoTrainer> {
    const callSite = new Error();
    const meta = readTrainerMeta<{
      options: ResolvedPpoOptions; state: NativePpoState; optimizerSteps: { policy: number; critic: number }; monitor: MonitorState; rewardModel: boolean;
    }>(dir, 'ppo', callSite);
    const device = args.device;
    const policy = await Model.load(path.join(dir, 'policy'), { device });
    const reference = await Model.load(path.join(dir, 'reference'), { trainable: false, device });
    const critic = await Model.load(path.join(dir, 'critic'), { device });
    const rewardModel = meta.rewardModel ? await Model.load(path.join(dir, 'reward'), { trainable: false, device }) : undefined;
    await loadOptimizerState(policy, path.join(dir, 'policy.optimizer.safetensors'), meta.optimizerSteps.policy, callSite);
    await loadOptimizerState(critic, path.join(dir, 'critic.optimizer.safetensors'), meta.optimizerSteps.critic, callSite);
    const options = { ...meta.options } as unknown as PpoOptions;
    const trainer = await PpoTrainer.create({ ...args, policy, reference, critic, rewardModel, options });
    try {
      native().ppoTrainerSetState(trainer.handle, meta.state);
    } catch (e) {
      throw fromNative(e, callSite);
    }
    trainer.steps = meta.step;
    trainer.monitor.restore(meta.monitor);
    return trainer;
  }
}

// ---- SFT ----------------------------------------------------------------------------------------

export interface SftOptions {
  optimizer: OptimizerOptions;
  /** Rows per forward/backward (gradients accumulate; 0: all at once). */
  microBatch?: number;
  /** 'response' (default): loss on the response tokens only; 'all': every token after the first. */
  lossOn?: 'response' | 'all';
  /**
   * 'pad' (default): one row per example; 'pack': examples joined (each followed by eos)
   * into rows of packLength. Packed examples attend to the ones before them in their row
   * (no document mask), as in GPT pretraining; their positions continue along the row.
   */
  packing?: 'pad' | 'pack';
  /** Row length when packing (default: the model's context). */
  packLength?: number;
  logFile?: string;
  onStats?: (stats: Stats, step: number) => void;
}

/** Supervised fine-tuning on prompt and response pairs. */
export class SftTrainer {
  private readonly optimizer: ResolvedOptimizer;
  private readonly log: JsonlLog | null;
  private steps = 0;
  private constructor(readonly model: Model, private readonly o: SftOptions) {
    this.optimizer = resolveOptimizer('optimizer', o.optimizer);
    this.log = o.logFile ? new JsonlLog(o.logFile) : null;
  }

  static create(model: Model, options: SftOptions): SftTrainer {
    if (!(model instanceof Model)) throw invalidArgument('model', `model must be a Model, got ${describe(model)}`);
    if (!model.trainable) throw invalidArgument('model', 'the model must be trainable');
    const o = objectArgument('options', options) as unknown as SftOptions;
    if (o.lossOn !== undefined && o.lossOn !== 'response' && o.lossOn !== 'all') throw invalidArgument('lossOn', `lossOn must be 'response' or 'all'`);
    if (o.packing !== undefined && o.packing !== 'pad' && o.packing !== 'pack') throw invalidArgument('packing', `packing must be 'pad' or 'pack'`);
    return new SftTrainer(model, o);
  }

  /** The batch and target mask the trainer makes of examples (padding or packing). */
  prepare(examples: PromptResponse[]): { batch: Batch; mask: Float32Array } {
    const cfg = this.model.config;
    if (this.o.packing === 'pack') {
      const len = this.o.packLength ?? cfg.nPositions;
      if (!Number.isInteger(len) || len < 2 || len > cfg.nPositions) throw invalidArgument('packLength', `packLength must be an integer in [2, ${cfg.nPositions}]`);
      const rows: number[][] = [[]], masks: number[][] = [[]];
      examples.forEach((ex, i) => {
        const p = Array.from(ex.prompt), r = Array.from(ex.response);
        const seq = [...p, ...r, cfg.eosTokenId];
        if (seq.length > len) throw invalidArgument(`examples[${i}]`, `example ${i} has ${seq.length} tokens with eos, more than packLength ${len}`);
        if (rows[rows.length - 1].length + seq.length > len) {
          rows.push([]);
          masks.push([]);
        }
        const lossAll = this.o.lossOn === 'all';
        rows[rows.length - 1].push(...seq);
        masks[masks.length - 1].push(...seq.map((_, t) => (lossAll ? (t > 0 ? 1 : 0) : t >= p.length ? 1 : 0)));
      });
      const batch = prepareBatch(rows.filter((r) => r.length > 0), cfg.vocabSize, cfg.nPositions, 'examples');
      const mask = new Float32Array(batch.batch * batch.steps);
      masks.forEach((m, r) => m.forEach((v, t) => (mask[r * batch.steps + t] = t > 0 ? v : 0)));
      return { batch, mask };
    }
    const joined = joinPairs('examples', examples, cfg.vocabSize, cfg.nPositions);
    if (this.o.lossOn === 'all') return { batch: joined.batch, mask: spanMask(joined.batch, new Array(joined.batch.batch).fill(1)) };
    return joined;
  }

  /** One optimizer step on these examples (the masked LM loss, mean over their target tokens). */
  async step(examples: PromptResponse[]): Promise<Stats> {
    const callSite = new Error();
    const { batch, mask } = this.prepare(examples);
    const stats = await Model.exclusive([this.model], callSite, {}, () => (h: NativeModelHandle[]) =>
      native().sftStep(h[0], nativeBatch(batch, mask), { microBatch: this.o.microBatch ?? 0, optimizer: nativeOptimizer(this.optimizer) }),
    );
    this.steps += 1;
    stats.perplexity = Math.exp(stats.loss);
    if (this.log) this.log.write({ kind: 'sft', time: new Date().toISOString(), step: this.steps, ...stats });
    this.o.onStats?.(stats, this.steps);
    return stats;
  }

  /** The number of steps taken (restored by resume). */
  get stepCount(): number {
    return this.steps;
  }

  /**
   * Saves the model, its AdamW moments and the step count (atomically), so that resume()
   * continues as if never stopped.
   */
  save(dir: string): Promise<void> {
    return saveModelTrainer(dir, 'sft', this.model, this.steps, this.o);
  }

  /** An SftTrainer from a save() directory (pass logFile/onStats again if wanted). */
  static async resume(dir: string, args: Pick<SftOptions, 'logFile' | 'onStats'> & { device?: Device } = {}): Promise<SftTrainer> {
    const { device, ...rest } = args;
    const saved = await loadModelTrainer<SftOptions>(dir, 'sft', device);
    const trainer = SftTrainer.create(saved.model, { ...saved.options, ...rest });
    trainer.steps = saved.step;
    return trainer;
  }

  /** The masked LM loss and perplexity on held-out examples (no gradient). */
  evaluate(examples: PromptResponse[]): Promise<Stats> {
    const { batch, mask } = this.prepare(examples);
    return Model.exclusive([this.model], new Error(), {}, () => (h: NativeModelHandle[]) =>
      native().lmEval(h[0], nativeBatch(batch, mask), { microBatch: this.o.microBatch ?? 0 }),
    );
  }
}

// ---- the reward model --------------------------------------------------------------------------

export interface PreferencePair {
  prompt: ArrayLike<number>;
  chosen: ArrayLike<number>;
  rejected: ArrayLike<number>;
}

export interface RewardModelOptions {
  optimizer: OptimizerOptions;
  /** β_rm: weight of the chosen responses' LM loss (the paper uses 1; default 1). */
  lmCoef?: number;
  /** Pairs per forward/backward (0: all at once). */
  microBatch?: number;
  logFile?: string;
  onStats?: (stats: Stats, step: number) => void;
}

/** The reward model: pairwise ranking loss (plus the LM term), score at the last token. */
export class RewardModelTrainer {
  private readonly optimizer: ResolvedOptimizer;
  private readonly lmCoef: number;
  private readonly log: JsonlLog | null;
  private steps = 0;
  private constructor(readonly model: Model, private readonly o: RewardModelOptions) {
    this.optimizer = resolveOptimizer('optimizer', o.optimizer);
    this.lmCoef = numberOption('lmCoef', o.lmCoef, 1, { min: 0 });
    this.log = o.logFile ? new JsonlLog(o.logFile) : null;
  }

  static create(model: Model, options: RewardModelOptions): RewardModelTrainer {
    if (!(model instanceof Model)) throw invalidArgument('model', `model must be a Model, got ${describe(model)}`);
    if (!model.trainable) throw invalidArgument('model', 'the reward model must be trainable while it is trained');
    if (!model.config.valueHead) throw invalidArgument('model', 'the reward model needs a value head (config.valueHead: true)');
    return new RewardModelTrainer(model, objectArgument('options', options) as unknown as RewardModelOptions);
  }

  private pairs(pairs: PreferencePair[]): object {
    if (!Array.isArray(pairs) || pairs.length === 0) throw invalidArgument('pairs', 'pairs must be a non-empty array of { prompt, chosen, rejected }');
    const cfg = this.model.config;
    const side = (key: 'chosen' | 'rejected') =>
      joinPairs(
        'pairs',
        pairs.map((p, i) => {
          const o = objectArgument(`pairs[${i}]`, p);
          return { prompt: o.prompt, response: o[key] };
        }),
        cfg.vocabSize,
        cfg.nPositions,
      );
    const chosen = side('chosen'), rejected = side('rejected');
    return { chosen: nativeBatch(chosen.batch, chosen.mask), rejected: nativeBatch(rejected.batch) };
  }

  /** One optimizer step on these pairs. */
  async step(pairs: PreferencePair[]): Promise<Stats> {
    const args = this.pairs(pairs);
    const stats = await Model.exclusive([this.model], new Error(), {}, () => (h: NativeModelHandle[]) =>
      native().rewardModelStep(h[0], args, { lmCoef: this.lmCoef, microBatch: this.o.microBatch ?? 0, optimizer: nativeOptimizer(this.optimizer) }),
    );
    this.steps += 1;
    if (this.log) this.log.write({ kind: 'rewardModel', time: new Date().toISOString(), step: this.steps, ...stats });
    this.o.onStats?.(stats, this.steps);
    return stats;
  }

  /** The number of steps taken (restored by resume). */
  get stepCount(): number {
    return this.steps;
  }

  /** Saves the model, its AdamW moments and the step count (atomically). */
  save(dir: string): Promise<void> {
    return saveModelTrainer(dir, 'rewardModel', this.model, this.steps, this.o);
  }

  /** A RewardModelTrainer from a save() directory. */
  static async resume(dir: string, args: Pick<RewardModelOptions, 'logFile' | 'onStats'> & { device?: Device } = {}): Promise<RewardModelTrainer> {
    const { device, ...rest } = args;
    const saved = await loadModelTrainer<RewardModelOptions>(dir, 'rewardModel', device);
    const trainer = RewardModelTrainer.create(saved.model, { ...saved.options, ...rest });
    trainer.steps = saved.step;
    return trainer;
  }

  /** Pairwise accuracy and ranking loss on held-out pairs, with each pair's scores. */
  async evaluate(pairs: PreferencePair[]): Promise<{ stats: Stats; chosenScores: Float32Array; rejectedScores: Float32Array }> {
    const args = this.pairs(pairs);
    return Model.exclusive([this.model], new Error(), {}, () => (h: NativeModelHandle[]) =>
      native().rewardModelEval(h[0], args, { microBatch: this.o.microBatch ?? 0 }),
    );
  }
}

/** The value head at each sequence's last token (a reward model's scores). */
export function scoreSequences(model: Model, sequences: TokenBatchInput, o: { microBatch?: number } = {}): Promise<Float32Array> {
  return Model.exclusive([model], new Error(), {}, () => {
    if (!model.config.valueHead) throw invalidArgument('model', 'scoring needs a value head');
    const b = prepareBatch(sequences, model.config.vocabSize, model.config.nPositions, 'sequences');
    return (h: NativeModelHandle[]) => native().scoreSequences(h[0], nativeBatch(b), { microBatch: o.microBatch ?? 0 });
  });
}
