import { expect } from '@jest/globals';
/**
 * Assertions shared by the jest suites. Errors and typed arrays made in native code
 * come from another realm under jest, so nothing here uses instanceof: typed arrays
 * are recognized with ArrayBuffer.isView and errors by their stable `code`.
 */
import { Mask, isValid } from './reference';

// Bound once: global lookups are slow inside jest's vm sandbox, and these loops are long.
const { abs, floor } = Math;

export interface Tolerance {
  abs: number;
  rel: number;
}

function fmt(x: number): string {
  return Number.isFinite(x) ? x.toPrecision(9) : String(x);
}

/** Every |actual - expected| <= abs + rel * |expected|; reports the worst offender. */
export function expectClose(actual: ArrayLike<number>, expected: ArrayLike<number>, tol: Tolerance, label = 'values'): void {
  if (actual.length !== expected.length) {
    throw new Error(`${label}: length ${actual.length}, expected ${expected.length}`);
  }
  let bad = 0;
  let worst = -1;
  let worstExcess = 0;
  for (let i = 0; i < actual.length; i++) {
    const a = actual[i];
    const e = expected[i];
    if (Object.is(a, e) || a === e) continue;
    const excess = abs(a - e) - (tol.abs + tol.rel * abs(e));
    if (!(excess <= 0)) {
      bad++;
      if (worst < 0 || !(excess <= worstExcess)) {
        worst = i;
        worstExcess = excess;
      }
    }
  }
  if (bad > 0) {
    throw new Error(
      `${label}: ${bad} of ${actual.length} elements outside abs ${tol.abs} + rel ${tol.rel}; ` +
        `worst at [${worst}]: got ${fmt(actual[worst])}, expected ${fmt(expected[worst])} ` +
        `(|diff| ${fmt(abs(actual[worst] - expected[worst]))})`,
    );
  }
}

export function expectScalarClose(actual: number, expected: number, tol: Tolerance, label = 'value'): void {
  expectClose([actual], [expected], tol, label);
}

/** A Float32Array (checked without instanceof) of the given length. */
export function expectFloat32(x: unknown, length: number): Float32Array {
  expect(ArrayBuffer.isView(x)).toBe(true);
  expect((x as Float32Array).constructor.name).toBe('Float32Array');
  expect((x as Float32Array).length).toBe(length);
  return x as Float32Array;
}

/** Bit-identical float arrays (NaN payloads and signed zeros included). */
export function expectBitEqual(a: Float32Array, b: Float32Array, label = 'values'): void {
  expect(a.length).toBe(b.length);
  const ua = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const ub = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < ua.length; i++) {
    if (ua[i] !== ub[i]) throw new Error(`${label}: differ at [${i}]: ${a[i]} vs ${b[i]}`);
  }
}

/** Outputs at padded positions are exactly 0. `inner` elements per position. */
export function expectZeroWhereMasked(values: ArrayLike<number>, mask: Mask, inner = 1, label = 'values'): void {
  if (!mask) return;
  for (let i = 0; i < values.length; i++) {
    const r = floor(i / inner);
    if (!isValid(mask, r) && values[i] !== 0) {
      throw new Error(`${label}[${i}] is ${values[i]} at a padded position, expected 0`);
    }
  }
}

export interface ErrorShape {
  code: string;
  argument?: string;
  message?: RegExp | string;
}

function checkError(e: unknown, want: ErrorShape): { code: string; argument?: string; message: string; stack?: string } {
  const err = e as { code?: unknown; argument?: unknown; message?: unknown; name?: unknown };
  expect(typeof err).toBe('object');
  expect({ code: err.code, argument: err.argument }).toEqual(
    want.argument === undefined ? { code: want.code, argument: err.argument } : { code: want.code, argument: want.argument },
  );
  if (want.message !== undefined) expect(String(err.message)).toMatch(want.message);
  return e as { code: string; argument?: string; message: string; stack?: string };
}

/** fn() throws a ppo-max error with this code (and argument, when given). */
export function expectThrows(fn: () => unknown, want: ErrorShape): { code: string; argument?: string; message: string; stack?: string } {
  let thrown: unknown;
  let threw = false;
  try {
    fn();
  } catch (e) {
    threw = true;
    thrown = e;
  }
  if (!threw) throw new Error(`expected a ${want.code} error, but nothing was thrown`);
  return checkError(thrown, want);
}

/**
 * The call returns a promise without throwing synchronously, and the promise
 * rejects with a ppo-max error with this code (and argument, when given).
 */
export async function expectRejects(
  call: () => Promise<unknown>,
  want: ErrorShape,
): Promise<{ code: string; argument?: string; message: string; stack?: string }> {
  let promise: Promise<unknown>;
  try {
    promise = call();
  } catch (e) {
    throw new Error(`expected a rejected promise, but the call threw synchronously: ${String((e as Error)?.message ?? e)}`);
  }
  expect(typeof (promise as { then?: unknown })?.then).toBe('function');
  let rejected = false;
  let reason: unknown;
  try {
    await promise;
  } catch (e) {
    rejected = true;
    reason = e;
  }
  if (!rejected) throw new Error(`expected a ${want.code} rejection, but the promise resolved`);
  return checkError(reason, want);
}

/** A plain array of the values with -0 turned into 0 (for toEqual on exact results). */
export function plain(values: ArrayLike<number>): number[] {
  return Array.from(values, (x) => x + 0);
}
