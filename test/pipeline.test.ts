/**
 * End to end on real text: the tokenizer (Hugging Face's, trained on our corpus), the
 * embedded corpus and its split, the simulated labeler, the run configuration, and a
 * miniature of the whole pipeline through the CLI (tiny model, a few steps): each stage's
 * outputs exist, parse and make sense; stages are cached; an interrupted run resumes to
 * the same numbers as an uninterrupted one; the report renders in headless Chromium
 * (when Debian's chromium is installed, as .ci/run does) with data in its charts.
 */
import { afterAll, beforeAll, describe, expect, test } from '@jest/globals';
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

import {
  Model,
  Pipeline,
  SentimentLabeler,
  Tokenizer,
  applyConfigLayer,
  defaultConfig,
  loadCorpus,
  sentenceOpening,
  splitCorpus,
  splitSentences,
} from '../lib';
import { main, parseFlags } from '../lib/cli';
import { byteLevelAlphabet } from '../lib/tokenizer';
import { expectRejects, expectThrows } from './helpers';

const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'ppo-pipeline-'));
afterAll(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));

const readJsonl = (file: string) => fs.readFileSync(file, 'utf8').split('\n').filter((l) => l !== '').map((l) => JSON.parse(l));
const readJson = (file: string) => JSON.parse(fs.readFileSync(file, 'utf8'));

/** Runs the CLI in-process, capturing what it prints. */
async function cli(args: string[]): Promise<{ code: number; out: string; err: string }> {
  const out: string[] = [], err: string[] = [];
  const log = console.log, error = console.error;
  console.log = (...a: unknown[]) => out.push(a.join(' '));
  console.error = (...a: unknown[]) => err.push(a.join(' '));
  try {
    const code = await main(args);
    return { code, out: out.join('\n'), err: err.join('\n') };
  } finally {
    console.log = log;
    console.error = error;
  }
}

describe('tokenizer', () => {
  const text = 'Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse. '.repeat(20);

  test('the byte-level alphabet is GPT-2\'s: 256 distinct characters, printable bytes first', () => {
    const a = byteLevelAlphabet();
    expect(new Set(a).size).toBe(256);
    expect(a[0]).toBe('!');
    expect(a[93]).toBe('~');
    expect(a[188]).toBe(String.fromCharCode(256)); // byte 0
    expect(a.indexOf('Ġ')).toBe(188 + 32); // byte 32, the space
  });

  test('trains to the asked size with <|endoftext|> last, round-trips any text, saves and loads', async () => {
    const tok = await Tokenizer.train([text], { vocabSize: 300 });
    expect(tok.vocabSize).toBe(300);
    expect(tok.eosTokenId).toBe(299);
    expect(tok.bosTokenId).toBe(299);
    expect(tok.token(299)).toBe('<|endoftext|>');
    const odd = 'Ishmael — “whale” 😀 naïve\u0000\ttab, 123';
    const ids = await tok.encode(odd);
    expect(ArrayBuffer.isView(ids)).toBe(true);
    for (const id of ids) expect(id >= 0 && id < 299).toBe(true);
    expect(await tok.decode(ids)).toBe(odd);
    // merges learned from the text: a frequent word is fewer tokens than bytes
    expect((await tok.encode(' Ishmael')).length).toBeLessThan(Buffer.byteLength(' Ishmael'));
    const file = path.join(tmpRoot, 'tok', 'tokenizer.json');
    tok.save(file);
    const again = Tokenizer.load(file);
    expect(Array.from(await again.encode(odd))).toEqual(Array.from(ids));
    const saved = readJson(file);
    expect(saved.model.type).toBe('BPE');
    expect(Object.keys(saved.model.vocab).length).toBe(299);
    expect(saved.added_tokens[0]).toMatchObject({ id: 299, content: '<|endoftext|>', special: true });
    expect(await tok.decodeBatch([ids, [tok.eosTokenId!]])).toEqual([odd, '']);
    expect(await tok.decode([tok.eosTokenId!], { skipSpecialTokens: false })).toBe('<|endoftext|>');
  });

  test('bad input gets coded errors', async () => {
    expectThrows(() => Tokenizer.load(path.join(tmpRoot, 'missing.json')), { code: 'ERR_NOT_FOUND', message: /no such tokenizer file/ });
    const bad = path.join(tmpRoot, 'bad.json');
    fs.writeFileSync(bad, '{"version": "1.0", "model": {');
    expectThrows(() => Tokenizer.load(bad), { code: 'ERR_CORRUPT_FILE', message: /not valid JSON/ });
    fs.writeFileSync(bad, '{"hello": 1}');
    expectThrows(() => Tokenizer.load(bad), { code: 'ERR_CORRUPT_FILE', message: /tokenizers can read/ });
    await expectRejects(() => Tokenizer.train([text], { vocabSize: 100 }), { code: 'ERR_INVALID_ARGUMENT', message: /vocabSize/ });
    await expectRejects(() => Tokenizer.train([]), { code: 'ERR_INVALID_ARGUMENT', message: /texts/ });
    const tok = await Tokenizer.train([text], { vocabSize: 280 });
    await expectRejects(() => tok.decode([1, 280]), { code: 'ERR_OUT_OF_RANGE', message: /ids\[1\] = 280/ });
    await expectRejects(() => tok.decode([1.5]), { code: 'ERR_OUT_OF_RANGE', message: /ids\[0\]/ });
  });
});

