/**
 * RunningMoments: batched updates against the one-shot float64 moments of every
 * score, merge order, concurrency, serialization, normalization and its errors.
 */
import { describe, expect, test } from '@jest/globals';

import { RunningMoments } from '../lib';
import { Rng, besselStd, refMoments, refNormalize } from './reference';
import { Tolerance, expectBitEqual, expectClose, expectFloat32, expectRejects, expectScalarClose, expectThrows } from './helpers';

const CPU = { device: 'cpu' as const };
const f32 = Math.fround;

// Moments are double sums on both sides (two-pass per batch, Chan's merge across
// batches); the merge's rounding differs from a one-shot two-pass sum by a few ulps
// per merge, so 1e-10 relative is generous yet far below any float32 effect.
const MOMENTS_TOL: Tolerance = { abs: 1e-12, rel: 1e-10 };
// Normalized scores: computed in double from the float32 scores, rounded once to float32.
const NORM_TOL: Tolerance = { abs: 1e-6, rel: 1e-6 };

/** Random batches of scores with drifting mean and scale, like a reward model's. */
function scoreBatches(seed: number, count: number, maxSize = 200): Float32Array[] {
  const rng = new Rng(seed);
  const batches: Float32Array[] = [];
  for (let k = 0; k < count; k++) {
    const size = 1 + rng.int(maxSize);
    batches.push(rng.normals(size, 0.5 + 3 * rng.random(), 2 * rng.normal() + k * 0.05));
  }
  return batches;
}

function concat(batches: Float32Array[]): number[] {
  return batches.flatMap((b) => Array.from(b));
}

function expectMomentsClose(rm: RunningMoments, all: number[], tol: Tolerance = MOMENTS_TOL): void {
  const ref = refMoments(all);
  expect(rm.count).toBe(ref.count);
  const s = rm.state();
  expect(s.count).toBe(ref.count);
  expectScalarClose(s.mean, ref.mean, tol, 'mean');
  expectScalarClose(s.m2, ref.m2, tol, 'm2');
  expectScalarClose(rm.mean, ref.mean, tol, 'mean getter');
  expectScalarClose(rm.std, besselStd(ref), tol, 'std (Bessel)');
}

