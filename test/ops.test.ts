/**
 * Every op, in its async and Sync forms, against the float64 reference in
 * test/reference.ts: random shapes with a mask, with lengths and with neither; edge
 * layouts; gradients against central finite differences; padding, determinism and
 * async/Sync agreement. All on device 'cpu' (CUDA is compared with the CPU in
 * cuda-parity.test.ts), so the suite means the same on every machine.
 */
import { describe, expect, test } from '@jest/globals';

import * as ppo from '../lib';
import {
  CPU,
  FD_TOL,
  GRAD_LOGITS_TOL,
  LOGITS_TOL,
  Out,
  SCALAR_TOL,
  SEQ_TOL,
  SPECS,
  Spec,
  checkCase,
  expectMatchesReference,
  expectSameResult,
  f32,
  gaeSpec,
  klSpec,
  logprobsSpec,
  policySpec,
  runBoth,
  seedOf,
  valueSpec,
  whitenSpec,
} from './op-specs';
import {
  Estimator,
  Layout,
  MaskKind,
  Rng,
  centralDifferences,
  isValid,
  maskFromLengths,
  randomLayout,
  refLogprobsGrad,
  refLogprobsLoss,
  refPolicyLoss,
  refValueLoss,
} from './reference';
import { expectBitEqual, expectClose, expectScalarClose, expectZeroWhereMasked, plain } from './helpers';

// ---- generic: random shapes, edge layouts, padding, determinism -------------------------------

const SHAPES: [number, number][] = [
  [1, 1],
  [1, 9],
  [2, 3],
  [5, 17],
  [16, 40],
  [3, 129],
];
const KINDS: MaskKind[] = ['none', 'mask', 'lengths'];

function edgeLayouts(): [string, Layout][] {
  const fromMask = (batch: number, steps: number, mask: number[]): Layout => {
    const m = Float32Array.from(mask);
    return { batch, steps, kind: 'mask', shape: { batch, steps, mask: m }, mask: m, valid: mask.filter((x) => x).length };
  };
  const fromLengths = (steps: number, lengths: number[]): Layout => {
    const m = maskFromLengths(lengths, steps);
    const batch = lengths.length;
    return { batch, steps, kind: 'lengths', shape: { batch, steps, lengths }, mask: m, valid: m.filter((x) => x).length };
  };
  return [
    ['batch of one', fromLengths(6, [4])],
    ['batch of one, one step, no mask', { batch: 1, steps: 1, kind: 'none', shape: { batch: 1, steps: 1 }, mask: null, valid: 1 }],
    ['rows of length 1', fromLengths(5, [1, 1, 1, 1])],
    ['rows of length 1 at the end (left padding)', fromMask(3, 4, [0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1])],
    ['one valid position in the whole batch', fromMask(3, 3, [0, 0, 0, 0, 1, 0, 0, 0, 0])],
    ['all-masked rows among others', fromMask(4, 3, [1, 1, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0])],
    ['all-masked batch (mask)', fromMask(3, 4, new Array(12).fill(0))],
    ['all-masked batch (lengths 0)', fromLengths(5, [0, 0])],
    ['full lengths', fromLengths(4, [4, 4, 4])],
  ];
}