describe('corpus and labeler', () => {
  test('Moby-Dick ships in the npm package: chapters, sentences, a seeded split', () => {
    const c = loadCorpus('moby-dick');
    expect(c.documents.length).toBeGreaterThanOrEqual(135);
    expect(c.documents[0].startsWith('Call me Ishmael.')).toBe(true);
    const s1 = splitCorpus(c, { heldOutFraction: 0.15, seed: 1 });
    const s2 = splitCorpus(c, { heldOutFraction: 0.15, seed: 1 });
    expect(s1).toEqual(s2);
    const total = s1.train.length + s1.heldOut.length;
    expect(total).toBeGreaterThan(5000);
    expect(Math.abs(s1.heldOut.length / total - 0.15)).toBeLessThan(0.02);
    expect(splitCorpus(c, { heldOutFraction: 0.15, seed: 2 }).heldOut[0]).not.toBe(s1.heldOut[0]);
  });

  test('the State of the Union addresses ship too', () => {
    const c = loadCorpus('sotu');
    expect(c.documents.length).toBeGreaterThan(200);
  });

  test('sentences are cut after . ! ? before a capital, not after Mr.', () => {
    expect(splitSentences('Call me Ishmael.  Some years ago—never mind how long. "Is it?" he asked. Mr. Starbuck came! The end'))
      .toEqual(['Call me Ishmael.', 'Some years ago—never mind how long.', '"Is it?" he asked.', 'Mr. Starbuck came!', 'The end']);
    expect(sentenceOpening('one two three four five six seven eight nine ten', 5)).toBe('one two three four five');
    expect(sentenceOpening('one two three four', 5)).toBe('one two');
  });

  test('user text and JSONL corpora, with coded errors', () => {
    const jsonl = path.join(tmpRoot, 'c.jsonl');
    fs.writeFileSync(jsonl, '{"text": "A. B."}\n"plain"\n{"prompt": "P", "response": "R"}\n');
    expect(loadCorpus(jsonl).documents).toEqual(['A. B.', 'plain', 'P R']);
    fs.writeFileSync(jsonl, '{"text": "ok"}\n{"nope": 1}\n');
    expectThrows(() => loadCorpus(jsonl), { code: 'ERR_CORRUPT_FILE', message: /c\.jsonl:2: expected a string/ });
    fs.writeFileSync(jsonl, '{"text": \n');
    expectThrows(() => loadCorpus(jsonl), { code: 'ERR_CORRUPT_FILE', message: /c\.jsonl:1: not valid JSON/ });
    expectThrows(() => loadCorpus(path.join(tmpRoot, 'none.txt')), { code: 'ERR_NOT_FOUND', message: /no such file/ });
    const small = path.join(tmpRoot, 'small.txt');
    fs.writeFileSync(small, 'Too short. Far too short.');
    expectThrows(() => splitCorpus(loadCorpus(small), { heldOutFraction: 0.1, seed: 1 }), { code: 'ERR_INVALID_ARGUMENT', message: /at least 20/ });
  });

  test('the labeler scores AFINN sentiment, each distinct word once by default', () => {
    const l = new SentimentLabeler();
    expect(l.score('a good day')).toBe(3);
    expect(l.score('good good good')).toBe(3);
    expect(new SentimentLabeler({ countRepeats: true }).score('good good good')).toBe(9);
    expect(l.score('the whale is not good')).toBeLessThan(0);
    expect(l.score('the sea and the ship')).toBe(0);
    expect(l.score('happy but dead')).toBe(3 - 3);
    expect(l.prefer('a happy sailor', 'a sad sailor')).toEqual({ choice: 0, scores: [3, -2] });
    expect(l.prefer('a sad sailor', 'a happy sailor')!.choice).toBe(1);
    expect(l.prefer('the sea', 'the ship')).toBeNull();
    const words = l.sentimentWords('happy and sad');
    expect(words).toHaveLength(2);
    expect(words).toEqual(expect.arrayContaining([{ word: 'happy', valence: 3 }, { word: 'sad', valence: -2 }]));
    expectThrows(() => l.score(3 as unknown as string), { code: 'ERR_INVALID_ARGUMENT', message: /text/ });
  });
});

