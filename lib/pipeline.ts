/**
 * A whole RLHF run on real English text, stage by stage, each cached in a run directory:
 *
 *   tokenizer  byte-level BPE trained on the corpus's pretraining sentences   tokenizer/
 *   sft        a small GPT pretrained on those sentences (packed rows)        sft/
 *   labels     two sampled continuations per held-out prompt, compared by    labels/
 *              the simulated labeler (AFINN sentiment, lib/labeler.ts)
 *   rm         the reward model (the SFT model plus a value head) on the pairs rm/
 *   ppo        per preset (ppoMax, vanilla): the critic from the reward model,ppo-<preset>/
 *              pre-trained where the preset says so, then PPO from the SFT model
 *   report     report.html and summary.json                                   report.html
 *
 * A stage is skipped when its done.json carries the key of the settings it depends on
 * (its own and its inputs'); changed settings rerun it. SFT and PPO save checkpoints as
 * they go (and when asked to stop): the next run resumes from there.
 */
import * as crypto from 'crypto';
import * as fs from 'fs';
import * as path from 'path';

import { Corpus, CorpusSplit, loadCorpus, sentenceOpening, splitCorpus } from './corpus';
import { PpoMaxError } from './errors';
import { SentimentLabeler } from './labeler';
import { GPT2Config, Model } from './model';
import { JsonlLog, ProgressBar, writeFileAtomic } from './monitor';
import { PipelineConfig } from './pipeline-config';
import { PpoOptions, ppoMax, ppoPtx, vanilla } from './ppo-options';
import { mulberry32, shuffleInPlace } from './random';
import { readJsonl, writeReport } from './report';
import { Tokenizer } from './tokenizer';
import { Experience, PpoTrainer, PreferencePair, RewardModelTrainer, SftTrainer, Stats } from './trainers';

export const PRESETS: Record<string, Readonly<PpoOptions>> = { ppoMax, vanilla, ppoPtx };

export type StageName = 'tokenizer' | 'sft' | 'labels' | 'rm' | 'ppo' | 'report';
export const STAGES: readonly StageName[] = ['tokenizer', 'sft', 'labels', 'rm', 'ppo', 'report'];

export interface RunOptions {
  /** The stages to run (default all). Stages before them must be done already. */
  stages?: StageName[];
  /** Rerun these stages even when cached. */
  force?: boolean;
  /** Progress lines (default console.log). */
  log?: (line: string) => void;
  /** Progress bars on stderr (default: when stderr is a terminal). */
  progressBar?: boolean | 'auto';
  /** Polled between steps: true saves a checkpoint and stops with ERR_INTERRUPTED. */
  shouldStop?: () => boolean;
}

/** What a finished stage records in its done.json. */
export interface StageRecord {
  stage: string;
  key: string;
  seconds: number;
  finishedAt: string;
  summary: Record<string, unknown>;
}

/** One evaluation of a policy on the held-out prompts. */
export interface PolicyEvaluation {
  step: number;
  proxy: number;
  gold: number;
  kl: number;
  perplexity: number;
  length: number;
  repetition: number;
  samples: { prompt: string; response: string; proxy: number; gold: number }[];
}

const mean = (xs: ArrayLike<number>) => {
  let s = 0;
  for (let i = 0; i < xs.length; i++) s += xs[i];
  return xs.length === 0 ? 0 : s / xs.length;
};

function hash(value: unknown): string {
  return crypto.createHash('sha256').update(JSON.stringify(value)).digest('hex').slice(0, 16);
}

function writeJson(file: string, value: unknown): void {
  writeFileAtomic(file, `${JSON.stringify(value, (_k, v) => (typeof v === 'number' && !Number.isFinite(v) ? String(v) : v), 2)}\n`);
}

export function readJson<T>(file: string): T {
  if (!fs.existsSync(file)) throw new PpoMaxError('ERR_NOT_FOUND', `${file}: not found`, 'runDir');
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8')) as T;
  } catch (e) {
    throw new PpoMaxError('ERR_CORRUPT_FILE', `${file}: not valid JSON (${(e as Error).message})`, 'runDir');
  }
}

function appendJsonl(file: string, record: object): void {
  new JsonlLog(file).write(record as Record<string, unknown>);
}

/** Keeps the records of a JSONL log up to a step (a resumed stage rewrites what follows). */
function truncateJsonl(file: string, maxStep: number): void {
  if (!fs.existsSync(file)) return;
  const kept = readJsonl<{ step?: number }>(file).filter((r) => (r.step ?? 0) <= maxStep);
  fs.writeFileSync(file, kept.map((r) => `${JSON.stringify(r)}\n`).join(''));
}

