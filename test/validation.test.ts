/**
 * Argument validation of every op, in both forms: the Sync form throws and the async
 * form rejects (never throws synchronously), with a stable `code`, the JS name of the
 * offending argument in `argument`, and (async) a stack that points at the caller.
 */
import { describe, expect, test } from '@jest/globals';

import * as ppo from '../lib';
import { ErrorShape, expectRejects, expectThrows } from './helpers';

type Obj = Record<string, any>;

interface OpDef {
  name: string;
  sync(input: any, options?: any): unknown;
  async(input: any, options?: any): Promise<unknown>;
  /** A valid call on batch 2, steps 3 (vocab 5), every position valid. */
  valid(): { input: Obj; options: Obj };
  /** Per-position float inputs (JS names) and their elements per position. */
  floats: [string, number][];
  /** Other float inputs with their lengths (e.g. scores [batch]). */
  others?: [string, number][];
  /** Options that must be rejected, each with the argument named in the error. */
  badOptions: [string, Obj][];
}

const B = 2;
const S = 3;
const V = 5;
const ROWS = B * S;

const seq = (start = 0.1) => Float32Array.from({ length: ROWS }, (_, i) => start + i * 0.25);

/** logprobsBackward's gradients live in their own argument; the defs see them in input. */
function splitGrads(input: any): [any, any] {
  if (typeof input !== 'object' || input === null) return [input, {}];
  const { gradLogprobs, gradEntropy, ...rest } = input;
  return [rest, { gradLogprobs, gradEntropy }];
}

