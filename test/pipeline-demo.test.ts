/**
 * The demo (`npm run demo`): the whole toy RLHF pipeline runs through the real trainers
 * and each stage's output makes sense (a shortened PPO phase keeps this test quick).
 */
import { expect, test } from '@jest/globals';

import { goldReward, runPipelineDemo } from '../lib/pipeline-demo';

test('the labeler rule scores positive minus negative words per word, up to the end token', () => {
  expect(goldReward([3, 7, 5, 1])).toBeCloseTo(0.25, 12);
  expect(goldReward([13, 13, 0, 3, 3])).toBe(-1);
  expect(goldReward([0])).toBe(0);
});

test('SFT, labels, reward model, critic pre-training and PPO under both presets', async () => {
  const lines: string[] = [];
  const r = await runPipelineDemo({ ppoSteps: 6, log: (l) => lines.push(l) });
  expect(r.pipeline.sftPerplexityAfter).toBeLessThan(0.5 * r.pipeline.sftPerplexityBefore);
  expect(r.pipeline.pairs).toBeGreaterThan(100);
  expect(r.pipeline.rmAccuracy).toBeGreaterThan(0.7); // the reward model learned the labeler's preference
  for (const name of ['ppoMax', 'vanilla']) {
    for (const [k, v] of Object.entries(r[name])) if (!Number.isFinite(v)) throw new Error(`${name}.${k} = ${v}`);
    expect(r[name].proxyEnd).toBeGreaterThan(r[name].proxyStart); // PPO raises the proxy reward
    expect(r[name].klEnd).toBeGreaterThan(-0.5);
  }
  expect(lines.some((l) => l.startsWith('ppoMax: critic pre-training'))).toBe(true);
  expect(lines[lines.length - 1]).toMatch(/^done in/);
}, 120000);