function interrupted(where: string): PpoMaxError {
  return new PpoMaxError('ERR_INTERRUPTED', `stopped during ${where}; the state is saved: run the same command again to resume`);
}

/** The settings each stage depends on (its cache key is their hash plus its inputs' keys). */
function stageKeys(c: PipelineConfig): Record<string, string> {
  const tokenizer = hash({ corpus: c.corpus, tokenizer: c.tokenizer, vocabSize: c.vocabSize, seed: c.seed, heldOut: c.prompts.heldOutFraction, v: 1 });
  const sft = hash({ tokenizer, model: c.model, sft: { ...c.sft, evalEvery: 0, checkpointEvery: 0 }, v: 1 });
  const labels = hash({ sft, prompts: c.prompts, labels: c.labels, maxNewTokens: c.ppo.maxNewTokens, v: 1 });
  const rm = hash({ labels, rm: c.rm, v: 1 });
  const keys: Record<string, string> = { tokenizer, sft, labels, rm };
  for (const preset of c.ppo.presets) keys[`ppo-${preset}`] = hash({ rm, preset, ppo: { ...c.ppo, presets: undefined, checkpointEvery: 0 }, v: 1 });
  return keys;
}

/** The sentences, the tokenizer and the prompts of a run (rebuilt from the corpus; cheap). */
export interface RunData {
  tokenizer: Tokenizer;
  eos: number;
  train: string[];
  heldOut: string[];
  /** Prompt texts: the openings of held-out sentences; the first evalCount are for evaluation only. */
  evalPrompts: string[];
  trainPrompts: string[];
}

export class Pipeline {
  private data: RunData | null = null;
  private split: { corpus: Corpus; split: CorpusSplit } | null = null;
  private readonly log: (line: string) => void;
  private readonly bar: ProgressBar | null;
  private readonly shouldStop: () => boolean;
  readonly keys: Record<string, string>;
  readonly labeler: SentimentLabeler;

  constructor(readonly config: PipelineConfig, private readonly o: RunOptions = {}) {
    for (const p of config.ppo.presets) {
      if (!PRESETS[p]) throw new PpoMaxError('ERR_INVALID_ARGUMENT', `ppo.presets: unknown preset '${p}' (the presets: ${Object.keys(PRESETS).join(', ')})`, 'ppo.presets');
    }
    if (config.model.init && !config.tokenizer) {
      throw new PpoMaxError('ERR_INVALID_ARGUMENT', "model.init needs the checkpoint's tokenizer: give --tokenizer <its tokenizer.json>", 'model.init');
    }
    this.log = o.log ?? ((line) => console.log(line));
    this.bar = ProgressBar.enabled(o.progressBar) ? new ProgressBar() : null;
    this.shouldStop = o.shouldStop ?? (() => false);
    this.keys = stageKeys(config);
    this.labeler = new SentimentLabeler({ countRepeats: config.labels.countRepeats });
  }

  dir(...parts: string[]): string {
    return path.join(this.config.runDir, ...parts);
  }

  /** The done.json of a stage when it is done with the current settings, else null. */
  done(stage: string): StageRecord | null {
    const file = this.dir(stage, 'done.json');
    if (!fs.existsSync(file)) return null;
    const r = readJson<StageRecord>(file);
    return r.key === this.keys[stage] ? r : null;
  }

  private need(stage: string, command: string): StageRecord {
    const r = this.done(stage);
    if (!r) {
      const stale = fs.existsSync(this.dir(stage, 'done.json'));
      throw new PpoMaxError(
        'ERR_NOT_FOUND',
        `the ${stage} stage ${stale ? 'was run with other settings' : 'has not run'} in ${this.config.runDir}: run \`ppo-max ${command}\` (or \`ppo-max demo\`) with these settings first`,
        'runDir',
      );
    }
    return r;
  }

  /** Runs the stages asked for, skipping those already done with these settings. */
  async run(): Promise<Record<string, StageRecord>> {
    const stages = this.o.stages ?? [...STAGES];
    fs.mkdirSync(this.config.runDir, { recursive: true });
    writeJson(this.dir('config.json'), this.config);
    const records: Record<string, StageRecord> = {};
    const stage = async (name: string, work: () => Promise<Record<string, unknown>>) => {
      const cached = this.o.force ? null : this.done(name);
      if (cached) {
        this.log(`${name}: done already (${this.dir(name)}); skipped`);
        records[name] = cached;
        return;
      }
      const t0 = Date.now();
      const summary = await work();
      const r: StageRecord = { stage: name, key: this.keys[name], seconds: (Date.now() - t0) / 1000, finishedAt: new Date().toISOString(), summary };
      writeJson(this.dir(name, 'done.json'), r);
      records[name] = r;
    };
    if (stages.includes('tokenizer')) await stage('tokenizer', () => this.tokenizerStage());
    if (stages.includes('sft')) await stage('sft', () => this.sftStage());
    if (stages.includes('labels')) await stage('labels', () => this.labelsStage());
    if (stages.includes('rm')) await stage('rm', () => this.rewardModelStage());
    if (stages.includes('ppo')) for (const p of this.config.ppo.presets) await stage(`ppo-${p}`, () => this.ppoStage(p));
    if (stages.includes('report')) {
      const file = await writeReport(this);
      this.log(`report: ${file}`);
    }
    return records;
  }

