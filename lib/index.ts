/**
 * ppo-max: RLHF with the PPO-max recipe. This entry point exports the RLHF kernels
 * (async and Sync forms), RunningMoments, device selection and the error type.
 */
export { PpoMaxError, isPpoMaxError } from './errors';
export type { ErrorCode } from './errors';
export { cudaAvailable, cudaCompiled, backendInfo, resolveDevice } from './device';
export type { Device } from './device';
export * from './ops';
export { RunningMoments } from './running-moments';
export type { RunningMomentsState, NormalizeOptions } from './running-moments';
export type { FloatArray, TokenArray, MaskArray, SequenceShape } from './validate';