describe.each(SPECS.map((s) => [s.name, s] as [string, Spec]))('%s', (_name, spec) => {
  describe('matches the float64 reference, async and Sync', () => {
    const cases: [string, number, number, MaskKind][] = [];
    for (const [b, s] of SHAPES) for (const k of KINDS) cases.push([`[${b}, ${s}] ${k}`, b, s, k]);
    test.each(cases)('%s', async (label, batch, steps, kind) => {
      const rng = new Rng(seedOf(`${spec.name} ${label}`));
      await checkCase(spec, randomLayout(rng, batch, steps, kind), rng);
    });
  });

  test.each(edgeLayouts())('edge layout: %s', async (label, layout) => {
    await checkCase(spec, layout, new Rng(seedOf(`${spec.name} edge ${label}`)));
  });

  test('data at padded positions (NaN, Infinity, huge, bad token ids) changes nothing', async () => {
    const rng = new Rng(seedOf(`${spec.name} padding`));
    for (const kind of ['mask', 'lengths'] as MaskKind[]) {
      const l = randomLayout(rng, 6, 11, kind);
      const input = { ...l.shape, ...spec.make(rng, l) };
      const scrambled = spec.scramble(input, l, rng);
      for (const variant of spec.variants) {
        const options = { ...variant, ...CPU };
        const clean = spec.sync(input, options);
        expectSameResult(clean, spec.sync(scrambled, options), `${spec.name} scrambled padding (sync)`);
        expectSameResult(clean, await spec.async(scrambled, options), `${spec.name} scrambled padding (async)`);
      }
    }
  });

  test('is deterministic: the same call twice gives identical outputs', async () => {
    const rng = new Rng(seedOf(`${spec.name} determinism`));
    const l = randomLayout(rng, 24, 70, 'mask');
    const input = { ...l.shape, ...spec.make(rng, l) };
    for (const variant of spec.variants) {
      const options = { ...variant, ...CPU };
      const first = spec.sync(input, options);
      expectSameResult(first, spec.sync(input, options), `${spec.name} sync twice`);
      const [a, b] = await Promise.all([spec.async(input, options), spec.async(input, options)]);
      expectSameResult(first, a, `${spec.name} async`);
      expectSameResult(first, b, `${spec.name} concurrent async`);
    }
  });

  test("device 'auto' gives the same result as an explicit device", async () => {
    const rng = new Rng(seedOf(`${spec.name} auto`));
    const l = randomLayout(rng, 3, 8, 'lengths');
    const input = { ...l.shape, ...spec.make(rng, l) };
    const variant = spec.variants[0];
    const explicit = spec.sync(input, { ...variant, device: ppo.cudaAvailable() ? 'cuda' : 'cpu' });
    expectSameResult(explicit, spec.sync(input, { ...variant, device: 'auto' }), `${spec.name} auto`);
    expectSameResult(explicit, spec.sync(input, variant), `${spec.name} default device`);
  });
});

// ---- log-probs: op-specific -------------------------------------------------------------------