  // ---- data ------------------------------------------------------------------------------------

  /** The corpus split, the tokenizer (trained by the tokenizer stage) and the prompts. */
  async runData(): Promise<RunData> {
    if (this.data) return this.data;
    const c = this.config;
    const { split } = this.corpusSplit();
    this.need('tokenizer', 'sft');
    const tokenizer = Tokenizer.load(this.dir('tokenizer', 'tokenizer.json'));
    const eos = tokenizer.eosTokenId!;
    const prompts = split.heldOut.map((s) => sentenceOpening(s, c.prompts.openingWords));
    const evalCount = Math.min(c.prompts.evalCount, Math.floor(prompts.length / 2));
    this.data = { tokenizer, eos, train: split.train, heldOut: split.heldOut, evalPrompts: prompts.slice(0, evalCount), trainPrompts: prompts.slice(evalCount) };
    return this.data;
  }

  /** Prompt token ids: end-of-text (as between sentences in pretraining), then the opening. */
  async encodePrompts(texts: string[]): Promise<Int32Array[]> {
    const { tokenizer, eos } = await this.runData();
    const room = this.config.model.nPositions - this.config.ppo.maxNewTokens - 1;
    return (await tokenizer.encodeBatch(texts)).map((ids) => Int32Array.from([eos, ...ids.slice(0, room)]));
  }

  private progress(stage: string, done: number, total: number): void {
    this.bar?.update(stage, done, total);
  }

  // ---- stages ----------------------------------------------------------------------------------

  /** The corpus and its seeded split (read once per Pipeline). */
  private corpusSplit(): { corpus: Corpus; split: CorpusSplit } {
    if (!this.split) {
      const corpus = loadCorpus(this.config.corpus);
      this.split = { corpus, split: splitCorpus(corpus, { heldOutFraction: this.config.prompts.heldOutFraction, seed: this.config.seed }) };
    }
    return this.split;
  }

  private async tokenizerStage(): Promise<Record<string, unknown>> {
    const c = this.config;
    const { corpus, split } = this.corpusSplit();
    let tokenizer: Tokenizer;
    if (c.tokenizer) {
      tokenizer = Tokenizer.load(c.tokenizer);
      if (tokenizer.eosTokenId === null) {
        throw new PpoMaxError('ERR_INVALID_ARGUMENT', `${c.tokenizer}: the tokenizer has no end-of-text token (<|endoftext|>, </s>, <eos>, ...); the pipeline needs one`, 'tokenizer');
      }
    } else {
      tokenizer = await Tokenizer.train(split.train, { vocabSize: c.vocabSize });
    }
    tokenizer.save(this.dir('tokenizer', 'tokenizer.json'));
    const sample = split.train.slice(0, 500).join(' ');
    const charsPerToken = sample.length / Math.max(1, (await tokenizer.encode(sample)).length);
    const summary = {
      corpus: corpus.name,
      documents: corpus.documents.length,
      sentencesTrain: split.train.length,
      sentencesHeldOut: split.heldOut.length,
      vocabSize: tokenizer.vocabSize,
      eosTokenId: tokenizer.eosTokenId,
      charsPerToken,
      trained: !c.tokenizer,
    };
    this.log(
      `tokenizer: ${corpus.name}, ${split.train.length} sentences for pretraining, ${split.heldOut.length} held out; ` +
        `${c.tokenizer ? 'loaded' : 'trained'} ${tokenizer.vocabSize} tokens (${charsPerToken.toFixed(2)} chars/token)`,
    );
    return summary;
  }

