/**
 * Text in, token ids out: Hugging Face's own tokenizer library (the `tokenizers` npm
 * package) behind a small typed wrapper.
 *   - Tokenizer.train: a byte-level BPE (GPT-2's scheme) trained on your text, written as
 *     a standard tokenizer.json that Hugging Face's Python and Rust libraries also read.
 *   - Tokenizer.load: any tokenizer.json a user brings (GPT-2's, Llama's, ...).
 * Ids come back as Int32Array, the layout the models take.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import * as hf from 'tokenizers';
import { PpoMaxError, invalidArgument } from './errors';
import { writeFileAtomic } from './monitor';

export interface TrainTokenizerOptions {
  /** Total ids, the 256 byte tokens and the special tokens included (default 4096). */
  vocabSize?: number;
  /** Added at the end of the vocabulary (default ['<|endoftext|>'], so eos = vocabSize - 1 as in GPT-2). */
  specialTokens?: string[];
}

/** Special tokens that end a text, in the order they are looked for. */
const EOS_NAMES = ['<|endoftext|>', '</s>', '<|end_of_text|>', '<eos>', '<|eot_id|>', '<|im_end|>'];
const BOS_NAMES = ['<|endoftext|>', '<s>', '<|begin_of_text|>', '<bos>'];

/**
 * GPT-2's map from bytes to printable characters (the byte-level alphabet): printable
 * Latin-1 bytes stand for themselves, the other 68 take the code points from 256 on. Its
 * order is the order of the 256 byte tokens in GPT-2's vocabulary, which we keep.
 */
export function byteLevelAlphabet(): string[] {
  const printable: number[] = [];
  for (let b = 33; b <= 126; b++) printable.push(b);
  for (let b = 161; b <= 172; b++) printable.push(b);
  for (let b = 174; b <= 255; b++) printable.push(b);
  const chars = printable.map((b) => String.fromCharCode(b));
  let extra = 0;
  for (let b = 0; b < 256; b++) if (!printable.includes(b)) chars.push(String.fromCharCode(256 + extra++));
  return chars;
}

export class Tokenizer {
  private constructor(
    private readonly inner: hf.Tokenizer,
    /** The tokenizer.json text this tokenizer was made from. */
    readonly json: string,
  ) {}

  /**
   * Trains a byte-level BPE on texts: Hugging Face's BPE trainer learns the merges, and the
   * vocabulary keeps the 256 byte tokens (so any text encodes, no unknown token), then the
   * most frequent merges in the order they were learned, then the special tokens.
   */
  static async train(texts: string[], options: TrainTokenizerOptions = {}): Promise<Tokenizer> {
    if (!Array.isArray(texts) || texts.length === 0 || texts.some((t) => typeof t !== 'string')) {
      throw invalidArgument('texts', 'texts must be a non-empty array of strings');
    }
    const specials = options.specialTokens ?? ['<|endoftext|>'];
    if (!Array.isArray(specials) || specials.some((s) => typeof s !== 'string' || s === '')) {
      throw invalidArgument('specialTokens', 'specialTokens must be an array of non-empty strings');
    }
    const vocabSize = options.vocabSize ?? 4096;
    if (!Number.isSafeInteger(vocabSize) || vocabSize < 256 + specials.length) {
      throw invalidArgument('vocabSize', `vocabSize must be an integer >= ${256 + specials.length} (256 bytes + the special tokens), got ${vocabSize}`);
    }
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ppo-max-tokenizer-'));
    try {
      const corpus = path.join(dir, 'corpus.txt');
      fs.writeFileSync(corpus, texts.join('\n'));
      const trainer = new hf.Tokenizer(hf.BPE.empty());
      trainer.setPreTokenizer(hf.byteLevelPreTokenizer(false, true));
      trainer.train([corpus]);
      const trainedPath = path.join(dir, 'trained.json');
      trainer.save(trainedPath);
      const trained = JSON.parse(fs.readFileSync(trainedPath, 'utf8'));

      const vocab: Record<string, number> = {};
      let size = 0;
      for (const ch of byteLevelAlphabet()) vocab[ch] = size++;
      const merges: [string, string][] = [];
      const budget = vocabSize - specials.length;
      for (const m of trained.model.merges as ([string, string] | string)[]) {
        if (size >= budget) break;
        const [a, b] = typeof m === 'string' ? (m.split(' ') as [string, string]) : m;
        if (vocab[a] === undefined || vocab[b] === undefined || vocab[a + b] !== undefined) continue;
        vocab[a + b] = size++;
        merges.push([a, b]);
      }
      const firstSpecial = size;
      const json = {
        version: '1.0',
        truncation: null,
        padding: null,
        added_tokens: specials.map((content, i) => ({
          id: firstSpecial + i, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true,
        })),
        normalizer: null,
        pre_tokenizer: { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true },
        post_processor: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: false, use_regex: true },
        decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
        model: {
          type: 'BPE', dropout: null, unk_token: null, continuing_subword_prefix: '', end_of_word_suffix: '',
          fuse_unk: false, byte_fallback: false, ignore_merges: false, vocab, merges,
        },
      };
      return Tokenizer.fromJSON(JSON.stringify(json), 'the trained tokenizer');
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }

