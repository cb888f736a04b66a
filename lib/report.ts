/**
 * report.html: one self-contained page (Chart.js from the npm registry inlined, the run's
 * numbers embedded as JSON) comparing the PPO presets of a run side by side, with the
 * paper's finding, what this run shows, and sample responses at the start, middle and end.
 * Opens offline. When the page has drawn its charts it writes what it drew into
 * #render-status (charts, points, charts with painted pixels), which tests read back
 * from headless Chromium.
 */
import * as fs from 'fs';
import * as path from 'path';

import { writeFileAtomic } from './monitor';
import type { Pipeline, PolicyEvaluation, StageRecord } from './pipeline';

/** The records of a JSON-lines file ([] when it does not exist). */
export function readJsonl<T>(file: string): T[] {
  if (!fs.existsSync(file)) return [];
  return fs
    .readFileSync(file, 'utf8')
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => JSON.parse(l) as T);
}

function chartJsSource(): string {
  // chart.js exports only '.', './auto' and './helpers'; the UMD build sits beside them.
  const auto = require.resolve('chart.js/auto');
  return fs.readFileSync(path.resolve(path.dirname(auto), '..', 'dist', 'chart.umd.min.js'), 'utf8');
}

const escapeHtml = (s: string) => s.replace(/[&<>"']/g, (ch) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[ch]!);
const fmt = (x: unknown, digits = 3) => (typeof x === 'number' && Number.isFinite(x) ? x.toFixed(digits) : String(x));

/** The charts: [title, stat key in log.jsonl, what it shows]. */
const CHARTS: [string, string, string][] = [
  ['Proxy reward (reward model)', 'reward_raw_mean', 'mean reward-model score of the step\'s rollouts'],
  ['Gold reward (the labeler)', 'gold_mean', 'mean AFINN score of the same responses: what the reward model stands in for'],
  ['KL to the reference (per token)', 'kl_mean', 'mean per-token log-ratio to the SFT model'],
  ['Perplexity of responses', 'perplexity', 'exp(mean negative log-likelihood of the sampled responses under the policy)'],
  ['Response length (tokens)', 'response_length_mean', 'mean generated tokens'],
  ['Repeated 3-grams', 'repetition', 'share of a response\'s 3-grams that repeat an earlier one'],
  ['Policy loss', 'policy_loss', 'clipped surrogate loss'],
  ['Value loss', 'value_loss', 'clipped value loss'],
  ['Clip fraction', 'clip_fraction', 'share of tokens whose ratio was clipped'],
];

interface PresetRun {
  name: string;
  record: StageRecord | null;
  log: Record<string, number>[];
  evals: PolicyEvaluation[];
}

/** Plain-language sentences on what the run shows, computed from its numbers. */
export function findings(presets: PresetRun[]): string[] {
  const out: string[] = [];
  const byName = Object.fromEntries(presets.filter((p) => p.evals.length > 1).map((p) => [p.name, p]));
  const delta = (p: PresetRun, k: keyof PolicyEvaluation) => (p.evals[p.evals.length - 1][k] as number) - (p.evals[0][k] as number);
  for (const p of Object.values(byName)) {
    const a = p.evals[0], b = p.evals[p.evals.length - 1];
    out.push(
      `${p.name}: over ${b.step} steps, proxy reward ${fmt(a.proxy)} → ${fmt(b.proxy)} (${delta(p, 'proxy') >= 0 ? '+' : ''}${fmt(delta(p, 'proxy'))}), ` +
        `gold reward ${fmt(a.gold)} → ${fmt(b.gold)} (${delta(p, 'gold') >= 0 ? '+' : ''}${fmt(delta(p, 'gold'))}), ` +
        `KL/token ${fmt(a.kl)} → ${fmt(b.kl)}, perplexity ${fmt(a.perplexity, 2)} → ${fmt(b.perplexity, 2)}, ` +
        `repeated 3-grams ${fmt(a.repetition)} → ${fmt(b.repetition)}, length ${fmt(a.length, 1)} → ${fmt(b.length, 1)} (held-out prompts).`,
    );
  }
  const max = byName.ppoMax, van = byName.vanilla;
  if (max && van) {
    const mEnd = max.evals[max.evals.length - 1], vEnd = van.evals[van.evals.length - 1];
    out.push(
      vEnd.kl > mEnd.kl
        ? `KL: vanilla drifted further from the reference (${fmt(vEnd.kl)} vs ${fmt(mEnd.kl)} per token under ppoMax): consistent with the paper.`
        : `KL: vanilla did not drift further than ppoMax (${fmt(vEnd.kl)} vs ${fmt(mEnd.kl)} per token): not what the paper reports.`,
    );
    const vGap = delta(van, 'proxy') - delta(van, 'gold');
    out.push(
      delta(van, 'proxy') > 0 && vGap > 0
        ? `Reward hacking: under vanilla the proxy rose by ${fmt(delta(van, 'proxy'))} while the gold rose by ${fmt(delta(van, 'gold'))}: the policy gains reward-model score faster than it gains what the labeler wants.`
        : `Reward hacking: under vanilla the proxy changed by ${fmt(delta(van, 'proxy'))} and the gold by ${fmt(delta(van, 'gold'))}: no gap opened between them in this run.`,
    );
    out.push(
      vEnd.perplexity > mEnd.perplexity * 1.05 || vEnd.repetition > mEnd.repetition + 0.02
        ? `Degeneration: vanilla's responses ended with perplexity ${fmt(vEnd.perplexity, 2)} and ${fmt(100 * vEnd.repetition, 1)}% repeated 3-grams, ppoMax's with ${fmt(mEnd.perplexity, 2)} and ${fmt(100 * mEnd.repetition, 1)}%.`
        : `Degeneration: vanilla's responses (perplexity ${fmt(vEnd.perplexity, 2)}, ${fmt(100 * vEnd.repetition, 1)}% repeated 3-grams) were not more degenerate than ppoMax's (${fmt(mEnd.perplexity, 2)}, ${fmt(100 * mEnd.repetition, 1)}%).`,
    );
    out.push(
      delta(max, 'gold') > 0
        ? `Gold under ppoMax improved by ${fmt(delta(max, 'gold'))} (vanilla: ${delta(van, 'gold') >= 0 ? '+' : ''}${fmt(delta(van, 'gold'))}) with KL held at ${fmt(mEnd.kl)} per token.`
        : `Gold under ppoMax did not improve (${fmt(delta(max, 'gold'))}; vanilla: ${fmt(delta(van, 'gold'))}).`,
    );
  }
  return out;
}

/** The middle evaluation of a run (closest to half its steps). */
function middle(evals: PolicyEvaluation[]): PolicyEvaluation | undefined {
  if (evals.length === 0) return undefined;
  const half = evals[evals.length - 1].step / 2;
  return evals.reduce((best, e) => (Math.abs(e.step - half) < Math.abs(best.step - half) ? e : best), evals[0]);
}

export async function writeReport(pipeline: Pipeline): Promise<string> {
  const c = pipeline.config;
  const stage = (name: string) => pipeline.done(name);
  const presets: PresetRun[] = c.ppo.presets.map((name) => ({
    name,
    record: stage(`ppo-${name}`),
    log: readJsonl<Record<string, number>>(pipeline.dir(`ppo-${name}`, 'log.jsonl')),
    evals: readJsonl<PolicyEvaluation>(pipeline.dir(`ppo-${name}`, 'evals.jsonl')),
  }));
  const sftLog = readJsonl<{ kind: string; step: number; perplexity: number; loss: number }>(pipeline.dir('sft', 'log.jsonl'));
  const records = Object.fromEntries(['tokenizer', 'sft', 'labels', 'rm'].map((s) => [s, stage(s)]));
  const lines = findings(presets);

  const colors: Record<string, string> = { ppoMax: '#1f77b4', vanilla: '#d62728', ppoPtx: '#2ca02c' };
  const chartData = {
    charts: CHARTS.map(([title, key, help]) => ({
      title, help,
      datasets: presets.map((p) => ({ label: p.name, color: colors[p.name] ?? '#555', points: p.log.filter((r) => Number.isFinite(Number(r[key]))).map((r) => ({ x: r.step, y: Number(r[key]) })) })),
    })),
    evalCharts: (['proxy', 'gold', 'kl', 'perplexity'] as const).map((key) => ({
      title: `Held-out prompts: ${key === 'kl' ? 'KL/token' : key}`,
      help: `on the ${c.prompts.evalCount} evaluation prompts every ${c.ppo.evalEvery} steps`,
      datasets: presets.map((p) => ({ label: p.name, color: colors[p.name] ?? '#555', points: p.evals.map((e) => ({ x: e.step, y: e[key] })) })),
    })),
    sft: sftLog.filter((r) => r.kind === 'sftEval').map((r) => ({ x: r.step, y: r.perplexity })),
  };

  const sampleRows: string[] = [];
  const evalsAt = presets.map((p) => ({ name: p.name, at: { start: p.evals[0], middle: middle(p.evals), end: p.evals[p.evals.length - 1] } }));
  const nSamples = Math.max(0, ...presets.map((p) => p.evals[0]?.samples.length ?? 0));
  for (let i = 0; i < nSamples; i++) {
    for (const when of ['start', 'middle', 'end'] as const) {
      const cells = evalsAt.map((p) => {
        const e = p.at[when];
        const s = e?.samples[i];
        return s ? `<td><span class="resp">${escapeHtml(s.response)}</span><div class="meta">step ${e!.step} · proxy ${fmt(s.proxy, 2)} · gold ${fmt(s.gold, 0)}</div></td>` : '<td></td>';
      });
      const prompt = evalsAt[0]?.at.start?.samples[i]?.prompt ?? '';
      sampleRows.push(`<tr>${when === 'start' ? `<td rowspan="3" class="prompt">${escapeHtml(prompt)}…</td>` : ''}<td>${when}</td>${cells.join('')}</tr>`);
    }
  }

  const summaryTable = (rows: [string, string][]) => `<table class="kv">${rows.map(([k, v]) => `<tr><th>${escapeHtml(k)}</th><td>${v}</td></tr>`).join('')}</table>`;
  const tok = records.tokenizer?.summary as Record<string, number> | undefined;
  const sft = records.sft?.summary as Record<string, number> | undefined;
  const labels = records.labels?.summary as Record<string, number> | undefined;
  const rm = records.rm?.summary as Record<string, number> | undefined;
  const pipelineRows: [string, string][] = [
    ['Corpus', `${escapeHtml(c.corpus)}: ${tok?.sentencesTrain ?? '?'} sentences for pretraining, ${tok?.sentencesHeldOut ?? '?'} held out (prompts are their first ${c.prompts.openingWords} words)`],
    ['Tokenizer', `byte-level BPE, ${tok?.vocabSize ?? '?'} tokens, ${fmt(tok?.charsPerToken, 2)} characters per token`],
    ['Model', c.model.init ? `from ${c.model.init}, context ${c.model.nPositions}` : `${c.model.type === 'llama' ? 'Llama' : 'GPT-2'}: ${c.model.nLayer} layers, width ${c.model.nEmbd}, ${c.model.nHead} heads, context ${c.model.nPositions}`],
    ['SFT', sft ? `held-out perplexity ${fmt(sft.perplexityStart, 1)} → ${fmt(sft.perplexityEnd, 1)} in ${c.sft.steps} steps (${fmt(sft.epochs, 1)} epochs)` : 'not run'],
    ['Labels', labels ? `${labels.pairs} preference pairs of ${labels.compared} comparisons (${labels.ties} ties dropped), ${labels.heldOut} held out` : 'not run'],
    ['Reward model', rm ? `held-out pairwise accuracy <b>${fmt(100 * rm.accuracy, 1)}%</b> (chance 50%) on ${rm.heldOutPairs} pairs; trained on ${rm.trainPairs}` : 'not run'],
    ...presets.map((p): [string, string] => {
      const s = p.record?.summary as { secondsPerStep?: number; criticPretrain?: { valueLossFirst: number; valueLoss: number; passes: number } | null; alarms?: number; skipped?: number } | undefined;
      return [`PPO ${p.name}`, s ? `${c.ppo.steps} steps, ${fmt(s.secondsPerStep, 2)} s/step${s.criticPretrain ? `, critic pre-trained (value loss ${fmt(s.criticPretrain.valueLossFirst, 4)} → ${fmt(s.criticPretrain.valueLoss, 4)})` : ''}, ${s.alarms} alarms, ${s.skipped} skipped steps` : 'not finished'];
    }),
  ];

  const html = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ppo-max run report</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:16px 24px;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:0}h2{margin-top:1.8em;border-bottom:1px solid #ddd}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:18px}
.chart{border:1px solid #e3e3e3;border-radius:6px;padding:8px}.chart h3{margin:0;font-size:1em}.chart p{margin:2px 0 6px;color:#666;font-size:.85em}
canvas{width:100%!important;height:220px!important}
table{border-collapse:collapse;width:100%}td,th{border:1px solid #e3e3e3;padding:6px;vertical-align:top;text-align:left}
.kv th{width:160px;background:#fafafa}.prompt{font-style:italic;width:180px}.resp{font-family:Georgia,serif}.meta{color:#777;font-size:.8em}
.claim{background:#f6f8fa;border-left:4px solid #1f77b4;padding:8px 14px}.muted{color:#666}
</style></head><body>
<h1>ppo-max: PPO-max versus vanilla PPO on ${escapeHtml(c.corpus)}</h1>
<p class="muted">Run directory <code>${escapeHtml(path.resolve(c.runDir))}</code> · seed ${c.seed} · written ${new Date().toISOString()}</p>

<h2>The finding tested</h2>
<div class="claim"><p>Zheng et al. (2023), <i>Secrets of RLHF in Large Language Models Part I: PPO</i>: under vanilla PPO the reward model's score
(the proxy) keeps rising while the policy drifts away from the SFT model into degenerate patterns (repetition, collapse), so the
reward the humans would give stops improving; PPO-max's constraints (token-level KL penalty, reward normalization and clipping,
value clipping, gradient clipping, critic pre-training from the reward model) keep KL and perplexity bounded while the real reward improves.</p>
<p>Here the humans are simulated, and said to be: a labeler prefers the continuation with the more positive sentiment under the AFINN
lexicon (${c.labels.countRepeats ? 'every occurrence of a word counted' : 'each distinct word counted once, so repeating "good" earns nothing more'}).
Its preferences between pairs of samples train the reward model (the proxy); its own score is the gold reward.</p></div>
<h2>What this run shows</h2>
<ul>${lines.map((l) => `<li>${escapeHtml(l)}</li>`).join('\n')}</ul>

<h2>The pipeline</h2>
${summaryTable(pipelineRows)}

<h2>Training curves (each PPO step's rollouts)</h2>
<div class="grid" id="charts"></div>
<h2>Held-out evaluation prompts</h2>
<div class="grid" id="eval-charts"></div>
<h2>SFT</h2>
<div class="grid" id="sft-charts"></div>

<h2>Sample responses to the same prompts</h2>
<table><tr><th>prompt</th><th>when</th>${presets.map((p) => `<th>${escapeHtml(p.name)}</th>`).join('')}</tr>
${sampleRows.join('\n')}</table>

<p id="render-status" class="muted">charts not drawn (JavaScript off?)</p>
<script>${chartJsSource().replace(/<\/script/gi, '<\\/script')}</script>
<script>
const DATA = ${JSON.stringify(chartData).replace(/</g, '\\u003c')};
const made = [];
function chart(parent, title, help, datasets, yLabel) {
  const box = document.createElement('div'); box.className = 'chart';
  box.innerHTML = '<h3></h3><p></p><canvas></canvas>';
  box.querySelector('h3').textContent = title; box.querySelector('p').textContent = help;
  document.getElementById(parent).appendChild(box);
  const c = new Chart(box.querySelector('canvas'), {
    type: 'line',
    data: { datasets: datasets.map(d => ({ label: d.label, data: d.points, borderColor: d.color, backgroundColor: d.color, pointRadius: d.points.length > 40 ? 0 : 2, borderWidth: 1.5, tension: 0 })) },
    options: { animation: false, responsive: true, maintainAspectRatio: false, parsing: true,
      scales: { x: { type: 'linear', title: { display: true, text: 'step' } }, y: { title: { display: !!yLabel, text: yLabel || '' } } },
      plugins: { legend: { position: 'bottom' } } },
  });
  made.push(c);
}
for (const ch of DATA.charts) chart('charts', ch.title, ch.help, ch.datasets);
for (const ch of DATA.evalCharts) chart('eval-charts', ch.title, ch.help, ch.datasets);
chart('sft-charts', 'SFT: held-out perplexity', 'on held-out sentences during pretraining', [{ label: 'sft', color: '#555', points: DATA.sft }]);
let points = 0, painted = 0;
for (const c of made) {
  c.update();
  points += c.data.datasets.reduce((s, d) => s + d.data.length, 0);
  const cv = c.canvas, px = cv.getContext('2d').getImageData(0, 0, cv.width, cv.height).data;
  let ink = 0; for (let i = 3; i < px.length; i += 4) if (px[i] > 0) ink++;
  if (ink > 0) painted++;
}
const status = document.getElementById('render-status');
status.textContent = 'rendered ' + made.length + ' charts, ' + points + ' points, ' + painted + ' painted';
status.dataset.charts = made.length; status.dataset.points = points; status.dataset.painted = painted;
</script>
</body></html>
`;
  const file = pipeline.dir('report.html');
  writeFileAtomic(file, html);
  const evalSummary = (p: PresetRun) => (p.evals.length ? { start: { ...p.evals[0], samples: undefined }, end: { ...p.evals[p.evals.length - 1], samples: undefined } } : null);
  const summary = {
    config: c,
    stages: Object.fromEntries(Object.entries(records).map(([k, r]) => [k, r?.summary ?? null])),
    presets: Object.fromEntries(presets.map((p) => [p.name, { ...evalSummary(p), summary: p.record?.summary ?? null }])),
    findings: lines,
  };
  writeFileAtomic(pipeline.dir('summary.json'), `${JSON.stringify(summary, null, 2)}\n`);
  return file;
}