const OPS: OpDef[] = [
  {
    name: 'logprobsFromLogits',
    sync: (i, o) => ppo.logprobsFromLogitsSync(i, o),
    async: (i, o) => ppo.logprobsFromLogits(i, o),
    valid: () => ({
      input: { batch: B, steps: S, vocab: V, logits: Float32Array.from({ length: ROWS * V }, (_, k) => Math.sin(k)), tokens: Int32Array.from([0, 1, 2, 3, 4, 0]) },
      options: { temperature: 1, entropy: true, device: 'cpu' },
    }),
    floats: [['logits', V]],
    badOptions: [
      ['temperature', { temperature: 0 }],
      ['temperature', { temperature: -1 }],
      ['temperature', { temperature: NaN }],
      ['temperature', { temperature: Infinity }],
      ['temperature', { temperature: '1' }],
      ['entropy', { entropy: 'yes' }],
      ['device', { device: 'tpu' }],
    ],
  },
  {
    name: 'logprobsBackward',
    sync: (i, o) => ppo.logprobsBackwardSync(...splitGrads(i), o),
    async: (i, o) => ppo.logprobsBackward(...splitGrads(i), o),
    valid: () => ({
      input: {
        batch: B,
        steps: S,
        vocab: V,
        logits: Float32Array.from({ length: ROWS * V }, (_, k) => Math.cos(k)),
        tokens: Int32Array.from([4, 3, 2, 1, 0, 4]),
        gradLogprobs: seq(),
        gradEntropy: seq(-0.5),
      },
      options: { temperature: 0.9, device: 'cpu' },
    }),
    floats: [
      ['logits', V],
      ['gradLogprobs', 1],
      ['gradEntropy', 1],
    ],
    badOptions: [
      ['temperature', { temperature: 0 }],
      ['temperature', { temperature: -0.5 }],
      ['device', { device: 'tpu' }],
    ],
  },
  {
    name: 'klPenalizedRewards',
    sync: (i, o) => ppo.klPenalizedRewardsSync(i, o),
    async: (i, o) => ppo.klPenalizedRewards(i, o),
    valid: () => ({
      input: { batch: B, steps: S, logprobs: seq(-3), refLogprobs: seq(-2), scores: Float32Array.from([0.5, -1]) },
      options: { klCoef: 0.1, estimator: 'k3', device: 'cpu' },
    }),
    floats: [
      ['logprobs', 1],
      ['refLogprobs', 1],
    ],
    others: [['scores', B]],
    badOptions: [
      ['estimator', { estimator: 'k9' }],
      ['estimator', { estimator: 'K1' }],
      ['estimator', { estimator: 1 }],
      ['klCoef', { klCoef: -1 }],
      ['klCoef', { klCoef: NaN }],
      ['klCoef', { klCoef: '0.1' }],
      ['device', { device: 'tpu' }],
    ],
  },
  {
    name: 'gae',
    sync: (i, o) => ppo.gaeSync(i, o),
    async: (i, o) => ppo.gae(i, o),
    valid: () => ({ input: { batch: B, steps: S, rewards: seq(), values: seq(1) }, options: { gamma: 0.99, lambda: 0.95, device: 'cpu' } }),
    floats: [
      ['rewards', 1],
      ['values', 1],
    ],
    badOptions: [
      ['gamma', { gamma: 1.5 }],
      ['gamma', { gamma: -0.01 }],
      ['gamma', { gamma: NaN }],
      ['lambda', { lambda: -0.1 }],
      ['lambda', { lambda: 1.01 }],
      ['lambda', { lambda: Infinity }],
      ['device', { device: 'tpu' }],
    ],
  },
  {
    name: 'whiten',
    sync: (i, o) => ppo.whitenSync(i, o),
    async: (i, o) => ppo.whiten(i, o),
    valid: () => ({ input: { batch: B, steps: S, values: seq() }, options: { shiftMean: true, clip: 3, device: 'cpu' } }),
    floats: [['values', 1]],
    badOptions: [
      ['clip', { clip: 0 }],
      ['clip', { clip: -1 }],
      ['clip', { clip: NaN }],
      ['eps', { eps: 0 }],
      ['eps', { eps: -1e-8 }],
      ['eps', { eps: 2 }],
      ['shiftMean', { shiftMean: 1 }],
      ['device', { device: 'tpu' }],
    ],
  },
  {
    name: 'clipAdvantages',
    sync: (i, o) => ppo.clipAdvantagesSync(i, o),
    async: (i, o) => ppo.clipAdvantages(i, o),
    valid: () => ({ input: { batch: B, steps: S, values: seq(-1) }, options: { clip: 0.5, device: 'cpu' } }),
    floats: [['values', 1]],
    badOptions: [
      ['clip', { clip: 0 }],
      ['clip', { clip: -2 }],
      ['clip', { clip: undefined }],
      ['clip', { clip: Infinity }],
      ['device', { device: 'tpu' }],
    ],
  },
  {
    name: 'policyLoss',
    sync: (i, o) => ppo.policyLossSync(i, o),
    async: (i, o) => ppo.policyLoss(i, o),
    valid: () => ({ input: { batch: B, steps: S, logprobs: seq(-2), oldLogprobs: seq(-2.1), advantages: seq(-0.5) }, options: { clip: 0.2, device: 'cpu' } }),
    floats: [
      ['logprobs', 1],
      ['oldLogprobs', 1],
      ['advantages', 1],
    ],
    badOptions: [
      ['clip', { clip: 0 }],
      ['clip', { clip: -0.2 }],
      ['clip', { clip: null }],
      ['device', { device: 'tpu' }],
    ],
  },
  {
    name: 'valueLoss',
    sync: (i, o) => ppo.valueLossSync(i, o),
    async: (i, o) => ppo.valueLoss(i, o),
    valid: () => ({ input: { batch: B, steps: S, values: seq(), oldValues: seq(0.2), returns: seq(-0.3) }, options: { clip: 0.2, device: 'cpu' } }),
    floats: [
      ['values', 1],
      ['oldValues', 1],
      ['returns', 1],
    ],
    badOptions: [
      ['clip', { clip: 0 }],
      ['clip', { clip: -1 }],
      ['clip', { clip: 'none' }],
      ['device', { device: 'tpu' }],
    ],
  },
];

const THIS_FILE = 'validation.test';

/**
 * The Sync form throws `want`; the async form returns a promise that rejects with
 * `want`, whose stack names this test file (the caller's frames).
 */
async function expectBothFail(op: OpDef, input: any, options: any, want: ErrorShape): Promise<void> {
  expectThrows(() => op.sync(input, options), want);
  const e = await expectRejects(() => op.async(input, options), want);
  expect(e.stack ?? '').toContain(THIS_FILE);
  expect(e.stack ?? '').toContain(want.code);
}

