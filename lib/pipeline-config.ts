/**
 * The configuration of a whole RLHF run on real text (lib/pipeline.ts): one table of
 * options, each with its type, its help and its default for each run size. The CLI's
 * flags, its --help and the validation of config files all come from this table.
 */
import { PpoMaxError } from './errors';

export type RunSize = 'tiny' | 'default' | 'large';
export const RUN_SIZES: readonly RunSize[] = ['tiny', 'default', 'large'];

export interface PipelineConfig {
  runDir: string;
  seed: number;
  /** Where the models run: 'auto' (CUDA when usable), 'cpu' or 'cuda'. */
  device: 'auto' | 'cpu' | 'cuda';
  corpus: string;
  tokenizer: string | null;
  vocabSize: number;
  model: { type: 'gpt2' | 'llama'; init: string | null; nEmbd: number; nLayer: number; nHead: number; nKvHead: number; nPositions: number };
  sft: { steps: number; batchSize: number; lr: number; warmupSteps: number; evalEvery: number; checkpointEvery: number };
  prompts: { openingWords: number; heldOutFraction: number; evalCount: number };
  labels: { rounds: number; temperature: number; heldOutFraction: number; countRepeats: boolean };
  rm: { epochs: number; batchSize: number; lr: number; lmCoef: number };
  ppo: {
    presets: string[];
    steps: number;
    numRollouts: number;
    miniBatchSize: number;
    ppoEpochs: number;
    maxNewTokens: number;
    policyLr: number;
    criticLr: number;
    criticPretrainSteps: number;
    evalEvery: number;
    checkpointEvery: number;
    samples: number;
    /** Any PpoOptions, applied over every preset (config file only). */
    options: Record<string, unknown>;
  };
}

type OptionType = 'int' | 'number' | 'string' | 'string?' | 'boolean' | 'list' | 'object';

export interface OptionSpec {
  /** Dotted path in PipelineConfig; the CLI flag is --<key>. */
  key: string;
  type: OptionType;
  help: string;
  /** Per run size; a single value applies to every size. */
  defaults: unknown | Record<RunSize, unknown>;
  min?: number;
  max?: number;
  /** The allowed values of a string option. */
  choices?: string[];
}

const sized = (tiny: unknown, def: unknown, large: unknown) => ({ tiny, default: def, large });