describe('logprobsFromLogits specifics', () => {
  const rng = new Rng(101);

  test.each([
    [4, 32, 1000, 1],
    [2, 16, 4099, 0.9],
    [1, 3, 32000, 1.2],
  ])('larger vocabularies: [%i, %i] x %i, temperature %f', async (batch, steps, vocab, temperature) => {
    const l = randomLayout(rng, batch, steps, 'lengths');
    const logits = rng.normals(batch * steps * vocab, 4);
    const tokens = rng.tokens(batch * steps, vocab);
    const input = { ...l.shape, vocab, logits, tokens };
    const options = { temperature, entropy: true, ...CPU };
    const out = await runBoth(logprobsSpec, input, options);
    expectMatchesReference(logprobsSpec, out, input, options, l);
  });

  test('omitting entropy returns no entropy and the same log-probs', () => {
    const l = randomLayout(rng, 3, 5, 'mask');
    const input = { ...l.shape, ...logprobsSpec.make(rng, l) };
    const without = ppo.logprobsFromLogitsSync(input as any, { ...CPU });
    const withEntropy = ppo.logprobsFromLogitsSync(input as any, { entropy: true, ...CPU });
    expect(without.entropy).toBeUndefined();
    expectBitEqual(without.logprobs, withEntropy.logprobs);
    expect(ppo.logprobsFromLogitsSync(input as any, { entropy: false, ...CPU }).entropy).toBeUndefined();
  });

  test('vocab of 1: log-prob 0 and entropy 0', async () => {
    const input = { batch: 2, steps: 3, vocab: 1, logits: rng.normals(6, 10), tokens: new Int32Array(6) };
    const out = await ppo.logprobsFromLogits(input, { entropy: true, ...CPU });
    expect(plain(out.logprobs)).toEqual(new Array(6).fill(0));
    expect(plain(out.entropy!)).toEqual(new Array(6).fill(0));
  });

  test('-Infinity logits for non-taken tokens (banned tokens)', async () => {
    const [batch, steps, vocab] = [3, 7, 40];
    const l = randomLayout(rng, batch, steps, 'mask');
    const logits = rng.normals(batch * steps * vocab, 2);
    const tokens = rng.tokens(batch * steps, vocab);
    for (let r = 0; r < batch * steps; r++) {
      for (let v = 0; v < vocab; v++) if (v !== tokens[r] && rng.bool(0.4)) logits[r * vocab + v] = -Infinity;
    }
    // One row where the taken token is the only finite logit: log p = 0, H = 0.
    for (let v = 0; v < vocab; v++) if (v !== tokens[0]) logits[v] = -Infinity;
    const mask = l.mask!;
    mask[0] = 1;
    const input = { batch, steps, mask, vocab, logits, tokens };
    for (const temperature of [1, 0.5, 2]) {
      const options = { temperature, entropy: true, ...CPU };
      const out = await runBoth(logprobsSpec, input, options);
      expectMatchesReference(logprobsSpec, out, input, options, { ...l, mask });
      expect(out.logprobs).toBeDefined();
      expect((out.logprobs as Float32Array)[0]).toBe(0);
      expect((out.entropy as Float32Array)[0]).toBe(0);
      for (const x of out.entropy as Float32Array) expect(Number.isFinite(x)).toBe(true);
    }
  });

  test('very large logits (magnitude 1e4, spread 1e3) stay accurate', async () => {
    const [batch, steps, vocab] = [2, 6, 500];
    const l = randomLayout(rng, batch, steps, 'none');
    const logits = rng.normals(batch * steps * vocab, 1e3, 1e4);
    const tokens = rng.tokens(batch * steps, vocab);
    const input = { ...l.shape, vocab, logits, tokens };
    // temperature 1: the kernel's z - max is exact in float32, so the default tolerance holds.
    const out = await runBoth(logprobsSpec, input, { entropy: true, ...CPU });
    expectMatchesReference(logprobsSpec, out, input, { entropy: true }, l);
    // temperature 1.3: logits * (1/T) rounds to float32 (relative 6e-8 of ~1e4), so the
    // error is relative to the log-probs' size (~1e3 here), which LOGITS_TOL.rel allows.
    const hot = await runBoth(logprobsSpec, input, { temperature: 1.3, entropy: true, ...CPU });
    expectMatchesReference(logprobsSpec, hot, input, { temperature: 1.3, entropy: true }, l);
    for (const x of hot.logprobs as Float32Array) expect(Number.isFinite(x)).toBe(true);
  });

  test('very small logits give the uniform distribution', async () => {
    const [batch, steps, vocab] = [2, 3, 50];
    const logits = rng.normals(batch * steps * vocab, 1e-30);
    const tokens = rng.tokens(batch * steps, vocab);
    const out = await ppo.logprobsFromLogits({ batch, steps, vocab, logits, tokens }, { entropy: true, temperature: 0.01, ...CPU });
    expectClose(out.logprobs, new Array(6).fill(-Math.log(vocab)), LOGITS_TOL);
    expectClose(out.entropy!, new Array(6).fill(Math.log(vocab)), LOGITS_TOL);
  });

  test('accepts plain number arrays, Float64Array, Uint32Array tokens and a Uint8Array mask', async () => {
    const [batch, steps, vocab] = [2, 4, 9];
    const logits = rng.normals(batch * steps * vocab, 2);
    const tokens = rng.tokens(batch * steps, vocab);
    const mask = Float32Array.from([1, 1, 0, 1, 1, 0, 0, 0]);
    const expected = ppo.logprobsFromLogitsSync({ batch, steps, vocab, logits, tokens, mask }, { entropy: true, ...CPU });
    const other = await ppo.logprobsFromLogits(
      { batch, steps, vocab, logits: Float64Array.from(logits), tokens: Uint32Array.from(tokens), mask: Uint8Array.from(mask) },
      { entropy: true, ...CPU },
    );
    expectSameResult(expected as unknown as Out, other as unknown as Out);
    const plain = ppo.logprobsFromLogitsSync(
      { batch, steps, vocab, logits: Array.from(logits), tokens: Array.from(tokens), mask: Array.from(mask) },
      { entropy: true, ...CPU },
    );
    expectSameResult(expected as unknown as Out, plain as unknown as Out);
  });
});

