#!/usr/bin/env node
/**
 * `npx ppo-max <command>`: the RLHF pipeline on real text (demo, sft, rm, ppo, report),
 * using its models (generate, eval), timing the engine (bench), and building the addon.
 * Exit codes: 0 success, 1 failure, 2 bad usage or option, 3 a stage this command needs
 * has not run, 130 stopped by Ctrl-C (state saved: the same command resumes).
 */
import * as fs from 'fs';
import * as path from 'path';

import { buildAddon } from './build';
import { runDemo } from './demo';
import { backendInfo } from './device';
import { PpoMaxError, isPpoMaxError } from './errors';
import { Model } from './model';
import { Pipeline, StageName } from './pipeline';
import { PIPELINE_OPTIONS, PipelineConfig, RUN_SIZES, RunSize, applyConfigLayer, defaultConfig, optionValue } from './pipeline-config';
import { Tokenizer } from './tokenizer';
import { PpoTrainer, SftTrainer } from './trainers';

export const EXIT = { ok: 0, failure: 1, usage: 2, missingStage: 3, interrupted: 130 } as const;

const PIPELINE_COMMANDS: Record<string, { stages: StageName[]; help: string }> = {
  demo: {
    stages: ['tokenizer', 'sft', 'labels', 'rm', 'ppo', 'report'],
    help: 'the whole RLHF pipeline on real text (Moby-Dick by default): tokenizer, SFT, simulated preference labels, reward model, critic, PPO under ppoMax and vanilla from the same start, then report.html. About 10 minutes on 2 CPU cores; --size tiny takes seconds, --size large is bigger',
  },
  sft: { stages: ['tokenizer', 'sft'], help: 'train the tokenizer and pretrain/SFT the GPT on the corpus' },
  rm: { stages: ['labels', 'rm'], help: 'sample pairs of continuations, label them with the simulated labeler, train the reward model (needs sft)' },
  ppo: { stages: ['ppo', 'report'], help: 'PPO from the SFT model for each preset (ppo.presets), then the report (needs rm)' },
  report: { stages: ['report'], help: 'rewrite report.html and summary.json from what the run directory holds' },
};

const HELP = `usage: ppo-max <command> [options]        ppo-max help <command> for its options

the pipeline (each stage cached in --runDir; rerunning resumes, changed settings rerun):
${Object.entries(PIPELINE_COMMANDS).map(([k, v]) => `  ${k.padEnd(9)} ${v.help}`).join('\n')}

using a run's models:
  generate  continue prompts: --prompt TEXT (repeatable) --model sft|ppoMax|vanilla|DIR
            --samples N --maxNewTokens N --temperature T --topP P --topK K --repetitionPenalty R --greedy --seed N
  eval      proxy reward, gold reward, KL to the SFT model, perplexity, length and repetition on the
            held-out prompts, for --model sft|ppoMax|vanilla|DIR (default: every model of the run)
  bench     time SFT steps, generation and PPO steps at the run's model size on this machine (--runs N)

the package:
  build     build the native addon (--tool cmake|gyp|auto --cuda auto|on|off --tests)
  info      the loaded addon, CUDA availability and CPU threads
  demo --kernels   one PPO-max step's math through the native kernels on a synthetic batch

every pipeline option is a flag (--sft.steps 2000, --ppo.presets ppoMax) or a key of a JSON
--config file (nested or dotted keys). Flags win over the file, the file over the settings
saved in the run directory (with --size: that size's defaults). \`ppo-max help demo\` lists them.

exit codes: 0 success, 1 failure, 2 bad usage or option, 3 a stage this command needs has
not run, 130 stopped by Ctrl-C (its state saved: run the same command again to resume)`;