/** Every option of a run: the flags of `ppo-max demo|sft|rm|ppo|...` and the keys of a config file. */
export const PIPELINE_OPTIONS: OptionSpec[] = [
  { key: 'runDir', type: 'string', defaults: 'ppo-max-run', help: 'the run directory: each stage writes its outputs here and is skipped when they are already there with the same settings; an interrupted stage resumes from its checkpoint' },
  { key: 'seed', type: 'int', min: 0, defaults: 1, help: 'seeds every random choice: same seed, same machine, same numbers' },
  { key: 'device', type: 'string', choices: ['auto', 'cpu', 'cuda'], defaults: 'auto', help: "where the models run: 'auto' (CUDA when a GPU is usable, else the CPU), 'cpu' or 'cuda'; not part of any stage's cache key, so a run may resume on another device" },
  { key: 'corpus', type: 'string', defaults: 'moby-dick', help: "the text: 'moby-dick', 'sotu' (State of the Union addresses), 'moby-dick+sotu', or a .txt or .jsonl file of your own" },
  { key: 'tokenizer', type: 'string?', defaults: null, help: 'a tokenizer.json to use (it needs an end-of-text token); default: train a byte-level BPE on the corpus' },
  { key: 'vocabSize', type: 'int', min: 260, defaults: sized(1024, 4096, 8192), help: 'the trained tokenizer\'s vocabulary (256 bytes + merges + <|endoftext|>)' },
  { key: 'model.type', type: 'string', choices: ['gpt2', 'llama'], defaults: 'gpt2', help: "the architecture of a model trained from scratch: 'gpt2' or 'llama' (RMSNorm, rotary positions, SwiGLU, grouped-query attention)" },
  { key: 'model.init', type: 'string?', defaults: null, help: 'a Hugging Face checkpoint directory (GPT-2 or Llama: config.json + safetensors) to start SFT from instead of a new model; needs --tokenizer (its tokenizer.json); model.type and the sizes are then the checkpoint\'s' },
  { key: 'model.nEmbd', type: 'int', min: 8, defaults: sized(48, 192, 384), help: 'GPT width' },
  { key: 'model.nLayer', type: 'int', min: 1, defaults: sized(2, 4, 6), help: 'GPT blocks' },
  { key: 'model.nHead', type: 'int', min: 1, defaults: sized(2, 6, 6), help: 'attention heads (must divide nEmbd)' },
  { key: 'model.nKvHead', type: 'int', min: 0, defaults: 0, help: "key/value heads of a 'llama' model (grouped-query attention; 0: one per attention head)" },
  { key: 'model.nPositions', type: 'int', min: 16, defaults: sized(48, 64, 96), help: 'context length; sentences longer than this are left out' },
  { key: 'sft.steps', type: 'int', min: 1, defaults: sized(30, 1500, 6000), help: 'pretraining/SFT steps on the corpus\'s sentences (packed rows, loss on every token)' },
  { key: 'sft.batchSize', type: 'int', min: 1, defaults: sized(8, 16, 32), help: 'rows of nPositions tokens per SFT step' },
  { key: 'sft.lr', type: 'number', min: 0, defaults: 2e-3, help: 'SFT peak learning rate (warmup, then linear decay to 0)' },
  { key: 'sft.warmupSteps', type: 'int', min: 0, defaults: sized(5, 100, 300), help: 'SFT warmup steps' },
  { key: 'sft.evalEvery', type: 'int', min: 1, defaults: sized(15, 250, 500), help: 'held-out perplexity every this many SFT steps' },
  { key: 'sft.checkpointEvery', type: 'int', min: 1, defaults: sized(1000, 500, 1000), help: 'SFT checkpoint (model, AdamW state) every this many steps' },
  { key: 'prompts.openingWords', type: 'int', min: 1, defaults: 5, help: 'a prompt is the first this many words of a held-out sentence' },
  { key: 'prompts.heldOutFraction', type: 'number', min: 0.01, max: 0.9, defaults: 0.15, help: 'share of sentences held out from SFT: their openings are the prompts' },
  { key: 'prompts.evalCount', type: 'int', min: 1, defaults: sized(8, 64, 128), help: 'held-out prompts kept for evaluation (never labeled or trained on)' },
  { key: 'labels.rounds', type: 'int', min: 1, defaults: sized(1, 3, 4), help: 'passes over the prompts, each sampling two continuations per prompt for the labeler to compare' },
  { key: 'labels.temperature', type: 'number', min: 0.05, defaults: 1, help: 'sampling temperature of the continuations to label' },
  { key: 'labels.heldOutFraction', type: 'number', min: 0.01, max: 0.9, defaults: 0.15, help: 'share of preference pairs held out to measure the reward model\'s accuracy' },
  { key: 'labels.countRepeats', type: 'boolean', defaults: false, help: 'the labeler counts every repetition of a sentiment word (plain AFINN sum) instead of each distinct word once' },
  { key: 'rm.epochs', type: 'int', min: 1, defaults: sized(1, 3, 3), help: 'passes of reward-model training over the training pairs' },
  { key: 'rm.batchSize', type: 'int', min: 1, defaults: sized(16, 32, 32), help: 'pairs per reward-model step' },
  { key: 'rm.lr', type: 'number', min: 0, defaults: 1e-3, help: 'reward-model learning rate' },
  { key: 'rm.lmCoef', type: 'number', min: 0, defaults: 1, help: 'weight of the LM loss on chosen responses in the reward-model loss (the paper\'s 1)' },
  { key: 'ppo.presets', type: 'list', defaults: ['ppoMax', 'vanilla'], help: 'the PPO presets to run from the same start, comma-separated: ppoMax, vanilla, ppoPtx' },
  { key: 'ppo.steps', type: 'int', min: 1, defaults: sized(3, 100, 300), help: 'PPO steps per preset' },
  { key: 'ppo.numRollouts', type: 'int', min: 1, defaults: sized(8, 32, 64), help: 'prompts per PPO step' },
  { key: 'ppo.miniBatchSize', type: 'int', min: 1, defaults: sized(4, 16, 16), help: 'rollouts per PPO mini-batch' },
  { key: 'ppo.ppoEpochs', type: 'int', min: 1, defaults: sized(1, 2, 2), help: 'passes over each batch of rollouts' },
  { key: 'ppo.maxNewTokens', type: 'int', min: 1, defaults: sized(12, 24, 32), help: 'the longest response, in tokens (labels and PPO)' },
  { key: 'ppo.policyLr', type: 'number', min: 0, defaults: 1e-4, help: 'policy learning rate (the presets carry the paper\'s 7B rates, far too small for a small model)' },
  { key: 'ppo.criticLr', type: 'number', min: 0, defaults: 3e-4, help: 'critic learning rate' },
  { key: 'ppo.criticPretrainSteps', type: 'int', min: 0, defaults: sized(2, 20, 50), help: 'critic pre-training passes (presets with criticPretrain)' },
  { key: 'ppo.evalEvery', type: 'int', min: 1, defaults: sized(2, 10, 20), help: 'evaluate on the held-out prompts (proxy and gold reward, KL, perplexity, samples) every this many steps' },
  { key: 'ppo.checkpointEvery', type: 'int', min: 1, defaults: sized(1000, 20, 50), help: 'save the trainer (four models, optimizers, state) every this many steps' },
  { key: 'ppo.samples', type: 'int', min: 0, defaults: sized(3, 6, 8), help: 'evaluation prompts whose responses the report shows' },
  { key: 'ppo.options', type: 'object', defaults: {}, help: 'any PpoOptions applied over every preset, e.g. {"klCoef": 0.1} (config file only)' },
];