  /** The config of a model trained from scratch (model.type, model.* sizes). */
  private newModelConfig(vocabSize: number, eos: number): GPT2Config {
    const m = this.config.model;
    const base: GPT2Config = { vocabSize, nPositions: m.nPositions, nEmbd: m.nEmbd, nLayer: m.nLayer, nHead: m.nHead, bosTokenId: eos, eosTokenId: eos };
    if (m.type !== 'llama') return base;
    // SwiGLU's width: 8/3 of the width (the parameters of GPT-2's 4C GELU MLP), to a multiple of 16.
    return { ...base, modelType: 'llama', nKvHead: m.nKvHead > 0 ? m.nKvHead : m.nHead, intermediateSize: Math.max(16, Math.round((8 * m.nEmbd) / 3 / 16) * 16) };
  }

  /** model.init: a user's checkpoint, checked against the tokenizer and the context length. */
  private async initialModel(dir: string, tokenizerVocab: number): Promise<Model> {
    const c = this.config;
    const model = await Model.load(dir, { device: c.device });
    if (model.config.vocabSize < tokenizerVocab) {
      await model.dispose();
      throw new PpoMaxError('ERR_SHAPE_MISMATCH', `model.init: the checkpoint's vocabulary (${model.config.vocabSize}) is smaller than the tokenizer's (${tokenizerVocab})`, 'model.init');
    }
    if (model.config.nPositions < c.model.nPositions) {
      await model.dispose();
      throw new PpoMaxError('ERR_OUT_OF_RANGE', `model.nPositions (${c.model.nPositions}) exceeds the checkpoint's context (${model.config.nPositions}): lower --model.nPositions`, 'model.nPositions');
    }
    return model;
  }

  private async sftStage(): Promise<Record<string, unknown>> {
    const c = this.config;
    const data = await this.runData();
    const { tokenizer, eos } = data;
    const maxLen = c.model.nPositions - 1;
    // Sentences longer than the context are cut into pieces that fit (with their eos).
    const pieces = (rows: Int32Array[]) => rows.flatMap((ids) => {
      const out: Int32Array[] = [];
      for (let i = 0; i < ids.length; i += maxLen) out.push(ids.slice(i, i + maxLen));
      return out;
    });
    const encoded = pieces(await tokenizer.encodeBatch(data.train));
    const heldOutIds = pieces(await tokenizer.encodeBatch(data.heldOut.slice(0, 256)));
    const heldOut = heldOutIds.map((ids) => ({ prompt: ids, response: [] as number[] }));
    const tokensPerStep = c.sft.batchSize * c.model.nPositions;
    const sftOptions = {
      optimizer: { lr: c.sft.lr, schedule: 'warmupLinearDecay' as const, warmupSteps: c.sft.warmupSteps, totalSteps: c.sft.steps + 1, weightDecay: 0.01, maxGradNorm: 1.0 },
      lossOn: 'all' as const,
      packing: 'pack' as const,
      logFile: this.dir('sft', 'log.jsonl'),
    };
    const checkpoint = this.dir('sft', 'checkpoint');
    const progressFile = this.dir('sft', 'progress.json');
    let trainer: SftTrainer;
    let cursor = 0;
    let start: Stats;
    const resumeFrom = fs.existsSync(progressFile) ? readJson<{ key: string; step: number; cursor: number; start: Stats }>(progressFile) : null;
    if (resumeFrom && resumeFrom.key === this.keys.sft && fs.existsSync(path.join(checkpoint, 'trainer.json'))) {
      trainer = await SftTrainer.resume(checkpoint, { logFile: sftOptions.logFile, device: c.device });
      cursor = resumeFrom.cursor;
      start = resumeFrom.start;
      truncateJsonl(sftOptions.logFile, trainer.stepCount);
      this.log(`sft: resuming at step ${trainer.stepCount} of ${c.sft.steps}`);
    } else {
      fs.rmSync(this.dir('sft'), { recursive: true, force: true });
      fs.mkdirSync(this.dir('sft'), { recursive: true });
      const model = c.model.init ? await this.initialModel(c.model.init, tokenizer.vocabSize) : await Model.create(this.newModelConfig(tokenizer.vocabSize, eos), { seed: c.seed, device: c.device });
      trainer = SftTrainer.create(model, sftOptions);
      start = await trainer.evaluate(heldOut);
      appendJsonl(sftOptions.logFile, { kind: 'sftEval', step: 0, ...start });
      this.log(`sft: ${model.parameterCount().toLocaleString('en-US')} parameters, ${encoded.length} sentences; held-out perplexity ${start.perplexity.toFixed(1)} at the start`);
    }
    // A seeded order per epoch; each step takes the next sentences that fill batchSize rows.
    const orderFor = (epoch: number) => shuffleInPlace(encoded.map((_, i) => i), mulberry32((c.seed * 1000003 + epoch) >>> 0 || 1));
    let epoch = Math.floor(cursor / encoded.length);
    let order = orderFor(epoch);
    const t0 = Date.now();
    let tokens = 0;
    const save = async () => {
      await trainer.save(checkpoint);
      writeJson(progressFile, { key: this.keys.sft, step: trainer.stepCount, cursor, start });
    };
    while (trainer.stepCount < c.sft.steps) {
      if (this.shouldStop()) {
        await save();
        throw interrupted(`sft (step ${trainer.stepCount} of ${c.sft.steps})`);
      }
      const examples: { prompt: Int32Array; response: number[] }[] = [];
      let budget = tokensPerStep;
      let rowFill = 0, rows = 1;
      while (true) {
        if (Math.floor(cursor / encoded.length) !== epoch) {
          epoch = Math.floor(cursor / encoded.length);
          order = orderFor(epoch);
        }
        const ids = encoded[order[cursor % encoded.length]];
        const need = ids.length + 1;
        if (rowFill + need > c.model.nPositions) {
          if (rows === c.sft.batchSize) break;
          rows += 1;
          rowFill = 0;
        }
        rowFill += need;
        budget -= need;
        examples.push({ prompt: ids, response: [] });
        cursor += 1;
      }
      const stats = await trainer.step(examples);
      tokens += tokensPerStep - budget;
      const step = trainer.stepCount;
      this.progress('sft', step, c.sft.steps);
      if (step % c.sft.evalEvery === 0 || step === c.sft.steps) {
        const ev = await trainer.evaluate(heldOut);
        appendJsonl(sftOptions.logFile, { kind: 'sftEval', step, ...ev });
        this.log(`sft: step ${step}/${c.sft.steps}, train loss ${stats.loss.toFixed(3)}, held-out perplexity ${ev.perplexity.toFixed(1)}`);
      }
      if (step % c.sft.checkpointEvery === 0 && step < c.sft.steps) await save();
    }
    const end = await trainer.evaluate(heldOut);
    await trainer.model.save(this.dir('sft', 'model'));
    const seconds = (Date.now() - t0) / 1000;
    await trainer.model.dispose();
    fs.rmSync(checkpoint, { recursive: true, force: true });
    fs.rmSync(progressFile, { force: true });
    const epochs = cursor / encoded.length;
    this.log(`sft: held-out perplexity ${start.perplexity.toFixed(1)} -> ${end.perplexity.toFixed(1)} (${epochs.toFixed(1)} epochs, ${(tokens / Math.max(seconds, 1e-9)).toFixed(0)} tokens/s)`);
    return { perplexityStart: start.perplexity, perplexityEnd: end.perplexity, epochs, sentences: encoded.length, tokensPerSecond: tokens / Math.max(seconds, 1e-9) };
  }

