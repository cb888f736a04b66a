/**
 * Errors of ppo-max. Every failure carries a stable `code` (part of the public API)
 * and, when one argument is to blame, its name in `argument`.
 */

export type ErrorCode =
  | 'ERR_INVALID_ARGUMENT' // a bad option or argument value
  | 'ERR_SHAPE_MISMATCH' // array lengths or dimensions that disagree
  | 'ERR_NON_FINITE' // NaN or Infinity where it makes no sense
  | 'ERR_OUT_OF_RANGE' // a value outside its allowed range (token id, mask value)
  | 'ERR_CUDA_UNAVAILABLE' // 'cuda' requested but not compiled in or no usable GPU
  | 'ERR_CUDA' // a CUDA call failed
  | 'ERR_OUT_OF_MEMORY' // host or device allocation failed
  | 'ERR_NOT_FOUND' // a file or directory that does not exist (a checkpoint path)
  | 'ERR_CORRUPT_FILE' // a file that cannot be parsed (truncated, corrupt header)
  | 'ERR_IO' // reading or writing a file failed
  | 'ERR_DISPOSED' // a call on a model after dispose()
  | 'ERR_BUSY' // a call on a model while another runs (async calls are queued instead)
  | 'ERR_NATIVE_NOT_BUILT' // the native addon is missing: run `npx ppo-max build`
  | 'ERR_INTERRUPTED' // stopped on request (Ctrl-C) after saving its state
  | 'ERR_INTERNAL'; // a bug in ppo-max

export class PpoMaxError extends Error {
  readonly code: ErrorCode;
  readonly argument?: string;

  constructor(code: ErrorCode, message: string, argument?: string) {
    super(message);
    this.name = 'PpoMaxError';
    this.code = code;
    if (argument !== undefined) this.argument = argument;
  }
}

/** True for any error thrown by ppo-max (works across realms, unlike instanceof). */
export function isPpoMaxError(e: unknown): e is PpoMaxError {
  return (
    typeof e === 'object' &&
    e !== null &&
    typeof (e as { code?: unknown }).code === 'string' &&
    (e as { code: string }).code.startsWith('ERR_')
  );
}

// The C++ core names arguments in snake_case; the JS API in camelCase.
const NATIVE_ARGUMENT_NAMES: Record<string, string> = {
  ref_logprobs: 'refLogprobs',
  old_logprobs: 'oldLogprobs',
  grad_logprobs: 'gradLogprobs',
  grad_entropy: 'gradEntropy',
  old_values: 'oldValues',
  kl_coef: 'klCoef',
  clip_eps: 'clip',
};

function jsArgumentName(name: string | undefined, names: Record<string, string>): string | undefined {
  if (name === undefined || name === '') return undefined;
  return names[name] ?? name;
}

/**
 * Turns an error thrown or rejected by the addon into a PpoMaxError. `callSite`, an
 * Error created where the user called the async function, supplies the stack, so an
 * async failure points at the user's code rather than at the event loop.
 * `opArgumentNames` renames native arguments for one op (e.g. values -> scores).
 * A PpoMaxError thrown by our own TypeScript checks passes through with its fields.
 */
export function fromNative(e: unknown, callSite?: Error, opArgumentNames: Record<string, string> = {}): PpoMaxError {
  const names = { ...NATIVE_ARGUMENT_NAMES, ...opArgumentNames };
  const raw = e as { code?: unknown; message?: unknown; argument?: unknown };
  const code = typeof raw?.code === 'string' && raw.code.startsWith('ERR_') ? (raw.code as ErrorCode) : 'ERR_INTERNAL';
  const message = typeof raw?.message === 'string' ? raw.message : String(e);
  const argument = jsArgumentName(typeof raw?.argument === 'string' ? raw.argument : undefined, names);
  let text = message;
  if (argument !== undefined && raw?.argument !== argument && typeof raw?.argument === 'string') {
    text = text.split(raw.argument).join(argument);
  }
  for (const [nativeName, jsName] of Object.entries(NATIVE_ARGUMENT_NAMES)) {
    text = text.split(nativeName).join(jsName);
  }
  const error = new PpoMaxError(code, text, argument);
  if (callSite?.stack) {
    const frames = callSite.stack.split('\n').slice(1).join('\n');
    error.stack = `PpoMaxError [${code}]: ${text}\n${frames}`;
  }
  return error;
}

export function invalidArgument(argument: string, message: string): PpoMaxError {
  return new PpoMaxError('ERR_INVALID_ARGUMENT', message, argument);
}

export function shapeMismatch(argument: string, message: string): PpoMaxError {
  return new PpoMaxError('ERR_SHAPE_MISMATCH', message, argument);
}

export function outOfRange(argument: string, message: string): PpoMaxError {
  return new PpoMaxError('ERR_OUT_OF_RANGE', message, argument);
}