function setPath(target: Record<string, unknown>, key: string, value: unknown): void {
  const parts = key.split('.');
  let o = target;
  for (const p of parts.slice(0, -1)) {
    if (typeof o[p] !== 'object' || o[p] === null) o[p] = {};
    o = o[p] as Record<string, unknown>;
  }
  o[parts[parts.length - 1]] = value;
}

function getPath(source: Record<string, unknown>, key: string): unknown {
  let o: unknown = source;
  for (const p of key.split('.')) {
    if (typeof o !== 'object' || o === null) return undefined;
    o = (o as Record<string, unknown>)[p];
  }
  return o;
}

function defaultFor(spec: OptionSpec, size: RunSize): unknown {
  const d = spec.defaults;
  if (d !== null && typeof d === 'object' && !Array.isArray(d) && 'default' in (d as object) && 'tiny' in (d as object)) return (d as Record<RunSize, unknown>)[size];
  return Array.isArray(d) ? [...d] : d && typeof d === 'object' ? { ...(d as object) } : d;
}

/** The defaults of a run size. */
export function defaultConfig(size: RunSize = 'default'): PipelineConfig {
  const c: Record<string, unknown> = {};
  for (const spec of PIPELINE_OPTIONS) setPath(c, spec.key, defaultFor(spec, size));
  return c as unknown as PipelineConfig;
}

function configError(where: string, message: string): PpoMaxError {
  return new PpoMaxError('ERR_INVALID_ARGUMENT', `${where}: ${message}`, where);
}

