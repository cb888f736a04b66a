/**
 * The async forms run on a worker thread: the event loop stays free while a large
 * op runs, and the caller may drop its references to the inputs (the native call
 * keeps them alive) without changing the result.
 */
import { describe, expect, test } from '@jest/globals';

import * as ppo from '../lib';
import { refGae, refLogprobs, refLogprobsGrad } from './reference';
import { expectClose, expectFloat32 } from './helpers';

// 16 x 256 x 8192 logits (128 MiB of float32): a few hundred ms on two cores, long
// enough for a 5 ms interval to tick many times, small enough to keep the suite quick
// (64 x 256 x 8192 works the same but costs seconds just to allocate and fill).
const [BATCH, STEPS, VOCAB] = [16, 256, 8192];
const ROWS = BATCH * STEPS;
// Logits repeat a block whose length is not a multiple of the vocabulary, so rows differ.
const BLOCK_LENGTH = VOCAB * 7 + 3;
const CPU = { device: 'cpu' as const };
// As in ops.test.ts: float32 logits kernels against float64.
const LOGITS_TOL = { abs: 1e-5, rel: 1e-5 };

function block(): Float32Array {
  const b = new Float32Array(BLOCK_LENGTH);
  for (let i = 0; i < b.length; i++) b[i] = 4 * Math.sin(i * 0.37) + ((i * 7919) % 13) * 0.1;
  return b;
}

function bigLogits(): Float32Array {
  const b = block();
  const logits = new Float32Array(ROWS * VOCAB);
  for (let off = 0; off < logits.length; off += b.length) logits.set(b.subarray(0, Math.min(b.length, logits.length - off)), off);
  return logits;
}

function rowLogits(b: Float32Array, r: number): Float32Array {
  const row = new Float32Array(VOCAB);
  for (let v = 0; v < VOCAB; v++) row[v] = b[(r * VOCAB + v) % BLOCK_LENGTH];
  return row;
}

const tokenOf = (r: number) => (r * 7919 + 11) % VOCAB;
const lengthOf = (b: number) => 1 + ((b * 37) % STEPS);
const SAMPLE_ROWS = [0, 1, 255, 256, 1000, 2047, ROWS - 1].filter((r) => r % STEPS < lengthOf(Math.floor(r / STEPS)));

/** Counts interval ticks until the promise settles; also the longest gap between ticks. */
async function ticksWhile<T>(promise: Promise<T>): Promise<{ value: T; ticks: number; maxGapMs: number }> {
  let ticks = 0;
  let last = Date.now();
  let maxGapMs = 0;
  const timer = setInterval(() => {
    const now = Date.now();
    maxGapMs = Math.max(maxGapMs, now - last);
    last = now;
    ticks++;
  }, 5);
  try {
    const value = await promise;
    return { value, ticks, maxGapMs };
  } finally {
    clearInterval(timer);
  }
}

function collectGarbage(): void {
  const gc = (globalThis as { gc?: () => void }).gc;
  if (gc) gc();
  // Without --expose-gc: churn the heap so that a collection is likely anyway.
  let junk: unknown[] = [];
  for (let i = 0; i < 200; i++) junk.push(new Float32Array(1 << 16), { i });
  junk = [];
  void junk;
}

