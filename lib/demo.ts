/**
 * The kernels demonstration run by `npx ppo-max demo --kernels`: the numerical core of
 * one PPO-max step on a realistic synthetic batch, every stage through the native
 * kernels, with timings. The policy, reference, critic and reward
 * model are stand-ins (random logits, values and scores from a seeded generator);
 * the math applied to them is the real thing.
 */
import { Device, backendInfo, resolveDevice } from './device';
import {
  gae,
  klPenalizedRewards,
  logprobsBackward,
  logprobsFromLogits,
  policyLoss,
  valueLoss,
  whiten,
} from './ops';
import { mulberry32 } from './random';
import { RunningMoments } from './running-moments';

export interface DemoOptions {
  batch?: number;
  steps?: number;
  vocab?: number;
  device?: Device;
  seed?: number;
  log?: (line: string) => void;
}

/** Small, fast, seeded PRNG (mulberry32) and a Gaussian from it. */
function rng(seed: number): { uniform: () => number; normal: () => number } {
  const uniform = mulberry32(seed);
  const normal = () => Math.sqrt(-2 * Math.log(1 - uniform())) * Math.cos(2 * Math.PI * uniform());
  return { uniform, normal };
}

function maskedMean(x: Float32Array, mask: Float32Array): number {
  let s = 0;
  let n = 0;
  for (let i = 0; i < x.length; i++) {
    if (mask[i]) {
      s += x[i];
      n++;
    }
  }
  return n ? s / n : 0;
}

