/**
 * One specification per op, shared by ops.test.ts (against the float64 reference, on
 * the CPU) and cuda-parity.test.ts (CUDA against the CPU): how to build random inputs
 * on a layout, scramble its padded positions, call both forms, and the reference.
 */
import { expect } from '@jest/globals';

import * as ppo from '../lib';
import { Estimator, Layout, Rng, isValid, refClip, refGae, refKlRewards, refLogprobs, refLogprobsGrad, refPolicyLoss, refValueLoss, refWhiten } from './reference';
import { Tolerance, expectBitEqual, expectClose, expectFloat32, expectScalarClose, expectZeroWhereMasked } from './helpers';

export const CPU = { device: 'cpu' as const };
export const f32 = Math.fround;

// ---- tolerances -------------------------------------------------------------------------------
// Logits kernels: float32 math (a ~2 ulp exp, float partial sums over blocks of 256
// added into double) with a double log; against float64 that leaves ~1e-6 absolute
// error, so 1e-5 absolute + 1e-5 relative (the relative part covers large log-probs).
export const LOGITS_TOL: Tolerance = { abs: 1e-5, rel: 1e-5 };
// Gradients w.r.t. logits: the same float32 softmax, and p_v (log p_v + H) loses
// relative precision for tiny p_v; the absolute part dominates there.
export const GRAD_LOGITS_TOL: Tolerance = { abs: 1e-5, rel: 1e-4 };
// Sequence kernels (rewards, GAE, whitening, loss gradients) compute in double from
// the float32 inputs (which the reference reads exactly) and round once to float32
// (relative 6e-8): 1e-6 relative leaves room for the order of double operations.
export const SEQ_TOL: Tolerance = { abs: 1e-6, rel: 1e-6 };
// Scalar losses are double sums on both sides; only the summation order differs.
export const SCALAR_TOL: Tolerance = { abs: 1e-12, rel: 1e-10 };
// Kernel gradients (float32) against central differences of the float64 reference
// loss (h = 1e-6 on a smooth piece: truncation ~1e-12, cancellation ~1e-10).
export const FD_TOL: Tolerance = { abs: 1e-7, rel: 1e-5 };

export function seedOf(text: string): number {
  let h = 2166136261;
  for (let i = 0; i < text.length; i++) h = Math.imul(h ^ text.charCodeAt(i), 16777619);
  return h >>> 0;
}

export type Out = Record<string, unknown>;

/** Every field of two results is identical: typed arrays bit for bit, numbers by Object.is. */
export function expectSameResult(a: Out, b: Out, label = 'result'): void {
  expect(Object.keys(b).sort()).toEqual(Object.keys(a).sort());
  for (const key of Object.keys(a)) {
    const x = a[key];
    const y = b[key];
    if (ArrayBuffer.isView(x)) expectBitEqual(x as Float32Array, y as Float32Array, `${label}.${key}`);
    else expect(Object.is(x, y)).toBe(true);
  }
}

// ---- op specifications ----------------------------------------------------------------------------

export interface Spec {
  name: string;
  /** Option sets every generic case runs through. */
  variants: Record<string, unknown>[];
  /** The op's per-sequence inputs on a layout (besides batch/steps/mask/lengths). */
  make(rng: Rng, l: Layout): Record<string, unknown>;
  /** A copy of the input with every padded position holding garbage (NaN, huge, bad ids). */
  scramble(input: Record<string, unknown>, l: Layout, rng: Rng): Record<string, unknown>;
  sync(input: any, options: any): Out;
  async(input: any, options: any): Promise<Out>;
  reference(input: any, options: any, l: Layout): Record<string, ArrayLike<number> | number>;
  tol: Record<string, Tolerance>;
  /** Output elements per [batch, steps] position (default 1). */
  inner?(input: any): Record<string, number>;
}

export const GARBAGE = [NaN, Infinity, -Infinity, 3.4e38, -1e30, 0, 12345.678];