  /** Decoded responses of a batch of generated or rolled-out rows. */
  private async decodeResponses(rows: Int32Array[]): Promise<string[]> {
    const { tokenizer, eos } = await this.runData();
    return tokenizer.decodeBatch(rows.map((r) => Array.from(r).filter((t) => t !== eos)));
  }

  private async labelsStage(): Promise<Record<string, unknown>> {
    const c = this.config;
    this.need('sft', 'sft');
    const data = await this.runData();
    const sft = await Model.load(this.dir('sft', 'model'), { trainable: false, device: this.config.device });
    fs.rmSync(this.dir('labels'), { recursive: true, force: true });
    fs.mkdirSync(this.dir('labels'), { recursive: true });
    const prompts = data.trainPrompts;
    const ids = await this.encodePrompts(prompts);
    const pairs: { prompt: string; promptIds: number[]; chosen: string; chosenIds: number[]; rejected: string; rejectedIds: number[]; scores: [number, number] }[] = [];
    let compared = 0;
    const golds: number[] = [];
    const chunk = 64;
    const total = c.labels.rounds * Math.ceil(prompts.length / chunk);
    let done = 0;
    for (let round = 0; round < c.labels.rounds; round++) {
      for (let i = 0; i < prompts.length; i += chunk) {
        if (this.shouldStop()) throw interrupted('labels (it restarts from the beginning: it is quick)');
        const batch = ids.slice(i, i + chunk);
        const gen = (k: number) =>
          sft.generate(batch, { maxNewTokens: c.ppo.maxNewTokens, temperature: c.labels.temperature, seed: c.seed * 7919 + round * 1000003 + i * 2 + k, stopTokens: [data.eos] });
        const [a, b] = [await gen(0), await gen(1)];
        const [ta, tb] = [await this.decodeResponses(a.tokens), await this.decodeResponses(b.tokens)];
        for (let r = 0; r < batch.length; r++) {
          compared += 1;
          const pref = this.labeler.prefer(ta[r], tb[r]);
          golds.push(this.labeler.score(ta[r]));
          if (!pref) continue;
          const [win, lose] = pref.choice === 0 ? [[ta[r], a.tokens[r]], [tb[r], b.tokens[r]]] : [[tb[r], b.tokens[r]], [ta[r], a.tokens[r]]];
          pairs.push({
            prompt: prompts[i + r], promptIds: Array.from(batch[r]),
            chosen: win[0] as string, chosenIds: Array.from(win[1] as Int32Array),
            rejected: lose[0] as string, rejectedIds: Array.from(lose[1] as Int32Array),
            scores: pref.choice === 0 ? pref.scores : [pref.scores[1], pref.scores[0]],
          });
        }
        this.progress('labels', ++done, total);
      }
    }
    await sft.dispose();
    // A seeded shuffle, then the held-out tail.
    shuffleInPlace(pairs, mulberry32((c.seed * 31337) >>> 0 || 1));
    const heldOut = Math.max(1, Math.round(pairs.length * c.labels.heldOutFraction));
    if (pairs.length < 4) throw new PpoMaxError('ERR_INVALID_ARGUMENT', `labels: only ${pairs.length} of ${compared} comparisons had a preference; use more prompts (a larger corpus or labels.rounds)`, 'labels.rounds');
    const file = this.dir('labels', 'pairs.jsonl');
    fs.writeFileSync(file, pairs.map((p, i) => `${JSON.stringify({ split: i < pairs.length - heldOut ? 'train' : 'heldOut', ...p })}\n`).join(''));
    const summary = { compared, pairs: pairs.length, ties: compared - pairs.length, train: pairs.length - heldOut, heldOut, goldMeanOfSamples: mean(golds) };
    this.log(`labels: the simulated labeler (AFINN sentiment${c.labels.countRepeats ? '' : ', each word once'}) preferred one of two continuations in ${pairs.length} of ${compared} comparisons (${summary.ties} ties dropped); ${heldOut} pairs held out`);
    return summary;
  }