describe('RunningMoments.update', () => {
  test('a fresh instance has count 0, mean 0, std 0', () => {
    const rm = new RunningMoments();
    expect(rm.state()).toEqual({ count: 0, mean: 0, m2: 0 });
    expect([rm.count, rm.mean, rm.std]).toEqual([0, 0, 0]);
  });

  test('update over many random batches equals the one-shot float64 moments of all scores', async () => {
    const batches = scoreBatches(1, 60);
    const asyncRm = new RunningMoments();
    const syncRm = new RunningMoments();
    const seen: Float32Array[] = [];
    for (const b of batches) {
      const state = await asyncRm.update(b, CPU);
      const syncState = syncRm.updateSync(b, CPU);
      seen.push(b);
      // Each update resolves to the state after that batch; async and Sync agree exactly.
      expect(state).toEqual(asyncRm.state());
      expect(syncState).toEqual(state);
    }
    expectMomentsClose(asyncRm, concat(seen));
    expectMomentsClose(syncRm, concat(seen));
  });

  test('one score at a time, and a single huge batch', async () => {
    const rng = new Rng(2);
    const scores = rng.normals(300, 2, 1);
    const one = new RunningMoments();
    for (const x of scores) one.updateSync([x], CPU);
    expectMomentsClose(one, Array.from(scores));
    const big = new Rng(3).normals(200_000, 3, -4);
    const rm = new RunningMoments();
    await rm.update(big, CPU);
    expectMomentsClose(rm, Array.from(big));
  });

  test('is stable for a large mean and a small spread', async () => {
    const batches = scoreBatches(4, 40).map((b) => Float32Array.from(b, (x) => 1e5 + x * 1e-2));
    const rm = new RunningMoments();
    for (const b of batches) await rm.update(b, CPU);
    // Conditioning mean / std ~ 1e7: each merge's delta of two means ~1e5 carries an
    // absolute error ~1e-11, so m2 is good to ~1e-9 relative (no catastrophic loss).
    expectMomentsClose(rm, concat(batches), { abs: 1e-12, rel: 1e-8 });
  });

  test('std is 0 before two scores were seen', () => {
    const rm = new RunningMoments();
    rm.updateSync([3.5], CPU);
    expect(rm.count).toBe(1);
    expect(rm.mean).toBe(3.5);
    expect(rm.std).toBe(0);
    rm.updateSync([5.5], CPU);
    expectScalarClose(rm.std, Math.sqrt(2), MOMENTS_TOL);
  });

  test('merging is independent of batch order and split (within tolerance)', () => {
    const batches = scoreBatches(5, 30);
    const forward = new RunningMoments();
    const backward = new RunningMoments();
    const shuffled = new RunningMoments();
    const resplit = new RunningMoments();
    batches.forEach((b) => forward.updateSync(b, CPU));
    [...batches].reverse().forEach((b) => backward.updateSync(b, CPU));
    const rng = new Rng(6);
    const order = batches.map((_, i) => i).sort(() => rng.random() - 0.5);
    order.forEach((i) => shuffled.updateSync(batches[i], CPU));
    const all = Float32Array.from(concat(batches));
    for (let i = 0; i < all.length; i += 97) resplit.updateSync(all.subarray(i, i + 97), CPU);
    for (const other of [backward, shuffled, resplit]) {
      expect(other.count).toBe(forward.count);
      expectScalarClose(other.mean, forward.mean, MOMENTS_TOL, 'mean');
      expectScalarClose(other.state().m2, forward.state().m2, MOMENTS_TOL, 'm2');
      expectScalarClose(other.std, forward.std, MOMENTS_TOL, 'std');
    }
  });

  test('concurrent update() calls settle in call order', async () => {
    const batches = scoreBatches(7, 12, 5000);
    const sequential = new RunningMoments();
    const expected = batches.map((b) => sequential.updateSync(b, CPU));
    const rm = new RunningMoments();
    const settled: number[] = [];
    const promises = batches.map((b, i) =>
      rm.update(b, CPU).then((state) => {
        settled.push(i);
        return state;
      }),
    );
    const states = await Promise.all(promises);
    expect(settled).toEqual(batches.map((_, i) => i));
    // Merged in call order: every intermediate state equals the sequential one exactly.
    expect(states).toEqual(expected);
    expect(rm.state()).toEqual(sequential.state());
  });

  test('normalize() called while updates are pending uses the moments after them', async () => {
    const batches = scoreBatches(8, 5, 2000);
    const rm = new RunningMoments();
    const pending = batches.map((b) => rm.update(b, CPU));
    const probe = Float32Array.from([-2, 0, 1, 5]);
    const normalized = rm.normalize(probe, CPU);
    await Promise.all(pending);
    expectBitEqual(await normalized, rm.normalizeSync(probe, CPU));
  });

  test('a failed update rejects without changing the state or blocking later updates', async () => {
    const rm = new RunningMoments();
    rm.updateSync([1, 2, 3], CPU);
    const before = rm.state();
    const bad = rm.update([1, NaN, 3], CPU);
    const good = rm.update([4, 5], CPU);
    await expectRejects(() => bad, { code: 'ERR_NON_FINITE' });
    await good;
    const ref = new RunningMoments(before);
    ref.updateSync([4, 5], CPU);
    expect(rm.state()).toEqual(ref.state());
  });

  test('accepts plain arrays and Float64Array', () => {
    const values = [0.5, -1.25, 3, 8];
    const a = new RunningMoments();
    const b = new RunningMoments();
    const c = new RunningMoments();
    a.updateSync(Float32Array.from(values), CPU);
    b.updateSync(values, CPU);
    c.updateSync(Float64Array.from(values), CPU);
    expect(b.state()).toEqual(a.state());
    expect(c.state()).toEqual(a.state());
  });
});