export function scrambleFields(fields: string[]) {
  return (input: Record<string, unknown>, l: Layout, rng: Rng): Record<string, unknown> => {
    const out = { ...input };
    for (const name of fields) {
      const src = input[name] as Float32Array;
      const copy = Float32Array.from(src);
      for (let i = 0; i < copy.length; i++) if (!isValid(l.mask, i)) copy[i] = GARBAGE[rng.int(GARBAGE.length)];
      out[name] = copy;
    }
    return out;
  };
}

export const asValues = (x: Float32Array): Out => ({ values: x });

export const logprobsSpec: Spec = {
  name: 'logprobsFromLogits',
  variants: [
    { temperature: 1, entropy: true },
    { temperature: 0.7, entropy: true },
    { temperature: 1.6, entropy: true },
    { temperature: 1 },
  ],
  make(rng, l) {
    const rows = l.batch * l.steps;
    const choices = rows > 200 ? [1, 2, 7, 23, 64] : [1, 2, 7, 23, 64, 300]; // keeps the float64 reference quick
    const vocab = choices[rng.int(choices.length)];
    return { vocab, logits: rng.normals(rows * vocab, 3), tokens: rng.tokens(rows, vocab) };
  },
  scramble(input, l, rng) {
    const vocab = input.vocab as number;
    const logits = Float32Array.from(input.logits as Float32Array);
    const tokens = Int32Array.from(input.tokens as Int32Array);
    for (let r = 0; r < l.batch * l.steps; r++) {
      if (isValid(l.mask, r)) continue;
      tokens[r] = [-1, vocab, 1 << 30, -(1 << 30)][rng.int(4)];
      for (let v = 0; v < vocab; v++) logits[r * vocab + v] = GARBAGE[rng.int(GARBAGE.length)];
    }
    return { ...input, logits, tokens };
  },
  sync: (i, o) => ppo.logprobsFromLogitsSync(i, o) as unknown as Out,
  async: (i, o) => ppo.logprobsFromLogits(i, o) as unknown as Promise<Out>,
  reference(i, o, l) {
    const r = refLogprobs(i.logits, i.tokens, l.batch, l.steps, i.vocab, l.mask, o.temperature ?? 1);
    const out: Record<string, number[]> = { logprobs: r.logprobs };
    if (o.entropy) out.entropy = r.entropy;
    return out;
  },
  tol: { logprobs: LOGITS_TOL, entropy: LOGITS_TOL },
};

export const backwardSpec: Spec = {
  name: 'logprobsBackward',
  variants: [
    { temperature: 1, grads: 'both' },
    { temperature: 0.8, grads: 'logprobs' },
    { temperature: 1.5, grads: 'entropy' },
    { temperature: 1.3, grads: 'both' },
    { temperature: 1, grads: 'none' },
  ],
  make(rng, l) {
    const base = logprobsSpec.make(rng, l);
    const rows = l.batch * l.steps;
    return { ...base, gradLogprobs: rng.normals(rows), gradEntropy: rng.normals(rows) };
  },
  scramble(input, l, rng) {
    return scrambleFields(['gradLogprobs', 'gradEntropy'])(logprobsSpec.scramble(input, l, rng), l, rng);
  },
  sync(i, o) {
    const { grads, ...options } = o;
    return ppo.logprobsBackwardSync(i, pickGrads(i, grads), options) as unknown as Out;
  },
  async(i, o) {
    const { grads, ...options } = o;
    return ppo.logprobsBackward(i, pickGrads(i, grads), options) as unknown as Promise<Out>;
  },
  reference(i, o, l) {
    const g = pickGrads(i, o.grads);
    return {
      gradLogits: refLogprobsGrad(i.logits, i.tokens, l.batch, l.steps, i.vocab, l.mask, o.temperature ?? 1, g.gradLogprobs ?? null, g.gradEntropy ?? null),
    };
  },
  tol: { gradLogits: GRAD_LOGITS_TOL },
  inner: (i) => ({ gradLogits: i.vocab }),
};

export function pickGrads(i: any, which: string): { gradLogprobs?: Float32Array; gradEntropy?: Float32Array } {
  if (which === 'both') return { gradLogprobs: i.gradLogprobs, gradEntropy: i.gradEntropy };
  if (which === 'logprobs') return { gradLogprobs: i.gradLogprobs };
  if (which === 'entropy') return { gradEntropy: i.gradEntropy };
  return {};
}