  /** The preference pairs of the labels stage, split. */
  readPairs(): { train: PreferencePair[]; heldOut: PreferencePair[] } {
    const rows = readJsonl<{ split: string; promptIds: number[]; chosenIds: number[]; rejectedIds: number[] }>(this.dir('labels', 'pairs.jsonl'));
    const toPair = (r: { promptIds: number[]; chosenIds: number[]; rejectedIds: number[] }) => ({ prompt: r.promptIds, chosen: r.chosenIds, rejected: r.rejectedIds });
    return { train: rows.filter((r) => r.split === 'train').map(toPair), heldOut: rows.filter((r) => r.split !== 'train').map(toPair) };
  }

  private async rewardModelStage(): Promise<Record<string, unknown>> {
    const c = this.config;
    this.need('labels', 'rm');
    fs.rmSync(this.dir('rm'), { recursive: true, force: true });
    fs.mkdirSync(this.dir('rm'), { recursive: true });
    const { train, heldOut } = this.readPairs();
    const sft = await Model.load(this.dir('sft', 'model'), { trainable: false, device: this.config.device });
    const model = await sft.clone({ trainable: true, valueHead: true });
    await sft.dispose();
    const stepsPerEpoch = Math.ceil(train.length / c.rm.batchSize);
    const trainer = RewardModelTrainer.create(model, {
      optimizer: { lr: c.rm.lr, schedule: 'warmupLinearDecay', warmupSteps: Math.ceil(0.1 * stepsPerEpoch * c.rm.epochs), totalSteps: stepsPerEpoch * c.rm.epochs + 1, maxGradNorm: 1.0 },
      lmCoef: c.rm.lmCoef,
      logFile: this.dir('rm', 'log.jsonl'),
    });
    const accuracy: { epoch: number; accuracy: number; loss: number }[] = [];
    const evaluate = async (epoch: number) => {
      const ev = await trainer.evaluate(heldOut);
      accuracy.push({ epoch, accuracy: ev.stats.accuracy, loss: ev.stats.ranking_loss });
      appendJsonl(this.dir('rm', 'log.jsonl'), { kind: 'rewardModelEval', epoch, step: trainer.stepCount, ...ev.stats });
      return ev.stats;
    };
    const start = await evaluate(0);
    const rand = mulberry32((c.seed * 48271) >>> 0 || 1);
    for (let epoch = 1; epoch <= c.rm.epochs; epoch++) {
      const order = shuffleInPlace(train.map((_, i) => i), rand);
      for (let i = 0; i < order.length; i += c.rm.batchSize) {
        if (this.shouldStop()) throw interrupted('rm (it restarts from the beginning: it is quick)');
        await trainer.step(order.slice(i, i + c.rm.batchSize).map((k) => train[k]));
        this.progress(`rm epoch ${epoch}`, Math.min(order.length, i + c.rm.batchSize), order.length);
      }
      const ev = await evaluate(epoch);
      this.log(`rm: epoch ${epoch}/${c.rm.epochs}, held-out accuracy ${(100 * ev.accuracy).toFixed(1)}%, ranking loss ${ev.ranking_loss.toFixed(3)}`);
    }
    await model.save(this.dir('rm', 'model'));
    // Score spread on held-out responses: what "reward" means in this run.
    const end = accuracy[accuracy.length - 1];
    await model.dispose();
    this.log(`rm: held-out pairwise accuracy ${(100 * end.accuracy).toFixed(1)}% (${train.length} training pairs, ${heldOut.length} held out; chance is 50%)`);
    return { accuracyStart: start.accuracy, accuracy: end.accuracy, loss: end.loss, trainPairs: train.length, heldOutPairs: heldOut.length, epochs: accuracy };
  }