function optionsHelp(): string {
  const rows = PIPELINE_OPTIONS.map((s) => {
    const d = RUN_SIZES.map((size) => JSON.stringify(optionValue(defaultConfig(size), s.key)));
    const defaults = d.every((x) => x === d[0]) ? d[0] : RUN_SIZES.map((size, i) => `${size} ${d[i]}`).join(', ');
    return `  --${s.key} <${s.type}>\n      ${s.help}\n      default: ${defaults}`;
  });
  return `options (flags or --config file keys):
  --config FILE          a JSON file of options
  --size ${RUN_SIZES.join('|')}   the scale of the defaults (default: the run directory's settings, else default)
  --force                rerun the command's stages even when cached
  --no-progress          no progress bars
${rows.join('\n')}`;
}

/** A pipeline command's help with every option, or the general help. */
function helpFor(command: string | undefined): string {
  return command && PIPELINE_COMMANDS[command] ? `${PIPELINE_COMMANDS[command].help}\n\n${optionsHelp()}` : HELP;
}

type Flags = Record<string, (string | true)[]>;

/** --key value pairs (repeatable), --flag alone for true; kebab-case keys become camelCase. */
export function parseFlags(args: string[]): Flags {
  const flags: Flags = {};
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (!a.startsWith('--') || a === '--') throw new PpoMaxError('ERR_INVALID_ARGUMENT', `unexpected argument '${a}' (options are --name value)`);
    let key = a.slice(2);
    let value: string | true;
    const eq = key.indexOf('=');
    if (eq >= 0) {
      value = key.slice(eq + 1);
      key = key.slice(0, eq);
    } else {
      const next = args[i + 1];
      if (next === undefined || (next.startsWith('--') && next.length > 2)) value = true;
      else {
        value = next;
        i++;
      }
    }
    key = key.split('.').map((part) => part.replace(/-([a-z])/g, (_m, ch: string) => ch.toUpperCase())).join('.');
    (flags[key] ??= []).push(value);
  }
  return flags;
}

function single(flags: Flags, key: string): string | true | undefined {
  const v = flags[key];
  if (!v) return undefined;
  if (v.length > 1) throw new PpoMaxError('ERR_INVALID_ARGUMENT', `--${key} is given ${v.length} times`, key);
  return v[0];
}

function stringFlag(flags: Flags, key: string): string | undefined {
  const v = single(flags, key);
  if (v === true) throw new PpoMaxError('ERR_INVALID_ARGUMENT', `--${key} needs a value`, key);
  return v;
}

function numberFlag(flags: Flags, key: string, o: { integer?: boolean; min?: number } = {}): number | undefined {
  const v = stringFlag(flags, key);
  if (v === undefined) return undefined;
  const n = Number(v);
  if (v.trim() === '' || !Number.isFinite(n) || (o.integer && !Number.isInteger(n)) || (o.min !== undefined && n < o.min)) {
    throw new PpoMaxError('ERR_INVALID_ARGUMENT', `--${key} must be ${o.integer ? 'an integer' : 'a number'}${o.min !== undefined ? ` >= ${o.min}` : ''}, got '${v}'`, key);
  }
  return n;
}

/** Runs f; an error it throws is a usage error (exit code 2): bad flags, options or config files. */
function configure<T>(f: () => T): T {
  try {
    return f();
  } catch (e) {
    if (isPpoMaxError(e) && e.code === 'ERR_INVALID_ARGUMENT') (e as { usage?: boolean }).usage = true;
    throw e;
  }
}

/** Flags that are not pipeline options, per command. */
const COMMAND_FLAGS = ['config', 'size', 'force', 'noProgress', 'help'];
const GENERATE_FLAGS = ['model', 'prompt', 'samples', 'maxNewTokens', 'temperature', 'topP', 'topK', 'repetitionPenalty', 'greedy', 'seed'];

