/**
 * The trainers from TypeScript: options and presets (the recipe's table), SFT and the
 * reward model learning what they are shown, a tiny end-to-end PPO run that learns a known
 * property under ppoMax with the KL bounded while vanilla drifts further, save and resume
 * continuing bit for bit, memory refusal, queueing against the models' own calls, and
 * bad input. (The trainers' math against float64 references is in test/cpp/test_ppo.cpp
 * and test/cpp/test_trainer_supervised.cpp.)
 */
import { afterAll, describe, expect, test } from '@jest/globals';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

import { GPT2Config, Model, PpoOptions, PpoTrainer, RewardModelTrainer, SftTrainer, estimatePpoMemory, ppoMax, ppoPtx, resolvePpoOptions, vanilla } from '../lib';
import { expectRejects, expectThrows } from './helpers';

const CFG: GPT2Config = { vocabSize: 12, nPositions: 24, nEmbd: 32, nLayer: 2, nHead: 2 };
const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'ppo-trainers-'));
afterAll(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));

/** The gold reward of the toy task: the share of token 3 in the response. */
const gold = (s: { response: Int32Array }) => s.response.filter((t) => t === 3).length / s.response.length;
const pool = Array.from({ length: 20 }, (_, i) => [1 + (i % 10), 1 + ((i * 7) % 10)]);

async function models(seed = 1) {
  const policy = await Model.create(CFG, { seed });
  const reference = await Model.create(CFG, { seed, trainable: false });
  const critic = await Model.create({ ...CFG, valueHead: true }, { seed: seed + 1 });
  return { policy, reference, critic };
}

function toyOptions(preset: Readonly<PpoOptions>, extra: Partial<PpoOptions> = {}): Partial<PpoOptions> {
  return {
    ...preset,
    maxNewTokens: 8,
    numRollouts: 32,
    miniBatchSize: 16,
    ppoEpochs: 2,
    seed: 5,
    criticPretrainSteps: 10,
    policyOptimizer: { ...preset.policyOptimizer, lr: 3e-3 },
    criticOptimizer: { ...preset.criticOptimizer, lr: 3e-3 },
    ...extra,
  };
}