  /** Loads a tokenizer.json. Missing: ERR_NOT_FOUND; not a tokenizer: ERR_CORRUPT_FILE. */
  static load(file: string): Tokenizer {
    if (typeof file !== 'string' || file === '') throw invalidArgument('file', 'file must be a path to a tokenizer.json');
    if (!fs.existsSync(file)) throw new PpoMaxError('ERR_NOT_FOUND', `${file}: no such tokenizer file`, 'file');
    let text: string;
    try {
      text = fs.readFileSync(file, 'utf8');
    } catch (e) {
      throw new PpoMaxError('ERR_IO', `${file}: ${(e as Error).message}`, 'file');
    }
    return Tokenizer.fromJSON(text, file);
  }

  /** A tokenizer from the text of a tokenizer.json. */
  static fromJSON(text: string, source = 'tokenizer.json'): Tokenizer {
    try {
      JSON.parse(text);
    } catch (e) {
      throw new PpoMaxError('ERR_CORRUPT_FILE', `${source}: not valid JSON (${(e as Error).message})`, 'file');
    }
    try {
      return new Tokenizer(hf.Tokenizer.fromString(text), text);
    } catch (e) {
      throw new PpoMaxError('ERR_CORRUPT_FILE', `${source}: not a tokenizer.json Hugging Face's tokenizers can read (${(e as Error).message})`, 'file');
    }
  }

  /** The number of ids, added tokens included: the model's vocabSize must be at least this. */
  get vocabSize(): number {
    return this.inner.getVocabSize(true);
  }

  /** The id of a token string, or null. */
  tokenId(token: string): number | null {
    return this.inner.tokenToId(token) ?? null;
  }

  /** The token string of an id, or null. */
  token(id: number): string | null {
    return this.inner.idToToken(id) ?? null;
  }

  /** The end-of-text id (<|endoftext|>, </s>, <eos>, ...), or null when it has none. */
  get eosTokenId(): number | null {
    for (const name of EOS_NAMES) {
      const id = this.tokenId(name);
      if (id !== null) return id;
    }
    return null;
  }

  /** The beginning-of-text id (GPT-2 uses <|endoftext|>), or null. */
  get bosTokenId(): number | null {
    for (const name of BOS_NAMES) {
      const id = this.tokenId(name);
      if (id !== null) return id;
    }
    return null;
  }

  /** Token ids of a text (no special tokens added unless asked). */
  async encode(text: string, options: { addSpecialTokens?: boolean } = {}): Promise<Int32Array> {
    if (typeof text !== 'string') throw invalidArgument('text', 'text must be a string');
    const e = await this.inner.encode(text, null, { addSpecialTokens: options.addSpecialTokens ?? false });
    return Int32Array.from(e.getIds());
  }

  async encodeBatch(texts: string[], options: { addSpecialTokens?: boolean } = {}): Promise<Int32Array[]> {
    if (!Array.isArray(texts) || texts.some((t) => typeof t !== 'string')) throw invalidArgument('texts', 'texts must be an array of strings');
    if (texts.length === 0) return [];
    const es = await this.inner.encodeBatch(texts, { addSpecialTokens: options.addSpecialTokens ?? false });
    return es.map((e) => Int32Array.from(e.getIds()));
  }

  /** The text of ids (special tokens left out unless skipSpecialTokens is false). */
  async decode(ids: ArrayLike<number>, options: { skipSpecialTokens?: boolean } = {}): Promise<string> {
    return this.inner.decode(this.checkIds(ids, 'ids'), options.skipSpecialTokens ?? true);
  }

  async decodeBatch(ids: ArrayLike<number>[], options: { skipSpecialTokens?: boolean } = {}): Promise<string[]> {
    if (!Array.isArray(ids)) throw invalidArgument('ids', 'ids must be an array of id arrays');
    if (ids.length === 0) return [];
    return this.inner.decodeBatch(ids.map((row, i) => this.checkIds(row, `ids[${i}]`)), options.skipSpecialTokens ?? true);
  }

  /** Writes tokenizer.json atomically (a temp file, then rename). */
  save(file: string): void {
    writeFileAtomic(file, this.json);
  }

  private checkIds(ids: ArrayLike<number>, what: string): number[] {
    if (ids === null || typeof ids !== 'object' || typeof (ids as { length?: unknown }).length !== 'number') {
      throw invalidArgument(what, `${what} must be an array of token ids`);
    }
    const out = Array.from(ids);
    const v = this.vocabSize;
    for (let i = 0; i < out.length; i++) {
      if (!Number.isInteger(out[i]) || out[i] < 0 || out[i] >= v) {
        throw new PpoMaxError('ERR_OUT_OF_RANGE', `${what}[${i}] = ${out[i]} is not a token id in [0, ${v})`, what);
      }
    }
    return out;
  }
}