describe('async ops leave the event loop free', () => {
  test(`logprobsFromLogits over ${BATCH}x${STEPS}x${VOCAB}: a setInterval ticks while it runs`, async () => {
    const logits = bigLogits();
    const tokens = Int32Array.from({ length: ROWS }, (_, r) => tokenOf(r));
    const started = Date.now();
    // Three calls in a row (~25 ms each on two cores): a window long enough that a brief
    // stall of the main thread on a loaded machine cannot hide the ticks. Work done on
    // the main thread would give 0 ticks: awaiting settled promises never lets a timer run.
    const { value, ticks, maxGapMs } = await ticksWhile(
      (async () => {
        let last;
        for (let i = 0; i < 3; i++) {
          last = await ppo.logprobsFromLogits({ batch: BATCH, steps: STEPS, vocab: VOCAB, logits, tokens }, { entropy: true, ...CPU });
        }
        return last!;
      })(),
    );
    const elapsed = Date.now() - started;
    // The timer ran repeatedly before the ops settled: the work was off the main thread.
    expect(ticks).toBeGreaterThanOrEqual(2);
    // No long stall: validation and the kernel both ran on the worker. (Generous bound
    // for a loaded CI machine; the op itself takes several times longer on two cores.)
    expect(maxGapMs).toBeLessThan(Math.max(250, elapsed / 2));
    expectFloat32(value.logprobs, ROWS);
    const b = block();
    for (const r of [0, 17, 2048, ROWS - 1]) {
      const ref = refLogprobs(rowLogits(b, r), [tokenOf(r)], 1, 1, VOCAB, null);
      expectClose([value.logprobs[r], value.entropy![r]], [ref.logprobs[0], ref.entropy[0]], LOGITS_TOL, `row ${r}`);
    }
  });

  test('several different async ops at once all resolve correctly', async () => {
    const n = 512 * 512;
    const rewards = Float32Array.from({ length: n }, (_, i) => Math.sin(i));
    const values = Float32Array.from({ length: n }, (_, i) => Math.cos(i * 0.5));
    const shape = { batch: 512, steps: 512 };
    const [g, w, p, logp] = await Promise.all([
      ppo.gae({ ...shape, rewards, values }, { gamma: 0.99, lambda: 0.95, ...CPU }),
      ppo.whiten({ ...shape, values: rewards }, CPU),
      ppo.policyLoss({ ...shape, logprobs: values, oldLogprobs: values, advantages: rewards }, CPU),
      ppo.logprobsFromLogits({ batch: 4, steps: 8, vocab: 1000, logits: block().subarray(0, 32 * 1000), tokens: new Int32Array(32) }, CPU),
    ]);
    const sync = ppo.gaeSync({ ...shape, rewards, values }, { gamma: 0.99, lambda: 0.95, ...CPU });
    expect(Buffer.from(g.advantages.buffer).equals(Buffer.from(sync.advantages.buffer))).toBe(true);
    const ref = refGae(rewards.subarray(0, 512), values.subarray(0, 512), 1, 512, null, Math.fround(0.99), Math.fround(0.95));
    expectClose(g.advantages.subarray(0, 512), ref.advantages, { abs: 1e-6, rel: 1e-6 });
    expect(Buffer.from(w.buffer).equals(Buffer.from(ppo.whitenSync({ ...shape, values: rewards }, CPU).buffer))).toBe(true);
    expect(p.tokens).toBe(n);
    expect(logp.logprobs.length).toBe(32);
  });
});

describe('inputs may be dropped by the caller while an async op runs', () => {
  test('logprobsFromLogits with lengths: no reference kept, result still right', async () => {
    // The inputs live only inside this function's scope, which ends before the op does.
    const start = () =>
      ppo.logprobsFromLogits(
        {
          batch: BATCH,
          steps: STEPS,
          vocab: VOCAB,
          logits: bigLogits(),
          tokens: Int32Array.from({ length: ROWS }, (_, r) => tokenOf(r)),
          lengths: Array.from({ length: BATCH }, (_, b) => lengthOf(b)),
        },
        { entropy: true, temperature: 0.8, ...CPU },
      );
    const promise = start();
    collectGarbage();
    await new Promise((resolve) => setTimeout(resolve, 10));
    collectGarbage();
    const out = await promise;
    collectGarbage();
    const b = block();
    for (const r of SAMPLE_ROWS) {
      const ref = refLogprobs(rowLogits(b, r), [tokenOf(r)], 1, 1, VOCAB, null, 0.8);
      expectClose([out.logprobs[r], out.entropy![r]], [ref.logprobs[0], ref.entropy[0]], LOGITS_TOL, `row ${r}`);
    }
    // Padded positions are 0.
    const padded = STEPS - 1; // row 0 has length 1
    expect(out.logprobs[padded]).toBe(0);
    expect(out.entropy![padded]).toBe(0);
  });

  test('logprobsBackward with dropped logits and gradients', async () => {
    const [batch, steps] = [4, 64];
    const rows = batch * steps;
    const g = (r: number) => Math.cos(r) * 0.5;
    const h = (r: number) => Math.sin(r * 3) * 0.25;
    const start = () => {
      const b = block();
      const logits = new Float32Array(rows * VOCAB);
      for (let r = 0; r < rows; r++) logits.set(rowLogits(b, r), r * VOCAB);
      return ppo.logprobsBackward(
        { batch, steps, vocab: VOCAB, logits, tokens: Int32Array.from({ length: rows }, (_, r) => tokenOf(r)) },
        { gradLogprobs: Float32Array.from({ length: rows }, (_, r) => g(r)), gradEntropy: Float32Array.from({ length: rows }, (_, r) => h(r)) },
        { temperature: 1.25, ...CPU },
      );
    };
    const promise = start();
    collectGarbage();
    const { gradLogits } = await promise;
    expectFloat32(gradLogits, rows * VOCAB);
    const b = block();
    for (const r of [0, 63, 64, rows - 1]) {
      const ref = refLogprobsGrad(rowLogits(b, r), [tokenOf(r)], 1, 1, VOCAB, null, 1.25, [Math.fround(g(r))], [Math.fround(h(r))]);
      expectClose(gradLogits.subarray(r * VOCAB, (r + 1) * VOCAB), ref, { abs: 1e-5, rel: 1e-4 }, `row ${r}`);
    }
  });
});
