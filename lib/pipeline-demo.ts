/**
 * `npx ppo-max demo`: a whole RLHF pipeline, small enough for a laptop's CPU, on a toy
 * language. Every stage is the real trainer; only the data is synthetic and the human is
 * simulated (and said to be):
 *   1. a corpus of sentences from a seeded Markov chain over 23 "words" (token 0 ends a sentence);
 *   2. SFT of a small GPT on it (prompt: a sentence's first words; response: the rest);
 *   3. pairs of sampled continuations labeled by a transparent rule, the "gold" reward:
 *      words 3, 7 and 11 are "positive", 5 and 13 "negative", the score their balance per word;
 *   4. a reward model trained on the pairs (held-out accuracy reported): the proxy reward;
 *   5. the critic initialized from the reward model and pre-trained (ppoMax);
 *   6. PPO under `ppoMax` and under `vanilla`, from the same start, with the proxy reward;
 *      proxy and gold reward, KL to the reference, perplexity and response length compared.
 */
import { Model } from './model';
import { ppoMax, vanilla, PpoOptions } from './ppo-options';
import { mulberry32 } from './random';
import { Experience, PpoTrainer, RewardModelTrainer, SftTrainer } from './trainers';

export interface PipelineDemoOptions {
  /** PPO steps per preset (default 40). */
  ppoSteps?: number;
  seed?: number;
  log?: (line: string) => void;
}

const VOCAB = 24;
const EOS = 0;
const POSITIVE = new Set([3, 7, 11]);
const NEGATIVE = new Set([5, 13]);

/** The simulated labeler's score of a response: (positive − negative words) per word. */
export function goldReward(response: ArrayLike<number>): number {
  let s = 0, n = 0;
  for (let i = 0; i < response.length; i++) {
    const t = response[i];
    if (t === EOS) break;
    n++;
    if (POSITIVE.has(t)) s++;
    if (NEGATIVE.has(t)) s--;
  }
  return n === 0 ? 0 : s / n;
}

/** A sentence of the toy language: each word picks its successor from 3 favourites. */
function sentence(rand: () => number): number[] {
  const len = 6 + Math.floor(rand() * 8);
  const out = [1 + Math.floor(rand() * 23)];
  while (out.length < len) {
    const prev = out[out.length - 1];
    const k = [1, 5, 11][Math.floor(rand() * 3)];
    out.push(((prev * 7 + k) % 23) + 1);
  }
  return out;
}

function responses(e: Experience): Int32Array[] {
  const out: Int32Array[] = [];
  for (let b = 0; b < e.batch; b++) out.push(e.tokens.slice(b * e.steps + e.promptLengths[b], b * e.steps + e.lengths[b]));
  return out;
}

const mean = (xs: number[]) => xs.reduce((s, x) => s + x, 0) / Math.max(1, xs.length);

