/**
 * The GPT-2 engine through its TypeScript API (lib/model.ts): parameter counts, the
 * alignment of forward's outputs (checked in float64 against the model's own logits),
 * padding invariance, the value head, training, the one-call and two-call backward
 * forms, generation, and checkpoints. Tiny configs throughout, so the file runs in
 * seconds; the engine's math is tested against references in test/cpp.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

import { afterAll, beforeAll, describe, expect, test } from '@jest/globals';

import * as ppo from '../lib';
import { GPT2Config, Model, TokenBatch } from '../lib';
import { expectBitEqual, expectClose, expectFloat32, expectRejects } from './helpers';
import { Rng, entropyOf, logSoftmax } from './reference';

const TINY: GPT2Config = { vocabSize: 64, nPositions: 32, nEmbd: 32, nLayer: 2, nHead: 4 };
const V = TINY.vocabSize;

/** V*C + P*C + L*(12C^2 + 13C) + 2C (+ C for the value head): GPT-2's parameters. */
function countByFormula(c: GPT2Config): number {
  const C = c.nEmbd;
  return c.vocabSize * C + c.nPositions * C + c.nLayer * (12 * C * C + 13 * C) + 2 * C + (c.valueHead ? C : 0);
}

/** A batch whose padded positions hold `pad(i)` (anything: the engine never reads them). */
function makeBatch(rng: Rng, lengths: number[], steps: number, pad: (i: number) => number = () => 0): TokenBatch {
  const batch = lengths.length;
  const tokens = new Int32Array(batch * steps);
  for (let b = 0; b < batch; b++) {
    for (let t = 0; t < steps; t++) tokens[b * steps + t] = t < lengths[b] ? rng.int(V) : pad(b * steps + t);
  }
  return { tokens, batch, steps, lengths };
}

const tmpDirs: string[] = [];
function tmpDir(): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ppo-max-model-'));
  tmpDirs.push(dir);
  return dir;
}
afterAll(() => {
  for (const dir of tmpDirs) fs.rmSync(dir, { recursive: true, force: true });
});

describe('creating models', () => {
  test("GPT-2 124M's parameter count, and a tiny config's by formula", async () => {
    const gpt2 = { vocabSize: 50257, nPositions: 1024, nEmbd: 768, nLayer: 12, nHead: 12 };
    expect(Model.parameterCount(gpt2)).toBe(124439808);
    expect(countByFormula(gpt2)).toBe(124439808);
    expect(Model.parameterCount({ ...gpt2, valueHead: true })).toBe(124439808 + 768);

    const m = await Model.create(TINY, { seed: 1 });
    expect(m.parameterCount()).toBe(countByFormula(TINY));
    expect(Model.parameterCount(TINY)).toBe(countByFormula(TINY));
    const withHead = await Model.create({ ...TINY, valueHead: true });
    expect(withHead.parameterCount()).toBe(countByFormula({ ...TINY, valueHead: true }));
    await Promise.all([m.dispose(), withHead.dispose()]);
  });

  test('config defaults, device, trainable and memory', async () => {
    const m = await Model.create(TINY, { device: 'auto' });
    expect(m.config).toEqual({ ...TINY, modelType: 'gpt2', layerNormEpsilon: 1e-5, valueHead: false, bosTokenId: V - 1, eosTokenId: V - 1 });
    expect(Object.isFrozen(m.config)).toBe(true);
    expect(m.device).toBe('cpu');
    expect(m.trainable).toBe(true);
    expect(m.disposed).toBe(false);
    const mem = m.memory();
    expect(mem.params).toBe(4 * countByFormula(TINY));
    // Gradients and AdamW moments are allocated on first use only.
    expect(mem.grads).toBe(0);
    expect(mem.optimizer).toBe(0);
    expect(mem.kvCache).toBe(0);
    const rng = new Rng(5);
    await m.lmLossBackward(makeBatch(rng, [6, 4], 6));
    expect(m.memory().grads).toBe(4 * countByFormula(TINY));
    await m.step({ lr: 1e-3 });
    expect(m.memory().optimizer).toBe(8 * countByFormula(TINY));
    expect(m.memory().activations).toBeGreaterThan(0);
    await m.dispose();
    expect(m.memory()).toEqual({ params: 0, grads: 0, optimizer: 0, activations: 0, kvCache: 0 });

    const frozen = await Model.create(TINY, { trainable: false, device: 'cpu' });
    expect(frozen.trainable).toBe(false);
    await frozen.logits(makeBatch(rng, [3], 3));
    expect(frozen.memory().grads).toBe(0);
    await frozen.dispose();
  });

  test('same seed, same weights; another seed, other weights', async () => {
    const batch = makeBatch(new Rng(2), [5, 3], 5);
    const [a, b, c] = await Promise.all([Model.create(TINY, { seed: 7 }), Model.create(TINY, { seed: 7 }), Model.create(TINY, { seed: 8 })]);
    const [la, lb, lc] = await Promise.all([a.logits(batch), b.logits(batch), c.logits(batch)]);
    expectBitEqual(la, lb, 'seed 7 twice');
    expect(Array.from(la.subarray(0, V)).some((x, i) => x !== lc[i])).toBe(true);
    await Promise.all([a.dispose(), b.dispose(), c.dispose()]);
  });
});