describe('options and presets', () => {
  test('the presets carry the recipe table of ppo-max.md', () => {
    expect(ppoMax).toMatchObject({
      klCoef: 0.05, klEstimator: 'k1', rewardNorm: true, rewardClip: 0.8, rewardScaling: false, advantageNorm: false,
      advantageClip: null, policyClip: 0.2, valueClip: 0.2, valueLossCoef: 1, entropyCoef: 0, ptxCoef: 0, gamma: 1,
      lam: 0.9, criticPretrain: true, numRollouts: 128, miniBatchSize: 32, ppoEpochs: 1, temperature: 0.8, topP: 0.9,
      repetitionPenalty: 1.1,
    });
    expect(ppoMax.policyOptimizer).toMatchObject({ lr: 5e-7, beta1: 0.9, beta2: 0.95, eps: 1e-6, weightDecay: 0, maxGradNorm: 1, schedule: 'warmupInverseSqrt', warmupFraction: 0.1 });
    expect(ppoMax.criticOptimizer).toMatchObject({ lr: 1.65e-6, eps: 1e-8, maxGradNorm: 1 });
    expect(vanilla).toMatchObject({ klCoef: 0, rewardNorm: false, rewardClip: null, valueClip: null, criticPretrain: false, policyClip: 0.2 });
    expect(vanilla.policyOptimizer.maxGradNorm).toBeNull();
    expect(ppoPtx.ptxCoef).toBe(1);
    expect(Object.isFrozen(ppoMax)).toBe(true);
    // warmup: 10% of totalSteps
    expect(resolvePpoOptions({ policyOptimizer: { ...ppoMax.policyOptimizer, totalSteps: 200 } }).policyOptimizer.warmupSteps).toBe(20);
  });

  test('bad options are named', () => {
    expectThrows(() => resolvePpoOptions({ klCoeff: 0.1 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'options.klCoeff', message: /no option 'klCoeff'/ });
    expectThrows(() => resolvePpoOptions({ klCoef: -1 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'klCoef' });
    expectThrows(() => resolvePpoOptions({ topP: 1.5 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'topP' });
    expectThrows(() => resolvePpoOptions({ miniBatchSize: 0 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'miniBatchSize' });
    expectThrows(() => resolvePpoOptions({ gamma: 1.1 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'gamma' });
    expectThrows(() => resolvePpoOptions({ klEstimator: 'k4' }), { code: 'ERR_INVALID_ARGUMENT', argument: 'klEstimator' });
    expectThrows(() => resolvePpoOptions({ rewardScaling: true }), { code: 'ERR_INVALID_ARGUMENT', argument: 'rewardScaling' });
    expectThrows(() => resolvePpoOptions({ policyOptimizer: { lr: 1e-3, beta1: 1 } }), { code: 'ERR_INVALID_ARGUMENT', argument: 'policyOptimizer.beta1' });
    expectThrows(() => resolvePpoOptions({ policyOptimizer: { lr: 1e-3, momentum: 0.9 } }), { code: 'ERR_INVALID_ARGUMENT', argument: 'policyOptimizer.momentum' });
    expectThrows(() => resolvePpoOptions({ stopTokens: [3, 99] }, 12), { code: 'ERR_OUT_OF_RANGE', argument: 'stopTokens' });
  });
});

describe('SFT and the reward model', () => {
  test('SFT drives the response loss down; padding and packing agree on what is a target', async () => {
    const m = await Model.create(CFG, { seed: 3 });
    const sft = SftTrainer.create(m, { optimizer: { lr: 3e-3 }, microBatch: 2 });
    const examples = [
      { prompt: [1, 2], response: [3, 4, 5] },
      { prompt: [6], response: [7, 8] },
      { prompt: [9, 10, 1], response: [2] },
    ];
    const { mask } = sft.prepare(examples);
    expect(Array.from(mask).reduce((s, x) => s + x, 0)).toBe(6); // response tokens only
    const packed = SftTrainer.create(m, { optimizer: { lr: 1e-3 }, packing: 'pack', packLength: 24 }).prepare(examples);
    expect(packed.batch.batch).toBe(1);
    expect(Array.from(packed.mask).reduce((s, x) => s + x, 0)).toBe(6 + 3); // + one eos per example
    const first = await sft.evaluate(examples);
    for (let i = 0; i < 60; i++) await sft.step(examples);
    const last = await sft.evaluate(examples);
    expect(first.tokens).toBe(6);
    expect(last.loss).toBeLessThan(0.2 * first.loss);
    expect(last.perplexity).toBeCloseTo(Math.exp(last.loss), 6);
    await expectRejects(() => sft.step([{ prompt: [1], response: [] }]), { code: 'ERR_INVALID_ARGUMENT', argument: 'examples[0].response' });
    await m.dispose();
  });

  test('the reward model learns separable preferences (held-out accuracy)', async () => {
    const m = await Model.create({ ...CFG, valueHead: true }, { seed: 4 });
    const rm = RewardModelTrainer.create(m, { optimizer: { lr: 3e-3 }, lmCoef: 0.1 });
    // chosen responses hold more 3s than rejected ones
    const make = (i: number) => ({ prompt: [1 + (i % 9)], chosen: [3, 3, 1 + (i % 5), 3], rejected: [1 + (i % 5), 4, 5, 2 + (i % 7)] });
    const train = Array.from({ length: 16 }, (_, i) => make(i));
    const held = Array.from({ length: 8 }, (_, i) => make(i + 100));
    const before = await rm.evaluate(held);
    let stats = await rm.step(train);
    for (let i = 0; i < 40; i++) stats = await rm.step(train);
    const after = await rm.evaluate(held);
    expect(after.stats.accuracy).toBe(1);
    expect(after.stats.ranking_loss).toBeLessThan(before.stats.ranking_loss);
    expect(after.chosenScores.length).toBe(8);
    expect(stats.lm_loss).toBeGreaterThan(0);
    await m.dispose();
  });
});

describe('PPO end to end on a toy task (reward: the share of token 3)', () => {
  test('ppoMax learns it with the KL bounded; vanilla drifts further from the reference', async () => {
    const run = async (preset: Readonly<PpoOptions>) => {
      const { policy, reference, critic } = await models();
      const trainer = await PpoTrainer.create({ policy, reference, critic, reward: (ss) => ss.map(gold), options: toyOptions(preset), progressBar: false });
      const results = await trainer.train(pool, { steps: 30 });
      await Promise.all([policy.dispose(), reference.dispose(), critic.dispose()]);
      const mean = (k: string, from: number, to: number) => results.slice(from, to).reduce((s, r) => s + r.stats[k], 0) / (to - from);
      return { goldStart: mean('reward_raw_mean', 0, 3), goldEnd: mean('reward_raw_mean', 27, 30), klEnd: mean('kl_mean', 27, 30), results };
    };
    const max = await run(ppoMax);
    const van = await run(vanilla);
    expect(max.goldEnd - max.goldStart).toBeGreaterThan(0.3); // it learns the property
    expect(max.klEnd).toBeLessThan(1.2); // the KL stays bounded
    expect(van.klEnd).toBeGreaterThan(max.klEnd); // vanilla drifts further
    for (const r of max.results) {
      expect(r.stats.skipped).toBe(0);
      for (const [k, v] of Object.entries(r.stats)) if (!Number.isFinite(v)) throw new Error(`stat ${k} = ${v}`);
    }
    // the statistics the issue names
    for (const k of ['reward_raw_mean', 'reward_norm_mean', 'kl_mean', 'kl_sum_mean', 'policy_loss', 'value_loss', 'clip_fraction', 'approx_kl', 'entropy_mean', 'perplexity', 'ref_perplexity', 'response_length_mean', 'value_error', 'explained_variance', 'advantages_mean', 'advantages_std', 'policy_grad_norm', 'critic_grad_norm', 'policy_lr', 'critic_lr', 'seconds_rollout', 'seconds_score', 'seconds_update', 'rollout_tokens_per_second']) {
      expect(typeof max.results[5].stats[k]).toBe('number');
    }
  });

  test('a reward model instead of a function, stages one by one, and the JSONL log', async () => {
    const { policy, reference, critic } = await models(7);
    const rewardModel = await Model.create({ ...CFG, valueHead: true }, { seed: 9, trainable: false });
    const logFile = path.join(tmpRoot, 'log.jsonl');
    const seen: number[] = [];
    const trainer = await PpoTrainer.create({ policy, reference, critic, rewardModel, options: toyOptions(ppoMax), logFile, onStats: (_s, step) => seen.push(step), progressBar: false });
    const e = await trainer.rollout([[1, 2], [3]]);
    expect(e.batch).toBe(2);
    for (let b = 0; b < 2; b++) {
      expect(e.lengths[b]).toBe(e.promptLengths[b] + e.responseLengths[b]);
      expect(e.truncated[b] === 1).toBe(e.responseLengths[b] === 8);
    }
    const scores = await trainer.score(e);
    const shaped = await trainer.shape(e, scores);
    expect(shaped.experience.advantages?.length).toBe(e.batch * e.steps);
    const u = await trainer.update(shaped.experience);
    expect(u.skipped).toBe(0);
    const stepped = await trainer.step([[1, 2], [3], [4]]);
    expect(stepped.stats.reward_raw_mean).toBeCloseTo(Array.from(stepped.experience.scores as Float32Array).reduce((s, x) => s + x, 0) / 3, 5);
    expect(seen).toEqual([1]);
    // options change between steps, validated
    await trainer.setOptions({ klCoef: 0.2, policyOptimizer: { lr: 1e-4 } });
    expect(trainer.options.klCoef).toBe(0.2);
    expect(trainer.state().klCoef).toBe(0.2);
    expect((await trainer.step([[1, 2]])).stats.policy_lr).toBeCloseTo(1e-4, 12);
    await expectRejects(() => trainer.setOptions({ gamma: 2 }), { code: 'ERR_INVALID_ARGUMENT', argument: 'gamma' });
    expect(trainer.options.klCoef).toBe(0.2);
    const lines = fs.readFileSync(logFile, 'utf8').trim().split('\n').map((l) => JSON.parse(l));
    expect(lines).toHaveLength(2);
    expect(lines[0]).toMatchObject({ kind: 'ppo', step: 1 });
    // a non-finite experience is skipped, the models untouched
    const before = await policy.logprobs([[1, 2, 3, 4]]);
    const bad = { ...shaped.experience, advantages: (shaped.experience.advantages as Float32Array).map((x, i) => (i === 3 ? NaN : x)) };
    const skipped = await trainer.update(bad);
    expect(skipped.skipped).toBe(1);
    expect(Array.from((await policy.logprobs([[1, 2, 3, 4]])).logprobs)).toEqual(Array.from(before.logprobs));
    // defaults: the reference a frozen clone of the policy, the critic a trainable clone of the reward model
    const defaults = await PpoTrainer.create({ policy, rewardModel, options: toyOptions(ppoMax), progressBar: false });
    expect(defaults.reference.trainable).toBe(false);
    expect(defaults.critic.trainable).toBe(true);
    const probe = [[1, 2, 3, 4]];
    expect(Array.from((await defaults.reference.logprobs(probe)).logprobs)).toEqual(Array.from((await policy.logprobs(probe)).logprobs));
    expect(Array.from(await defaults.critic.values(probe))).toEqual(Array.from(await rewardModel.values(probe)));
    await expectRejects(() => PpoTrainer.create({ policy, reward: () => [0] }), { code: 'ERR_INVALID_ARGUMENT', argument: 'critic' });
    await Promise.all([policy, reference, critic, rewardModel, defaults.reference, defaults.critic].map((m) => m.dispose()));
  });

  test('save and resume continue exactly as the uninterrupted run', async () => {
    const opts = toyOptions(ppoMax, { numRollouts: 8, miniBatchSize: 4 });
    const a = await models(11);
    const t1 = await PpoTrainer.create({ ...a, reward: (ss) => ss.map(gold), options: opts, progressBar: false });
    await t1.train(pool, { steps: 2 });
    const dir = path.join(tmpRoot, 'ckpt');
    await t1.save(dir);
    const atSave = t1.state();
    const prompts = [[1, 2], [3], [4, 5], [6]];
    const cont1 = [await t1.step(prompts), await t1.step(prompts)];
    const t2 = await PpoTrainer.resume(dir, { reward: (ss) => ss.map(gold), progressBar: false });
    expect(t2.state()).toEqual(atSave);
    const cont2 = [await t2.step(prompts), await t2.step(prompts)];
    const strip = (s: Record<string, number>) => Object.fromEntries(Object.entries(s).filter(([k]) => !k.startsWith('seconds') && !k.endsWith('per_second')));
    for (let i = 0; i < 2; i++) {
      expect(strip(cont2[i].stats)).toEqual(strip(cont1[i].stats));
      expect(Array.from(cont2[i].experience.tokens)).toEqual(Array.from(cont1[i].experience.tokens));
    }
    const probe = [[1, 2, 3, 4, 5, 6]];
    expect(Array.from((await t2.policy.logprobs(probe)).logprobs)).toEqual(Array.from((await a.policy.logprobs(probe)).logprobs));
    expect(Array.from(await t2.critic.values(probe))).toEqual(Array.from(await a.critic.values(probe)));
    // saving again over the checkpoint replaces it whole
    await t2.save(dir);
    expect(fs.readdirSync(tmpRoot).filter((n) => n.startsWith('ckpt'))).toEqual(['ckpt']);
    await expectRejects(() => PpoTrainer.resume(path.join(tmpRoot, 'nothing')), { code: 'ERR_NOT_FOUND' });
    await Promise.all([a.policy, a.reference, a.critic, t2.policy, t2.reference, t2.critic].map((m) => m.dispose()));
  });
});

describe('bad input and resources', () => {
  test('clear errors, never a corrupted run', async () => {
    const { policy, reference, critic } = await models(21);
    const small = await Model.create({ ...CFG, vocabSize: 10 }, { seed: 1, trainable: false });
    await expectRejects(() => PpoTrainer.create({ policy, reference: small, critic, reward: () => [0] }), { code: 'ERR_SHAPE_MISMATCH', argument: 'reference' });
    await expectRejects(() => PpoTrainer.create({ policy, reference, critic }), { code: 'ERR_INVALID_ARGUMENT', argument: 'reward' });
    await expectRejects(() => PpoTrainer.create({ policy, reference, critic: policy, reward: () => [0] }), { code: 'ERR_INVALID_ARGUMENT', argument: 'critic' });
    await expectRejects(
      () => PpoTrainer.create({ policy, reference, critic, reward: () => [0], options: toyOptions(ppoMax), memoryLimit: 1000 }),
      { code: 'ERR_OUT_OF_MEMORY', message: /needs about .* GiB/ },
    );
    // the estimate bounds what a step really holds
    const probeTrainer = await PpoTrainer.create({ policy, reference, critic, reward: (ss) => ss.map(gold), options: toyOptions(ppoMax), progressBar: false });
    await probeTrainer.step(pool.slice(0, 32));
    const held = [policy, reference, critic].reduce((s, m) => {
      const x = m.memory();
      return s + x.params + x.grads + x.optimizer + x.activations + x.kvCache;
    }, 0);
    const estimate = estimatePpoMemory({ policy: CFG, critic: { ...CFG, valueHead: true }, options: toyOptions(ppoMax), maxPromptLength: 2 });
    expect(estimate.total - estimate.snapshots).toBeGreaterThanOrEqual(held);
    expect(estimate.total).toBeLessThan(3 * held);
    let nan = false;
    const trainer = await PpoTrainer.create({
      policy, reference, critic, options: toyOptions(ppoMax), progressBar: false,
      reward: (ss) => ss.map((s, i) => (nan && i === 1 ? NaN : gold(s))),
    });
    await expectRejects(() => trainer.step([]), { code: 'ERR_INVALID_ARGUMENT', argument: 'prompts' });
    await expectRejects(() => trainer.step([Array.from({ length: 20 }, () => 1)]), { code: 'ERR_INVALID_ARGUMENT', argument: 'prompts', message: /context/ });
    await expectRejects(() => trainer.step([[1, 99]]), { code: 'ERR_OUT_OF_RANGE' });
    const state = trainer.state();
    nan = true;
    await expectRejects(() => trainer.step([[1], [2]]), { code: 'ERR_NON_FINITE', argument: 'reward', message: /sample 1/ });
    const wrongCount = await PpoTrainer.create({ policy, reference, critic, reward: () => [1], options: toyOptions(ppoMax), progressBar: false });
    await expectRejects(() => wrongCount.step([[1], [2]]), { code: 'ERR_SHAPE_MISMATCH', argument: 'reward' });
    // the failed steps updated nothing: only the rollouts' counter moved
    expect({ ...trainer.state(), rollouts: 0 }).toEqual({ ...state, rollouts: 0 });
    // a trainer's step and a model's own call, issued together, are queued
    nan = false;
    const [stepped, gen] = await Promise.all([trainer.step([[1], [2]]), policy.generate([[1, 2]], { maxNewTokens: 3, seed: 1 })]);
    expect(stepped.stats.skipped).toBe(0);
    expect(gen.lengths[0]).toBeGreaterThan(0);
    await Promise.all([policy, reference, critic, small].map((m) => m.dispose()));
    await expectRejects(() => trainer.step([[1]]), { code: 'ERR_DISPOSED' });
  });
});
