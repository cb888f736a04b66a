/**
 * CUDA against the CPU: every op on random inputs (with a mask, with lengths, with
 * neither) on device 'cuda' and on device 'cpu', within stated tolerances; plus
 * async/Sync agreement, determinism and padding invariance on the GPU. Skipped
 * cleanly when CUDA cannot be used (no CUDA build, no driver or no GPU).
 */
import { describe, expect, test } from '@jest/globals';

import * as ppo from '../lib';
import { Out, SPECS, Spec, expectSameResult, logprobsSpec, backwardSpec, seedOf } from './op-specs';
import { Layout, MaskKind, Rng, randomLayout } from './reference';
import { Tolerance, expectBitEqual, expectClose, expectFloat32, expectScalarClose, expectZeroWhereMasked } from './helpers';

const CUDA = { device: 'cuda' as const };
const CPU = { device: 'cpu' as const };

// ---- tolerances of CUDA against the CPU -----------------------------------------------------------
// Log-probs and entropy: two float32 softmax implementations (different exp, different
// summation trees), each within 1e-5 (+1e-5 relative) of float64: twice that between them.
const LOGITS_TOL: Tolerance = { abs: 2e-5, rel: 2e-5 };
// Gradients w.r.t. logits: likewise twice the CPU-vs-float64 tolerance.
const GRAD_LOGITS_TOL: Tolerance = { abs: 2e-5, rel: 2e-4 };
// Per-position outputs computed in double on both backends from the same float32 inputs
// and rounded once to float32: at most an ulp or so apart (6e-8 relative).
const SEQ_TOL: Tolerance = { abs: 1e-6, rel: 1e-6 };
// Scalar losses, fractions and moments: double reductions whose order differs.
const SCALAR_TOL: Tolerance = { abs: 1e-12, rel: 1e-9 };
// Clamping is exact on any backend.
const EXACT: Tolerance = { abs: 0, rel: 0 };

const TOLERANCES: Record<string, Record<string, Tolerance>> = {
  logprobsFromLogits: { logprobs: LOGITS_TOL, entropy: LOGITS_TOL },
  logprobsBackward: { gradLogits: GRAD_LOGITS_TOL },
  klPenalizedRewards: { rewards: SEQ_TOL, kl: SEQ_TOL },
  gae: { advantages: SEQ_TOL, returns: SEQ_TOL },
  whiten: { values: SEQ_TOL },
  clipAdvantages: { values: EXACT },
  policyLoss: { loss: SCALAR_TOL, gradLogprobs: SEQ_TOL, clipFraction: SCALAR_TOL, approxKl: SCALAR_TOL, tokens: EXACT },
  valueLoss: { loss: SCALAR_TOL, gradValues: SEQ_TOL, clipFraction: SCALAR_TOL, tokens: EXACT },
};

/** Sync and async on CUDA agree exactly, and match the CPU within the op's tolerances. */
async function compare(spec: Spec, input: any, variant: Record<string, unknown>, l: Layout): Promise<void> {
  const cpu = spec.sync(input, { ...variant, ...CPU });
  const gpu = spec.sync(input, { ...variant, ...CUDA });
  expectSameResult(gpu, await spec.async(input, { ...variant, ...CUDA }), `${spec.name} cuda sync vs async`);
  expect(Object.keys(gpu).sort()).toEqual(Object.keys(cpu).sort());
  const inner = spec.inner ? spec.inner(input) : {};
  for (const key of Object.keys(cpu)) {
    const tol = TOLERANCES[spec.name][key];
    const label = `${spec.name}.${key} cuda vs cpu (${JSON.stringify(variant)})`;
    if (typeof cpu[key] === 'number') {
      expectScalarClose(gpu[key] as number, cpu[key] as number, tol, label);
    } else {
      const n = l.batch * l.steps * (inner[key] ?? 1);
      expectClose(expectFloat32(gpu[key], n), cpu[key] as Float32Array, tol, label);
      expectZeroWhereMasked(gpu[key] as Float32Array, l.mask, inner[key] ?? 1, label);
    }
  }
}

const maybe = ppo.cudaAvailable() ? describe : describe.skip;