describe('run configuration and flags', () => {
  test('defaults per size, layers and their errors', () => {
    const d = defaultConfig();
    expect(d.model.nEmbd % d.model.nHead).toBe(0);
    expect(defaultConfig('tiny').sft.steps).toBeLessThan(d.sft.steps);
    const c = applyConfigLayer(d, { 'sft.steps': '7', ppo: { presets: 'vanilla,ppoMax', policyLr: 1e-3 }, labels: { countRepeats: 'true' } }, 'test');
    expect(c.sft.steps).toBe(7);
    expect(c.ppo.presets).toEqual(['vanilla', 'ppoMax']);
    expect(c.ppo.policyLr).toBe(1e-3);
    expect(c.labels.countRepeats).toBe(true);
    expect(d.sft.steps).not.toBe(7); // the base is not changed
    expectThrows(() => applyConfigLayer(d, { sft: { stepz: 1 } }, 'test'), { code: 'ERR_INVALID_ARGUMENT', message: /unknown option 'sft.stepz'/ });
    expectThrows(() => applyConfigLayer(d, { 'sft.steps': 0 }, 'test'), { code: 'ERR_INVALID_ARGUMENT', message: /sft.steps must be >= 1/ });
    expectThrows(() => applyConfigLayer(d, { 'sft.steps': 1.5 }, 'test'), { code: 'ERR_INVALID_ARGUMENT', message: /integer/ });
    expectThrows(() => applyConfigLayer(d, { device: 'tpu' }, 'test'), { code: 'ERR_INVALID_ARGUMENT', message: /device must be one of auto, cpu, cuda/ });
    expect(applyConfigLayer(d, { device: 'cpu' }, 'test').device).toBe('cpu');
    expect(d.device).toBe('auto');
    expectThrows(() => applyConfigLayer(d, { 'sft.lr': 'fast' }, 'test'), { code: 'ERR_INVALID_ARGUMENT', message: /sft.lr must be a number/ });
    expectThrows(() => applyConfigLayer(d, { model: { nHead: 5 } }, 'test'), { code: 'ERR_INVALID_ARGUMENT', message: /must divide/ });
    expectThrows(() => applyConfigLayer(d, { 'ppo.maxNewTokens': 60 }, 'test'), { code: 'ERR_INVALID_ARGUMENT', message: /room for prompts/ });
  });

  test('flags: --key value, --key=value, repeats, kebab-case to camelCase', () => {
    expect(parseFlags(['--run-dir', 'x', '--ppo.policy-lr=1e-3', '--prompt', 'a', '--prompt', 'b', '--greedy'])).toEqual({
      runDir: ['x'], 'ppo.policyLr': ['1e-3'], prompt: ['a', 'b'], greedy: [true],
    });
  });

  test('exit codes: 2 for bad usage and options, 3 when a needed stage has not run', async () => {
    expect((await cli(['frobnicate'])).code).toBe(2);
    expect((await cli([])).code).toBe(2);
    const bad = await cli(['demo', '--sft.stepz', '3']);
    expect(bad.code).toBe(2);
    expect(bad.err).toMatch(/unknown option --sft.stepz/);
    expect((await cli(['demo', '--size', 'huge'])).code).toBe(2);
    expect((await cli(['demo', 'positional'])).code).toBe(2);
    const cfg = path.join(tmpRoot, 'bad-config.json');
    fs.writeFileSync(cfg, '{"sft": {"steps": -1}}');
    expect((await cli(['demo', '--config', cfg, '--runDir', path.join(tmpRoot, 'never')])).code).toBe(2);
    expect((await cli(['demo', '--config', path.join(tmpRoot, 'nope.json')])).code).toBe(1);
    expect((await cli(['demo', '--ppo.presets', 'ppoTurbo', '--runDir', path.join(tmpRoot, 'never')])).code).toBe(2);
    const missing = await cli(['rm', '--size', 'tiny', '--runDir', path.join(tmpRoot, 'empty-run')]);
    expect(missing.code).toBe(3);
    expect(missing.err).toMatch(/the sft stage has not run .*ppo-max sft/);
    const help = await cli(['help', 'demo']);
    expect(help.code).toBe(0);
    expect(help.out).toMatch(/--ppo.policyLr <number>/);
    expect(help.out).toMatch(/--sft.steps <int>[\s\S]*default: tiny 30, default 1500, large 6000/);
  });
});