// ---- gradients against central finite differences ---------------------------------------------------

describe('gradients match central finite differences of the float64 reference', () => {
  test.each([
    ['no mask, T = 1', 2, 3, 7, 'none', 1],
    ['mask, T = 0.6', 3, 4, 11, 'mask', 0.6],
    ['lengths, T = 1.7', 3, 3, 16, 'lengths', 1.7],
    ['one row, vocab 2, T = 2.5', 1, 1, 2, 'none', 2.5],
  ] as [string, number, number, number, MaskKind, number][])(
    'logprobsBackward (gradLogprobs and gradEntropy): %s',
    async (label, batch, steps, vocab, kind, temperature) => {
      const rng = new Rng(seedOf(`fd logprobs ${label}`));
      const l = randomLayout(rng, batch, steps, kind);
      const rows = batch * steps;
      const logits = rng.normals(rows * vocab, 2);
      const tokens = rng.tokens(rows, vocab);
      if (vocab > 4) logits[3] = -Infinity; // a banned token (never the taken one below)
      if (tokens[0] === 3) tokens[0] = 0;
      const gradLogprobs = rng.normals(rows);
      const gradEntropy = rng.normals(rows);
      const input = { ...l.shape, vocab, logits, tokens };
      const h = 1e-6;
      for (const grads of [{ gradLogprobs, gradEntropy }, { gradLogprobs }, { gradEntropy }]) {
        const g = grads.gradLogprobs ?? null;
        const e = grads.gradEntropy ?? null;
        const loss = (x: number[]) => refLogprobsLoss(x, tokens, batch, steps, vocab, l.mask, temperature, g, e);
        const fd = centralDifferences(loss, logits, h);
        // The reference's analytic gradient is itself right (float64 on both sides).
        const analytic = refLogprobsGrad(logits, tokens, batch, steps, vocab, l.mask, temperature, g, e);
        expectClose(analytic, fd, { abs: 1e-8, rel: 1e-6 }, 'reference analytic gradient vs finite differences');
        const sync = ppo.logprobsBackwardSync(input, grads, { temperature, ...CPU });
        const out = await ppo.logprobsBackward(input, grads, { temperature, ...CPU });
        expectBitEqual(sync.gradLogits, out.gradLogits);
        // Float32 softmax in the kernel: the logits tolerance (relative 1e-4 for small entries).
        expectClose(out.gradLogits, fd, GRAD_LOGITS_TOL, `gradLogits ${label}`);
        if (vocab > 4) expect(out.gradLogits[3] === 0).toBe(true); // the banned token's gradient (0 or -0)
        expectZeroWhereMasked(out.gradLogits, l.mask, vocab, 'gradLogits');
      }
    },
  );

  /** Log-ratios at least 1e-3 away from log(1 +- clip), where the loss has kinks. */
  function awayFromRatioKinks(rng: Rng, n: number, clip: number): Float32Array {
    const kinks = [Math.log(1 - clip), Math.log(1 + clip)];
    return rng.floats(n, () => {
      for (;;) {
        const x = f32(0.4 * rng.normal());
        if (kinks.every((k) => Math.abs(x - k) > 1e-3)) return x;
      }
    });
  }

  test.each([
    ['no mask', 4, 9, 'none', 0.2],
    ['mask', 5, 8, 'mask', 0.1],
    ['lengths', 3, 12, 'lengths', 0.3],
  ] as [string, number, number, MaskKind, number][])('policyLoss.gradLogprobs: %s, clip %f', async (label, batch, steps, kind, clip) => {
    const rng = new Rng(seedOf(`fd policy ${label}`));
    const l = randomLayout(rng, batch, steps, kind);
    const rows = batch * steps;
    const oldLogprobs = rng.floats(rows, () => -Math.abs(2 * rng.normal()));
    const logRatio = awayFromRatioKinks(rng, rows, f32(clip));
    const logprobs = new Float32Array(rows);
    // Build logprobs so that logprobs - oldLogprobs (in double) is the sampled float32 log-ratio.
    for (let i = 0; i < rows; i++) {
      logprobs[i] = oldLogprobs[i] + logRatio[i];
      if (Math.abs(logprobs[i] - oldLogprobs[i] - logRatio[i]) > 1e-6) throw new Error('log-ratio not representable');
    }
    const advantages = rng.floats(rows, () => (rng.bool() ? 1 : -1) * (0.05 + Math.abs(rng.normal())));
    const input = { ...l.shape, logprobs, oldLogprobs, advantages };
    const loss = (x: number[]) => refPolicyLoss(x, oldLogprobs, advantages, l.mask, f32(clip)).loss;
    const fd = centralDifferences(loss, logprobs, 1e-6);
    const out = await ppo.policyLoss(input, { clip, ...CPU });
    expectSameResult(ppo.policyLossSync(input, { clip, ...CPU }) as unknown as Out, out as unknown as Out);
    expectClose(out.gradLogprobs, fd, FD_TOL, `policy gradLogprobs ${label}`);
    // Both clipped (zero-gradient) and unclipped tokens occur.
    if (l.valid > 10) {
      expect(out.clipFraction).toBeGreaterThan(0);
      expect(out.clipFraction).toBeLessThan(1);
    }
  });

  test.each([
    ['no mask, clip 0.2', 4, 9, 'none', 0.2],
    ['mask, clip 0.5', 5, 8, 'mask', 0.5],
    ['lengths, no clipping', 3, 12, 'lengths', null],
  ] as [string, number, number, MaskKind, number | null][])('valueLoss.gradValues: %s', async (label, batch, steps, kind, clip) => {
    const rng = new Rng(seedOf(`fd value ${label}`));
    const l = randomLayout(rng, batch, steps, kind);
    const rows = batch * steps;
    const oldValues = rng.normals(rows, 2);
    const returns = rng.normals(rows, 2);
    const values = new Float32Array(rows);
    const eps = clip === null ? null : f32(clip);
    for (let i = 0; i < rows; i++) {
      // Resample until V is 1e-3 away from the kinks: V = old +- eps and |V - R| = |vc - R|.
      for (;;) {
        const v = f32(oldValues[i] + 0.6 * rng.normal());
        if (eps !== null) {
          const lo = oldValues[i] - eps;
          const hi = oldValues[i] + eps;
          const vc = Math.min(hi, Math.max(lo, v));
          if (Math.abs(v - lo) < 1e-3 || Math.abs(v - hi) < 1e-3) continue;
          if (Math.abs(Math.abs(v - returns[i]) - Math.abs(vc - returns[i])) < 1e-3 && v !== vc) continue;
        }
        values[i] = v;
        break;
      }
    }
    const input = { ...l.shape, values, oldValues, returns };
    const loss = (x: number[]) => refValueLoss(x, oldValues, returns, l.mask, eps).loss;
    const fd = centralDifferences(loss, values, 1e-6);
    const out = await ppo.valueLoss(input, { clip, ...CPU });
    expectSameResult(ppo.valueLossSync(input, { clip, ...CPU }) as unknown as Out, out as unknown as Out);
    expectClose(out.gradValues, fd, FD_TOL, `value gradValues ${label}`);
    if (clip === null) expect(out.clipFraction).toBe(0);
  });
});