async function expectBothSucceed(op: OpDef, input: any, options: any): Promise<void> {
  op.sync(input, options);
  await op.async(input, options);
}

/** A copy of the valid call with every array copied, so cases never share buffers. */
function fresh(op: OpDef): { input: Obj; options: Obj } {
  const { input, options } = op.valid();
  const copy: Obj = {};
  for (const [k, v] of Object.entries(input)) copy[k] = ArrayBuffer.isView(v) ? (v as Float32Array).slice() : v;
  return { input: copy, options: { ...options } };
}

describe.each(OPS.map((op) => [op.name, op] as [string, OpDef]))('%s validation', (_name, op) => {
  test('the valid call succeeds (sync and async)', async () => {
    const { input, options } = fresh(op);
    await expectBothSucceed(op, input, options);
  });

  // ---- shapes ----
  const arrays: [string, number][] = [...op.floats.map(([n, inner]) => [n, ROWS * inner] as [string, number]), ...(op.others ?? [])];
  if (op.name.startsWith('logprobs')) arrays.push(['tokens', ROWS]);
  const lengthCases: [string, number, number][] = [];
  for (const [name, n] of arrays) for (const delta of [-1, 1]) lengthCases.push([name, n, delta]);
  test.each(lengthCases)('wrong length of %s (%i %+i) -> ERR_SHAPE_MISMATCH', async (name, n, delta) => {
    const { input, options } = fresh(op);
    const isTokens = name === 'tokens';
    input[name] = isTokens ? new Int32Array(n + delta) : new Float32Array(n + delta);
    await expectBothFail(op, input, options, { code: 'ERR_SHAPE_MISMATCH', argument: name, message: new RegExp(name) });
  });

  test.each([
    ['mask', 'mask', ROWS - 1],
    ['mask', 'mask', ROWS + 2],
    ['lengths', 'lengths', B - 1],
    ['lengths', 'lengths', B + 1],
  ] as [string, string, number][])('wrong length of %s (%s has %i) -> ERR_SHAPE_MISMATCH', async (_l, name, n) => {
    const { input, options } = fresh(op);
    input[name] = name === 'mask' ? new Float32Array(n).fill(1) : new Array(n).fill(1);
    await expectBothFail(op, input, options, { code: 'ERR_SHAPE_MISMATCH', argument: name });
  });

  const dims = op.name.startsWith('logprobs') ? ['batch', 'steps', 'vocab'] : ['batch', 'steps'];
  const dimCases: [string, unknown][] = [];
  for (const d of dims) for (const bad of [0, -2, 1.5, NaN, Infinity, '2', undefined, null]) dimCases.push([d, bad]);
  test.each(dimCases)('%s = %p -> ERR_INVALID_ARGUMENT', async (dim, bad) => {
    const { input, options } = fresh(op);
    input[dim] = bad;
    await expectBothFail(op, input, options, { code: 'ERR_INVALID_ARGUMENT', argument: dim });
  });

  test('a dimension inconsistent with the arrays -> ERR_SHAPE_MISMATCH naming an array', async () => {
    const { input, options } = fresh(op);
    input.steps = S + 1;
    const e = expectThrows(() => op.sync(input, options), { code: 'ERR_SHAPE_MISMATCH' });
    expect(arrays.map(([n]) => n)).toContain(e.argument);
    await expectRejects(() => op.async(input, options), { code: 'ERR_SHAPE_MISMATCH', argument: e.argument });
  });

  // (logprobsBackward's gradients are optional: omitted means zeros.)
  const required = arrays.map(([n]) => n).filter((n) => !n.startsWith('grad'));
  test.each(required.map((n) => [n]))('missing %s -> ERR_INVALID_ARGUMENT', async (name) => {
    const { input, options } = fresh(op);
    delete input[name];
    await expectBothFail(op, input, options, { code: 'ERR_INVALID_ARGUMENT', argument: name });
  });

  test.each(arrays.map(([n]) => [n]))('%s of the wrong type (a string, an object) -> ERR_INVALID_ARGUMENT', async (name) => {
    const { input, options } = fresh(op);
    input[name] = 'abc';
    await expectBothFail(op, input, options, { code: 'ERR_INVALID_ARGUMENT', argument: name });
    input[name] = { foo: 1 };
    await expectBothFail(op, input, options, { code: 'ERR_INVALID_ARGUMENT', argument: name });
  });

  test('input and options must be objects', async () => {
    const { input, options } = fresh(op);
    for (const bad of [null, 42, 'x', [1, 2]]) {
      await expectBothFail(op, bad, options, { code: 'ERR_INVALID_ARGUMENT' });
      await expectBothFail(op, input, bad, { code: 'ERR_INVALID_ARGUMENT', argument: 'options' });
    }
  });

  // ---- contents ----
  // [name, value, index]: per-position arrays get it at position 3 (valid with and without the mask below).
  const nonFinite: [string, number, number][] = [];
  for (const [name, inner] of op.floats) {
    for (const bad of name === 'logits' ? [NaN, Infinity] : [NaN, Infinity, -Infinity]) nonFinite.push([name, bad, 3 * inner + (inner > 1 ? 2 : 0)]);
  }
  for (const [name] of op.others ?? []) for (const bad of [NaN, Infinity, -Infinity]) nonFinite.push([name, bad, 1]);
  test.each(nonFinite)('%s holding %p at a valid position -> ERR_NON_FINITE', async (name, bad, index) => {
    for (const withMask of [false, true]) {
      const { input, options } = fresh(op);
      if (withMask) input.mask = Float32Array.from([1, 1, 0, 1, 0, 0]);
      const arr = input[name] as Float32Array;
      arr[index] = bad;
      await expectBothFail(op, input, options, { code: 'ERR_NON_FINITE', argument: name, message: new RegExp(name) });
    }
  });

  const paddable = op.floats.map(([n, inner]) => [n, inner] as [string, number]);
  test.each(paddable)('%s holding NaN and Infinity at padded positions is accepted', async (name, inner) => {
    for (const shape of [{ mask: Float32Array.from([1, 1, 0, 1, 0, 0]) }, { lengths: [2, 1] }]) {
      const { input, options } = fresh(op);
      Object.assign(input, shape);
      const arr = input[name] as Float32Array;
      for (let k = 0; k < inner; k++) {
        arr[2 * inner + k] = NaN;
        arr[5 * inner + k] = Infinity;
      }
      await expectBothSucceed(op, input, options);
    }
  });

  test.each([[0.5], [2], [-1], [NaN], [Infinity]])('a mask value %p -> ERR_OUT_OF_RANGE', async (bad) => {
    const { input, options } = fresh(op);
    input.mask = Float32Array.from([1, 0, 1, 1, 1, 1]);
    input.mask[4] = bad;
    await expectBothFail(op, input, options, { code: 'ERR_OUT_OF_RANGE', argument: 'mask' });
  });

  test('a mask given as plain numbers or Uint8Array is accepted; 0.5 in a plain array is not', async () => {
    const { input, options } = fresh(op);
    await expectBothSucceed(op, { ...input, mask: [1, 1, 0, 1, 1, 0] }, options);
    await expectBothSucceed(op, { ...input, mask: Uint8Array.from([1, 1, 0, 1, 1, 0]) }, options);
    await expectBothFail(op, { ...input, mask: [1, 1, 0.5, 1, 1, 0] }, options, { code: 'ERR_OUT_OF_RANGE', argument: 'mask' });
    await expectBothFail(op, { ...input, mask: Uint8Array.from([1, 1, 3, 1, 1, 0]) }, options, { code: 'ERR_OUT_OF_RANGE', argument: 'mask' });
  });

  test.each([[-1], [S + 1], [1.5], [NaN], [Infinity]])('a length of %p -> ERR_OUT_OF_RANGE', async (bad) => {
    const { input, options } = fresh(op);
    input.lengths = [S, bad];
    await expectBothFail(op, input, options, { code: 'ERR_OUT_OF_RANGE', argument: 'lengths' });
  });

  test.each([['2'], [null], [{}]])('a length of %p (not a number) -> ERR_INVALID_ARGUMENT', async (bad) => {
    const { input, options } = fresh(op);
    input.lengths = [S, bad as unknown as number];
    await expectBothFail(op, input, options, { code: 'ERR_INVALID_ARGUMENT', argument: 'lengths' });
  });

  test('lengths of 0 and of steps are accepted, as an array or a typed array', async () => {
    const { input, options } = fresh(op);
    await expectBothSucceed(op, { ...input, lengths: [0, S] }, options);
    await expectBothSucceed(op, { ...input, lengths: Int32Array.from([S, 0]) }, options);
  });

  test('mask and lengths both given -> ERR_INVALID_ARGUMENT', async () => {
    const { input, options } = fresh(op);
    input.mask = new Float32Array(ROWS).fill(1);
    input.lengths = [S, S];
    await expectBothFail(op, input, options, { code: 'ERR_INVALID_ARGUMENT', argument: 'mask', message: /lengths/ });
  });

  test.each(op.badOptions)('bad option %s: %p -> ERR_INVALID_ARGUMENT', async (argument, bad) => {
    const { input, options } = fresh(op);
    await expectBothFail(op, input, { ...options, ...bad }, { code: 'ERR_INVALID_ARGUMENT', argument, message: new RegExp(argument) });
  });

  test("device 'cuda' fails with ERR_CUDA_UNAVAILABLE when CUDA cannot be used", async () => {
    const { input, options } = fresh(op);
    if (ppo.cudaAvailable()) {
      await expectBothSucceed(op, input, { ...options, device: 'cuda' });
    } else {
      await expectBothFail(op, input, { ...options, device: 'cuda' }, { code: 'ERR_CUDA_UNAVAILABLE', argument: 'device' });
    }
  });

  test("device 'auto', 'cpu' and no device option all work", async () => {
    const { input, options } = fresh(op);
    for (const device of ['auto', 'cpu', undefined]) await expectBothSucceed(op, input, { ...options, device });
    if (op.name !== 'clipAdvantages') await expectBothSucceed(op, input, undefined); // clip is required there
  });

  test('async forms reject, never throw synchronously, for every kind of failure', () => {
    const { input, options } = fresh(op);
    const [firstFloat] = op.floats[0];
    const withNaN = { ...input, [firstFloat]: Float32Array.from(input[firstFloat] as Float32Array).fill(NaN, 0, 1) };
    const failing: [any, any][] = [
      [null, options], // found in TypeScript
      [{ ...input, batch: 0 }, options],
      [{ ...input, mask: new Float32Array(1) }, options],
      [input, { ...options, device: 'tpu' }],
      [withNaN, options], // found natively, on the worker thread
      [{ ...input, mask: Float32Array.from([1, 0.5, 1, 1, 1, 1]) }, options],
    ];
    if (!ppo.cudaAvailable()) failing.push([input, { ...options, device: 'cuda' }]);
    const promises = failing.map(([i, o]) => {
      let p: Promise<unknown> | undefined;
      expect(() => {
        p = op.async(i, o);
      }).not.toThrow();
      return p!;
    });
    return Promise.all(promises.map((p) => p.then(() => Promise.reject(new Error('resolved')), (e) => expect(typeof e.code).toBe('string'))));
  });
});

