/**
 * How every op reaches native code: a validated, prepared call that runs either
 * synchronously or on a worker thread behind a promise, with native errors turned
 * into PpoMaxError and async errors given the caller's stack.
 */
import { fromNative } from './errors';
import { NativeAddon, native } from './native';

export type NativeOpName = {
  [K in keyof NativeAddon]: NativeAddon[K] extends (args: object, async: boolean) => unknown ? K : never;
}[keyof NativeAddon];

/** A validated call, ready to run synchronously or asynchronously. */
export interface PreparedOp<R> {
  name: NativeOpName;
  args: object;
  /** Native argument names to report differently in errors (e.g. values -> scores). */
  nativeArgumentNames?: Record<string, string>;
  finish(raw: Record<string, unknown>): R;
}

export async function runAsync<R>(prepare: () => PreparedOp<R>, callSite: Error): Promise<R> {
  let op: PreparedOp<R>;
  try {
    op = prepare();
  } catch (e) {
    throw fromNative(e, callSite);
  }
  let raw: Record<string, unknown>;
  try {
    raw = (await (native()[op.name](op.args, true) as Promise<Record<string, unknown>>)) ?? {};
  } catch (e) {
    throw fromNative(e, callSite, op.nativeArgumentNames);
  }
  return op.finish(raw);
}

export function runSync<R>(prepare: () => PreparedOp<R>): R {
  const op = (() => {
    try {
      return prepare();
    } catch (e) {
      throw fromNative(e);
    }
  })();
  try {
    return op.finish(native()[op.name](op.args, false) as Record<string, unknown>);
  } catch (e) {
    throw fromNative(e, undefined, op.nativeArgumentNames);
  }
}
