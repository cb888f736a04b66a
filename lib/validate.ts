/**
 * Argument checks done in TypeScript before any native code runs: types, lengths,
 * shapes and options. (Contents such as NaN, token ids out of range and mask values
 * other than 0/1 are checked natively, before the kernel runs, with the same kind of
 * error naming the argument.)
 */
import { invalidArgument, outOfRange, shapeMismatch } from './errors';

/** Numbers that ops accept where a Float32Array is expected (others are copied in). */
export type FloatArray = Float32Array | Float64Array | ArrayLike<number>;
/** Token ids: an Int32Array is used as is; other arrays of integers are converted. */
export type TokenArray = Int32Array | Uint32Array | Uint16Array | ArrayLike<number>;
/** A [batch, steps] mask of 0 (padding) and 1 (valid). */
export type MaskArray = Float32Array | Uint8Array | ArrayLike<number>;

/** The [batch, steps] layout shared by the sequence ops, with an optional mask or lengths. */
export interface SequenceShape {
  /** Number of sequences. */
  batch: number;
  /** Padded length of each sequence. */
  steps: number;
  /** [batch * steps] of 0/1: 1 where a position holds a real token. */
  mask?: MaskArray;
  /** Per-row count of valid positions, counted from the start of the row (right padding). */
  lengths?: ArrayLike<number>;
}

export function positiveInteger(name: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value <= 0) {
    throw invalidArgument(name, `${name} must be a positive integer, got ${describe(value)}`);
  }
  return value;
}

/** A value as error messages show it: a number, a type, an array's length. */
export function describe(value: unknown): string {
  if (typeof value === 'number') return String(value);
  if (ArrayBuffer.isView(value)) return value.constructor.name;
  if (Array.isArray(value)) return `an array of length ${value.length}`;
  return value === null ? 'null' : typeof value === 'string' ? JSON.stringify(value) : typeof value;
}

/** Typed arrays (not DataView), arrays and other objects with a numeric length. */
export function isArrayLike(value: unknown): value is ArrayLike<unknown> {
  return (
    (ArrayBuffer.isView(value) && !(value instanceof DataView)) ||
    Array.isArray(value) ||
    (typeof value === 'object' && value !== null && typeof (value as { length?: unknown }).length === 'number')
  );
}

function checkLength(name: string, value: ArrayLike<unknown>, length: number, shape: string): void {
  if (value.length !== length) {
    throw shapeMismatch(name, `${name} has ${value.length} elements, expected ${length} (${shape})`);
  }
}

/** A Float32Array of exactly `length` elements: passed through, or copied from numbers. */
export function float32(name: string, value: unknown, length: number, shape: string): Float32Array {
  if (value === undefined || value === null) {
    throw invalidArgument(name, `${name} is required (a Float32Array of ${shape})`);
  }
  if (!isArrayLike(value) || typeof value === 'string') {
    throw invalidArgument(name, `${name} must be a Float32Array or an array of numbers, got ${describe(value)}`);
  }
  checkLength(name, value, length, shape);
  if (ArrayBuffer.isView(value) && (value as Float32Array).constructor?.name === 'Float32Array') {
    return value as Float32Array;
  }
  const out = new Float32Array(length);
  for (let i = 0; i < length; i++) {
    const x = (value as ArrayLike<unknown>)[i];
    if (typeof x !== 'number' && typeof x !== 'bigint') {
      throw invalidArgument(name, `${name}[${i}] must be a number, got ${describe(x)}`);
    }
    out[i] = Number(x);
  }
  return out;
}

/** Token ids as an Int32Array of `length`; integers only (range is checked natively). */
export function tokenIds(name: string, value: unknown, length: number, shape: string): Int32Array {
  if (value === undefined || value === null) {
    throw invalidArgument(name, `${name} is required (an Int32Array of ${shape})`);
  }
  if (!isArrayLike(value) || typeof value === 'string') {
    throw invalidArgument(name, `${name} must be an Int32Array or an array of integers, got ${describe(value)}`);
  }
  checkLength(name, value, length, shape);
  if (ArrayBuffer.isView(value) && (value as Int32Array).constructor?.name === 'Int32Array') {
    return value as Int32Array;
  }
  const out = new Int32Array(length);
  for (let i = 0; i < length; i++) {
    const x = Number((value as ArrayLike<unknown>)[i]);
    if (!Number.isInteger(x) || x < -2147483648 || x > 2147483647) {
      throw invalidArgument(name, `${name}[${i}] must be an integer token id, got ${describe((value as ArrayLike<unknown>)[i])}`);
    }
    out[i] = x;
  }
  return out;
}

/** The mask of a SequenceShape as a Float32Array, or null when every position is valid. */
export function sequenceMask(shape: SequenceShape): Float32Array | null {
  const { batch, steps } = shape;
  if (shape.mask !== undefined && shape.lengths !== undefined) {
    throw invalidArgument('mask', 'give either mask or lengths, not both');
  }
  if (shape.mask !== undefined && shape.mask !== null) {
    return float32('mask', shape.mask, batch * steps, `[batch=${batch}, steps=${steps}]`);
  }
  if (shape.lengths !== undefined && shape.lengths !== null) {
    const lengths = shape.lengths;
    if (!isArrayLike(lengths)) throw invalidArgument('lengths', `lengths must be an array of ${batch} integers`);
    checkLength('lengths', lengths, batch, `[batch=${batch}]`);
    const mask = new Float32Array(batch * steps);
    for (let b = 0; b < batch; b++) {
      const n = lengths[b];
      if (typeof n !== 'number') {
        throw invalidArgument('lengths', `lengths[${b}] must be a number, got ${describe(n)}`);
      }
      if (!Number.isInteger(n) || n < 0 || n > steps) {
        throw outOfRange(
          'lengths',
          `lengths[${b}] is ${describe(lengths[b])}: each length must be an integer in [0, steps=${steps}]`,
        );
      }
      mask.fill(1, b * steps, b * steps + n);
    }
    return mask;
  }
  return null;
}

export interface NumberRange {
  min?: number;
  max?: number;
  /** min itself is not allowed */
  minExclusive?: boolean;
}

/** A finite number option within a range, or the default when undefined. */
export function numberOption(name: string, value: unknown, fallback: number, range: NumberRange = {}): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !Number.isFinite(value)) {
    throw invalidArgument(name, `${name} must be a finite number, got ${describe(value)}`);
  }
  const { min, max, minExclusive } = range;
  if (min !== undefined && (minExclusive ? value <= min : value < min)) {
    throw invalidArgument(name, `${name} must be ${minExclusive ? '>' : '>='} ${min}, got ${value}`);
  }
  if (max !== undefined && value > max) {
    throw invalidArgument(name, `${name} must be <= ${max}, got ${value}`);
  }
  return value;
}

export function booleanOption(name: string, value: unknown, fallback: boolean): boolean {
  if (value === undefined) return fallback;
  if (typeof value !== 'boolean') throw invalidArgument(name, `${name} must be a boolean, got ${describe(value)}`);
  return value;
}

export function choiceOption<T extends string>(name: string, value: unknown, choices: readonly T[], fallback: T): T {
  if (value === undefined) return fallback;
  if (typeof value !== 'string' || !(choices as readonly string[]).includes(value)) {
    throw invalidArgument(name, `${name} must be one of ${choices.map((c) => `'${c}'`).join(', ')}, got ${describe(value)}`);
  }
  return value as T;
}

export function objectArgument(name: string, value: unknown): Record<string, unknown> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw invalidArgument(name, `${name} must be an object, got ${describe(value)}`);
  }
  return value as Record<string, unknown>;
}