// ---- op-specific contents ---------------------------------------------------------------------

describe('logprobs-specific validation', () => {
  const defs = OPS.filter((op) => op.name.startsWith('logprobs'));

  test.each(defs.flatMap((op) => [-1, V, 1000, -(2 ** 31), 2 ** 31 - 1].map((t) => [op.name, op, t] as [string, OpDef, number])))(
    '%s: token id %p at a valid position -> ERR_OUT_OF_RANGE',
    async (_name, op, bad) => {
      const { input, options } = fresh(op);
      (input.tokens as Int32Array)[4] = bad;
      await expectBothFail(op, input, options, { code: 'ERR_OUT_OF_RANGE', argument: 'tokens', message: /tokens/ });
    },
  );

  test.each(defs.map((op) => [op.name, op] as [string, OpDef]))('%s: out-of-range token ids at padded positions are accepted', async (_n, op) => {
    const { input, options } = fresh(op);
    (input.tokens as Int32Array)[5] = -7;
    (input.tokens as Int32Array)[2] = V;
    await expectBothSucceed(op, { ...input, mask: [1, 1, 0, 1, 1, 0] }, options);
    await expectBothSucceed(op, { ...input, lengths: [2, 2] }, options);
  });

  test.each(defs.map((op) => [op.name, op] as [string, OpDef]))('%s: non-integer token ids in a plain array -> ERR_INVALID_ARGUMENT', async (_n, op) => {
    const { input, options } = fresh(op);
    input.tokens = [0, 1, 2.5, 3, 4, 0];
    await expectBothFail(op, input, options, { code: 'ERR_INVALID_ARGUMENT', argument: 'tokens' });
    input.tokens = [0, 1, 2, 3, 4, 2 ** 40];
    await expectBothFail(op, input, options, { code: 'ERR_INVALID_ARGUMENT', argument: 'tokens' });
  });

  test.each(defs.map((op) => [op.name, op] as [string, OpDef]))('%s: -Infinity logits', async (_n, op) => {
    // Allowed for tokens not taken...
    const ok = fresh(op);
    const logits = ok.input.logits as Float32Array;
    logits[0 * V + 1] = -Infinity; // row 0 takes token 0 or 4
    logits[0 * V + 2] = -Infinity;
    await expectBothSucceed(op, ok.input, ok.options);
    // ...but not for the taken token (probability zero)...
    const taken = fresh(op);
    const t0 = (taken.input.tokens as Int32Array)[1];
    (taken.input.logits as Float32Array)[1 * V + t0] = -Infinity;
    await expectBothFail(op, taken.input, taken.options, { code: 'ERR_NON_FINITE', argument: 'logits' });
    // ...nor for a whole row.
    const row = fresh(op);
    (row.input.logits as Float32Array).fill(-Infinity, 2 * V, 3 * V);
    await expectBothFail(op, row.input, row.options, { code: 'ERR_NON_FINITE', argument: 'logits' });
    // A padded row may be anything.
    await expectBothSucceed(op, { ...row.input, mask: [1, 1, 0, 1, 1, 1] }, row.options);
  });

  test('logprobsBackward: grads must be an object; either gradient may be omitted or null', async () => {
    const op = defs[1];
    const { input, options } = fresh(op);
    const [rest] = splitGrads(input);
    expectThrows(() => ppo.logprobsBackwardSync(rest, null as any, options), { code: 'ERR_INVALID_ARGUMENT', argument: 'grads' });
    await expectRejects(() => ppo.logprobsBackward(rest, 'g' as any, options), { code: 'ERR_INVALID_ARGUMENT', argument: 'grads' });
    for (const grads of [{}, { gradLogprobs: null }, { gradEntropy: input.gradEntropy }, { gradLogprobs: input.gradLogprobs, gradEntropy: null }]) {
      const out = ppo.logprobsBackwardSync(rest, grads as any, options);
      expect(out.gradLogits.length).toBe(ROWS * V);
      expect((await ppo.logprobsBackward(rest, grads as any, options)).gradLogits.length).toBe(ROWS * V);
    }
  });
});