describe('RunningMoments state', () => {
  test('state() / fromState / JSON round trip continues identically', async () => {
    const batches = scoreBatches(9, 20);
    const rm = new RunningMoments();
    for (const b of batches.slice(0, 10)) await rm.update(b, CPU);
    const json = JSON.stringify(rm);
    const parsed = JSON.parse(json);
    expect(parsed).toEqual(rm.state());
    const restored = RunningMoments.fromState(parsed);
    const copied = new RunningMoments(rm.state());
    expect(restored.state()).toEqual(rm.state());
    for (const b of batches.slice(10)) {
      const s = await rm.update(b, CPU);
      expect(await restored.update(b, CPU)).toEqual(s);
      expect(copied.updateSync(b, CPU)).toEqual(s);
    }
    const probe = Float32Array.from([-3, 0.25, 7]);
    expectBitEqual(restored.normalizeSync(probe, CPU), rm.normalizeSync(probe, CPU));
  });

  test('state() is a copy', () => {
    const rm = new RunningMoments();
    rm.updateSync([1, 2, 3], CPU);
    const s = rm.state();
    s.count = 100;
    s.mean = -5;
    expect(rm.state()).toEqual({ count: 3, mean: 2, m2: 2 });
  });

  test.each([
    ['negative count', { count: -1, mean: 0, m2: 0 }, 'state.count'],
    ['non-integer count', { count: 2.5, mean: 0, m2: 0 }, 'state.count'],
    ['NaN count', { count: NaN, mean: 0, m2: 0 }, 'state.count'],
    ['string count', { count: '3', mean: 0, m2: 0 }, 'state.count'],
    ['infinite mean', { count: 3, mean: Infinity, m2: 1 }, 'state.mean'],
    ['NaN mean', { count: 3, mean: NaN, m2: 1 }, 'state.mean'],
    ['negative m2', { count: 3, mean: 0, m2: -1 }, 'state.m2'],
    ['infinite m2', { count: 3, mean: 0, m2: Infinity }, 'state.m2'],
    ['null', null, 'state'],
    ['a string', 'state', 'state'],
    ['an array', [3, 0, 1], 'state'],
  ] as [string, unknown, string][])('bad state rejected: %s', (_label, state, argument) => {
    expectThrows(() => RunningMoments.fromState(state as any), { code: 'ERR_INVALID_ARGUMENT', argument });
    expectThrows(() => new RunningMoments(state as any), { code: 'ERR_INVALID_ARGUMENT', argument });
  });

  test.each([
    ['missing m2', { count: 10, mean: 1 }, 'state.m2'],
    ['missing count', { mean: 1, m2: 3 }, 'state.count'],
    ['empty object', {}, undefined],
  ] as [string, unknown, string | undefined][])('incomplete state rejected: %s', (_label, state, argument) => {
    // A saved state lacking a field is corrupt: silently reading it as 0 would reset the statistics.
    expectThrows(() => RunningMoments.fromState(state as any), { code: 'ERR_INVALID_ARGUMENT', argument });
  });
});

