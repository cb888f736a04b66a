/**
 * A plain float64 reference of every ppo-max op, written from the math in
 * csrc/core/op_args.h with straightforward loops over number arrays (no blocking, no
 * threads, no float32 tricks), plus a seeded PRNG and builders of random batches.
 *
 * Layout: [batch, steps] row-major, index b * steps + t; a mask of 0/1 (null: every
 * position valid). Inputs are read as numbers, so float32 arrays are used exactly.
 */

export type Nums = ArrayLike<number>;
export type Mask = ArrayLike<number> | null | undefined;

export function isValid(mask: Mask, i: number): boolean {
  return !mask || mask[i] !== 0;
}

// ---- seeded PRNG ------------------------------------------------------------------------------

// Bound once: under jest's vm sandbox every lookup of a global such as Math is slow,
// which matters for the millions of draws a large logits tensor needs.
const { imul, sqrt, log, cos, floor, PI, exp, min, max } = Math;

/** mulberry32: a tiny, fast, seedable 32-bit PRNG; returns floats in [0, 1). */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = imul(t ^ (t >>> 15), t | 1);
    t ^= t + imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export class Rng {
  private readonly next: () => number;
  constructor(seed: number) {
    this.next = mulberry32(seed);
  }
  /** Uniform in [0, 1). */
  random(): number {
    return this.next();
  }
  uniform(lo: number, hi: number): number {
    return lo + (hi - lo) * this.next();
  }
  /** Integer in [0, n). */
  int(n: number): number {
    return floor(this.next() * n);
  }
  /** Standard normal (Box-Muller). */
  normal(): number {
    const u = 1 - this.next();
    const v = this.next();
    return sqrt(-2 * log(u)) * cos(2 * PI * v);
  }
  bool(p = 0.5): boolean {
    return this.next() < p;
  }
  /** A Float32Array of n values drawn from f. */
  floats(n: number, f: () => number): Float32Array {
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = f();
    return out;
  }
  normals(n: number, scale = 1, shift = 0): Float32Array {
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = shift + scale * this.normal();
    return out;
  }
  uniforms(n: number, lo: number, hi: number): Float32Array {
    return this.floats(n, () => this.uniform(lo, hi));
  }
  tokens(n: number, vocab: number): Int32Array {
    const out = new Int32Array(n);
    for (let i = 0; i < n; i++) out[i] = this.int(vocab);
    return out;
  }
}

// ---- random batch layouts ---------------------------------------------------------------------

export type MaskKind = 'none' | 'mask' | 'lengths';

/** How a batch is padded: the shape fields to pass to an op, and the effective mask. */
export interface Layout {
  batch: number;
  steps: number;
  kind: MaskKind;
  /** Spread into an op's input: { batch, steps, mask? , lengths? }. */
  shape: { batch: number; steps: number; mask?: Float32Array; lengths?: number[] };
  /** The mask as the kernels see it (null: every position valid). */
  mask: Float32Array | null;
  /** Number of valid positions. */
  valid: number;
}

export function maskFromLengths(lengths: ArrayLike<number>, steps: number): Float32Array {
  const mask = new Float32Array(lengths.length * steps);
  for (let b = 0; b < lengths.length; b++) for (let t = 0; t < lengths[b]; t++) mask[b * steps + t] = 1;
  return mask;
}

function countValid(mask: Mask, n: number): number {
  let c = 0;
  for (let i = 0; i < n; i++) if (isValid(mask, i)) c++;
  return c;
}

/**
 * A random layout. 'lengths': right padding with lengths in [0, steps] (some 0, some
 * full). 'mask': per row one of right padding, left padding, or random holes, so
 * the valid positions of a row need not be contiguous.
 */
export function randomLayout(rng: Rng, batch: number, steps: number, kind: MaskKind): Layout {
  if (kind === 'none') {
    return { batch, steps, kind, shape: { batch, steps }, mask: null, valid: batch * steps };
  }
  if (kind === 'lengths') {
    const lengths: number[] = [];
    for (let b = 0; b < batch; b++) {
      const r = rng.random();
      lengths.push(r < 0.15 ? steps : r < 0.25 && batch > 1 ? 0 : 1 + rng.int(steps));
    }
    const mask = maskFromLengths(lengths, steps);
    return { batch, steps, kind, shape: { batch, steps, lengths }, mask, valid: countValid(mask, batch * steps) };
  }
  const mask = new Float32Array(batch * steps);
  for (let b = 0; b < batch; b++) {
    const style = rng.int(4);
    const n = rng.int(steps + 1);
    for (let t = 0; t < steps; t++) {
      let v: boolean;
      if (style === 0) v = t < n; // right padding
      else if (style === 1) v = t >= steps - n; // left padding
      else v = rng.bool(0.6); // holes
      mask[b * steps + t] = v ? 1 : 0;
    }
  }
  return { batch, steps, kind, shape: { batch, steps, mask }, mask, valid: countValid(mask, batch * steps) };
}