  /** The PPO options of a preset in this run. */
  ppoOptions(preset: string): Partial<PpoOptions> {
    const c = this.config;
    const base = PRESETS[preset];
    return {
      ...base,
      maxNewTokens: c.ppo.maxNewTokens,
      numRollouts: c.ppo.numRollouts,
      miniBatchSize: c.ppo.miniBatchSize,
      ppoEpochs: c.ppo.ppoEpochs,
      criticPretrainSteps: c.ppo.criticPretrainSteps,
      seed: c.seed,
      stopTokens: [this.data!.eos],
      policyOptimizer: { ...base.policyOptimizer, lr: c.ppo.policyLr },
      criticOptimizer: { ...base.criticOptimizer, lr: c.ppo.criticLr },
      ...(c.ppo.options as Partial<PpoOptions>),
    };
  }

  /** Evaluates the trainer's policy on the evaluation prompts (no training, no moment updates). */
  async evaluatePolicy(trainer: PpoTrainer, step: number): Promise<PolicyEvaluation> {
    const data = await this.runData();
    const prompts = data.evalPrompts;
    const e: Experience = await trainer.rollout(await this.encodePrompts(prompts));
    const scores = await trainer.score(e);
    const shaped = await trainer.shape(e, scores, { updateMoments: false });
    const responses = await this.decodeResponses(responseRows(e));
    const gold = responses.map((r) => this.labeler.score(r));
    return {
      step,
      proxy: mean(scores),
      gold: mean(gold),
      kl: shaped.stats.kl_mean,
      perplexity: shaped.stats.perplexity,
      length: shaped.stats.response_length_mean,
      repetition: shaped.stats.repetition ?? 0,
      samples: prompts.slice(0, this.config.ppo.samples).map((p, i) => ({ prompt: p, response: responses[i], proxy: scores[i], gold: gold[i] })),
    };
  }