/** The run's settings: --size defaults or the run directory's config.json, then --config, then flags. */
export function resolveConfig(flags: Flags, extraFlags: string[] = []): PipelineConfig {
  const size = stringFlag(flags, 'size');
  if (size !== undefined && !RUN_SIZES.includes(size as RunSize)) throw new PpoMaxError('ERR_INVALID_ARGUMENT', `--size must be one of ${RUN_SIZES.join(', ')}, got '${size}'`, 'size');
  const optionFlags: Record<string, unknown> = {};
  for (const [key, values] of Object.entries(flags)) {
    if (COMMAND_FLAGS.includes(key) || extraFlags.includes(key)) continue;
    const spec = PIPELINE_OPTIONS.find((s) => s.key === key);
    if (!spec) throw new PpoMaxError('ERR_INVALID_ARGUMENT', `unknown option --${key} (\`ppo-max help demo\` lists the options)`, key);
    if (values.length > 1) throw new PpoMaxError('ERR_INVALID_ARGUMENT', `--${key} is given ${values.length} times`, key);
    optionFlags[key] = values[0] === true ? (spec.type === 'boolean' ? true : undefined) : values[0];
    if (optionFlags[key] === undefined) throw new PpoMaxError('ERR_INVALID_ARGUMENT', `--${key} needs a value`, key);
  }
  const configFile = stringFlag(flags, 'config');
  let fileLayer: Record<string, unknown> = {};
  if (configFile !== undefined) {
    if (!fs.existsSync(configFile)) throw new PpoMaxError('ERR_NOT_FOUND', `--config ${configFile}: no such file`, 'config');
    try {
      fileLayer = JSON.parse(fs.readFileSync(configFile, 'utf8'));
    } catch (e) {
      throw new PpoMaxError('ERR_INVALID_ARGUMENT', `--config ${configFile}: not valid JSON (${(e as Error).message})`, 'config');
    }
    if (typeof fileLayer !== 'object' || fileLayer === null || Array.isArray(fileLayer)) throw new PpoMaxError('ERR_INVALID_ARGUMENT', `--config ${configFile}: must hold a JSON object`, 'config');
  }
  const runDir = (optionFlags.runDir as string | undefined) ?? (fileLayer.runDir as string | undefined) ?? defaultConfig().runDir;
  const saved = path.join(runDir, 'config.json');
  let config = defaultConfig((size as RunSize | undefined) ?? 'default');
  if (size === undefined && fs.existsSync(saved)) {
    try {
      config = applyConfigLayer(config, JSON.parse(fs.readFileSync(saved, 'utf8')), saved);
    } catch (e) {
      throw new PpoMaxError('ERR_INVALID_ARGUMENT', `${saved} (the run's saved settings): ${(e as Error).message}; pass --size to start from defaults`, 'runDir');
    }
  }
  config = applyConfigLayer(config, fileLayer, configFile ?? 'config');
  return applyConfigLayer(config, optionFlags, 'flags');
}