/** Overwrites padded positions (per-position arrays) with `fill()`; returns a copy. */
export function scramblePadded(values: Float32Array, mask: Mask, fill: () => number): Float32Array {
  const out = Float32Array.from(values);
  if (!mask) return out;
  for (let i = 0; i < out.length; i++) if (!isValid(mask, i)) out[i] = fill();
  return out;
}

// ---- log-probs and entropy --------------------------------------------------------------------

export interface LogprobsRef {
  logprobs: number[];
  entropy: number[];
}

/** log softmax(z / T) of one row, in float64 (entries of -Infinity stay -Infinity). */
export function logSoftmax(z: Nums, temperature: number): number[] {
  const n = z.length;
  let top = -Infinity;
  for (let v = 0; v < n; v++) top = max(top, z[v] / temperature);
  let sum = 0;
  for (let v = 0; v < n; v++) sum += exp(z[v] / temperature - top);
  const logSum = log(sum);
  const out = new Array<number>(n);
  for (let v = 0; v < n; v++) out[v] = z[v] / temperature - top - logSum;
  return out;
}

/** -sum p log p of one row's log-probs (p = 0 terms contribute 0). */
export function entropyOf(logp: number[]): number {
  let h = 0;
  for (const lp of logp) {
    const p = exp(lp);
    if (p > 0) h -= p * lp;
  }
  return h;
}

export function refLogprobs(
  logits: Nums,
  tokens: Nums,
  batch: number,
  steps: number,
  vocab: number,
  mask: Mask,
  temperature = 1,
): LogprobsRef {
  const rows = batch * steps;
  const logprobs = new Array<number>(rows).fill(0);
  const entropy = new Array<number>(rows).fill(0);
  for (let r = 0; r < rows; r++) {
    if (!isValid(mask, r)) continue;
    const row = Array.prototype.slice.call(logits, r * vocab, (r + 1) * vocab) as number[];
    const logp = logSoftmax(row, temperature);
    logprobs[r] = logp[tokens[r]];
    entropy[r] = entropyOf(logp);
  }
  return { logprobs, entropy };
}

/**
 * The analytic gradient of L = sum g * logprobs + sum h * entropy w.r.t. the logits:
 * dlogp_k/dz_v = [v == k] - p_v; dH/dz_v = -p_v (log p_v + H); both divided by T.
 */
export function refLogprobsGrad(
  logits: Nums,
  tokens: Nums,
  batch: number,
  steps: number,
  vocab: number,
  mask: Mask,
  temperature: number,
  gradLogprobs: Nums | null,
  gradEntropy: Nums | null,
): number[] {
  const rows = batch * steps;
  const grad = new Array<number>(rows * vocab).fill(0);
  for (let r = 0; r < rows; r++) {
    if (!isValid(mask, r)) continue;
    const g = gradLogprobs ? gradLogprobs[r] : 0;
    const h = gradEntropy ? gradEntropy[r] : 0;
    const row = Array.prototype.slice.call(logits, r * vocab, (r + 1) * vocab) as number[];
    const logp = logSoftmax(row, temperature);
    const H = entropyOf(logp);
    for (let v = 0; v < vocab; v++) {
      const p = exp(logp[v]);
      const dLogp = (v === tokens[r] ? 1 : 0) - p;
      const dH = p > 0 ? -p * (logp[v] + H) : 0;
      grad[r * vocab + v] = (g * dLogp + h * dH) / temperature;
    }
  }
  return grad;
}

/** The scalar sum g * logprobs + h * entropy, for finite differences. */
export function refLogprobsLoss(
  logits: Nums,
  tokens: Nums,
  batch: number,
  steps: number,
  vocab: number,
  mask: Mask,
  temperature: number,
  gradLogprobs: Nums | null,
  gradEntropy: Nums | null,
): number {
  const { logprobs, entropy } = refLogprobs(logits, tokens, batch, steps, vocab, mask, temperature);
  let loss = 0;
  for (let r = 0; r < batch * steps; r++) {
    if (gradLogprobs) loss += gradLogprobs[r] * logprobs[r];
    if (gradEntropy) loss += gradEntropy[r] * entropy[r];
  }
  return loss;
}

