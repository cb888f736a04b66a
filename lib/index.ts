/**
 * ppo-max: RLHF with the PPO-max recipe. This entry point exports the RLHF kernels
 * (async and Sync forms), the GPT-2 engine (Model), RunningMoments, device selection
 * and the error type.
 */
export { PpoMaxError, isPpoMaxError } from './errors';
export type { ErrorCode } from './errors';
export { cudaAvailable, cudaCompiled, backendInfo, resolveDevice } from './device';
export type { Device } from './device';
export * from './ops';
export { RunningMoments } from './running-moments';
export type { RunningMomentsState, NormalizeOptions } from './running-moments';
export type { FloatArray, TokenArray, MaskArray, SequenceShape } from './validate';
export { Model } from './model';
export type {
  GPT2Config,
  ModelDevice,
  CreateModelOptions,
  LoadModelOptions,
  TokenBatch,
  TokenBatchInput,
  FloatInput,
  ForwardOptions,
  ForwardResult,
  BackwardGradients,
  LmLossResult,
  StepOptions,
  StepResult,
  GenerateOptions,
  GenerateResult,
  ModelMemory,
} from './model';
export { PpoTrainer, SftTrainer, RewardModelTrainer, scoreSequences, estimatePpoMemory } from './trainers';
export type {
  Experience,
  RewardSample,
  RewardFunction,
  Stats,
  ProgressOptions,
  PromptResponse,
  PpoTrainerArgs,
  PpoStepResult,
  CriticPretrainResult,
  SftOptions,
  PreferencePair,
  RewardModelOptions,
  TrainerMemoryEstimate,
} from './trainers';
export { ppoMax, vanilla, ppoPtx, resolvePpoOptions } from './ppo-options';
export type { PpoOptions, OptimizerOptions, LrSchedule, KlEstimator, ResolvedPpoOptions } from './ppo-options';
export { AlarmMonitor } from './monitor';
export type { Alarm, AlarmKind, AlarmThresholds } from './monitor';