export async function runPipelineDemo(o: PipelineDemoOptions = {}): Promise<Record<string, Record<string, number>>> {
  const log = o.log ?? ((line: string) => console.log(line));
  const seed = o.seed ?? 1;
  const ppoSteps = o.ppoSteps ?? 40;
  const rand = mulberry32(seed >>> 0 || 1);
  const t0 = Date.now();
  const config = { vocabSize: VOCAB, nPositions: 32, nEmbd: 64, nLayer: 2, nHead: 4, bosTokenId: EOS, eosTokenId: EOS };

  // 1-2. corpus and SFT
  const corpus = Array.from({ length: 512 }, () => sentence(rand));
  const examples = corpus.map((s) => ({ prompt: s.slice(0, 3), response: [...s.slice(3), EOS] }));
  const sftModel = await Model.create(config, { seed });
  const sft = SftTrainer.create(sftModel, { optimizer: { lr: 2e-3, schedule: 'warmupLinearDecay', warmupSteps: 20, totalSteps: 300 } });
  const held = examples.slice(448);
  const before = await sft.evaluate(held);
  for (let i = 0; i < 300; i++) {
    const start = (i * 32) % 448;
    await sft.step(examples.slice(start, start + 32));
  }
  const after = await sft.evaluate(held);
  log(`SFT: held-out response perplexity ${before.perplexity.toFixed(2)} -> ${after.perplexity.toFixed(2)} (300 steps)`);

  // 3. simulated preferences: two samples per prompt, the labeler's rule picks
  const prompts = corpus.map((s) => s.slice(0, 3));
  const pairs: { prompt: number[]; chosen: number[]; rejected: number[] }[] = [];
  for (let i = 0; i < 6; i++) {
    const batch = prompts.slice(i * 64, i * 64 + 64);
    const a = await sftModel.generate(batch, { maxNewTokens: 12, temperature: 1, seed: seed * 100 + 2 * i, stopTokens: [EOS] });
    const b = await sftModel.generate(batch, { maxNewTokens: 12, temperature: 1, seed: seed * 100 + 2 * i + 1, stopTokens: [EOS] });
    for (let r = 0; r < batch.length; r++) {
      const ra = Array.from(a.tokens[r]);
      const rb = Array.from(b.tokens[r]);
      const ga = goldReward(ra), gb = goldReward(rb);
      if (ga === gb) continue;
      pairs.push(ga > gb ? { prompt: batch[r], chosen: ra, rejected: rb } : { prompt: batch[r], chosen: rb, rejected: ra });
    }
  }
  const split = Math.floor(pairs.length * 0.85);
  log(`labels: ${pairs.length} preference pairs from the simulated labeler (${split} train, ${pairs.length - split} held out)`);

  // 4. the reward model
  const rm = await Model.create({ ...config, valueHead: true }, { seed: seed + 1 });
  const rmTrainer = RewardModelTrainer.create(rm, { optimizer: { lr: 1e-3 }, lmCoef: 1 });
  for (let epoch = 0; epoch < 6; epoch++) {
    for (let i = 0; i < split; i += 32) await rmTrainer.step(pairs.slice(i, Math.min(split, i + 32)));
  }
  const rmEval = await rmTrainer.evaluate(pairs.slice(split));
  log(`reward model: held-out pairwise accuracy ${(100 * rmEval.stats.accuracy).toFixed(1)}%`);
  const rewardModel = await rm.clone({ trainable: false });

  // 5-6. PPO from the same start under both presets
  const promptPool = prompts.slice(0, 448);
  const evalPrompts = prompts.slice(448, 480);
  const results: Record<string, Record<string, number>> = {
    pipeline: { sftPerplexityBefore: before.perplexity, sftPerplexityAfter: after.perplexity, pairs: pairs.length, rmAccuracy: rmEval.stats.accuracy },
  };
  for (const [name, preset] of [['ppoMax', ppoMax], ['vanilla', vanilla]] as [string, Readonly<PpoOptions>][]) {
    const policy = await sftModel.clone({ trainable: true });
    const trainer = await PpoTrainer.create({
      policy,
      rewardModel,
      options: {
        ...preset,
        maxNewTokens: 12,
        numRollouts: 32,
        miniBatchSize: 16,
        ppoEpochs: 2,
        seed,
        criticPretrainSteps: 8,
        policyOptimizer: { ...preset.policyOptimizer, lr: 5e-4 },
        criticOptimizer: { ...preset.criticOptimizer, lr: 1e-3 },
      },
      progressBar: false,
    });
    if (preset.criticPretrain) {
      const pre = await trainer.pretrainCritic(() => promptPool.slice(0, 32));
      log(`${name}: critic pre-training value loss ${pre.valueLossFirst.toFixed(4)} -> ${pre.valueLoss.toFixed(4)} in ${pre.passes} passes`);
    }
    const snapshot = async () => {
      const e = await trainer.rollout(evalPrompts);
      const scores = await trainer.score(e);
      const shaped = await trainer.shape(e, scores, { updateMoments: false });
      return { proxy: mean(Array.from(scores)), gold: mean(responses(e).map(goldReward)), kl: shaped.stats.kl_mean, perplexity: shaped.stats.perplexity, length: shaped.stats.response_length_mean };
    };
    const start = await snapshot();
    const rows = await trainer.train(promptPool, { steps: ppoSteps });
    const end = await snapshot();
    const alarms = rows.reduce((s, r) => s + r.alarms.length, 0);
    results[name] = {
      proxyStart: start.proxy, proxyEnd: end.proxy, goldStart: start.gold, goldEnd: end.gold,
      klEnd: end.kl, perplexityStart: start.perplexity, perplexityEnd: end.perplexity, lengthStart: start.length, lengthEnd: end.length, alarms,
    };
    log(
      `${name}: proxy ${start.proxy.toFixed(3)} -> ${end.proxy.toFixed(3)}, gold ${start.gold.toFixed(3)} -> ${end.gold.toFixed(3)}, ` +
        `KL/token ${end.kl.toFixed(3)}, perplexity ${start.perplexity.toFixed(2)} -> ${end.perplexity.toFixed(2)}, ` +
        `length ${start.length.toFixed(1)} -> ${end.length.toFixed(1)}, alarms ${alarms}`,
    );
    await Promise.all([policy.dispose(), trainer.reference.dispose(), trainer.critic.dispose()]);
  }
  await Promise.all([sftModel.dispose(), rm.dispose(), rewardModel.dispose()]);
  log(`done in ${((Date.now() - t0) / 1000).toFixed(1)} s (gold: the simulated labeler; proxy: the learned reward model)`);
  return results;
}