// ---- KL-penalized rewards ---------------------------------------------------------------------

export type Estimator = 'k1' | 'k2' | 'k3';

export function klEstimate(d: number, estimator: Estimator): number {
  if (estimator === 'k1') return d;
  if (estimator === 'k2') return (d * d) / 2;
  return exp(-d) - 1 + d;
}

export function refKlRewards(
  logprobs: Nums,
  refLogprobs: Nums,
  scores: Nums,
  batch: number,
  steps: number,
  mask: Mask,
  klCoef: number,
  estimator: Estimator,
): { rewards: number[]; kl: number[] } {
  const rewards = new Array<number>(batch * steps).fill(0);
  const kl = new Array<number>(batch * steps).fill(0);
  for (let b = 0; b < batch; b++) {
    let last = -1;
    for (let t = 0; t < steps; t++) {
      const i = b * steps + t;
      if (!isValid(mask, i)) continue;
      kl[i] = klEstimate(logprobs[i] - refLogprobs[i], estimator);
      rewards[i] = -klCoef * kl[i];
      last = i;
    }
    if (last >= 0) rewards[last] += scores[b];
  }
  return { rewards, kl };
}

// ---- moments and score normalization ----------------------------------------------------------

export interface MomentsRef {
  count: number;
  mean: number;
  m2: number;
}

export function refMoments(values: Nums): MomentsRef {
  const n = values.length;
  let sum = 0;
  for (let i = 0; i < n; i++) sum += values[i];
  const mean = n > 0 ? sum / n : 0;
  let m2 = 0;
  for (let i = 0; i < n; i++) m2 += (values[i] - mean) ** 2;
  return { count: n, mean, m2 };
}

/** Bessel-corrected standard deviation; 0 with fewer than two values. */
export function besselStd(m: MomentsRef): number {
  return m.count < 2 ? 0 : sqrt(m.m2 / (m.count - 1));
}

export function refNormalize(
  values: Nums,
  mean: number,
  std: number,
  opts: { subtractMean?: boolean; eps?: number; clip?: number | null } = {},
): number[] {
  const subtract = opts.subtractMean ?? true;
  const eps = opts.eps ?? 1e-8;
  const out: number[] = [];
  for (let i = 0; i < values.length; i++) {
    let x = (values[i] - (subtract ? mean : 0)) / (std + eps);
    if (opts.clip != null && opts.clip > 0) x = min(opts.clip, max(-opts.clip, x));
    out.push(x);
  }
  return out;
}

// ---- GAE ----------------------------------------------------------------------------------------

export function refGae(
  rewards: Nums,
  values: Nums,
  batch: number,
  steps: number,
  mask: Mask,
  gamma: number,
  lambda: number,
): { advantages: number[]; returns: number[] } {
  const advantages = new Array<number>(batch * steps).fill(0);
  const returns = new Array<number>(batch * steps).fill(0);
  for (let b = 0; b < batch; b++) {
    // The valid positions of the row, in order; the state after the last is terminal.
    const idx: number[] = [];
    for (let t = 0; t < steps; t++) if (isValid(mask, b * steps + t)) idx.push(b * steps + t);
    const n = idx.length;
    const V = (k: number) => (k < n ? values[idx[k]] : 0);
    const A = new Array<number>(n + 1).fill(0);
    for (let k = n - 1; k >= 0; k--) {
      const delta = rewards[idx[k]] + gamma * V(k + 1) - V(k);
      A[k] = delta + gamma * lambda * A[k + 1];
    }
    for (let k = 0; k < n; k++) {
      advantages[idx[k]] = A[k];
      returns[idx[k]] = A[k] + V(k);
    }
  }
  return { advantages, returns };
}

// ---- whitening and clipping ---------------------------------------------------------------------