// ---- KL rewards: op-specific ---------------------------------------------------------------------

describe('klPenalizedRewards specifics', () => {
  test('the score lands on the last valid token, also with holes and left padding', () => {
    const mask = Float32Array.from([1, 0, 1, 0, 0, /**/ 0, 0, 1, 1, 1, /**/ 0, 0, 0, 0, 0, /**/ 1, 1, 1, 1, 1]);
    const zeros = new Float32Array(20);
    const scores = Float32Array.from([1, 2, 3, 4]);
    const { rewards, kl } = ppo.klPenalizedRewardsSync(
      { batch: 4, steps: 5, mask, logprobs: zeros, refLogprobs: zeros, scores },
      { klCoef: 0.5, ...CPU },
    );
    expect(plain(rewards)).toEqual([0, 0, 1, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4]);
    expect(plain(kl)).toEqual(new Array(20).fill(0));
  });

  test.each(['k1', 'k2', 'k3'] as Estimator[])('estimator %s on large log-prob gaps', async (estimator) => {
    const rng = new Rng(seedOf(`kl large ${estimator}`));
    const l = randomLayout(rng, 4, 16, 'lengths');
    const rows = 64;
    const logprobs = rng.floats(rows, () => -Math.abs(30 * rng.normal()));
    const refLogprobs = rng.floats(rows, () => -Math.abs(30 * rng.normal()));
    // k3 = exp(-d) - 1 + d grows like e^|d|: keep d >= -60 so it stays a finite float32.
    for (let i = 0; i < rows; i++) if (logprobs[i] - refLogprobs[i] < -60) refLogprobs[i] = logprobs[i] + 60;
    const input = { ...l.shape, logprobs, refLogprobs, scores: rng.normals(4, 1e3) };
    const options = { estimator, klCoef: 0.2, ...CPU };
    const out = await runBoth(klSpec, input, options);
    expectMatchesReference(klSpec, out, input, options, l);
  });

  test('k3 is accurate for tiny log-prob differences (no cancellation)', () => {
    const logprobs = Float32Array.from([-1, -2, -3, -0.5]);
    const refLogprobs = Float32Array.from([-1 + 1e-6, -2 - 1e-5, -3 + 2e-7, -0.5]);
    const { kl } = ppo.klPenalizedRewardsSync({ batch: 1, steps: 4, logprobs, refLogprobs, scores: [0] }, { estimator: 'k3', ...CPU });
    for (let i = 0; i < 4; i++) {
      const d = logprobs[i] - refLogprobs[i];
      // exp(-d) - 1 + d = d^2/2 - d^3/6 + ... for the float32 inputs' exact difference d
      const expected = (d * d) / 2 - (d * d * d) / 6;
      expectScalarClose(kl[i], expected, { abs: 0, rel: 1e-4 }, `k3[${i}]`);
    }
  });
});