maybe('CUDA matches the CPU', () => {
  const SHAPES: [number, number][] = [
    [1, 1],
    [3, 17],
    [16, 64],
    [5, 300],
    [64, 33],
  ];
  const KINDS: MaskKind[] = ['none', 'mask', 'lengths'];

  describe.each(SPECS.map((s) => [s.name, s] as [string, Spec]))('%s', (_name, spec) => {
    const cases: [string, number, number, MaskKind][] = [];
    for (const [b, s] of SHAPES) for (const k of KINDS) cases.push([`[${b}, ${s}] ${k}`, b, s, k]);

    test.each(cases)('%s', async (label, batch, steps, kind) => {
      const rng = new Rng(seedOf(`cuda ${spec.name} ${label}`));
      const l = randomLayout(rng, batch, steps, kind);
      const input = { ...l.shape, ...spec.make(rng, l) };
      for (const variant of spec.variants) await compare(spec, input, variant, l);
    });

    test('deterministic on CUDA, and padded data changes nothing', async () => {
      const rng = new Rng(seedOf(`cuda ${spec.name} determinism`));
      const l = randomLayout(rng, 32, 97, 'mask');
      const input = { ...l.shape, ...spec.make(rng, l) };
      const scrambled = spec.scramble(input, l, rng);
      for (const variant of spec.variants) {
        const options = { ...variant, ...CUDA };
        const first = spec.sync(input, options);
        expectSameResult(first, spec.sync(input, options), `${spec.name} cuda twice`);
        const [a, b] = await Promise.all([spec.async(input, options), spec.async(scrambled, options)]);
        expectSameResult(first, a, `${spec.name} cuda async`);
        expectSameResult(first, b, `${spec.name} cuda scrambled padding`);
      }
    });

    test("device 'auto' runs on CUDA (same bits)", () => {
      const rng = new Rng(seedOf(`cuda ${spec.name} auto`));
      const l = randomLayout(rng, 4, 9, 'lengths');
      const input = { ...l.shape, ...spec.make(rng, l) };
      const variant = spec.variants[0];
      expectSameResult(spec.sync(input, { ...variant, ...CUDA }), spec.sync(input, { ...variant, device: 'auto' }) as Out);
    });
  });

  test.each([
    [4, 32, 32000, 1],
    [2, 8, 50257, 0.7],
    [1, 4, 128256, 1.3],
  ])('logprobs and their backward on large vocabularies: [%i, %i] x %i, temperature %f', async (batch, steps, vocab, temperature) => {
    const rng = new Rng(seedOf(`cuda large ${vocab}`));
    const l = randomLayout(rng, batch, steps, 'lengths');
    const rows = batch * steps;
    const input = {
      ...l.shape,
      vocab,
      logits: rng.normals(rows * vocab, 4),
      tokens: rng.tokens(rows, vocab),
      gradLogprobs: rng.normals(rows),
      gradEntropy: rng.normals(rows),
    };
    await compare(logprobsSpec, input, { temperature, entropy: true }, l);
    await compare(backwardSpec, input, { temperature, grads: 'both' }, l);
  });

  test('-Infinity logits on CUDA', async () => {
    const rng = new Rng(17);
    const [batch, steps, vocab] = [4, 8, 777];
    const l = randomLayout(rng, batch, steps, 'mask');
    const input: any = { ...l.shape, ...logprobsSpec.make(rng, l), vocab };
    input.logits = rng.normals(batch * steps * vocab, 3);
    input.tokens = rng.tokens(batch * steps, vocab);
    for (let r = 0; r < batch * steps; r++) {
      for (let v = 0; v < vocab; v++) if (v !== input.tokens[r] && rng.bool(0.5)) input.logits[r * vocab + v] = -Infinity;
    }
    input.gradLogprobs = rng.normals(batch * steps);
    input.gradEntropy = rng.normals(batch * steps);
    await compare(logprobsSpec, input, { entropy: true, temperature: 0.9 }, l);
    await compare(backwardSpec, input, { temperature: 0.9, grads: 'both' }, l);
  });

  test('large sequence batches (multi-block reductions and long GAE rows)', async () => {
    const rng = new Rng(23);
    const l = randomLayout(rng, 48, 4096, 'lengths');
    for (const spec of SPECS.filter((s) => !s.name.startsWith('logprobs'))) {
      const input = { ...l.shape, ...spec.make(rng, l) };
      await compare(spec, input, spec.variants[0], l);
    }
  });

  test('RunningMoments on CUDA matches the CPU', async () => {
    const rng = new Rng(29);
    const gpu = new ppo.RunningMoments();
    const cpu = new ppo.RunningMoments();
    for (let k = 0; k < 20; k++) {
      const scores = rng.normals(1 + rng.int(100_000), 3, rng.normal());
      await gpu.update(scores, CUDA);
      cpu.updateSync(scores, CPU);
    }
    expect(gpu.count).toBe(cpu.count);
    expectScalarClose(gpu.mean, cpu.mean, SCALAR_TOL, 'mean');
    expectScalarClose(gpu.std, cpu.std, SCALAR_TOL, 'std');
    const probe = rng.normals(1000, 5);
    for (const options of [{}, { mode: 'scale' as const, clip: 1 }]) {
      const a = await gpu.normalize(probe, { ...options, ...CUDA });
      const b = gpu.normalizeSync(probe, { ...options, ...CPU });
      expectClose(a, b, SEQ_TOL, 'normalize cuda vs cpu');
    }
  });
});

