/**
 * Benchmark of the RLHF kernels on a realistic batch against a straightforward
 * TypeScript implementation of the same math (the yardstick, measured in the same
 * run). Reports the median of several runs and the ratio. Run: `npm run bench`
 * (options: --runs N, --device cpu|cuda, --batch N, --steps N, --vocab N, --lp-batch N).
 */
import * as ppo from '../lib';

function arg(name: string, fallback: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : fallback;
}
const runs = arg('runs', 5);
const B = arg('batch', 64);
const T = arg('steps', 512);
const V = arg('vocab', 32000);
const LP_B = arg('lp-batch', 16); // logprobs batch: 16 x 512 x 32000 floats = 1 GiB of logits
const deviceIndex = process.argv.indexOf('--device');
const device = (deviceIndex > 0 ? process.argv[deviceIndex + 1] : 'cpu') as ppo.Device;

// ---- the yardstick: the same math, written plainly in TypeScript --------------------------
const ts = {
  logprobs(logits: Float32Array, tokens: Int32Array, rows: number, vocab: number, entropy: Float32Array): Float32Array {
    const out = new Float32Array(rows);
    for (let r = 0; r < rows; r++) {
      const base = r * vocab;
      let max = -Infinity;
      for (let v = 0; v < vocab; v++) if (logits[base + v] > max) max = logits[base + v];
      let sum = 0;
      let weighted = 0;
      for (let v = 0; v < vocab; v++) {
        const t = logits[base + v] - max;
        const e = Math.exp(t);
        sum += e;
        weighted += e * t;
      }
      const logSum = Math.log(sum);
      out[r] = logits[base + tokens[r]] - max - logSum;
      entropy[r] = logSum - weighted / sum;
    }
    return out;
  },
  klRewards(lp: Float32Array, ref: Float32Array, scores: Float32Array, mask: Float32Array, coef: number) {
    const rewards = new Float32Array(lp.length);
    for (let b = 0; b < B; b++) {
      let last = -1;
      for (let t = 0; t < T; t++) {
        const i = b * T + t;
        if (mask[i]) {
          rewards[i] = -coef * (lp[i] - ref[i]);
          last = i;
        }
      }
      if (last >= 0) rewards[last] += scores[b];
    }
    return rewards;
  },
  gae(rewards: Float32Array, values: Float32Array, mask: Float32Array, gamma: number, lambda: number) {
    const adv = new Float32Array(rewards.length);
    const ret = new Float32Array(rewards.length);
    for (let b = 0; b < B; b++) {
      let nextValue = 0;
      let nextAdv = 0;
      for (let t = T - 1; t >= 0; t--) {
        const i = b * T + t;
        if (!mask[i]) continue;
        const delta = rewards[i] + gamma * nextValue - values[i];
        nextAdv = delta + gamma * lambda * nextAdv;
        nextValue = values[i];
        adv[i] = nextAdv;
        ret[i] = nextAdv + values[i];
      }
    }
    return { adv, ret };
  },
  whiten(x: Float32Array, mask: Float32Array) {
    let sum = 0;
    let n = 0;
    for (let i = 0; i < x.length; i++) if (mask[i]) (sum += x[i]), n++;
    const mean = sum / n;
    let sq = 0;
    for (let i = 0; i < x.length; i++) if (mask[i]) sq += (x[i] - mean) ** 2;
    const inv = 1 / Math.sqrt(sq / (n - 1) + 1e-8);
    const out = new Float32Array(x.length);
    for (let i = 0; i < x.length; i++) if (mask[i]) out[i] = (x[i] - mean) * inv;
    return out;
  },
  policyLoss(lp: Float32Array, old: Float32Array, adv: Float32Array, mask: Float32Array, eps: number) {
    let n = 0;
    for (let i = 0; i < mask.length; i++) n += mask[i];
    const grad = new Float32Array(lp.length);
    let loss = 0;
    for (let i = 0; i < lp.length; i++) {
      if (!mask[i]) continue;
      const ratio = Math.exp(lp[i] - old[i]);
      const a = -adv[i] * ratio;
      const c = -adv[i] * Math.min(Math.max(ratio, 1 - eps), 1 + eps);
      loss += Math.max(a, c);
      grad[i] = a >= c ? (-adv[i] * ratio) / n : 0;
    }
    return { loss: loss / n, grad };
  },
  valueLoss(v: Float32Array, old: Float32Array, ret: Float32Array, mask: Float32Array, eps: number) {
    let n = 0;
    for (let i = 0; i < mask.length; i++) n += mask[i];
    const grad = new Float32Array(v.length);
    let loss = 0;
    for (let i = 0; i < v.length; i++) {
      if (!mask[i]) continue;
      const vc = Math.min(Math.max(v[i], old[i] - eps), old[i] + eps);
      const a = (v[i] - ret[i]) ** 2;
      const c = (vc - ret[i]) ** 2;
      loss += 0.5 * Math.max(a, c);
      grad[i] = a >= c ? (v[i] - ret[i]) / n : 0;
    }
    return { loss: loss / n, grad };
  },
};