  private async ppoStage(preset: string): Promise<Record<string, unknown>> {
    const c = this.config;
    const stage = `ppo-${preset}`;
    this.need('rm', 'rm');
    const data = await this.runData();
    const checkpoint = this.dir(stage, 'checkpoint');
    const progressFile = this.dir(stage, 'progress.json');
    const logFile = this.dir(stage, 'log.jsonl');
    const evalFile = this.dir(stage, 'evals.jsonl');
    let trainer: PpoTrainer;
    let pretrain: Record<string, unknown> | null = null;
    const resumeFrom = fs.existsSync(progressFile) ? readJson<{ key: string; step: number; pretrain: Record<string, unknown> | null }>(progressFile) : null;
    if (resumeFrom && resumeFrom.key === this.keys[stage] && fs.existsSync(path.join(checkpoint, 'trainer.json'))) {
      trainer = await PpoTrainer.resume(checkpoint, { progressBar: false, device: c.device });
      pretrain = resumeFrom.pretrain;
      truncateJsonl(logFile, trainer.state().step);
      truncateJsonl(evalFile, trainer.state().step);
      this.log(`${stage}: resuming at step ${trainer.state().step} of ${c.ppo.steps}`);
    } else {
      fs.rmSync(this.dir(stage), { recursive: true, force: true });
      fs.mkdirSync(this.dir(stage), { recursive: true });
      const policy = await Model.load(this.dir('sft', 'model'), { device: this.config.device });
      const rewardModel = await Model.load(this.dir('rm', 'model'), { trainable: false, device: this.config.device });
      trainer = await PpoTrainer.create({ policy, rewardModel, options: this.ppoOptions(preset), progressBar: false });
    }
    const save = async (step: number) => {
      await trainer.save(checkpoint);
      writeJson(progressFile, { key: this.keys[stage], step, pretrain });
    };
    const pool = await this.encodePrompts(data.trainPrompts);
    const draw = mulberry32((c.seed * 7919 + 17) >>> 0);
    if (trainer.state().step === 0 && !fs.existsSync(evalFile)) {
      if (trainer.options.criticPretrain && !pretrain) {
        const r = await trainer.pretrainCritic(() => Array.from({ length: c.ppo.numRollouts }, () => pool[Math.floor(draw() * pool.length)]));
        pretrain = { ...r };
        this.log(`${stage}: critic (from the reward model) pre-trained: value loss ${r.valueLossFirst.toFixed(4)} -> ${r.valueLoss.toFixed(4)} in ${r.passes} passes`);
      }
      const ev = await this.evaluatePolicy(trainer, 0);
      appendJsonl(evalFile, ev);
      this.log(`${stage}: start: proxy ${ev.proxy.toFixed(3)}, gold ${ev.gold.toFixed(3)}, perplexity ${ev.perplexity.toFixed(2)}, length ${ev.length.toFixed(1)}`);
    }
    // Prompts per step: seeded by the step, so a resumed run draws the same ones.
    const promptsFor = (step: number) => {
      const rand = mulberry32((c.seed * 104729 + step * 7) >>> 0 || 1);
      return Array.from({ length: c.ppo.numRollouts }, () => pool[Math.floor(rand() * pool.length)]);
    };
    const t0 = Date.now();
    const alarmsSeen = new Set<string>();
    let last = readJsonl<PolicyEvaluation>(evalFile).pop()!;
    while (trainer.state().step < c.ppo.steps) {
      if (this.shouldStop()) {
        await save(trainer.state().step);
        throw interrupted(`${stage} (step ${trainer.state().step} of ${c.ppo.steps})`);
      }
      const step = trainer.state().step + 1;
      const r = await trainer.step(promptsFor(step));
      const responses = await this.decodeResponses(responseRows(r.experience));
      const gold = mean(responses.map((x) => this.labeler.score(x)));
      appendJsonl(logFile, { step, ...r.stats, gold_mean: gold, alarms: r.alarms.map((a) => a.kind) });
      for (const a of r.alarms) {
        if (!alarmsSeen.has(a.kind)) this.log(`${stage}: step ${step}: alarm ${a.kind}: ${a.message} (later ones of this kind are counted in the report, not printed)`);
        alarmsSeen.add(a.kind);
      }
      this.progress(stage, step, c.ppo.steps);
      if (step % c.ppo.evalEvery === 0 || step === c.ppo.steps) {
        last = await this.evaluatePolicy(trainer, step);
        appendJsonl(evalFile, last);
        this.log(
          `${stage}: step ${step}/${c.ppo.steps}: proxy ${last.proxy.toFixed(3)}, gold ${last.gold.toFixed(3)}, KL/token ${last.kl.toFixed(3)}, ` +
            `perplexity ${last.perplexity.toFixed(2)}, length ${last.length.toFixed(1)}`,
        );
      }
      if (step % c.ppo.checkpointEvery === 0 && step < c.ppo.steps) await save(step);
    }
    const seconds = (Date.now() - t0) / 1000;
    await trainer.policy.save(this.dir(stage, 'policy'));
    const first = readJsonl<PolicyEvaluation>(evalFile)[0];
    const rows = readJsonl<Stats & { alarms: string[] }>(logFile);
    const alarms = rows.reduce((s, x) => s + x.alarms.length, 0);
    await Promise.all([trainer.policy.dispose(), trainer.reference.dispose(), trainer.critic.dispose(), trainer.rewardModel?.dispose()]);
    fs.rmSync(checkpoint, { recursive: true, force: true });
    fs.rmSync(progressFile, { force: true });
    return {
      preset,
      steps: c.ppo.steps,
      secondsPerStep: seconds / Math.max(1, rows.length),
      criticPretrain: pretrain,
      start: { ...first, samples: undefined },
      end: { ...last, samples: undefined },
      alarms,
      skipped: rows.reduce((s, x) => s + (x.skipped ?? 0), 0),
    };
  }
}

/** The response tokens of each row of an experience. */
export function responseRows(e: Experience): Int32Array[] {
  const out: Int32Array[] = [];
  for (let b = 0; b < e.batch; b++) out.push(e.tokens.slice(b * e.steps + e.promptLengths[b], b * e.steps + e.lengths[b]));
  return out;
}