describe('RunningMoments.normalize', () => {
  function trained(seed: number): RunningMoments {
    const rm = new RunningMoments();
    for (const b of scoreBatches(seed, 10)) rm.updateSync(b, CPU);
    return rm;
  }

  test.each([
    ['default (norm)', {}],
    ["mode 'norm'", { mode: 'norm' }],
    ["mode 'scale'", { mode: 'scale' }],
    ["'norm' with clip 1", { mode: 'norm', clip: 1 }],
    ["'scale' with clip 0.5", { mode: 'scale', clip: 0.5 }],
    ['clip null (none)', { clip: null }],
    ['eps 0.5', { eps: 0.5 }],
  ] as [string, Record<string, unknown>][])('%s matches the reference, async and Sync', async (_label, options) => {
    const rm = trained(10);
    const scores = new Rng(11).normals(500, 4, 1);
    const sync = rm.normalizeSync(scores, { ...options, ...CPU });
    const out = await rm.normalize(scores, { ...options, ...CPU });
    expectFloat32(out, scores.length);
    expectBitEqual(sync, out);
    const expected = refNormalize(scores, rm.mean, rm.std, {
      subtractMean: options.mode !== 'scale',
      eps: f32((options.eps as number | undefined) ?? 1e-8),
      clip: options.clip == null ? null : f32(options.clip as number),
    });
    expectClose(out, expected, NORM_TOL);
    if (typeof options.clip === 'number') {
      const c = f32(options.clip);
      expect(Math.max(...Array.from(out, Math.abs))).toBeLessThanOrEqual(c);
      expect(Array.from(out).some((x) => Math.abs(x) === c)).toBe(true); // the clip did bind
    }
  });

  test('normalize does not change the moments', async () => {
    const rm = trained(12);
    const before = rm.state();
    await rm.normalize([1, 2, 3], CPU);
    rm.normalizeSync([1, 2, 3], CPU);
    expect(rm.state()).toEqual(before);
  });

  test('updateAndNormalize merges the batch first, then normalizes it', async () => {
    const rm = trained(13);
    const twin = RunningMoments.fromState(rm.state());
    const scores = new Rng(14).normals(64, 2);
    const out = await rm.updateAndNormalize(scores, { mode: 'norm', clip: 3, ...CPU });
    twin.updateSync(scores, CPU);
    expect(rm.state()).toEqual(twin.state());
    expectBitEqual(out, twin.normalizeSync(scores, { mode: 'norm', clip: 3, ...CPU }));
  });

  test('updateAndNormalize works on a fresh instance', async () => {
    const rm = new RunningMoments();
    const scores = Float32Array.from([1, 2, 3, 4, 5]);
    const out = await rm.updateAndNormalize(scores, CPU);
    const std = Math.sqrt(2.5);
    expectClose(out, [-2, -1, 0, 1, 2].map((x) => x / (std + f32(1e-8))), NORM_TOL);
  });

  test('one score seen: std 0 divides by eps (clip bounds it)', () => {
    const rm = new RunningMoments();
    rm.updateSync([2], CPU);
    const out = rm.normalizeSync([2, 2.5, 1], { clip: 5, ...CPU });
    expect(Array.from(out, (x) => x + 0)).toEqual([0, 5, -5]);
  });

  test('error when normalizing before any update', async () => {
    const rm = new RunningMoments();
    expectThrows(() => rm.normalizeSync([1, 2], CPU), { code: 'ERR_INVALID_ARGUMENT', message: /update/ });
    const e = await expectRejects(() => rm.normalize([1, 2], CPU), { code: 'ERR_INVALID_ARGUMENT', message: /update/ });
    expect(e.stack).toContain('running-moments.test');
  });

  test.each([
    ['mode', { mode: 'zscore' }],
    ['clip', { clip: 0 }],
    ['clip', { clip: -1 }],
    ['eps', { eps: 0 }],
    ['eps', { eps: 2 }],
    ['device', { device: 'tpu' }],
  ] as [string, Record<string, unknown>][])('bad option %s rejected: %j', async (argument, options) => {
    const rm = trained(15);
    expectThrows(() => rm.normalizeSync([1, 2], options as any), { code: 'ERR_INVALID_ARGUMENT', argument });
    await expectRejects(() => rm.normalize([1, 2], options as any), { code: 'ERR_INVALID_ARGUMENT', argument });
  });

  test('bad scores rejected by update and normalize', async () => {
    const rm = trained(16);
    expectThrows(() => rm.updateSync([], CPU), { code: 'ERR_INVALID_ARGUMENT', argument: 'scores' });
    await expectRejects(() => rm.update(new Float32Array(0), CPU), { code: 'ERR_INVALID_ARGUMENT', argument: 'scores' });
    expectThrows(() => rm.updateSync('abc' as any, CPU), { code: 'ERR_INVALID_ARGUMENT', argument: 'scores' });
    expectThrows(() => rm.normalizeSync([], CPU), { code: 'ERR_INVALID_ARGUMENT', argument: 'scores' });
    // NaN and Infinity are found natively; the error names the JS argument, `scores`.
    expectThrows(() => rm.updateSync([1, NaN], CPU), { code: 'ERR_NON_FINITE', argument: 'scores' });
    await expectRejects(() => rm.update([Infinity], CPU), { code: 'ERR_NON_FINITE', argument: 'scores' });
    expectThrows(() => rm.normalizeSync([1, NaN], CPU), { code: 'ERR_NON_FINITE', argument: 'scores' });
    await expectRejects(() => rm.normalize([-Infinity], CPU), { code: 'ERR_NON_FINITE', argument: 'scores' });
  });
});
