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
  LlamaConfig,
  ResolvedModelConfig,
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
export { Tokenizer } from './tokenizer';
export type { TrainTokenizerOptions } from './tokenizer';
export { SentimentLabeler } from './labeler';
export type { LabelerOptions, Preference } from './labeler';
export { loadCorpus, splitSentences, splitCorpus, sentenceOpening, EMBEDDED_CORPORA } from './corpus';
export type { Corpus, CorpusSplit } from './corpus';
export { Pipeline, PRESETS, STAGES } from './pipeline';
export type { RunOptions, StageName, StageRecord, PolicyEvaluation, RunData } from './pipeline';
export { defaultConfig, applyConfigLayer, PIPELINE_OPTIONS, RUN_SIZES } from './pipeline-config';
export type { PipelineConfig, RunSize, OptionSpec } from './pipeline-config';