// ---- GAE: op-specific --------------------------------------------------------------------------

describe('gae specifics', () => {
  test('gamma 0: advantages are r - V; lambda 0: one-step TD errors; gamma = lambda = 1: reward-to-go minus V', () => {
    const rewards = Float32Array.from([1, 2, 3, 4, 0.5, -1]);
    const values = Float32Array.from([0.5, 0.25, -1, 2, 1, 1]);
    const lengths = [4, 2];
    const g0 = ppo.gaeSync({ batch: 2, steps: 3, rewards, values, lengths: [3, 3] }, { gamma: 0, lambda: 0.9, ...CPU });
    expectClose(g0.advantages, Array.from(rewards, (r, i) => r - values[i]), SEQ_TOL);
    expectClose(g0.returns, rewards, SEQ_TOL);
    const td = ppo.gaeSync({ batch: 1, steps: 6, rewards, values, lengths: [lengths[0]] }, { gamma: 0.5, lambda: 0, ...CPU });
    // delta_t = r_t + 0.5 V_{t+1} - V_t, V after the last valid token = 0
    expectClose(td.advantages, [1 + 0.125 - 0.5, 2 - 0.5 - 0.25, 3 + 1 + 1, 4 - 2, 0, 0], SEQ_TOL);
    const mc = ppo.gaeSync({ batch: 1, steps: 6, rewards, values }, { gamma: 1, lambda: 1, ...CPU });
    let togo = 0;
    const expected: number[] = [];
    for (let t = 5; t >= 0; t--) {
      togo += rewards[t];
      expected[t] = togo - values[t];
    }
    expectClose(mc.advantages, expected, SEQ_TOL);
    expectClose(mc.returns, expected.map((a, t) => a + values[t]), SEQ_TOL);
  });

  test('long rows with large and small magnitudes', async () => {
    const rng = new Rng(77);
    const l = randomLayout(rng, 4, 512, 'mask');
    const rows = 4 * 512;
    const input = { ...l.shape, rewards: rng.normals(rows, 1e5), values: rng.normals(rows, 1e-5) };
    for (const options of [{ gamma: 1, lambda: 1 }, { gamma: 0.999, lambda: 0.95 }]) {
      const out = await runBoth(gaeSpec, input, { ...options, ...CPU });
      expectMatchesReference(gaeSpec, out, input, options, l);
    }
  });
});