export const klSpec: Spec = {
  name: 'klPenalizedRewards',
  variants: [
    {},
    { estimator: 'k1', klCoef: 0.1 },
    { estimator: 'k2', klCoef: 0.05 },
    { estimator: 'k3', klCoef: 0.3 },
    { estimator: 'k3', klCoef: 0 },
  ],
  make(rng, l) {
    const rows = l.batch * l.steps;
    const logprobs = rng.floats(rows, () => -Math.abs(3 * rng.normal()));
    const refLogprobs = rng.floats(rows, () => -Math.abs(3 * rng.normal()));
    return { logprobs, refLogprobs, scores: rng.normals(l.batch, 2) };
  },
  scramble: scrambleFields(['logprobs', 'refLogprobs']),
  sync: (i, o) => ppo.klPenalizedRewardsSync(i, o) as unknown as Out,
  async: (i, o) => ppo.klPenalizedRewards(i, o) as unknown as Promise<Out>,
  reference: (i, o, l) =>
    refKlRewards(i.logprobs, i.refLogprobs, i.scores, l.batch, l.steps, l.mask, f32(o.klCoef ?? 0.05), (o.estimator ?? 'k1') as Estimator),
  tol: { rewards: SEQ_TOL, kl: SEQ_TOL },
};

export const gaeSpec: Spec = {
  name: 'gae',
  variants: [{}, { gamma: 0.99, lambda: 0.9 }, { gamma: 1, lambda: 1 }, { gamma: 0, lambda: 0.5 }, { gamma: 0.7, lambda: 0 }, { gamma: 0, lambda: 0 }],
  make(rng, l) {
    const rows = l.batch * l.steps;
    return { rewards: rng.normals(rows, 0.5), values: rng.normals(rows, 2) };
  },
  scramble: scrambleFields(['rewards', 'values']),
  sync: (i, o) => ppo.gaeSync(i, o) as unknown as Out,
  async: (i, o) => ppo.gae(i, o) as unknown as Promise<Out>,
  // gamma and lambda are float32 in the kernel's arguments: the reference uses the same numbers.
  reference: (i, o, l) => refGae(i.rewards, i.values, l.batch, l.steps, l.mask, f32(o.gamma ?? 1), f32(o.lambda ?? 0.95)),
  tol: { advantages: SEQ_TOL, returns: SEQ_TOL },
};

export const whitenSpec: Spec = {
  name: 'whiten',
  variants: [{}, { shiftMean: false }, { clip: 1.5 }, { shiftMean: false, clip: 2, eps: 1e-3 }, { eps: 0.5 }],
  make(rng, l) {
    return { values: rng.normals(l.batch * l.steps, 3, 1.5) };
  },
  scramble: scrambleFields(['values']),
  sync: (i, o) => asValues(ppo.whitenSync(i, o)),
  async: async (i, o) => asValues(await ppo.whiten(i, o)),
  reference: (i, o, l) => ({ values: refWhiten(i.values, l.mask, { shiftMean: o.shiftMean, eps: f32(o.eps ?? 1e-8), clip: o.clip === undefined ? undefined : f32(o.clip) }) }),
  tol: { values: SEQ_TOL },
};

export const clipSpec: Spec = {
  name: 'clipAdvantages',
  variants: [{ clip: 1 }, { clip: 0.3 }, { clip: 5 }, { clip: 1e-3 }],
  make(rng, l) {
    return { values: rng.normals(l.batch * l.steps, 2) };
  },
  scramble: scrambleFields(['values']),
  sync: (i, o) => asValues(ppo.clipAdvantagesSync(i, o)),
  async: async (i, o) => asValues(await ppo.clipAdvantages(i, o)),
  // clamping a float32 to float32 bounds is exact: the float32 rounding of the reference must match bit for bit.
  reference: (i, o, l) => ({ values: Float32Array.from(refClip(i.values, l.mask, f32(o.clip))) }),
  tol: { values: { abs: 0, rel: 0 } },
};

