/**
 * The Llama family from TypeScript: a Hugging Face Llama checkpoint (sharded, BF16 and F16
 * tensors, grouped-query attention, rope scaling, untied head) loads and reproduces the
 * float64 reference of test/fixtures/make_llama_fixture.py; a Llama config made in
 * TypeScript saves and loads as the same model; and the trainers run on it unchanged
 * (SFT learns, the reward model gets a value head on the Llama backbone, a PPO-max step
 * runs with a Llama policy, reference and critic). The engine's math is checked in C++
 * (test/cpp/test_llama_known_answer.cpp, test_llama_layers.cpp, test_attention.cpp).
 */
import { afterAll, describe, expect, test } from '@jest/globals';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

import { LlamaConfig, Model, PpoTrainer, RewardModelTrainer, SftTrainer, ppoMax } from '../lib';
import { expectClose, expectRejects } from './helpers';

const FIXTURE = path.join(__dirname, 'fixtures', 'llama-tiny');
const expected = JSON.parse(fs.readFileSync(path.join(FIXTURE, 'expected.json'), 'utf8'));
const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'ppo-llama-'));
afterAll(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));

const TINY: LlamaConfig = {
  modelType: 'llama', vocabSize: 16, nPositions: 32, nEmbd: 32, nLayer: 2, nHead: 4, nKvHead: 2, intermediateSize: 48,
};

describe('Llama checkpoints', () => {
  test('the fixture loads (shards, BF16, F16) and matches the float64 reference', async () => {
    const m = await Model.load(FIXTURE, { device: 'cpu' });
    expect(m.config).toMatchObject({ modelType: 'llama', nKvHead: 2, intermediateSize: 48, ropeScaling: 2, tieWordEmbeddings: false, vocabSize: 61 });
    const batch = { batch: expected.batch, steps: expected.steps, tokens: expected.tokens, lengths: expected.lengths };
    const out = await m.forward(batch, { logits: true, logprobs: true, lmLoss: true });
    // float32 engine vs float64 reference on the stored weights (see the C++ test's bounds).
    expectClose(out.logits as Float32Array, Float32Array.from(expected.logits), { abs: 5e-6, rel: 5e-6 }, 'logits');
    expectClose(out.logprobs as Float32Array, Float32Array.from(expected.logprobs), { abs: 5e-6, rel: 5e-6 }, 'logprobs');
    expect(out.lmLoss).toBeCloseTo(expected.lm_loss, 5);
    await m.dispose();
  });

  test('a Llama config made in TypeScript saves as a Hugging Face checkpoint and loads back', async () => {
    const m = await Model.create({ ...TINY, ropeTheta: 5e5, tieWordEmbeddings: true }, { seed: 4, device: 'cpu' });
    const dir = path.join(tmpRoot, 'saved');
    await m.save(dir);
    const config = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8'));
    expect(config).toMatchObject({ model_type: 'llama', architectures: ['LlamaForCausalLM'], hidden_size: 32, num_key_value_heads: 2, rope_theta: 5e5, tie_word_embeddings: true, hidden_act: 'silu' });
    const back = await Model.load(dir, { device: 'cpu' });
    const batch = { batch: 2, steps: 6, tokens: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], lengths: [6, 4] };
    const [a, b] = [await m.logits(batch), await back.logits(batch)];
    expect(Buffer.from(b.buffer).equals(Buffer.from(a.buffer))).toBe(true);
    await Promise.all([m.dispose(), back.dispose()]);
  });

  test('bad Llama configs are refused with the field named', async () => {
    await expectRejects(() => Model.create({ ...TINY, nKvHead: 3 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'config.nKvHead' });
    await expectRejects(() => Model.create({ ...TINY, nHead: 8, nEmbd: 24 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'config.nHead' });
    await expectRejects(() => Model.create({ ...TINY, modelType: 'mistral' as 'llama' }), { code: 'ERR_INVALID_ARGUMENT', argument: 'config.modelType' });
  });
});

describe('the trainers on a Llama backbone', () => {
  test('SFT learns, the reward model gets a value head, and PPO-max steps', async () => {
    const m = await Model.create(TINY, { seed: 3, device: 'cpu' });
    const examples = [
      { prompt: [1, 2], response: [3, 4, 5] },
      { prompt: [6], response: [7, 8] },
      { prompt: [9, 10, 1], response: [2] },
    ];
    const sft = SftTrainer.create(m, { optimizer: { lr: 3e-3 } });
    const first = await sft.evaluate(examples);
    for (let i = 0; i < 40; i++) await sft.step(examples);
    expect((await sft.evaluate(examples)).loss).toBeLessThan(0.3 * first.loss);

    const rmModel = await m.clone({ valueHead: true });
    expect(rmModel.config.valueHead).toBe(true);
    const rm = RewardModelTrainer.create(rmModel, { optimizer: { lr: 3e-3 } });
    const pairs = [
      { prompt: [1], chosen: [3, 3], rejected: [4, 4] },
      { prompt: [2], chosen: [3, 5], rejected: [5, 4] },
    ];
    const before = await rm.evaluate(pairs);
    for (let i = 0; i < 30; i++) await rm.step(pairs);
    const after = await rm.evaluate(pairs);
    expect(after.stats.accuracy).toBe(1);
    expect(after.stats.ranking_loss).toBeLessThan(before.stats.ranking_loss);

    const reference = await m.clone({ trainable: false });
    const critic = await rmModel.clone();
    const trainer = await PpoTrainer.create({
      policy: m, reference, critic, rewardModel: await rmModel.clone({ trainable: false }),
      options: { ...ppoMax, maxNewTokens: 4, numRollouts: 8, miniBatchSize: 4, criticPretrainSteps: 2, seed: 1 },
      progressBar: false,
    });
    const step = await trainer.step([[1, 2], [3], [4, 5, 6], [7]]);
    expect(Number.isFinite(step.stats.policy_loss)).toBe(true);
    expect(step.stats.skipped).toBe(0);
  });
});