// ---- whitening and clipping: op-specific --------------------------------------------------------------

describe('whiten and clipAdvantages specifics', () => {
  test('whitened valid values have mean 0 and Bessel variance 1 over the whole batch', () => {
    const rng = new Rng(5);
    const l = randomLayout(rng, 7, 30, 'mask');
    const values = rng.normals(210, 5, -3);
    const out = ppo.whitenSync({ ...l.shape, values }, { eps: 1e-12, ...CPU });
    const valid = Array.from(out).filter((_, i) => isValid(l.mask, i));
    const mean = valid.reduce((s, x) => s + x, 0) / valid.length;
    const variance = valid.reduce((s, x) => s + (x - mean) ** 2, 0) / (valid.length - 1);
    expect(Math.abs(mean)).toBeLessThan(1e-6);
    expect(Math.abs(variance - 1)).toBeLessThan(1e-5);
  });

  test('one valid value whitens to 0 (to its mean without shiftMean); constant values to 0', () => {
    const values = Float32Array.from([5, 7, 9]);
    const mask = Float32Array.from([0, 1, 0]);
    expect(plain(ppo.whitenSync({ batch: 1, steps: 3, values, mask }, CPU))).toEqual([0, 0, 0]);
    expect(plain(ppo.whitenSync({ batch: 1, steps: 3, values, mask }, { shiftMean: false, ...CPU }))).toEqual([0, 7, 0]);
    const constant = ppo.whitenSync({ batch: 2, steps: 2, values: [3, 3, 3, 3] }, CPU);
    expect(plain(constant)).toEqual([0, 0, 0, 0]);
  });

  test('huge offsets and tiny spreads', async () => {
    const rng = new Rng(9);
    const l = randomLayout(rng, 5, 20, 'lengths');
    const big = { ...l.shape, values: rng.normals(100, 1e3, 1e6) };
    const out = await runBoth(whitenSpec, big, { shiftMean: false, ...CPU });
    expectMatchesReference(whitenSpec, out, big, { shiftMean: false }, l);
    const tiny = { ...l.shape, values: rng.normals(100, 1e-10) };
    const tinyOut = await runBoth(whitenSpec, tiny, { eps: 1e-30, clip: 3, ...CPU });
    expectMatchesReference(whitenSpec, tinyOut, tiny, { eps: 1e-30, clip: 3 }, l);
  });

  test('clipAdvantages leaves values inside the range untouched and clips huge values', () => {
    const values = Float32Array.from([-1e30, -2, -0.5, 0, 0.5, 2, 1e30, 3.4e38]);
    const out = ppo.clipAdvantagesSync({ batch: 2, steps: 4, values }, { clip: 1, ...CPU });
    expect(plain(out)).toEqual([-1, -1, -0.5, 0, 0.5, 1, 1, 1]);
  });
});