describe('option edge values that are valid', () => {
  test('gamma and lambda of 0 and 1, klCoef 0, valueLoss clip null', async () => {
    const [gaeOp, klOp, valueOp] = ['gae', 'klPenalizedRewards', 'valueLoss'].map((n) => OPS.find((o) => o.name === n)!);
    for (const gamma of [0, 1]) for (const lambda of [0, 1]) await expectBothSucceed(gaeOp, fresh(gaeOp).input, { gamma, lambda, device: 'cpu' });
    await expectBothSucceed(klOp, fresh(klOp).input, { klCoef: 0, estimator: 'k2' });
    await expectBothSucceed(valueOp, fresh(valueOp).input, { clip: null });
  });
});

// ---- devices ---------------------------------------------------------------------------------------

describe('devices', () => {
  test('cudaAvailable() and cudaCompiled() are booleans; available implies compiled', () => {
    expect(typeof ppo.cudaAvailable()).toBe('boolean');
    expect(typeof ppo.cudaCompiled()).toBe('boolean');
    if (ppo.cudaAvailable()) expect(ppo.cudaCompiled()).toBe(true);
  });

  test('backendInfo() describes the loaded addon', () => {
    const info = ppo.backendInfo();
    expect(info.addonPath).toMatch(/ppo_max\.node$/);
    expect(info.cudaAvailable).toBe(ppo.cudaAvailable());
    expect(info.cudaCompiled).toBe(ppo.cudaCompiled());
    expect(info.cpuThreads).toBeGreaterThanOrEqual(1);
    if (!info.cudaAvailable) expect(info.cudaUnavailableReason.length).toBeGreaterThan(0);
  });

  test("resolveDevice: 'cpu' -> cpu, 'auto' follows cudaAvailable, 'cuda' errors without CUDA, others invalid", () => {
    expect(ppo.resolveDevice('cpu')).toBe('cpu');
    expect(ppo.resolveDevice('auto')).toBe(ppo.cudaAvailable() ? 'cuda' : 'cpu');
    expect(ppo.resolveDevice(undefined)).toBe(ppo.cudaAvailable() ? 'cuda' : 'cpu');
    if (!ppo.cudaAvailable()) {
      const e = expectThrows(() => ppo.resolveDevice('cuda'), { code: 'ERR_CUDA_UNAVAILABLE', argument: 'device' });
      expect(e.message).toMatch(/cuda/i);
    } else {
      expect(ppo.resolveDevice('cuda')).toBe('cuda');
    }
    expectThrows(() => ppo.resolveDevice('tpu' as any), { code: 'ERR_INVALID_ARGUMENT', argument: 'device' });
  });

  test('RunningMoments rejects a bad or unavailable device', async () => {
    const rm = new ppo.RunningMoments();
    expectThrows(() => rm.updateSync([1, 2], { device: 'tpu' as any }), { code: 'ERR_INVALID_ARGUMENT', argument: 'device' });
    const e = await expectRejects(() => rm.update([1, 2], { device: 'tpu' as any }), { code: 'ERR_INVALID_ARGUMENT', argument: 'device' });
    expect(e.stack).toContain(THIS_FILE);
    if (!ppo.cudaAvailable()) {
      await expectRejects(() => rm.update([1, 2], { device: 'cuda' }), { code: 'ERR_CUDA_UNAVAILABLE', argument: 'device' });
    }
    expect(rm.count).toBe(0);
    await rm.update([1, 2], { device: 'auto' });
    expect(rm.count).toBe(2);
  });
});