describe('forward', () => {
  let model: Model;
  let critic: Model;
  beforeAll(async () => {
    model = await Model.create(TINY, { seed: 11 });
    critic = await Model.create({ ...TINY, valueHead: true }, { seed: 12 });
  });
  afterAll(async () => {
    await Promise.all([model.dispose(), critic.dispose()]);
  });

  test('shapes, and logprobs[t] = log_softmax(logits[t - 1])[tokens[t]] (float64 from the logits)', async () => {
    const steps = 9;
    const lengths = [9, 5, 1, 7];
    const batch = makeBatch(new Rng(3), lengths, steps);
    const out = await model.forward(batch, { logits: true, logprobs: true, entropy: true });
    const rows = lengths.length * steps;
    const logits = expectFloat32(out.logits, rows * V);
    const logprobs = expectFloat32(out.logprobs, rows);
    const entropy = expectFloat32(out.entropy, rows);
    expect(out.values).toBeUndefined();
    expect(out.lmLoss).toBeUndefined();
    const tokens = batch.tokens as Int32Array;
    const wantLp: number[] = [];
    const wantEnt: number[] = [];
    for (let b = 0; b < lengths.length; b++) {
      for (let t = 0; t < steps; t++) {
        const r = b * steps + t;
        if (t === 0 || t >= lengths[b]) {
          wantLp.push(0);
          wantEnt.push(0);
          continue;
        }
        const logp = logSoftmax(logits.subarray((r - 1) * V, r * V), 1);
        wantLp.push(logp[tokens[r]]);
        wantEnt.push(entropyOf(logp));
      }
    }
    // The model's log-probs come from its own float32 logits: float32 rounding only.
    expectClose(logprobs, wantLp, { abs: 2e-5, rel: 1e-5 }, 'logprobs');
    expectClose(entropy, wantEnt, { abs: 2e-5, rel: 1e-5 }, 'entropy');
    // Exactly 0 where undefined (t = 0, padding), logits too at padding.
    for (let b = 0; b < lengths.length; b++) {
      expect(logprobs[b * steps]).toBe(0);
      for (let t = lengths[b]; t < steps; t++) {
        expect(logprobs[b * steps + t]).toBe(0);
        expect(logits.subarray((b * steps + t) * V, (b * steps + t + 1) * V).every((x) => x === 0)).toBe(true);
      }
    }
    // The conveniences give the same numbers.
    const lp = await model.logprobs(batch, { entropy: true });
    expectBitEqual(lp.logprobs, logprobs, 'logprobs()');
    expectBitEqual(lp.entropy as Float32Array, entropy, 'logprobs().entropy');
    expectBitEqual(await model.logits(batch), logits, 'logits()');
    expect((await model.logprobs(batch)).entropy).toBeUndefined();
  });

  test('lmLoss is the mean of -logprobs over the target positions; targetMask selects them', async () => {
    const steps = 8;
    const lengths = [8, 6, 3];
    const batch = makeBatch(new Rng(4), lengths, steps);
    const { logprobs } = await model.logprobs(batch);
    const all = await model.lmLoss(batch);
    expect(all.tokens).toBe(7 + 5 + 2);
    let sum = 0;
    for (let i = 0; i < logprobs.length; i++) sum -= logprobs[i];
    expectClose([all.loss], [sum / all.tokens], { abs: 1e-6, rel: 1e-6 }, 'lmLoss');

    // Only the second half of each row (a "response"); logprobs elsewhere are 0.
    const targetMask = new Float32Array(lengths.length * steps);
    for (let b = 0; b < lengths.length; b++) for (let t = 4; t < steps; t++) targetMask[b * steps + t] = 1;
    const masked = await model.forward(batch, { logprobs: true, lmLoss: true, targetMask });
    expect(masked.lmTokens).toBe(4 + 2 + 0);
    let maskedSum = 0;
    for (let i = 0; i < logprobs.length; i++) {
      const inMask = targetMask[i] === 1 && i % steps < lengths[Math.floor(i / steps)];
      expect(masked.logprobs![i]).toBe(inMask ? logprobs[i] : 0);
      if (inMask) maskedSum -= logprobs[i];
    }
    expectClose([masked.lmLoss!], [maskedSum / 6], { abs: 1e-6, rel: 1e-6 }, 'masked lmLoss');
    expect(await model.lmLoss(batch, { targetMask: new Float32Array(targetMask.length) })).toEqual({ loss: 0, tokens: 0 });
  });

  test('padding invariance: whatever sits at padded positions (even out-of-vocabulary ids) changes nothing', async () => {
    const steps = 10;
    const lengths = [10, 4, 7, 1];
    const clean = makeBatch(new Rng(6), lengths, steps, () => 0);
    const garbage = makeBatch(new Rng(6), lengths, steps, (i) => [-7, 99999, V, V + 3, 2147483647, 5][i % 6]);
    const options = { logits: true, logprobs: true, entropy: true, lmLoss: true } as const;
    const a = await model.forward(clean, options);
    const b = await model.forward(garbage, options);
    expectBitEqual(a.logits!, b.logits!, 'logits');
    expectBitEqual(a.logprobs!, b.logprobs!, 'logprobs');
    expectBitEqual(a.entropy!, b.entropy!, 'entropy');
    expect(b.lmLoss).toBe(a.lmLoss);
    const va = await critic.values(clean);
    const vb = await critic.values(garbage);
    expectBitEqual(va, vb, 'values');

    // An array of sequences is right-padded into the same batch.
    const seqs = lengths.map((n, r) => Array.from((clean.tokens as Int32Array).subarray(r * steps, r * steps + n)));
    const c = await model.forward(seqs, options);
    expectBitEqual(a.logits!, c.logits!, 'logits from sequences');
    expectBitEqual(a.logprobs!, c.logprobs!, 'logprobs from sequences');
    // Plain number arrays work like Int32Arrays (padding given as anything, even NaN).
    const plain = { ...garbage, tokens: Array.from(garbage.tokens as Int32Array, (x, i) => (i % 3 === 0 && i % steps >= lengths[Math.floor(i / steps)] ? NaN : x)) };
    expectBitEqual((await model.forward(plain, { logprobs: true })).logprobs!, a.logprobs!, 'logprobs from number[]');
  });

  test('values need the value head; with it, one value per valid position, 0 at padding', async () => {
    const batch = makeBatch(new Rng(7), [5, 2], 5);
    await expectRejects(() => model.values(batch), { code: 'ERR_INVALID_ARGUMENT', argument: 'values', message: /value head/ });
    await expectRejects(() => model.forward(batch, { values: true }), { code: 'ERR_INVALID_ARGUMENT', argument: 'values' });
    await expectRejects(() => model.valuesBackward(batch, { gradValues: new Float32Array(10) }), { code: 'ERR_INVALID_ARGUMENT', argument: 'values' });
    const values = expectFloat32(await critic.values(batch), 10);
    expect(Array.from(values.subarray(7))).toEqual([0, 0, 0]);
    expect(Array.from(values.subarray(0, 7)).every((v) => v !== 0 && Number.isFinite(v))).toBe(true);
    // The critic is a GPT-2 too: its logits come with the values in one pass.
    const both = await critic.forward(batch, { values: true, logprobs: true });
    expectBitEqual(both.values!, values, 'values with logprobs');
  });
});