// ---- losses: op-specific --------------------------------------------------------------------------

describe('policyLoss and valueLoss specifics', () => {
  test('policyLoss: ratio 1 gives loss -mean(A), no clipping, zero approx KL', async () => {
    const logprobs = Float32Array.from([-1, -2, -0.5, -3]);
    const advantages = Float32Array.from([1, -2, 0.5, 4]);
    const out = await ppo.policyLoss({ batch: 2, steps: 2, logprobs, oldLogprobs: logprobs, advantages, lengths: [2, 1] }, CPU);
    expectScalarClose(out.loss, -(1 - 2 + 0.5) / 3, SCALAR_TOL);
    expect(out.clipFraction).toBe(0);
    expect(out.approxKl).toBe(0);
    expect(out.tokens).toBe(3);
    expectClose(out.gradLogprobs, [-1 / 3, 2 / 3, -0.5 / 3, 0], SEQ_TOL);
  });

  test('policyLoss with large advantages and log-ratios', async () => {
    const rng = new Rng(31);
    const l = randomLayout(rng, 6, 25, 'mask');
    const rows = 150;
    const oldLogprobs = rng.normals(rows, 5, -20);
    const logprobs = new Float32Array(rows);
    for (let i = 0; i < rows; i++) logprobs[i] = oldLogprobs[i] + 1.5 * rng.normal();
    const input = { ...l.shape, logprobs, oldLogprobs, advantages: rng.normals(rows, 1e3) };
    const out = await runBoth(policySpec, input, { clip: 0.2, ...CPU });
    expectMatchesReference(policySpec, out, input, { clip: 0.2 }, l);
  });

  test('valueLoss: clipping off is 0.5 * mean squared error', async () => {
    const values = Float32Array.from([1, 2, 3, 4]);
    const returns = Float32Array.from([0, 0, 1, 10]);
    const out = await ppo.valueLoss({ batch: 1, steps: 4, values, oldValues: values, returns }, { clip: null, ...CPU });
    expectScalarClose(out.loss, (0.5 * (1 + 4 + 4 + 36)) / 4, SCALAR_TOL);
    expectClose(out.gradValues, [1 / 4, 2 / 4, 2 / 4, -6 / 4], SEQ_TOL);
    expect(out.clipFraction).toBe(0);
    expect(out.tokens).toBe(4);
  });

  test('valueLoss with large values', async () => {
    const rng = new Rng(32);
    const l = randomLayout(rng, 4, 20, 'lengths');
    const rows = 80;
    const oldValues = rng.normals(rows, 1e4);
    const values = new Float32Array(rows);
    for (let i = 0; i < rows; i++) values[i] = oldValues[i] + 50 * rng.normal();
    const input = { ...l.shape, values, oldValues, returns: rng.normals(rows, 1e4) };
    for (const options of [{ clip: 20 }, { clip: null }]) {
      const out = await runBoth(valueSpec, input, { ...options, ...CPU });
      expectMatchesReference(valueSpec, out, input, options, l);
    }
  });

  test('all-masked batch: loss, fractions and tokens are 0, gradients all 0', async () => {
    const mask = new Float32Array(6);
    const x = Float32Array.from([1, 2, 3, 4, 5, 6]);
    const p = await ppo.policyLoss({ batch: 2, steps: 3, mask, logprobs: x, oldLogprobs: x, advantages: x }, CPU);
    expect(plain([p.loss, p.clipFraction, p.approxKl, p.tokens])).toEqual([0, 0, 0, 0]);
    expect(plain(p.gradLogprobs)).toEqual(new Array(6).fill(0));
    const v = await ppo.valueLoss({ batch: 2, steps: 3, mask, values: x, oldValues: x, returns: x }, CPU);
    expect(plain([v.loss, v.clipFraction, v.tokens])).toEqual([0, 0, 0]);
    expect(plain(v.gradValues)).toEqual(new Array(6).fill(0));
  });
});
