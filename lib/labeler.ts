/**
 * The simulated human: a labeler that prefers, of two responses, the one a transparent
 * rule scores higher. It stands in for human raters, and says so; its own score is the
 * gold reward that the learned reward model only approximates.
 *
 * The rule: positive sentiment under the AFINN-165 lexicon (the `sentiment` package): the
 * sum of the valences (-5..5) of the words of the response, negations handled as the
 * package does ("not good" counts -3). By default a word counts once however often it is
 * repeated (`countRepeats: false`), as a reader would not find "good good good" three
 * times as pleasant as "good": the gold reward is then not gamed by repetition, while a
 * reward model that only learned "positive words are good" is.
 */
import Sentiment = require('sentiment');
import { invalidArgument } from './errors';

export interface LabelerOptions {
  /** Count each repetition of a word (plain AFINN sum) instead of each distinct word once (default false). */
  countRepeats?: boolean;
}

export interface Preference {
  /** 0: the first response is preferred; 1: the second. */
  choice: 0 | 1;
  scores: [number, number];
}

export class SentimentLabeler {
  private readonly analyzer = new Sentiment();
  readonly countRepeats: boolean;

  constructor(options: LabelerOptions = {}) {
    if (options.countRepeats !== undefined && typeof options.countRepeats !== 'boolean') {
      throw invalidArgument('countRepeats', 'countRepeats must be a boolean');
    }
    this.countRepeats = options.countRepeats ?? false;
  }

  /** The gold reward of a response: AFINN valence, each distinct word once unless countRepeats. */
  score(text: string): number {
    if (typeof text !== 'string') throw invalidArgument('text', 'text must be a string');
    const result = this.analyzer.analyze(text);
    if (this.countRepeats) return result.score;
    const seen = new Map<string, number>();
    for (const entry of result.calculation) {
      for (const [word, valence] of Object.entries(entry)) if (!seen.has(word)) seen.set(word, valence);
    }
    let sum = 0;
    for (const v of seen.values()) sum += v;
    return sum;
  }

  /** The words that carry sentiment in a text, with their valence (for reports). */
  sentimentWords(text: string): { word: string; valence: number }[] {
    return this.analyzer.analyze(text).calculation.flatMap((e) => Object.entries(e).map(([word, valence]) => ({ word, valence })));
  }

  /** Which of two responses the labeler prefers; null on a tie (no preference: the pair is dropped). */
  prefer(a: string, b: string): Preference | null {
    const sa = this.score(a);
    const sb = this.score(b);
    if (sa === sb) return null;
    return { choice: sa > sb ? 0 : 1, scores: [sa, sb] };
  }
}