describe('training', () => {
  test('lmLossBackward + step lower the loss of a fixed batch over 30 steps', async () => {
    const m = await Model.create(TINY, { seed: 21 });
    const batch = makeBatch(new Rng(8), [16, 12, 16, 9], 16);
    const first = await m.lmLoss(batch);
    // Random init: about ln(V).
    expectClose([first.loss], [Math.log(V)], { abs: 0.1, rel: 0 }, 'initial loss');
    let last = first.loss;
    let step = 0;
    for (let i = 0; i < 30; i++) {
      await m.zeroGrad();
      const r = await m.lmLossBackward(batch);
      expect(r.tokens).toBe(15 + 11 + 15 + 8);
      last = r.loss;
      const s = await m.step({ lr: 1e-2, weightDecay: 0.01, maxGradNorm: 1 });
      step = s.step;
      expect(s.gradNorm).toBeGreaterThan(0);
      expect(s.clipped).toBe(s.gradNorm > 1);
    }
    expect(step).toBe(30);
    const final = await m.lmLoss(batch);
    expect(final.loss).toBeLessThan(last + 1e-3);
    expect(final.loss).toBeLessThan(first.loss - 2);
    await m.dispose();
  });

  test('gradients accumulate until zeroGrad', async () => {
    const m = await Model.create(TINY, { seed: 22 });
    const batch = makeBatch(new Rng(9), [7, 5], 7);
    expect(await m.gradNorm()).toBe(0);
    await m.lmLossBackward(batch);
    const once = await m.gradNorm();
    expect(once).toBeGreaterThan(0);
    await m.lmLossBackward(batch);
    // The same gradients again: the norm doubles (up to the rounding of the accumulation).
    expectClose([await m.gradNorm()], [2 * once], { abs: 0, rel: 1e-6 }, 'gradNorm after two backwards');
    await m.zeroGrad();
    expect(await m.gradNorm()).toBe(0);
    await m.dispose();
  });

  test('forward(retain) + backward equals the one-call forms (identical gradients)', async () => {
    const batch = makeBatch(new Rng(10), [8, 6, 3], 8);
    const rows = 24;
    const g = new Rng(11);
    const gradLogprobs = Float32Array.from({ length: rows }, () => g.uniform(-1, 1));
    const gradEntropy = Float32Array.from({ length: rows }, () => g.uniform(-0.1, 0.1));
    const gradValues = Float32Array.from({ length: rows }, () => g.uniform(-1, 1));
    const config = { ...TINY, valueHead: true };
    const [a, b] = await Promise.all([Model.create(config, { seed: 3 }), Model.create(config, { seed: 3 })]);

    // LM loss.
    const one = await a.lmLossBackward(batch, { scale: 1 });
    const fwd = await b.forward(batch, { lmLoss: true, retain: true });
    await b.backward({ lmLossScale: 1 });
    expect(fwd.lmLoss).toBe(one.loss);
    expect(fwd.lmTokens).toBe(one.tokens);
    const normA = await a.gradNorm();
    expect(normA).toBeGreaterThan(0);
    expect(await b.gradNorm()).toBe(normA);

    // Log-probs and entropy (a PPO-style loss computed in JS from the forward's outputs).
    const lpA = await a.logprobsBackward(batch, { gradLogprobs, gradEntropy });
    const lpB = await b.forward(batch, { logprobs: true, entropy: true, retain: true });
    await b.backward({ gradLogprobs, gradEntropy });
    expectBitEqual(lpA.logprobs, lpB.logprobs!, 'logprobs');
    expectBitEqual(lpA.entropy!, lpB.entropy!, 'entropy');
    expect(await b.gradNorm()).toBe(await a.gradNorm());

    // The value head.
    const vA = await a.valuesBackward(batch, { gradValues });
    const vB = await b.forward(batch, { values: true, retain: true });
    await b.backward({ gradValues });
    expectBitEqual(vA.values, vB.values!, 'values');
    const norm = await a.gradNorm();
    expect(await b.gradNorm()).toBe(norm);
    expect(norm).toBeGreaterThan(normA);

    // Same gradients, same step, same weights.
    const [sa, sb] = await Promise.all([a.step({ lr: 1e-3 }), b.step({ lr: 1e-3 })]);
    expect(sb).toEqual(sa);
    expectBitEqual(await a.logits(batch), await b.logits(batch), 'logits after the step');
    await Promise.all([a.dispose(), b.dispose()]);
  });

  test('a frozen model refuses backward and step', async () => {
    const m = await Model.create(TINY, { trainable: false });
    const batch = makeBatch(new Rng(12), [4], 4);
    await expectRejects(() => m.lmLossBackward(batch), { code: 'ERR_INVALID_ARGUMENT', argument: 'trainable', message: /frozen/ });
    await expectRejects(() => m.forward(batch, { logprobs: true, retain: true }), { code: 'ERR_INVALID_ARGUMENT', argument: 'trainable' });
    await expectRejects(() => m.step({ lr: 1e-3 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'trainable' });
    await m.dispose();
  });
});

describe('generate', () => {
  let model: Model;
  beforeAll(async () => {
    model = await Model.create(TINY, { seed: 31 });
  });
  afterAll(async () => {
    await model.dispose();
  });
  const prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9]];

  test('shapes; the log-probs equal model.logprobs of prompt + generated tokens', async () => {
    const out = await model.generate(prompts, { maxNewTokens: 6, seed: 1 });
    expect(out.tokens.length).toBe(3);
    expect(out.logprobs.length).toBe(3);
    expect(out.stopped).toEqual([false, false, false]);
    expect(ArrayBuffer.isView(out.lengths)).toBe(true);
    expect(Array.from(out.lengths)).toEqual([6, 6, 6]);
    for (let r = 0; r < 3; r++) {
      expect(out.tokens[r].constructor.name).toBe('Int32Array');
      expectFloat32(out.logprobs[r], 6);
      expect(out.tokens[r].length).toBe(6);
      expect(Array.from(out.tokens[r]).every((t) => Number.isInteger(t) && t >= 0 && t < V)).toBe(true);
      expect(Array.from(out.logprobs[r]).every((x) => x < 0 && Number.isFinite(x))).toBe(true);
    }
    // Score the full sequences with a forward pass: the same log-probs.
    const full = prompts.map((p, r) => [...p, ...out.tokens[r]]);
    const { logprobs } = await model.logprobs(full);
    const steps = Math.max(...full.map((s) => s.length));
    for (let r = 0; r < 3; r++) {
      const start = r * steps + prompts[r].length;
      expectClose(out.logprobs[r], logprobs.subarray(start, start + 6), { abs: 1e-4, rel: 0 }, `row ${r}`);
    }
  });

  test('a padded TokenBatch gives what the array of prompts gives', async () => {
    const steps = 7; // more padding than the longest prompt needs
    const tokens = new Int32Array(3 * steps).fill(-1);
    prompts.forEach((p, r) => tokens.set(p, r * steps));
    const a = await model.generate(prompts, { maxNewTokens: 4, seed: 5 });
    const b = await model.generate({ tokens, batch: 3, steps, lengths: prompts.map((p) => p.length) }, { maxNewTokens: 4, seed: 5 });
    expect(b.tokens.map((t) => Array.from(t))).toEqual(a.tokens.map((t) => Array.from(t)));
  });

  test('greedy is deterministic; same seed same tokens, another seed other tokens', async () => {
    const g1 = await model.generate(prompts, { maxNewTokens: 8, greedy: true, seed: 1 });
    const g2 = await model.generate(prompts, { maxNewTokens: 8, greedy: true, seed: 2 });
    expect(g2.tokens.map((t) => Array.from(t))).toEqual(g1.tokens.map((t) => Array.from(t)));
    // The initial model's distribution is nearly flat: sampling is close to uniform.
    const s1 = await model.generate(prompts, { maxNewTokens: 12, seed: 42 });
    const s2 = await model.generate(prompts, { maxNewTokens: 12, seed: 42 });
    const s3 = await model.generate(prompts, { maxNewTokens: 12, seed: 43 });
    const rows = (r: typeof s1) => r.tokens.map((t) => Array.from(t));
    expect(rows(s2)).toEqual(rows(s1));
    for (let r = 0; r < 3; r++) expect(Array.from(s3.tokens[r])).not.toEqual(Array.from(s1.tokens[r]));
    expect(rows(s1)).not.toEqual(rows(g1));
  });

  test('stop tokens end a row (the stop token included); other rows go on', async () => {
    const greedy = await model.generate(prompts, { maxNewTokens: 8, greedy: true });
    const stop = greedy.tokens[0][2]; // row 0's third token
    const out = await model.generate(prompts, { maxNewTokens: 8, greedy: true, stopTokens: [stop] });
    const firstStop = (row: Int32Array) => Array.from(row).indexOf(stop);
    for (let r = 0; r < 3; r++) {
      const k = firstStop(greedy.tokens[r]);
      const n = k < 0 ? 8 : k + 1;
      expect(out.lengths[r]).toBe(n);
      expect(out.stopped[r]).toBe(k >= 0);
      expect(Array.from(out.tokens[r])).toEqual(Array.from(greedy.tokens[r].subarray(0, n)));
      expectBitEqual(out.logprobs[r], greedy.logprobs[r].subarray(0, n), `logprobs of row ${r}`);
    }
    expect(out.stopped[0]).toBe(true);
    expect(out.lengths[0]).toBeLessThanOrEqual(3);
  });

  test('onProgress is called on the main thread after each step, in order', async () => {
    const calls: [number, number][] = [];
    const out = await model.generate(prompts, {
      maxNewTokens: 5,
      seed: 3,
      onProgress: (done, total) => {
        calls.push([done, total]);
      },
    });
    expect(calls).toEqual([1, 2, 3, 4, 5].map((d) => [d, 5]));
    expect(Array.from(out.lengths)).toEqual([5, 5, 5]);
  });

  test('an onProgress that throws stops generation; the promise rejects with what it threw', async () => {
    const thrown = new Error('stop here');
    let calls = 0;
    const e = await model
      .generate(prompts, {
        maxNewTokens: 10,
        onProgress: () => {
          calls++;
          throw thrown;
        },
      })
      .then(
        () => null,
        (err: unknown) => err,
      );
    expect(e).toBe(thrown);
    expect(calls).toBe(1);
    // The model is free again.
    expect((await model.generate(prompts, { maxNewTokens: 2 })).tokens.length).toBe(3);
  });
});