/** Checks and converts one option's value (strings from the command line included). */
export function parseOptionValue(spec: OptionSpec, raw: unknown, where: string): unknown {
  const fromText = typeof raw === 'string';
  switch (spec.type) {
    case 'int':
    case 'number': {
      const n = fromText ? Number(raw) : raw;
      if (typeof n !== 'number' || !Number.isFinite(n) || (fromText && (raw as string).trim() === '')) throw configError(where, `${spec.key} must be a number, got ${JSON.stringify(raw)}`);
      if (spec.type === 'int' && !Number.isInteger(n)) throw configError(where, `${spec.key} must be an integer, got ${n}`);
      if (spec.min !== undefined && n < spec.min) throw configError(where, `${spec.key} must be >= ${spec.min}, got ${n}`);
      if (spec.max !== undefined && n > spec.max) throw configError(where, `${spec.key} must be <= ${spec.max}, got ${n}`);
      return n;
    }
    case 'string':
      if (typeof raw !== 'string' || raw === '') throw configError(where, `${spec.key} must be a non-empty string`);
      if (spec.choices && !spec.choices.includes(raw)) throw configError(where, `${spec.key} must be one of ${spec.choices.join(', ')}, got ${JSON.stringify(raw)}`);
      return raw;
    case 'string?':
      if (raw === null || raw === 'null' || raw === '') return null;
      if (typeof raw !== 'string') throw configError(where, `${spec.key} must be a string or null`);
      return raw;
    case 'boolean':
      if (raw === true || raw === 'true') return true;
      if (raw === false || raw === 'false') return false;
      throw configError(where, `${spec.key} must be true or false, got ${JSON.stringify(raw)}`);
    case 'list': {
      const list = fromText ? (raw as string).split(',').map((s) => s.trim()).filter((s) => s !== '') : raw;
      if (!Array.isArray(list) || list.length === 0 || list.some((s) => typeof s !== 'string')) throw configError(where, `${spec.key} must be a non-empty list of names`);
      return list;
    }
    case 'object': {
      let v = raw;
      if (fromText) {
        try {
          v = JSON.parse(raw as string);
        } catch {
          throw configError(where, `${spec.key} must be a JSON object`);
        }
      }
      if (typeof v !== 'object' || v === null || Array.isArray(v)) throw configError(where, `${spec.key} must be an object`);
      return v;
    }
  }
}

/**
 * Layers settings over a config: `layer` is a (partial) PipelineConfig, nested or with
 * dotted keys; unknown keys and bad values give ERR_INVALID_ARGUMENT naming them.
 */
export function applyConfigLayer(base: PipelineConfig, layer: Record<string, unknown>, where: string): PipelineConfig {
  const out = JSON.parse(JSON.stringify(base)) as Record<string, unknown>;
  const flat: [string, unknown][] = [];
  const walk = (o: Record<string, unknown>, prefix: string) => {
    for (const [k, v] of Object.entries(o)) {
      const key = prefix ? `${prefix}.${k}` : k;
      if (PIPELINE_OPTIONS.some((s) => s.key === key)) flat.push([key, v]);
      else if (v !== null && typeof v === 'object' && !Array.isArray(v) && PIPELINE_OPTIONS.some((s) => s.key.startsWith(`${key}.`))) walk(v as Record<string, unknown>, key);
      else throw configError(where, `unknown option '${key}' (the options: ${PIPELINE_OPTIONS.map((s) => s.key).join(', ')})`);
    }
  };
  walk(layer, '');
  for (const [key, v] of flat) {
    const spec = PIPELINE_OPTIONS.find((s) => s.key === key)!;
    setPath(out, key, parseOptionValue(spec, v, where));
  }
  const c = out as unknown as PipelineConfig;
  if (c.model.nEmbd % c.model.nHead !== 0) throw configError(where, `model.nHead (${c.model.nHead}) must divide model.nEmbd (${c.model.nEmbd})`);
  if (c.ppo.maxNewTokens + 8 > c.model.nPositions) throw configError(where, `ppo.maxNewTokens (${c.ppo.maxNewTokens}) leaves too little room for prompts in model.nPositions (${c.model.nPositions})`);
  return c;
}

/** The value of an option in a config (for --help and summaries). */
export function optionValue(config: PipelineConfig, key: string): unknown {
  return getPath(config as unknown as Record<string, unknown>, key);
}