// ---- the transformer engine on CUDA against the CPU ------------------------------------------------
// Matrix products run in TF32 on the GPU (10-bit mantissa, float32 accumulation): outputs
// agree with the float32 CPU to about 1e-3 relative, and that is what the bounds allow.
const ENGINE_TOL: Tolerance = { abs: 2e-3, rel: 5e-3 };

maybe('the model engine on CUDA matches the CPU', () => {
  const CONFIG: ppo.GPT2Config = { vocabSize: 97, nPositions: 64, nEmbd: 64, nLayer: 2, nHead: 4, valueHead: true };

  function ragged(rng: Rng, batch: number, steps: number): ppo.TokenBatch {
    const lengths = Int32Array.from({ length: batch }, (_, b) => (b === 0 ? steps : 1 + rng.int(steps)));
    return { batch, steps, tokens: Int32Array.from(rng.tokens(batch * steps, CONFIG.vocabSize as number)), lengths };
  }

  test('forward outputs, a few training steps, and greedy generation', async () => {
    const rng = new Rng(seedOf('cuda engine'));
    const [cpu, gpu] = await Promise.all([
      ppo.Model.create(CONFIG, { seed: 5, ...CPU }),
      ppo.Model.create(CONFIG, { seed: 5, ...CUDA }),
    ]);
    expect(gpu.device).toBe('cuda');
    const batch = ragged(rng, 4, 40);
    const options = { logits: true, logprobs: true, entropy: true, values: true, lmLoss: true } as const;
    const [a, b] = [await cpu.forward(batch, options), await gpu.forward(batch, options)];
    for (const key of ['logits', 'logprobs', 'entropy', 'values'] as const) {
      expectClose(b[key] as Float32Array, a[key] as Float32Array, ENGINE_TOL, `forward ${key}`);
    }
    expectScalarClose(b.lmLoss as number, a.lmLoss as number, ENGINE_TOL, 'lm loss');
    for (let k = 0; k < 3; k++) {
      const [la, lb] = [await cpu.lmLossBackward(batch), await gpu.lmLossBackward(batch)];
      expectScalarClose(lb.loss, la.loss, ENGINE_TOL, `lm loss before step ${k}`);
      const [sa, sb] = [await cpu.step({ lr: 1e-3, maxGradNorm: 1 }), await gpu.step({ lr: 1e-3, maxGradNorm: 1 })];
      expectScalarClose(sb.gradNorm, sa.gradNorm, { abs: 1e-4, rel: 1e-2 }, `grad norm ${k}`);
      await Promise.all([cpu.zeroGrad(), gpu.zeroGrad()]);
    }
    const after = [await cpu.lmLoss(batch), await gpu.lmLoss(batch)];
    expectScalarClose(after[1].loss, after[0].loss, ENGINE_TOL, 'lm loss after 3 steps');
    const prompts = ragged(rng, 6, 8);
    const gen = { maxNewTokens: 16, greedy: true };
    const [ga, gb] = [await cpu.generate(prompts, gen), await gpu.generate(prompts, gen)];
    let same = 0;
    for (let i = 0; i < ga.tokens.length; i++) same += ga.tokens[i] === gb.tokens[i] ? 1 : 0;
    // A TF32 rounding can flip a near-tie of the argmax, and the row diverges after it.
    expect(same / ga.tokens.length).toBeGreaterThan(0.8);
    await Promise.all([cpu.dispose(), gpu.dispose()]);
  });

  test('deterministic: the same seed gives the same bits on CUDA', async () => {
    const rng = new Rng(seedOf('cuda engine determinism'));
    const batch = ragged(rng, 3, 33);
    const run = async (): Promise<Float32Array> => {
      const m = await ppo.Model.create(CONFIG, { seed: 9, ...CUDA });
      await m.lmLossBackward(batch);
      await m.step({ lr: 1e-3 });
      const out = (await m.forward(batch, { logits: true })).logits as Float32Array;
      await m.dispose();
      return out;
    };
    expectBitEqual(await run(), await run(), 'logits after one step, twice');
  });
});

describe('CUDA availability', () => {
  test('this suite runs exactly when cudaAvailable() is true', () => {
    expect(typeof ppo.cudaAvailable()).toBe('boolean');
    if (!ppo.cudaAvailable()) {
      expect(() => ppo.resolveDevice('cuda')).toThrow();
    }
  });
});