// ---- data ---------------------------------------------------------------------------------------
let seed = 42;
const uniform = () => {
  seed = (seed * 1664525 + 1013904223) >>> 0;
  return seed / 4294967296;
};
const randn = (n: number, scale = 1) => Float32Array.from({ length: n }, () => scale * (uniform() + uniform() + uniform() - 1.5) * 2);
const rows = B * T;
const mask = new Float32Array(rows);
for (let b = 0; b < B; b++) mask.fill(1, b * T, b * T + Math.max(1, Math.floor(T * (0.25 + 0.75 * uniform()))));
const lp = randn(rows, 0.5).map((x) => x - 2);
const ref = lp.map((x) => x + 0.05 * (uniform() - 0.5));
const scores = randn(B);
const values = randn(rows, 0.3);
const lpRows = LP_B * T;
const logits = new Float32Array(lpRows * V);
for (let i = 0; i < logits.length; i++) logits[i] = 4 * (uniform() - 0.5);
const tokens = Int32Array.from({ length: lpRows }, () => Math.floor(uniform() * V));

async function median(f: () => unknown | Promise<unknown>): Promise<number> {
  const times: number[] = [];
  await f(); // warm-up
  for (let i = 0; i < runs; i++) {
    const t0 = process.hrtime.bigint();
    await f();
    times.push(Number(process.hrtime.bigint() - t0) / 1e6);
  }
  times.sort((a, b) => a - b);
  return times[Math.floor(times.length / 2)];
}

async function main(): Promise<void> {
  const info = ppo.backendInfo();
  console.log(`ppo-max ops benchmark: device ${device}, ${info.cpuThreads} CPU threads, median of ${runs} runs (after a warm-up)`);
  console.log(`sequence ops: ${B} x ${T} tokens; logprobs: ${LP_B} x ${T} x vocab ${V} (${((logits.length * 4) / 2 ** 30).toFixed(2)} GiB of logits)\n`);
  const seq = { batch: B, steps: T, mask };
  const adv = ts.gae(ts.klRewards(lp, ref, scores, mask, 0.05), values, mask, 1, 0.95);
  const newValues = values.map((x) => x + 0.1);
  const cases: [string, (sync: boolean) => unknown, () => unknown][] = [
    [
      'logprobs + entropy',
      (sync) => (sync ? ppo.logprobsFromLogitsSync : ppo.logprobsFromLogits)({ batch: LP_B, steps: T, vocab: V, logits, tokens }, { entropy: true, device }),
      () => ts.logprobs(logits, tokens, lpRows, V, new Float32Array(lpRows)),
    ],
    [
      'KL-penalized rewards',
      (sync) => (sync ? ppo.klPenalizedRewardsSync : ppo.klPenalizedRewards)({ ...seq, logprobs: lp, refLogprobs: ref, scores }, { device }),
      () => ts.klRewards(lp, ref, scores, mask, 0.05),
    ],
    ['GAE', (sync) => (sync ? ppo.gaeSync : ppo.gae)({ ...seq, rewards: lp, values }, { device }), () => ts.gae(lp, values, mask, 1, 0.95)],
    ['whiten', (sync) => (sync ? ppo.whitenSync : ppo.whiten)({ ...seq, values: adv.adv }, { device }), () => ts.whiten(adv.adv, mask)],
    [
      'policy loss',
      (sync) => (sync ? ppo.policyLossSync : ppo.policyLoss)({ ...seq, logprobs: ref, oldLogprobs: lp, advantages: adv.adv }, { device }),
      () => ts.policyLoss(ref, lp, adv.adv, mask, 0.2),
    ],
    [
      'value loss',
      (sync) => (sync ? ppo.valueLossSync : ppo.valueLoss)({ ...seq, values: newValues, oldValues: values, returns: adv.ret }, { device }),
      () => ts.valueLoss(newValues, values, adv.ret, mask, 0.2),
    ],
  ];
  console.log(
    `${'op'.padEnd(24)}${'async ms'.padStart(10)}${'sync ms'.padStart(10)}${'TypeScript ms'.padStart(15)}` +
      `${'async x'.padStart(9)}${'sync x'.padStart(9)}`,
  );
  for (const [name, native, plain] of cases) {
    const a = await median(() => native(false));
    const s = await median(() => native(true));
    const b = await median(plain);
    console.log(
      `${name.padEnd(24)}${a.toFixed(2).padStart(10)}${s.toFixed(2).padStart(10)}${b.toFixed(2).padStart(15)}` +
        `${(b / a).toFixed(1).padStart(8)}x${(b / s).toFixed(1).padStart(8)}x`,
    );
  }
  console.log('\nasync: the promise form (worker thread + promise settle); sync: the Sync twin on the calling thread.');
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