describe('errors', () => {
  test('errors are PpoMaxErrors with a name, a code and isPpoMaxError() true', async () => {
    const e = expectThrows(() => ppo.gaeSync({ batch: 0, steps: 1, rewards: [], values: [] }), { code: 'ERR_INVALID_ARGUMENT', argument: 'batch' });
    expect((e as any).name).toBe('PpoMaxError');
    expect(ppo.isPpoMaxError(e)).toBe(true);
    const native = await expectRejects(() => ppo.gae({ batch: 1, steps: 2, rewards: [NaN, 0], values: [0, 0] }), { code: 'ERR_NON_FINITE' });
    expect(ppo.isPpoMaxError(native)).toBe(true);
    expect((native as any).name).toBe('PpoMaxError');
    expect(ppo.isPpoMaxError(new Error('x'))).toBe(false);
    expect(ppo.isPpoMaxError(null)).toBe(false);
  });

  test('messages name the argument in JS terms (camelCase), also for native checks', async () => {
    const op = OPS.find((o) => o.name === 'klPenalizedRewards')!;
    const { input, options } = fresh(op);
    (input.refLogprobs as Float32Array)[1] = NaN;
    const e = await expectRejects(() => op.async(input, options), { code: 'ERR_NON_FINITE', argument: 'refLogprobs' });
    expect(e.message).toContain('refLogprobs');
    expect(e.message).not.toContain('ref_logprobs');
  });

  test('an async failure found natively points at the caller in its stack', async () => {
    const promise = callGaeWithNaN();
    const e = await expectRejects(() => promise, { code: 'ERR_NON_FINITE', argument: 'rewards' });
    expect(e.stack).toContain('callGaeWithNaN');
    expect(e.stack).toContain(THIS_FILE);
  });
});

function callGaeWithNaN(): Promise<unknown> {
  return ppo.gae({ batch: 1, steps: 3, rewards: [0, NaN, 1], values: [0, 0, 0] }, { device: 'cpu' });
}