/** Ctrl-C: the first asks the running stage to checkpoint and stop; the second exits at once. */
function installInterrupt(log: (line: string) => void): { requested: () => boolean; remove: () => void } {
  let requested = false;
  const onSignal = () => {
    if (requested) {
      log('\nppo-max: stopped without saving');
      process.exit(EXIT.interrupted);
    }
    requested = true;
    log('\nppo-max: stopping after the current step and saving (Ctrl-C again to quit at once)');
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  return { requested: () => requested, remove: () => { process.off('SIGINT', onSignal); process.off('SIGTERM', onSignal); } };
}

/** A model of a run: 'sft', a preset's final policy, or a checkpoint directory. */
function modelDir(pipeline: Pipeline, name: string): string {
  if (name === 'sft') return pipeline.dir('sft', 'model');
  if (pipeline.config.ppo.presets.includes(name) || ['ppoMax', 'vanilla', 'ppoPtx'].includes(name)) return pipeline.dir(`ppo-${name}`, 'policy');
  return name;
}

function requireModel(dir: string, name: string): void {
  if (!fs.existsSync(path.join(dir, 'config.json'))) {
    throw new PpoMaxError('ERR_NOT_FOUND', `model '${name}': no checkpoint at ${dir} (run the stage that makes it first)`, 'model');
  }
}

async function generateCommand(flags: Flags): Promise<void> {
  const pipeline = configure(() => new Pipeline(resolveConfig(flags, GENERATE_FLAGS), { progressBar: false }));
  const data = await pipeline.runData();
  const which = stringFlag(flags, 'model') ?? (fs.existsSync(modelDir(pipeline, 'ppoMax')) ? 'ppoMax' : 'sft');
  const dir = modelDir(pipeline, which);
  requireModel(dir, which);
  const prompts = (flags.prompt ?? []).map((p) => {
    if (p === true) throw new PpoMaxError('ERR_INVALID_ARGUMENT', '--prompt needs a text', 'prompt');
    return p;
  });
  const texts = prompts.length > 0 ? prompts : data.evalPrompts.slice(0, 5);
  const samples = numberFlag(flags, 'samples', { integer: true, min: 1 }) ?? 1;
  const model = await Model.load(dir, { trainable: false, device: pipeline.config.device });
  try {
    const ids = await pipeline.encodePrompts(texts);
    const rows = ids.flatMap((p) => Array.from({ length: samples }, () => p));
    const greedy = single(flags, 'greedy') === true;
    const out = await model.generate(rows, {
      maxNewTokens: numberFlag(flags, 'maxNewTokens', { integer: true, min: 1 }) ?? pipeline.config.ppo.maxNewTokens,
      greedy,
      temperature: numberFlag(flags, 'temperature') ?? 0.8,
      topP: numberFlag(flags, 'topP') ?? 0.9,
      topK: numberFlag(flags, 'topK', { integer: true, min: 0 }) ?? 0,
      repetitionPenalty: numberFlag(flags, 'repetitionPenalty') ?? 1.1,
      seed: numberFlag(flags, 'seed', { integer: true, min: 0 }) ?? pipeline.config.seed,
      stopTokens: [data.eos],
    });
    const responses = await data.tokenizer.decodeBatch(out.tokens.map((t) => Array.from(t).filter((x) => x !== data.eos)));
    console.log(`model: ${which} (${dir})`);
    responses.forEach((r, i) => {
      const prompt = texts[Math.floor(i / samples)];
      console.log(`\n> ${prompt}\n${prompt}${r.startsWith(' ') ? '' : ' '}${r.trim()}\n  [gold (labeler) ${pipeline.labeler.score(r)}, ${out.lengths[i]} tokens]`);
    });
  } finally {
    await model.dispose();
  }
}

async function evalCommand(flags: Flags): Promise<void> {
  const pipeline = configure(() => new Pipeline(resolveConfig(flags, ['model']), { progressBar: false }));
  await pipeline.runData();
  const named = stringFlag(flags, 'model');
  const names = named ? [named] : ['sft', ...pipeline.config.ppo.presets].filter((n) => fs.existsSync(path.join(modelDir(pipeline, n), 'config.json')));
  for (const stage of ['sft', 'rm']) {
    if (!pipeline.done(stage)) throw new PpoMaxError('ERR_NOT_FOUND', `eval needs the ${stage} stage of ${pipeline.config.runDir}: run \`ppo-max ${stage}\` first`, 'runDir');
  }
  const rewardModel = await Model.load(pipeline.dir('rm', 'model'), { trainable: false, device: pipeline.config.device });
  const reference = await Model.load(pipeline.dir('sft', 'model'), { trainable: false, device: pipeline.config.device });
  console.log(`${pipeline.config.prompts.evalCount} held-out prompts, sampled as in PPO; proxy = reward model, gold = the labeler\n`);
  console.log(['model'.padEnd(12), 'proxy', 'gold', 'KL/token', 'perplexity', 'length', 'repeat3'].map((h) => h.padStart(10)).join(''));
  try {
    for (const name of names) {
      const dir = modelDir(pipeline, name);
      requireModel(dir, name);
      const policy = await Model.load(dir, { device: pipeline.config.device });
      const trainer = await PpoTrainer.create({ policy, reference, rewardModel, options: pipeline.ppoOptions('ppoMax'), progressBar: false });
      const e = await pipeline.evaluatePolicy(trainer, 0);
      console.log([name.padEnd(12), e.proxy.toFixed(3), e.gold.toFixed(3), e.kl.toFixed(3), e.perplexity.toFixed(2), e.length.toFixed(1), e.repetition.toFixed(3)].map((h) => h.padStart(10)).join(''));
      await Promise.all([policy.dispose(), trainer.critic.dispose()]);
    }
  } finally {
    await Promise.all([rewardModel.dispose(), reference.dispose()]);
  }
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

async function benchCommand(flags: Flags): Promise<void> {
  const c = configure(() => resolveConfig(flags, ['runs']));
  const runs = numberFlag(flags, 'runs', { integer: true, min: 1 }) ?? 5;
  const tokFile = path.join(c.runDir, 'tokenizer', 'tokenizer.json');
  const vocab = fs.existsSync(tokFile) ? Tokenizer.load(tokFile).vocabSize : c.vocabSize;
  const config = { vocabSize: vocab, nPositions: c.model.nPositions, nEmbd: c.model.nEmbd, nLayer: c.model.nLayer, nHead: c.model.nHead };
  const policy = await Model.create(config, { seed: 1, device: c.device });
  const rewardModel = await Model.create({ ...config, valueHead: true }, { seed: 2, trainable: false, device: c.device });
  const T = c.model.nPositions;
  const row = (i: number) => Array.from({ length: T - 1 }, (_, j) => (i * 131 + j * 17) % vocab);
  console.log(`model: ${policy.parameterCount().toLocaleString('en-US')} parameters (${c.model.nLayer} layers, width ${c.model.nEmbd}, context ${T}, vocabulary ${vocab}); median of ${runs} runs`);
  const time = async (f: () => Promise<unknown>) => {
    await f();
    const ts: number[] = [];
    for (let i = 0; i < runs; i++) {
      const t0 = process.hrtime.bigint();
      await f();
      ts.push(Number(process.hrtime.bigint() - t0) / 1e9);
    }
    return median(ts);
  };
  const sft = SftTrainer.create(policy, { optimizer: { lr: 1e-4 }, lossOn: 'all' });
  const examples = Array.from({ length: c.sft.batchSize }, (_, i) => ({ prompt: row(i), response: [1] }));
  const sftSeconds = await time(() => sft.step(examples));
  const sftTokens = c.sft.batchSize * T;
  const flops = 6 * policy.parameterCount() * sftTokens / sftSeconds / 1e9;
  console.log(`SFT step       ${c.sft.batchSize}×${T}: ${(sftSeconds * 1000).toFixed(1)} ms, ${(sftTokens / sftSeconds).toFixed(0)} tokens/s (≈${flops.toFixed(1)} GFLOP/s by 6·N·tokens)`);
  const prompts = Array.from({ length: c.ppo.numRollouts }, (_, i) => row(i).slice(0, 8));
  const genSeconds = await time(() => policy.generate(prompts, { maxNewTokens: c.ppo.maxNewTokens, seed: 3 }));
  console.log(`generation     ${c.ppo.numRollouts} prompts × ${c.ppo.maxNewTokens} new tokens: ${(genSeconds * 1000).toFixed(1)} ms, ${((c.ppo.numRollouts * c.ppo.maxNewTokens) / genSeconds).toFixed(0)} tokens/s`);
  const trainer = await PpoTrainer.create({
    policy, rewardModel, progressBar: false,
    options: { maxNewTokens: c.ppo.maxNewTokens, numRollouts: c.ppo.numRollouts, miniBatchSize: c.ppo.miniBatchSize, ppoEpochs: c.ppo.ppoEpochs, seed: 1, criticPretrain: false, policyOptimizer: { lr: 1e-5 }, criticOptimizer: { lr: 1e-5 } },
  });
  const ppoSeconds = await time(() => trainer.step(prompts));
  console.log(`PPO step       ${c.ppo.numRollouts} rollouts, ${c.ppo.ppoEpochs} epoch(s) of mini-batches of ${c.ppo.miniBatchSize}: ${(ppoSeconds * 1000).toFixed(0)} ms`);
  await Promise.all([policy.dispose(), rewardModel.dispose(), trainer.reference.dispose(), trainer.critic.dispose()]);
  console.log('\nkernel-level figures against this machine\'s GEMM ceiling: npm run bench:cpp (C++), npm run bench:engine (vs PyTorch where installed)');
}

async function pipelineCommand(command: string, flags: Flags, shouldStop: () => boolean, log: (line: string) => void): Promise<number> {
  const config = configure(() => resolveConfig(flags));
  const t0 = Date.now();
  const pipeline = configure(() => new Pipeline(config, {
    stages: PIPELINE_COMMANDS[command].stages,
    force: single(flags, 'force') === true,
    progressBar: single(flags, 'noProgress') === true ? false : 'auto',
    shouldStop,
    log,
  }));
  await pipeline.run();
  log(`ppo-max ${command}: done in ${((Date.now() - t0) / 1000).toFixed(1)} s; outputs in ${path.resolve(config.runDir)}`);
  return EXIT.ok;
}

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  const log = (line: string) => console.log(line);
  if (command === 'help') {
    console.log(helpFor(rest[0]));
    return EXIT.ok;
  }
  let flags: Flags;
  try {
    flags = parseFlags(rest);
  } catch (e) {
    console.error(`ppo-max: ${(e as Error).message}\n\n${HELP}`);
    return EXIT.usage;
  }
  if (flags.help) {
    console.log(helpFor(command));
    return EXIT.ok;
  }
  const interrupt = installInterrupt(log);
  try {
    switch (command) {
      case 'build': {
        const built = buildAddon({
          tool: (stringFlag(flags, 'tool') as 'cmake' | 'gyp' | 'auto') ?? 'auto',
          cuda: (stringFlag(flags, 'cuda') as 'auto' | 'on' | 'off') ?? 'auto',
          tests: single(flags, 'tests') === true,
        });
        console.log(`ppo-max: built ${built}`);
        return EXIT.ok;
      }
      case 'demo':
        if (single(flags, 'kernels') === true) {
          await runDemo({
            batch: numberFlag(flags, 'batch', { integer: true, min: 1 }),
            steps: numberFlag(flags, 'steps', { integer: true, min: 1 }),
            vocab: numberFlag(flags, 'vocab', { integer: true, min: 2 }),
            seed: numberFlag(flags, 'seed', { integer: true, min: 0 }),
            device: stringFlag(flags, 'device') as 'cpu' | 'cuda' | 'auto' | undefined,
          });
          return EXIT.ok;
        }
        return await pipelineCommand(command, flags, interrupt.requested, log);
      case 'sft':
      case 'rm':
      case 'ppo':
      case 'report':
        return await pipelineCommand(command, flags, interrupt.requested, log);
      case 'generate':
        await generateCommand(flags);
        return EXIT.ok;
      case 'eval':
        await evalCommand(flags);
        return EXIT.ok;
      case 'bench':
        await benchCommand(flags);
        return EXIT.ok;
      case 'info':
        console.log(JSON.stringify(backendInfo(), null, 2));
        return EXIT.ok;
      case undefined:
        console.log(HELP);
        return EXIT.usage;
      default:
        console.error(`ppo-max: unknown command '${command}'\n\n${HELP}`);
        return EXIT.usage;
    }
  } catch (e) {
    if (isPpoMaxError(e)) {
      console.error(`ppo-max: ${e.message} [${e.code}]`);
      if (e.code === 'ERR_INTERRUPTED') return EXIT.interrupted;
      if ((e as { usage?: boolean }).usage) return EXIT.usage;
      if (e.code === 'ERR_NOT_FOUND' && e.argument === 'runDir') return EXIT.missingStage;
      return EXIT.failure;
    }
    console.error(e);
    return EXIT.failure;
  } finally {
    interrupt.remove();
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).then((code) => process.exit(code));
}