export function refWhiten(
  values: Nums,
  mask: Mask,
  opts: { shiftMean?: boolean; eps?: number; clip?: number } = {},
): number[] {
  const shiftMean = opts.shiftMean ?? true;
  const eps = opts.eps ?? 1e-8;
  const n = values.length;
  const valid: number[] = [];
  for (let i = 0; i < n; i++) if (isValid(mask, i)) valid.push(values[i]);
  const out = new Array<number>(n).fill(0);
  if (valid.length === 0) return out;
  const mean = valid.reduce((s, x) => s + x, 0) / valid.length;
  const variance = valid.length < 2 ? 0 : valid.reduce((s, x) => s + (x - mean) ** 2, 0) / (valid.length - 1);
  for (let i = 0; i < n; i++) {
    if (!isValid(mask, i)) continue;
    let x = (values[i] - mean) / sqrt(variance + eps);
    if (!shiftMean) x += mean;
    if (opts.clip !== undefined && opts.clip > 0) x = min(opts.clip, max(-opts.clip, x));
    out[i] = x;
  }
  return out;
}

export function refClip(values: Nums, mask: Mask, clip: number): number[] {
  const out: number[] = [];
  for (let i = 0; i < values.length; i++) out.push(isValid(mask, i) ? min(clip, max(-clip, values[i])) : 0);
  return out;
}

// ---- losses ---------------------------------------------------------------------------------------

export interface PolicyLossRef {
  loss: number;
  grad: number[];
  clipFraction: number;
  approxKl: number;
  tokens: number;
}

export function refPolicyLoss(logprobs: Nums, oldLogprobs: Nums, advantages: Nums, mask: Mask, clipEps: number): PolicyLossRef {
  const n = logprobs.length;
  let N = 0;
  for (let i = 0; i < n; i++) if (isValid(mask, i)) N++;
  const grad = new Array<number>(n).fill(0);
  if (N === 0) return { loss: 0, grad, clipFraction: 0, approxKl: 0, tokens: 0 };
  let loss = 0;
  let clipped = 0;
  let kl = 0;
  for (let i = 0; i < n; i++) {
    if (!isValid(mask, i)) continue;
    const A = advantages[i];
    const logRatio = logprobs[i] - oldLogprobs[i];
    const ratio = exp(logRatio);
    const clippedRatio = min(1 + clipEps, max(1 - clipEps, ratio));
    const unclippedTerm = -A * ratio;
    const clippedTerm = -A * clippedRatio;
    loss += max(unclippedTerm, clippedTerm);
    if (clippedTerm > unclippedTerm) clipped++;
    else grad[i] = (-A * ratio) / N;
    kl += ratio - 1 - logRatio;
  }
  return { loss: loss / N, grad, clipFraction: clipped / N, approxKl: kl / N, tokens: N };
}

export interface ValueLossRef {
  loss: number;
  grad: number[];
  clipFraction: number;
  tokens: number;
}

/** clipEps null: no value clipping, loss = mean 0.5 (V - R)^2. */
export function refValueLoss(values: Nums, oldValues: Nums, returns: Nums, mask: Mask, clipEps: number | null): ValueLossRef {
  const n = values.length;
  let N = 0;
  for (let i = 0; i < n; i++) if (isValid(mask, i)) N++;
  const grad = new Array<number>(n).fill(0);
  if (N === 0) return { loss: 0, grad, clipFraction: 0, tokens: 0 };
  let loss = 0;
  let clipped = 0;
  for (let i = 0; i < n; i++) {
    if (!isValid(mask, i)) continue;
    const V = values[i];
    const R = returns[i];
    const sq = (V - R) ** 2;
    if (clipEps === null) {
      loss += 0.5 * sq;
      grad[i] = (V - R) / N;
      continue;
    }
    const vc = min(oldValues[i] + clipEps, max(oldValues[i] - clipEps, V));
    const sqClipped = (vc - R) ** 2;
    loss += 0.5 * max(sq, sqClipped);
    if (sqClipped > sq) clipped++;
    else grad[i] = (V - R) / N;
  }
  return { loss: loss / N, grad, clipFraction: clipped / N, tokens: N };
}

// ---- finite differences -----------------------------------------------------------------------

/** Central differences of f at x (a copy is perturbed), one coordinate at a time. */
export function centralDifferences(f: (x: number[]) => number, x: Nums, h: number, only?: (i: number) => boolean): number[] {
  const xs = Array.from(x);
  const grad = new Array<number>(xs.length).fill(0);
  for (let i = 0; i < xs.length; i++) {
    if (only && !only(i)) continue;
    const x0 = xs[i];
    if (!Number.isFinite(x0)) continue; // -Infinity logits: no neighbourhood to probe
    xs[i] = x0 + h;
    const up = f(xs);
    xs[i] = x0 - h;
    const down = f(xs);
    xs[i] = x0;
    grad[i] = (up - down) / (2 * h);
  }
  return grad;
}