describe('checkpoints', () => {
  test('save then load gives identical logits and values', async () => {
    const config = { ...TINY, valueHead: true, layerNormEpsilon: 1e-6, bosTokenId: 3, eosTokenId: 4 };
    const m = await Model.create(config, { seed: 41 });
    // Train a step so that the weights are not just the initialization.
    const batch = makeBatch(new Rng(13), [6, 4], 6);
    await m.lmLossBackward(batch);
    await m.step({ lr: 1e-2 });
    const dir = path.join(tmpDir(), 'nested', 'checkpoint');
    await m.save(dir);
    expect(fs.existsSync(path.join(dir, 'config.json'))).toBe(true);
    expect(fs.existsSync(path.join(dir, 'model.safetensors'))).toBe(true);
    const loaded = await Model.load(dir, { trainable: false });
    expect(loaded.config).toEqual(m.config);
    expect(loaded.trainable).toBe(false);
    expect(loaded.parameterCount()).toBe(m.parameterCount());
    const options = { logits: true, values: true } as const;
    const [a, b] = await Promise.all([m.forward(batch, options), loaded.forward(batch, options)]);
    expectBitEqual(a.logits!, b.logits!, 'logits');
    expectBitEqual(a.values!, b.values!, 'values');
    await Promise.all([m.dispose(), loaded.dispose()]);
  });

  test('a missing directory: ERR_NOT_FOUND; a corrupt model.safetensors: ERR_CORRUPT_FILE', async () => {
    const missing = path.join(tmpDir(), 'does-not-exist');
    const e = await expectRejects(() => Model.load(missing), { code: 'ERR_NOT_FOUND' });
    expect(e.message).toContain('does-not-exist');

    const m = await Model.create(TINY);
    const dir = tmpDir();
    await m.save(dir);
    await m.dispose();
    const file = path.join(dir, 'model.safetensors');
    const good = fs.readFileSync(file);
    // Truncated: the header promises more data than the file holds.
    fs.writeFileSync(file, good.subarray(0, good.length - 100));
    await expectRejects(() => Model.load(dir), { code: 'ERR_CORRUPT_FILE' });
    // Garbage where the header's JSON should be.
    const garbage = Buffer.from(good);
    garbage.fill(0x7b, 8, 40);
    fs.writeFileSync(file, garbage);
    await expectRejects(() => Model.load(dir), { code: 'ERR_CORRUPT_FILE' });
    // The intact file loads again.
    fs.writeFileSync(file, good);
    await (await Model.load(dir)).dispose();
  });

  test('ppo re-exports Model', () => {
    expect(ppo.Model).toBe(Model);
  });
});