describe('the pipeline in miniature (tiny model, a few steps)', () => {
  const runDir = path.join(tmpRoot, 'run');
  let demo: { code: number; out: string; err: string };
  const t0 = Date.now();

  beforeAll(async () => {
    demo = await cli(['demo', '--size', 'tiny', '--runDir', runDir, '--no-progress']);
  }, 120000);

  test('the demo runs every stage and exits 0 within a minute', () => {
    expect(demo.err).toBe('');
    expect(demo.code).toBe(0);
    expect(Date.now() - t0).toBeLessThan(60000);
    for (const stage of ['tokenizer', 'sft', 'labels', 'rm', 'ppo-ppoMax', 'ppo-vanilla']) {
      expect(readJson(path.join(runDir, stage, 'done.json')).stage).toBe(stage);
    }
  });

  test('tokenizer and SFT: a tokenizer that loads, a model whose held-out perplexity fell', async () => {
    const tok = Tokenizer.load(path.join(runDir, 'tokenizer', 'tokenizer.json'));
    expect(tok.vocabSize).toBe(defaultConfig('tiny').vocabSize);
    const sft = readJson(path.join(runDir, 'sft', 'done.json')).summary;
    expect(sft.perplexityEnd).toBeLessThan(sft.perplexityStart * 0.8);
    const model = await Model.load(path.join(runDir, 'sft', 'model'), { trainable: false });
    expect(model.config.vocabSize).toBe(tok.vocabSize);
    expect(model.config.eosTokenId).toBe(tok.eosTokenId);
    await model.dispose();
    const log = readJsonl(path.join(runDir, 'sft', 'log.jsonl'));
    expect(log.filter((r) => r.kind === 'sft').length).toBe(defaultConfig('tiny').sft.steps);
  });

  test('labels: every pair is ordered by the labeler, prompts are held-out openings', async () => {
    const pairs = readJsonl(path.join(runDir, 'labels', 'pairs.jsonl'));
    const summary = readJson(path.join(runDir, 'labels', 'done.json')).summary;
    expect(pairs.length).toBe(summary.pairs);
    expect(pairs.length).toBeGreaterThan(10);
    const labeler = new SentimentLabeler();
    const tok = Tokenizer.load(path.join(runDir, 'tokenizer', 'tokenizer.json'));
    const split = splitCorpus(loadCorpus('moby-dick'), { heldOutFraction: 0.15, seed: 1 });
    const openings = new Set(split.heldOut.map((s) => sentenceOpening(s, 5)));
    const trainSet = new Set(split.train);
    for (const p of pairs.slice(0, 40)) {
      expect(labeler.score(p.chosen)).toBeGreaterThan(labeler.score(p.rejected));
      expect(p.scores[0]).toBeGreaterThan(p.scores[1]);
      expect(openings.has(p.prompt)).toBe(true);
      expect(await tok.decode(p.chosenIds)).toBe(p.chosen);
      expect(p.promptIds[0]).toBe(tok.eosTokenId);
    }
    expect(split.heldOut.some((s) => trainSet.has(s))).toBe(false);
    expect(pairs.filter((p) => p.split === 'heldOut').length).toBe(summary.heldOut);
  });

  test('reward model: a value-head model with an accuracy in [0, 1]', async () => {
    const rm = readJson(path.join(runDir, 'rm', 'done.json')).summary;
    expect(rm.accuracy).toBeGreaterThanOrEqual(0);
    expect(rm.accuracy).toBeLessThanOrEqual(1);
    const model = await Model.load(path.join(runDir, 'rm', 'model'), { trainable: false });
    expect(model.config.valueHead).toBe(true);
    await model.dispose();
  });

  test('PPO: both presets logged every step with finite stats and gold; evaluations at start and end', () => {
    const steps = defaultConfig('tiny').ppo.steps;
    for (const preset of ['ppoMax', 'vanilla']) {
      const log = readJsonl(path.join(runDir, `ppo-${preset}`, 'log.jsonl'));
      expect(log.map((r) => r.step)).toEqual(Array.from({ length: steps }, (_, i) => i + 1));
      for (const r of log) for (const k of ['reward_raw_mean', 'gold_mean', 'kl_mean', 'perplexity', 'policy_loss', 'value_loss', 'clip_fraction']) expect(Number.isFinite(r[k])).toBe(true);
      const evals = readJsonl(path.join(runDir, `ppo-${preset}`, 'evals.jsonl'));
      expect(evals[0].step).toBe(0);
      expect(evals[evals.length - 1].step).toBe(steps);
      expect(evals[0].samples.length).toBe(defaultConfig('tiny').ppo.samples);
      expect(fs.existsSync(path.join(runDir, `ppo-${preset}`, 'policy', 'model.safetensors'))).toBe(true);
      expect(fs.existsSync(path.join(runDir, `ppo-${preset}`, 'checkpoint'))).toBe(false);
    }
    const max = readJson(path.join(runDir, 'ppo-ppoMax', 'done.json')).summary;
    expect(max.criticPretrain.passes).toBeGreaterThan(0);
    expect(readJson(path.join(runDir, 'ppo-vanilla', 'done.json')).summary.criticPretrain).toBeNull();
  });

  test('report.html is one self-contained file with the data; summary.json states the findings', () => {
    const html = fs.readFileSync(path.join(runDir, 'report.html'), 'utf8');
    expect(html).toMatch(/Chart\.js v4/); // the library inlined
    expect(html).not.toMatch(/<script[^>]+src=/);
    expect(html).not.toMatch(/https?:\/\/(?!www\.w3\.org)[^"' ]+\.(js|css)/);
    for (const title of ['Proxy reward', 'Gold reward', 'KL to the reference', 'Perplexity', 'Response length', 'Policy loss', 'Value loss', 'Clip fraction']) expect(html).toContain(title);
    expect(html).toMatch(/Secrets of RLHF/);
    const summary = readJson(path.join(runDir, 'summary.json'));
    expect(summary.findings.length).toBeGreaterThanOrEqual(5);
    expect(summary.presets.ppoMax.end.step).toBe(defaultConfig('tiny').ppo.steps);
    expect(html).toContain(summary.findings[0].replace(/&/g, '&amp;').replace(/"/g, '&quot;').replace(/'/g, '&#39;').replace(/</g, '&lt;').replace(/>/g, '&gt;'));
  });

  test('a second run skips every cached stage; a changed PPO setting reruns only PPO', async () => {
    const again = await cli(['demo', '--runDir', runDir, '--no-progress']);
    expect(again.code).toBe(0);
    expect(again.out.match(/done already/g)!.length).toBe(6);
    const before = readJson(path.join(runDir, 'rm', 'done.json')).finishedAt;
    const changed = await cli(['ppo', '--runDir', runDir, '--no-progress', '--ppo.steps', '2', '--ppo.presets', 'vanilla']);
    expect(changed.code).toBe(0);
    expect(changed.out).toMatch(/ppo-vanilla: step 2\/2/);
    expect(readJson(path.join(runDir, 'rm', 'done.json')).finishedAt).toBe(before);
    expect(readJsonl(path.join(runDir, 'ppo-vanilla', 'log.jsonl')).length).toBe(2);
  }, 60000);

  test('generate and eval use the run\'s models', async () => {
    const g = await cli(['generate', '--runDir', runDir, '--model', 'sft', '--prompt', 'The whale', '--samples', '2', '--seed', '3']);
    expect(g.code).toBe(0);
    expect(g.out.match(/^> The whale$/gm)!.length).toBe(2);
    expect(g.out).toMatch(/gold \(labeler\) -?\d+/);
    const e = await cli(['eval', '--runDir', runDir, '--model', 'sft']);
    expect(e.code).toBe(0);
    expect(e.out).toMatch(/^sft\s+-?\d+\.\d{3}\s+-?\d+\.\d{3}\s+-?\d\.\d{3}/m);
    expect((await cli(['generate', '--runDir', runDir, '--model', path.join(tmpRoot, 'no-model')])).code).toBe(1);
  }, 60000);
});

describe('the pipeline on the Llama family', () => {
  test('a Llama model from scratch (--model.type llama), then a run that starts from its checkpoint (--model.init)', async () => {
    const first = path.join(tmpRoot, 'llama');
    const sft = await cli(['sft', '--size', 'tiny', '--runDir', first, '--model.type', 'llama', '--model.nKvHead', '1', '--sft.steps', '20', '--no-progress']);
    expect(sft.err).toBe('');
    expect(sft.code).toBe(0);
    const config = readJson(path.join(first, 'sft', 'model', 'config.json'));
    expect(config).toMatchObject({ model_type: 'llama', num_key_value_heads: 1, num_attention_heads: 2 });
    const evals = readJsonl(path.join(first, 'sft', 'log.jsonl')).filter((r) => r.kind === 'sftEval');
    expect(evals[evals.length - 1].perplexity).toBeLessThan(evals[0].perplexity);
    // A second run starts SFT from that checkpoint with its tokenizer, then goes on to PPO.
    const second = path.join(tmpRoot, 'llama-init');
    const tokenizer = path.join(first, 'tokenizer', 'tokenizer.json');
    const init = path.join(first, 'sft', 'model');
    const needsTokenizer = await cli(['sft', '--size', 'tiny', '--runDir', second, '--model.init', init, '--no-progress']);
    expect(needsTokenizer.code).toBe(2);
    expect(needsTokenizer.err).toMatch(/model.init needs the checkpoint's tokenizer/);
    const run = await cli(['demo', '--size', 'tiny', '--runDir', second, '--model.init', init, '--tokenizer', tokenizer, '--sft.steps', '5', '--ppo.presets', 'ppoMax', '--no-progress']);
    expect(run.err).toBe('');
    expect(run.code).toBe(0);
    const start = readJsonl(path.join(second, 'sft', 'log.jsonl')).find((r) => r.kind === 'sftEval');
    // Starting from the trained checkpoint: far below the perplexity of a new model.
    expect(start.perplexity).toBeLessThan(evals[0].perplexity);
    expect(readJson(path.join(second, 'ppo-ppoMax', 'done.json')).stage).toBe('ppo-ppoMax');
  }, 120000);
});

describe('interrupted and resumed, the run reaches the same numbers', () => {
  test('stopping in SFT and in PPO, then resuming, reproduces an uninterrupted run', async () => {
    const layer = { runDir: '', 'ppo.presets': 'ppoMax', 'ppo.steps': 4, 'ppo.checkpointEvery': 1000, 'sft.checkpointEvery': 1000 };
    const straight = applyConfigLayer(defaultConfig('tiny'), { ...layer, runDir: path.join(tmpRoot, 'straight') }, 'test');
    await new Pipeline(straight, { log: () => {}, progressBar: false }).run();

    const config = applyConfigLayer(defaultConfig('tiny'), { ...layer, runDir: path.join(tmpRoot, 'stopped') }, 'test');
    let stop = false;
    const lines: string[] = [];
    const run = () => new Pipeline(config, {
      progressBar: false,
      shouldStop: () => stop,
      log: (l) => {
        lines.push(l);
        if (/^sft: step 15\//.test(l) || /^ppo-ppoMax: step 2\//.test(l)) stop = true;
      },
    }).run();
    await expectRejects(() => run(), { code: 'ERR_INTERRUPTED', message: /stopped during sft \(step 15 of 30\)/ });
    expect(fs.existsSync(path.join(config.runDir, 'sft', 'checkpoint', 'trainer.json'))).toBe(true);
    stop = false;
    await expectRejects(() => run(), { code: 'ERR_INTERRUPTED', message: /stopped during ppo-ppoMax \(step 2 of 4\)/ });
    expect(lines).toContain('sft: resuming at step 15 of 30');
    stop = false;
    await run();
    expect(lines).toContain('ppo-ppoMax: resuming at step 2 of 4');

    const timeless = (rows: Record<string, unknown>[]) =>
      rows.map((r) => Object.fromEntries(Object.entries(r).filter(([k]) => !/seconds|per_second|^time$/.test(k))));
    for (const file of [['sft', 'log.jsonl'], ['ppo-ppoMax', 'log.jsonl'], ['ppo-ppoMax', 'evals.jsonl'], ['labels', 'pairs.jsonl']]) {
      expect(timeless(readJsonl(path.join(config.runDir, ...file)))).toEqual(timeless(readJsonl(path.join(straight.runDir, ...file))));
    }
    const a = await Model.load(path.join(config.runDir, 'ppo-ppoMax', 'policy'), { trainable: false });
    const b = await Model.load(path.join(straight.runDir, 'ppo-ppoMax', 'policy'), { trainable: false });
    const probe = [[1, 2, 3, 4, 5]];
    expect(Array.from(await a.logits(probe))).toEqual(Array.from(await b.logits(probe)));
    await Promise.all([a.dispose(), b.dispose()]);
  }, 120000);
});

describe('the report in headless Chromium', () => {
  const chromium = ['/usr/bin/chromium', '/usr/bin/chromium-browser', '/usr/bin/google-chrome'].find((p) => fs.existsSync(p)) ?? process.env.CHROMIUM_PATH;
  const maybe = chromium && fs.existsSync(chromium) ? test : test.skip;
  maybe('renders every chart with its data points and paints them', async () => {
    const runDir = path.join(tmpRoot, 'render');
    expect((await cli(['demo', '--size', 'tiny', '--runDir', runDir, '--no-progress', '--ppo.steps', '4'])).code).toBe(0);
    const file = path.join(runDir, 'report.html');
    const profile = fs.mkdtempSync(path.join(tmpRoot, 'chromium-'));
    const r = spawnSync(chromium!, [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', `--user-data-dir=${profile}`, '--virtual-time-budget=5000', '--dump-dom', `file://${file}`,
    ], { encoding: 'utf8', timeout: 60000 });
    const dom = r.stdout;
    const status = /<p id="render-status"[^>]*data-charts="(\d+)"[^>]*data-points="(\d+)"[^>]*data-painted="(\d+)"/.exec(dom);
    expect(status).not.toBeNull();
    const [charts, points, painted] = status!.slice(1).map(Number);
    const expected = readJsonl(path.join(runDir, 'ppo-ppoMax', 'log.jsonl')).length;
    expect(charts).toBe(9 + 4 + 1);
    expect(painted).toBe(charts);
    // 9 per-step charts × 2 presets × 4 steps at least, plus evaluations and the SFT curve
    expect(points).toBeGreaterThanOrEqual(9 * 2 * expected);
  }, 120000);
});
