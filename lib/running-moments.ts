/**
 * Running mean and standard deviation of every score seen so far (ppo-max.md step 3):
 * equal weight, no decay, batches merged with Chan et al.'s parallel algorithm (exact
 * for any split, stable for long runs), standard deviation Bessel-corrected. Used to
 * normalize (`mode: 'norm'`) or scale (`mode: 'scale'`) and clip reward-model scores.
 */
import { PreparedOp, runAsync, runSync } from './call';
import { Device, resolveDevice } from './device';
import { invalidArgument } from './errors';
import { native } from './native';
import { OpOptions } from './ops';
import { FloatArray, choiceOption, float32, numberOption, objectArgument } from './validate';

/** Serializable state: save it with JSON.stringify, restore with RunningMoments.fromState. */
export interface RunningMomentsState {
  count: number;
  mean: number;
  /** Sum of squared deviations from the mean. */
  m2: number;
}

export interface NormalizeOptions extends OpOptions {
  /** 'norm': (r - mean) / std (the default, rewardNorm); 'scale': r / std (rewardScaling). */
  mode?: 'norm' | 'scale';
  /** Clip the result to [-clip, clip] (rewardClip; default none). */
  clip?: number | null;
  /** Added to std before dividing (default 1e-8). */
  eps?: number;
}

function checkState(state: unknown): RunningMomentsState {
  const s = objectArgument('state', state);
  for (const key of ['count', 'mean', 'm2']) {
    if (s[key] === undefined) throw invalidArgument(`state.${key}`, `state.${key} is missing: a RunningMoments state has count, mean and m2`);
  }
  const count = numberOption('state.count', s.count, 0, { min: 0 });
  if (!Number.isInteger(count)) throw invalidArgument('state.count', `state.count must be an integer, got ${count}`);
  const mean = numberOption('state.mean', s.mean, 0);
  const m2 = numberOption('state.m2', s.m2, 0, { min: 0 });
  return { count, mean, m2 };
}

function scoresLength(values: unknown): number {
  const length = (values as { length?: unknown } | null | undefined)?.length;
  if (typeof length !== 'number') throw invalidArgument('scores', 'scores must be a Float32Array or an array of numbers');
  if (length === 0) throw invalidArgument('scores', 'scores is empty');
  return length;
}

/** count, mean and m2 of one batch of scores, computed natively in double. */
function batchMomentsOp(values: FloatArray, options: OpOptions): PreparedOp<RunningMomentsState> {
  const count = scoresLength(values);
  return {
    name: 'batchMoments',
    nativeArgumentNames: { values: 'scores' },
    args: {
      count,
      values: float32('scores', values, count, `[${count}]`),
      device: resolveDevice(objectArgument('options', options).device as Device | undefined),
    },
    finish: (raw) => ({ count: raw.count as number, mean: raw.mean as number, m2: raw.m2 as number }),
  };
}

interface NormalizeArgs {
  subtractMean: boolean;
  eps: number;
  clip: number;
  device?: Device;
}

function normalizeOp(values: FloatArray, stats: { mean: number; std: number }, o: NormalizeArgs): PreparedOp<Float32Array> {
  const count = scoresLength(values);
  return {
    name: 'normalizeScores',
    nativeArgumentNames: { values: 'scores' },
    args: {
      count,
      values: float32('scores', values, count, `[${count}]`),
      mean: stats.mean,
      std: stats.std,
      subtractMean: o.subtractMean,
      eps: o.eps,
      clip: o.clip,
      device: resolveDevice(o.device),
    },
    finish: (raw) => raw.scores as Float32Array,
  };
}

export class RunningMoments {
  private moments: RunningMomentsState;
  // Updates settle in call order, so concurrent update() calls merge deterministically.
  private queue: Promise<unknown> = Promise.resolve();

  constructor(state?: RunningMomentsState) {
    this.moments = state === undefined ? { count: 0, mean: 0, m2: 0 } : checkState(state);
  }

  static fromState(state: RunningMomentsState): RunningMoments {
    return new RunningMoments(state);
  }

  /** Number of scores seen. */
  get count(): number {
    return this.moments.count;
  }
  get mean(): number {
    return this.moments.mean;
  }
  /** Bessel-corrected standard deviation; 0 before two scores were seen. */
  get std(): number {
    const { count, m2 } = this.moments;
    return count < 2 ? 0 : Math.sqrt(m2 / (count - 1));
  }

  state(): RunningMomentsState {
    return { ...this.moments };
  }
  toJSON(): RunningMomentsState {
    return this.state();
  }

  private merge(batch: RunningMomentsState): RunningMomentsState {
    const m = native().mergeMoments(this.moments, batch);
    this.moments = { count: m.count, mean: m.mean, m2: m.m2 };
    return this.state();
  }

  /** Merges a batch of scores into the moments; resolves to the new state. */
  update(scores: FloatArray, options: OpOptions = {}): Promise<RunningMomentsState> {
    const callSite = new Error();
    const run = this.queue.then(() => runAsync(() => batchMomentsOp(scores, options), callSite));
    const merged = run.then((batch) => this.merge(batch));
    this.queue = merged.catch(() => undefined);
    return merged;
  }

  updateSync(scores: FloatArray, options: OpOptions = {}): RunningMomentsState {
    return this.merge(runSync(() => batchMomentsOp(scores, options)));
  }

  private normalizeArgs(options: NormalizeOptions): NormalizeArgs {
    const o = objectArgument('options', options);
    const mode = choiceOption('mode', o.mode, ['norm', 'scale'] as const, 'norm');
    if (this.moments.count === 0) {
      throw invalidArgument('scores', 'no scores seen yet: call update() before normalize()');
    }
    return {
      subtractMean: mode === 'norm',
      eps: numberOption('eps', o.eps, 1e-8, { min: 0, max: 1, minExclusive: true }),
      clip: o.clip === undefined || o.clip === null ? 0 : numberOption('clip', o.clip, 0, { min: 0, minExclusive: true }),
      device: o.device as Device | undefined,
    };
  }

  /** Normalizes (or scales) and clips scores with the current moments. */
  async normalize(scores: FloatArray, options: NormalizeOptions = {}): Promise<Float32Array> {
    const callSite = new Error();
    await this.queue;
    return runAsync(() => normalizeOp(scores, this.statsNow(), this.normalizeArgs(options)), callSite);
  }

  normalizeSync(scores: FloatArray, options: NormalizeOptions = {}): Float32Array {
    return runSync(() => normalizeOp(scores, this.statsNow(), this.normalizeArgs(options)));
  }

  /** The recipe's order: merge the batch first, then normalize it with the updated moments. */
  async updateAndNormalize(scores: FloatArray, options: NormalizeOptions = {}): Promise<Float32Array> {
    await this.update(scores, { device: options.device });
    return this.normalize(scores, options);
  }

  private statsNow(): { mean: number; std: number } {
    return { mean: this.mean, std: this.std };
  }
}