export async function runDemo(options: DemoOptions = {}): Promise<Record<string, number>> {
  const log = options.log ?? ((line: string) => console.log(line));
  const batch = options.batch ?? 32;
  const steps = options.steps ?? 256;
  const vocab = options.vocab ?? 8192;
  const device = resolveDevice(options.device);
  const r = rng(options.seed ?? 1234);
  const info = backendInfo();
  log(`ppo-max kernels demo: one PPO-max step's math on ${batch} responses x ${steps} tokens, vocab ${vocab}`);
  log(`device: ${device} (${info.cpuThreads} CPU threads; CUDA ${info.cudaAvailable ? 'available' : `not available: ${info.cudaUnavailableReason}`})`);
  log('models are synthetic stand-ins (seeded); every number below comes from the native kernels\n');

  const timings: [string, number][] = [];
  const timed = async <T>(name: string, f: () => Promise<T>): Promise<T> => {
    const t0 = process.hrtime.bigint();
    const out = await f();
    timings.push([name, Number(process.hrtime.bigint() - t0) / 1e6]);
    return out;
  };

  // Responses of different lengths, right-padded: lengths in [steps/8, steps].
  const lengths = Array.from({ length: batch }, () => Math.max(1, Math.floor(steps / 8 + r.uniform() * (steps - steps / 8))));
  const rows = batch * steps;
  const mask = new Float32Array(rows);
  lengths.forEach((n, b) => mask.fill(1, b * steps, b * steps + n));

  // Policy logits; the reference differs by small noise; tokens sampled from the policy.
  const policyLogits = new Float32Array(rows * vocab);
  const refLogits = new Float32Array(rows * vocab);
  for (let i = 0; i < policyLogits.length; i++) {
    policyLogits[i] = 2 * r.normal();
    refLogits[i] = policyLogits[i] + 0.3 * r.normal();
  }
  const tokens = new Int32Array(rows);
  for (let row = 0; row < rows; row++) {
    const base = row * vocab;
    let max = -Infinity;
    for (let v = 0; v < vocab; v++) max = Math.max(max, policyLogits[base + v]);
    let total = 0;
    for (let v = 0; v < vocab; v++) total += Math.exp(policyLogits[base + v] - max);
    let u = r.uniform() * total;
    let pick = vocab - 1;
    for (let v = 0; v < vocab; v++) {
      u -= Math.exp(policyLogits[base + v] - max);
      if (u <= 0) {
        pick = v;
        break;
      }
    }
    tokens[row] = pick;
  }

  const seq = { batch, steps, vocab, tokens, mask };
  const policy = await timed('logprobs + entropy (policy)', () =>
    logprobsFromLogits({ ...seq, logits: policyLogits }, { entropy: true, device }),
  );
  const reference = await timed('logprobs (reference)', () => logprobsFromLogits({ ...seq, logits: refLogits }, { device }));

  // Reward-model scores, reparameterized on running moments (norm + clip 0.8).
  const scores = Float32Array.from({ length: batch }, () => 1.5 + 2 * r.normal());
  const moments = new RunningMoments();
  const normalized = await timed('running moments + normalize', () => moments.updateAndNormalize(scores, { clip: 0.8, device }));

  const shaped = await timed('KL-penalized rewards (k1, 0.05)', () =>
    klPenalizedRewards({ batch, steps, mask, logprobs: policy.logprobs, refLogprobs: reference.logprobs, scores: normalized }, { klCoef: 0.05, device }),
  );

  const values = Float32Array.from({ length: rows }, (_, i) => (mask[i] ? 0.2 * r.normal() : 0));
  const adv = await timed('GAE (gamma 1, lambda 0.95)', () => gae({ batch, steps, mask, rewards: shaped.rewards, values }, { gamma: 1, lambda: 0.95, device }));
  const whitened = await timed('whiten advantages', () => whiten({ batch, steps, mask, values: adv.advantages }, { device }));

  // One update's losses: the new policy moved a little from the rollout policy.
  const newLogprobs = policy.logprobs.map((x, i) => (mask[i] ? x + 0.05 * r.normal() : 0));
  const pg = await timed('clipped policy loss', () =>
    policyLoss({ batch, steps, mask, logprobs: newLogprobs, oldLogprobs: policy.logprobs, advantages: whitened }, { clip: 0.2, device }),
  );
  const newValues = values.map((x, i) => (mask[i] ? x + 0.3 * r.normal() : 0));
  const vf = await timed('clipped value loss', () =>
    valueLoss({ batch, steps, mask, values: newValues, oldValues: values, returns: adv.returns }, { clip: 0.2, device }),
  );
  const grad = await timed('logprobs backward (to logits)', () =>
    logprobsBackward({ ...seq, logits: policyLogits }, { gradLogprobs: pg.gradLogprobs }, { device }),
  );
  let gradNorm = 0;
  for (let i = 0; i < grad.gradLogits.length; i++) gradNorm += grad.gradLogits[i] * grad.gradLogits[i];
  gradNorm = Math.sqrt(gradNorm);

  let klPerSeq = 0;
  for (let b = 0; b < batch; b++) for (let t = 0; t < steps; t++) klPerSeq += shaped.kl[b * steps + t];
  klPerSeq /= batch;

  const stats: Record<string, number> = {
    'response length (mean)': lengths.reduce((a, b) => a + b, 0) / batch,
    'score raw (mean)': Array.from(scores).reduce((a, b) => a + b, 0) / batch,
    'score normalized (mean)': Array.from(normalized).reduce((a, b) => a + b, 0) / batch,
    'KL to reference (k1, per token)': maskedMean(shaped.kl, mask),
    'KL to reference (k1, per sequence)': klPerSeq,
    'entropy (per token)': maskedMean(policy.entropy as Float32Array, mask),
    'advantage (mean, raw)': maskedMean(adv.advantages, mask),
    'return (mean)': maskedMean(adv.returns, mask),
    'policy loss': pg.loss,
    'clip fraction (ratio)': pg.clipFraction,
    'approx KL to rollout policy': pg.approxKl,
    'value loss': vf.loss,
    'clip fraction (values)': vf.clipFraction,
    '|d policy loss / d logits|': gradNorm,
  };
  log('statistics of the step:');
  for (const [k, v] of Object.entries(stats)) log(`  ${k.padEnd(36)} ${v.toFixed(5)}`);
  log('\nseconds per stage (native kernels, async):');
  for (const [k, ms] of timings) log(`  ${k.padEnd(36)} ${(ms / 1000).toFixed(4)}`);
  return stats;
}
