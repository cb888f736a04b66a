/**
 * The Model API's contract around the engine: argument validation (codes and argument
 * names), the per-model call queue and its native safety net (ERR_BUSY), dispose
 * (ERR_DISPOSED), error stacks that point at the caller, inputs copied at call time,
 * and an event loop that stays free while a long call runs.
 */
import { afterAll, beforeAll, describe, expect, test } from '@jest/globals';

import { GPT2Config, Model, TokenBatch, cudaAvailable } from '../lib';
import { native } from '../lib/native';
import { expectBitEqual, expectClose, expectRejects, expectThrows } from './helpers';
import { Rng } from './reference';

const TINY: GPT2Config = { vocabSize: 50, nPositions: 16, nEmbd: 16, nLayer: 1, nHead: 2 };

function batchOf(rng: Rng, lengths: number[], steps: number): TokenBatch {
  const tokens = new Int32Array(lengths.length * steps);
  lengths.forEach((n, b) => {
    for (let t = 0; t < n; t++) tokens[b * steps + t] = rng.int(TINY.vocabSize);
  });
  return { tokens, batch: lengths.length, steps, lengths };
}

/** The native handle, for the tests of the addon's own safety nets. */
function handleOf(m: Model): unknown {
  return (m as unknown as { handle: unknown }).handle;
}