export const policySpec: Spec = {
  name: 'policyLoss',
  variants: [{}, { clip: 0.1 }, { clip: 0.3 }, { clip: 5 }],
  make(rng, l) {
    const rows = l.batch * l.steps;
    const oldLogprobs = rng.floats(rows, () => -Math.abs(2 * rng.normal()));
    const logprobs = new Float32Array(rows); // filled below from the old ones
    for (let i = 0; i < rows; i++) logprobs[i] = oldLogprobs[i] + 0.3 * rng.normal();
    return { logprobs, oldLogprobs, advantages: rng.normals(rows) };
  },
  scramble: scrambleFields(['logprobs', 'oldLogprobs', 'advantages']),
  sync: (i, o) => ppo.policyLossSync(i, o) as unknown as Out,
  async: (i, o) => ppo.policyLoss(i, o) as unknown as Promise<Out>,
  reference(i, o, l) {
    const r = refPolicyLoss(i.logprobs, i.oldLogprobs, i.advantages, l.mask, f32(o.clip ?? 0.2));
    return { loss: r.loss, gradLogprobs: r.grad, clipFraction: r.clipFraction, approxKl: r.approxKl, tokens: r.tokens };
  },
  tol: { loss: SCALAR_TOL, gradLogprobs: SEQ_TOL, clipFraction: SCALAR_TOL, approxKl: SCALAR_TOL, tokens: { abs: 0, rel: 0 } },
};

export const valueSpec: Spec = {
  name: 'valueLoss',
  variants: [{}, { clip: 0.05 }, { clip: 1 }, { clip: null }],
  make(rng, l) {
    const rows = l.batch * l.steps;
    const oldValues = rng.normals(rows, 2);
    const values = new Float32Array(rows);
    for (let i = 0; i < rows; i++) values[i] = oldValues[i] + 0.3 * rng.normal();
    return { values, oldValues, returns: rng.normals(rows, 2) };
  },
  scramble: scrambleFields(['values', 'oldValues', 'returns']),
  sync: (i, o) => ppo.valueLossSync(i, o) as unknown as Out,
  async: (i, o) => ppo.valueLoss(i, o) as unknown as Promise<Out>,
  reference(i, o, l) {
    const r = refValueLoss(i.values, i.oldValues, i.returns, l.mask, o.clip === null ? null : f32(o.clip ?? 0.2));
    return { loss: r.loss, gradValues: r.grad, clipFraction: r.clipFraction, tokens: r.tokens };
  },
  tol: { loss: SCALAR_TOL, gradValues: SEQ_TOL, clipFraction: SCALAR_TOL, tokens: { abs: 0, rel: 0 } },
};

export const SPECS: Spec[] = [logprobsSpec, backwardSpec, klSpec, gaeSpec, whitenSpec, clipSpec, policySpec, valueSpec];

/** Runs the Sync and the async form; they must agree exactly. */
export async function runBoth(spec: Spec, input: any, options: any): Promise<Out> {
  const s = spec.sync(input, options);
  const a = await spec.async(input, options);
  expectSameResult(s, a, `${spec.name} sync vs async`);
  return s;
}

export function expectMatchesReference(spec: Spec, out: Out, input: any, options: any, l: Layout): void {
  const ref = spec.reference(input, options, l);
  const rows = l.batch * l.steps;
  const inner = spec.inner ? spec.inner(input) : {};
  expect(Object.keys(out).sort()).toEqual(Object.keys(ref).sort());
  for (const [key, expected] of Object.entries(ref)) {
    const label = `${spec.name}.${key} (${JSON.stringify(options)})`;
    if (typeof expected === 'number') {
      expect(typeof out[key]).toBe('number');
      expectScalarClose(out[key] as number, expected, spec.tol[key], label);
    } else {
      const actual = expectFloat32(out[key], rows * (inner[key] ?? 1));
      expectClose(actual, expected, spec.tol[key], label);
      expectZeroWhereMasked(actual, l.mask, inner[key] ?? 1, label);
    }
  }
}

export async function checkCase(spec: Spec, l: Layout, rng: Rng): Promise<void> {
  const input = { ...l.shape, ...spec.make(rng, l) };
  for (const variant of spec.variants) {
    const options = { ...variant, ...CPU };
    const out = await runBoth(spec, input, options);
    expectMatchesReference(spec, out, input, options, l);
  }
}