describe('validation', () => {
  let m: Model;
  const batch = batchOf(new Rng(1), [6, 3], 6);
  beforeAll(async () => {
    m = await Model.create(TINY, { seed: 1 });
  });
  afterAll(async () => {
    await m.dispose();
  });

  test('bad configs and options of create and load', async () => {
    await expectRejects(() => Model.create({ ...TINY, nHead: 3 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'config.nHead', message: /divisible/ });
    await expectRejects(() => Model.create({ ...TINY, vocabSize: 0 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'config.vocabSize' });
    await expectRejects(() => Model.create({ ...TINY, nLayer: 1.5 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'config.nLayer' });
    await expectRejects(() => Model.create({ ...TINY, layerNormEpsilon: 0 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'config.layerNormEpsilon' });
    await expectRejects(() => Model.create({ ...TINY, eosTokenId: 50 }), { code: 'ERR_OUT_OF_RANGE', argument: 'config.eosTokenId' });
    await expectRejects(() => Model.create({ ...TINY, n_embd: 16 } as unknown as GPT2Config), { code: 'ERR_INVALID_ARGUMENT', argument: 'config.n_embd', message: /not a GPT2Config field/ });
    await expectRejects(() => Model.create(null as unknown as GPT2Config), { code: 'ERR_INVALID_ARGUMENT', argument: 'config' });
    await expectRejects(() => Model.create(TINY, { seed: -1 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'seed' });
    await expectRejects(() => Model.create(TINY, { trainable: 'yes' as unknown as boolean }), { code: 'ERR_INVALID_ARGUMENT', argument: 'trainable' });
    await expectRejects(() => Model.create(TINY, { device: 'tpu' as 'cpu' }), { code: 'ERR_INVALID_ARGUMENT', argument: 'device' });
    await expectRejects(() => Model.load(''), { code: 'ERR_INVALID_ARGUMENT', argument: 'dir' });
    expectThrows(() => Model.parameterCount({ ...TINY, nEmbd: 15 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'config.nHead' });
  });

  test("device: 'cpu' always; 'auto' is CUDA when usable; 'cuda' without a usable GPU rejects with the reason", async () => {
    const cpu = await Model.create(TINY, { device: 'cpu' });
    expect(cpu.device).toBe('cpu');
    const clone = await cpu.clone();
    expect(clone.device).toBe('cpu');
    const auto = await Model.create(TINY, { device: 'auto' });
    expect(auto.device).toBe(cudaAvailable() ? 'cuda' : 'cpu');
    await Promise.all([cpu.dispose(), clone.dispose(), auto.dispose()]);
    if (cudaAvailable()) return;
    const e = await expectRejects(() => Model.create(TINY, { device: 'cuda' }), { code: 'ERR_CUDA_UNAVAILABLE', argument: 'device' });
    expect(e.message).toContain(native().cudaUnavailableReason());
    await expectRejects(() => Model.load('/nonexistent', { device: 'cuda' }), { code: 'ERR_CUDA_UNAVAILABLE' });
  });

  test('token batches: shapes, ranges, lengths, the context length', async () => {
    const { tokens } = batch;
    const t = tokens as Int32Array;
    const lp = { logprobs: true } as const;
    await expectRejects(() => m.forward({ tokens: t.subarray(1), batch: 2, steps: 6 }, lp), { code: 'ERR_SHAPE_MISMATCH', argument: 'tokens' });
    await expectRejects(() => m.forward({ tokens: t, batch: 2, steps: 6, lengths: [6] }, lp), { code: 'ERR_SHAPE_MISMATCH', argument: 'lengths' });
    await expectRejects(() => m.forward({ tokens: t, batch: 2, steps: 6, lengths: [7, 1] }, lp), { code: 'ERR_OUT_OF_RANGE', argument: 'lengths' });
    await expectRejects(() => m.forward({ tokens: t, batch: 2, steps: 6, lengths: [0, 1] }, lp), { code: 'ERR_OUT_OF_RANGE', argument: 'lengths' });
    const bad = Int32Array.from(t);
    bad[8] = 50; // row 1, position 2: valid (length 3)
    const e = await expectRejects(() => m.forward({ ...batch, tokens: bad }, lp), { code: 'ERR_OUT_OF_RANGE', argument: 'tokens' });
    expect(e.message).toMatch(/row 1, position 2/);
    bad[8] = -1;
    await expectRejects(() => m.forward({ ...batch, tokens: bad }, lp), { code: 'ERR_OUT_OF_RANGE', argument: 'tokens' });
    await expectRejects(() => m.forward({ ...batch, tokens: Array.from(t, (x, i) => (i === 0 ? 1.5 : x)) }, lp), { code: 'ERR_INVALID_ARGUMENT', argument: 'tokens' });
    // Out of range at a padded position is fine (row 1 has length 3).
    bad[8] = 1;
    bad[10] = 12345;
    await m.forward({ ...batch, tokens: bad }, lp);
    const long = new Int32Array(17);
    await expectRejects(() => m.forward({ tokens: long, batch: 1, steps: 17 }, lp), { code: 'ERR_OUT_OF_RANGE', argument: 'steps', message: /nPositions=16/ });
    await expectRejects(() => m.forward([Array.from(long)], lp), { code: 'ERR_OUT_OF_RANGE', argument: 'tokens' });
    await expectRejects(() => m.forward([[1, 2], []], lp), { code: 'ERR_OUT_OF_RANGE', argument: 'lengths', message: /empty/ });
    await expectRejects(() => m.forward([], lp), { code: 'ERR_INVALID_ARGUMENT', argument: 'batch' });
    await expectRejects(() => m.forward([[1, 99]], lp), { code: 'ERR_OUT_OF_RANGE', argument: 'tokens' });
    await expectRejects(() => m.forward(t as unknown as TokenBatch, lp), { code: 'ERR_INVALID_ARGUMENT', argument: 'batch' });
    await expectRejects(() => m.forward({ ...batch, batch: 0 }, lp), { code: 'ERR_INVALID_ARGUMENT', argument: 'batch' });
    await expectRejects(() => m.forward(batch, {}), { code: 'ERR_INVALID_ARGUMENT', argument: 'options', message: /computes nothing/ });
    await expectRejects(() => m.forward(batch, { logits: 1 as unknown as boolean }), { code: 'ERR_INVALID_ARGUMENT', argument: 'logits' });
  });

  test('targetMask and gradient arrays: lengths, 0/1, finite', async () => {
    const rows = 12;
    await expectRejects(() => m.forward(batch, { logprobs: true, targetMask: new Float32Array(11) }), { code: 'ERR_SHAPE_MISMATCH', argument: 'targetMask' });
    const half = new Float32Array(rows).fill(1);
    half[3] = 0.5;
    await expectRejects(() => m.lmLoss(batch, { targetMask: half }), { code: 'ERR_OUT_OF_RANGE', argument: 'targetMask' });
    half[3] = NaN;
    await expectRejects(() => m.lmLoss(batch, { targetMask: half }), { code: 'ERR_NON_FINITE', argument: 'targetMask' });
    half[3] = 1;
    half[10] = 0.5; // padding (row 1 has length 3): never read
    await m.lmLoss(batch, { targetMask: half });

    const grads = new Float32Array(rows);
    await expectRejects(() => m.logprobsBackward(batch, { gradLogprobs: new Float32Array(13) }), { code: 'ERR_SHAPE_MISMATCH', argument: 'gradLogprobs' });
    await expectRejects(() => m.logprobsBackward(batch, {} as { gradLogprobs: Float32Array }), { code: 'ERR_INVALID_ARGUMENT', argument: 'gradLogprobs' });
    grads[2] = NaN;
    await expectRejects(() => m.logprobsBackward(batch, { gradLogprobs: grads }), { code: 'ERR_NON_FINITE', argument: 'gradLogprobs' });
    await expectRejects(() => m.logprobsBackward(batch, { gradLogprobs: new Float32Array(rows), gradEntropy: Array.from(grads) }), { code: 'ERR_NON_FINITE', argument: 'gradEntropy' });
    grads[2] = Infinity;
    await expectRejects(() => m.logprobsBackward(batch, { gradLogprobs: grads }), { code: 'ERR_NON_FINITE', argument: 'gradLogprobs' });
    await expectRejects(() => m.lmLossBackward(batch, { scale: NaN }), { code: 'ERR_INVALID_ARGUMENT', argument: 'scale' });
    // number[] gradients work like Float32Arrays.
    await m.zeroGrad();
    await m.logprobsBackward(batch, { gradLogprobs: Array.from({ length: rows }, (_, i) => i / rows) });
    expect(await m.gradNorm()).toBeGreaterThan(0);
  });

  test('backward needs a retained forward computing what it differentiates', async () => {
    await m.forward(batch, { logprobs: true });
    const g = new Float32Array(12);
    await expectRejects(() => m.backward({ gradLogprobs: g }), { code: 'ERR_INVALID_ARGUMENT', argument: 'backward', message: /retain: true/ });
    await m.forward(batch, { logprobs: true, retain: true });
    await expectRejects(() => m.backward({ gradValues: g }), { code: 'ERR_INVALID_ARGUMENT', argument: 'gradValues' });
    await expectRejects(() => m.backward({ gradEntropy: g }), { code: 'ERR_INVALID_ARGUMENT', argument: 'gradEntropy' });
    await expectRejects(() => m.backward({ lmLossScale: 1 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'lmLossScale' });
    await expectRejects(() => m.backward({}), { code: 'ERR_INVALID_ARGUMENT', argument: 'gradients' });
    await expectRejects(() => m.backward({ gradLogprobs: new Float32Array(6) }), { code: 'ERR_SHAPE_MISMATCH', argument: 'gradLogprobs' });
    // The retained forward survives the failed calls above, and backward may repeat.
    await m.zeroGrad();
    await m.backward({ gradLogprobs: g.fill(0.5) });
    const once = await m.gradNorm();
    await m.backward({ gradLogprobs: g });
    expectClose([await m.gradNorm()], [2 * once], { abs: 0, rel: 1e-6 }, 'gradNorm after two backwards');
    // generate (and any forward without retain) drops it.
    await m.generate([[1]], { maxNewTokens: 1 });
    await expectRejects(() => m.backward({ gradLogprobs: g }), { code: 'ERR_INVALID_ARGUMENT', argument: 'backward' });
  });

  test('step and generate options', async () => {
    await expectRejects(() => m.step({} as { lr: number }), { code: 'ERR_INVALID_ARGUMENT', argument: 'lr' });
    await expectRejects(() => m.step({ lr: -1 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'lr' });
    await expectRejects(() => m.step({ lr: Infinity }), { code: 'ERR_INVALID_ARGUMENT', argument: 'lr' });
    await expectRejects(() => m.step({ lr: 1e-3, beta1: 1 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'beta1' });
    await expectRejects(() => m.step({ lr: 1e-3, beta2: -0.1 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'beta2' });
    await expectRejects(() => m.step({ lr: 1e-3, eps: 0 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'eps' });
    await expectRejects(() => m.step({ lr: 1e-3, weightDecay: -1 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'weightDecay' });
    await expectRejects(() => m.step({ lr: 1e-3, maxGradNorm: -1 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'maxGradNorm' });

    const p = [[1, 2, 3]];
    await expectRejects(() => m.generate(p, {} as { maxNewTokens: number }), { code: 'ERR_INVALID_ARGUMENT', argument: 'maxNewTokens' });
    await expectRejects(() => m.generate(p, { maxNewTokens: 0 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'maxNewTokens' });
    const e = await expectRejects(() => m.generate(p, { maxNewTokens: 14 }), { code: 'ERR_OUT_OF_RANGE', argument: 'maxNewTokens' });
    expect(e.message).toMatch(/3 \+ maxNewTokens \(14\) exceeds the context length nPositions=16/);
    await m.generate(p, { maxNewTokens: 13 }); // exactly the context
    await expectRejects(() => m.generate(p, { maxNewTokens: 2, temperature: 0 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'temperature' });
    await expectRejects(() => m.generate(p, { maxNewTokens: 2, topP: 1.5 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'topP' });
    await expectRejects(() => m.generate(p, { maxNewTokens: 2, topK: -1 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'topK' });
    await expectRejects(() => m.generate(p, { maxNewTokens: 2, repetitionPenalty: 0 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'repetitionPenalty' });
    await expectRejects(() => m.generate(p, { maxNewTokens: 2, stopTokens: [50] }), { code: 'ERR_OUT_OF_RANGE', argument: 'stopTokens[0]' });
    await expectRejects(() => m.generate(p, { maxNewTokens: 2, seed: 0.5 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'seed' });
    await expectRejects(() => m.generate(p, { maxNewTokens: 2, onProgress: 3 as unknown as () => void }), { code: 'ERR_INVALID_ARGUMENT', argument: 'onProgress' });
    await expectRejects(() => m.generate([[1, 50]], { maxNewTokens: 2 }), { code: 'ERR_OUT_OF_RANGE', argument: 'tokens' });
  });

  test('async errors carry the stack of the caller, from TS checks and from the engine alike', async () => {
    const fromTs = await expectRejects(() => m.forward({ ...batch, steps: 99 }, { logits: true }), { code: 'ERR_OUT_OF_RANGE' });
    expect(fromTs.stack).toMatch(/model-api\.test\.ts/);
    expect(fromTs.stack).toMatch(/^PpoMaxError \[ERR_OUT_OF_RANGE\]/);
    const fromNative = await expectRejects(() => Model.load('/nonexistent/ppo-max-model'), { code: 'ERR_NOT_FOUND' });
    expect(fromNative.stack).toMatch(/model-api\.test\.ts/);
    const queued = await expectRejects(() => m.logprobsBackward(batch, { gradLogprobs: [NaN] }), { code: 'ERR_SHAPE_MISMATCH' });
    expect(queued.stack).toMatch(/model-api\.test\.ts/);
  });
});

describe('queueing and dispose', () => {
  test('concurrent calls on one model run one after another, in call order (no ERR_BUSY)', async () => {
    const m = await Model.create(TINY, { seed: 2 });
    const batch = batchOf(new Rng(2), [8, 5, 8], 8);
    const order: number[] = [];
    const calls: Promise<unknown>[] = [];
    const track = <T>(i: number, p: Promise<T>) => p.then((v) => (order.push(i), v));
    const steps: Promise<{ step: number }>[] = [];
    for (let i = 0; i < 8; i++) {
      calls.push(track(calls.length, m.lmLossBackward(batch)));
      const s = m.step({ lr: 1e-3 });
      steps.push(s);
      calls.push(track(calls.length, s));
      calls.push(track(calls.length, m.logits(batch)));
      calls.push(track(calls.length, m.generate([[1, 2]], { maxNewTokens: 2 })));
    }
    const results = await Promise.all(calls);
    expect(order).toEqual(calls.map((_, i) => i));
    expect((await Promise.all(steps)).map((s) => s.step)).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
    // The logits after step k equal those of a model stepped k times sequentially.
    const ref = await Model.create(TINY, { seed: 2 });
    for (let i = 0; i < 3; i++) {
      await ref.lmLossBackward(batch);
      await ref.step({ lr: 1e-3 });
    }
    expectBitEqual(await ref.logits(batch), results[2 * 4 + 2] as Float32Array, 'logits after 3 steps');
    await Promise.all([m.dispose(), ref.dispose()]);
  });

  test('the addon refuses an overlapping call with ERR_BUSY (the safety net under the queue)', async () => {
    const m = await Model.create(TINY, { seed: 3 });
    const h = handleOf(m) as Parameters<ReturnType<typeof native>['modelZeroGrad']>[0];
    const first = native().modelGradNorm(h);
    expectThrows(() => native().modelZeroGrad(h), { code: 'ERR_BUSY', argument: 'model' });
    expect(await first).toBe(0);
    await native().modelZeroGrad(h); // free again once the first call settled
    expectThrows(() => native().modelZeroGrad({} as typeof h), { code: 'ERR_INVALID_ARGUMENT', argument: 'model' });
    await m.dispose();
    expectThrows(() => native().modelZeroGrad(h), { code: 'ERR_DISPOSED' });
  });

  test('dispose waits for queued calls; later calls reject with ERR_DISPOSED', async () => {
    const m = await Model.create(TINY, { seed: 4 });
    const batch = batchOf(new Rng(4), [4], 4);
    const before = m.logits(batch);
    const disposal = m.dispose();
    expect(m.disposed).toBe(true);
    expect(m.dispose()).toBe(disposal);
    const after = m.logits(batch);
    await expectRejects(() => after, { code: 'ERR_DISPOSED' });
    await expectRejects(() => m.step({ lr: 1 }), { code: 'ERR_DISPOSED' });
    await expectRejects(() => m.generate([[1]], { maxNewTokens: 1 }), { code: 'ERR_DISPOSED' });
    await expectRejects(() => m.save('/tmp/never'), { code: 'ERR_DISPOSED' });
    expect((await before).length).toBe(4 * TINY.vocabSize);
    await disposal;
    expect(m.memory()).toEqual({ params: 0, grads: 0, optimizer: 0, activations: 0, kvCache: 0 });
    await expectRejects(() => m.zeroGrad(), { code: 'ERR_DISPOSED', message: /disposed/ });
    // Still readable: what never needed the native model.
    expect(m.parameterCount()).toBeGreaterThan(0);
    expect(m.config.nEmbd).toBe(16);
  });

  test('a failed call does not block the queue', async () => {
    const m = await Model.create(TINY, { seed: 5 });
    const batch = batchOf(new Rng(5), [4], 4);
    // A failure in the engine (the save's directory cannot be made under a file) and one in
    // the TS checks, between calls that succeed.
    const results = await Promise.allSettled([m.logits(batch), m.save('/dev/null/ppo-max'), m.step({ lr: -1 }), m.logits(batch)]);
    expect(results.map((r) => r.status)).toEqual(['fulfilled', 'rejected', 'rejected', 'fulfilled']);
    // (ERR_IO or ERR_INVALID_ARGUMENT, '/dev/null' being a file: not a queue error.)
    expect(['ERR_IO', 'ERR_INVALID_ARGUMENT']).toContain((results[1] as PromiseRejectedResult).reason.code);
    await m.dispose();
  });

  test('inputs are copied when the method is called: the caller may reuse its arrays at once', async () => {
    const m = await Model.create(TINY, { seed: 6 });
    const batch = batchOf(new Rng(6), [8, 8], 8);
    const tokens = batch.tokens as Int32Array;
    const want = await m.logits(batch);
    const pending = m.logits(batch);
    tokens.fill(49); // changed before the queued call runs
    tokens[0] = 1e6 as number;
    expectBitEqual(await pending, want, 'logits');
    await m.dispose();
  });
});

describe('the event loop stays free', () => {
  test('a setInterval ticks while a large forward runs; the handle may be dropped meanwhile', async () => {
    const config: GPT2Config = { vocabSize: 2048, nPositions: 256, nEmbd: 256, nLayer: 4, nHead: 4 };
    let m: Model | null = await Model.create(config, { seed: 7, trainable: false });
    const rng = new Rng(7);
    const [batch, steps] = [8, 256];
    const tokens = Int32Array.from({ length: batch * steps }, () => rng.int(config.vocabSize));
    let ticks = 0;
    let last = Date.now();
    let maxGap = 0;
    const timer = setInterval(() => {
      const now = Date.now();
      maxGap = Math.max(maxGap, now - last);
      last = now;
      ticks++;
    }, 5);
    const started = Date.now();
    const pending = m.forward({ tokens, batch, steps }, { logits: true, entropy: true });
    m = null; // the worker keeps the native model alive
    let out;
    try {
      out = await pending;
    } finally {
      clearInterval(timer);
    }
    const elapsed = Date.now() - started;
    expect(out.logits!.length).toBe(batch * steps * config.vocabSize);
    expect(elapsed).toBeGreaterThan(30);
    expect(ticks).toBeGreaterThanOrEqual(2);
    expect(maxGap).toBeLessThan(Math.max(250, elapsed / 2));
  });
});
