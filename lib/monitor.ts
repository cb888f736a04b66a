/**
 * Watching a run: alarms for the failure the paper documents (pattern collapse: responses
 * running to the length cap, repetition, KL to the reference accelerating, entropy
 * collapsing) and for non-finite steps; a JSONL metrics log; a terminal progress bar.
 */
import * as fs from 'fs';
import * as path from 'path';

export type AlarmKind = 'lengthToCap' | 'repetition' | 'klAccelerating' | 'entropyCollapse' | 'nonFinite';

export interface Alarm {
  kind: AlarmKind;
  /** The trainer step that raised it. */
  step: number;
  message: string;
  /** The numbers that set it off. */
  values: Record<string, number>;
}

export interface AlarmThresholds {
  /** Share of responses truncated at maxNewTokens (default 0.5), or mean length ≥ 0.9 × cap. */
  truncatedFraction?: number;
  /** Share of repeated 3-grams within responses (default 0.3). */
  repetition?: number;
  /** KL per token (k1) must exceed this before acceleration counts (default 0.05). */
  klFloor?: number;
  /** Entropy below this share of its first value (default 0.25). */
  entropyRatio?: number;
}

/** The state alarms carry between steps (saved with the trainer). */
export interface MonitorState {
  klHistory: number[];
  firstEntropy: number | null;
}

export class AlarmMonitor {
  private klHistory: number[] = [];
  private firstEntropy: number | null = null;
  constructor(
    private readonly maxNewTokens: number,
    private readonly t: Required<AlarmThresholds> = { truncatedFraction: 0.5, repetition: 0.3, klFloor: 0.05, entropyRatio: 0.25 },
  ) {}

  state(): MonitorState {
    return { klHistory: [...this.klHistory], firstEntropy: this.firstEntropy };
  }
  restore(s: MonitorState): void {
    this.klHistory = [...s.klHistory];
    this.firstEntropy = s.firstEntropy;
  }

  /** The alarms a step's statistics raise. */
  check(step: number, stats: Record<string, number>): Alarm[] {
    const alarms: Alarm[] = [];
    const nonFinite = Object.entries(stats).filter(([, v]) => !Number.isFinite(v));
    if (stats.skipped === 1 || nonFinite.length > 0) {
      alarms.push({
        kind: 'nonFinite',
        step,
        message:
          stats.skipped === 1
            ? 'a loss or gradient turned non-finite: the update was skipped and the models left untouched'
            : `non-finite statistics: ${nonFinite.map(([k]) => k).join(', ')}`,
        values: Object.fromEntries(nonFinite.length ? nonFinite : [['skipped', stats.skipped ?? 0]]),
      });
    }
    const len = stats.response_length_mean, trunc = stats.truncated_fraction;
    if (Number.isFinite(len) && (trunc >= this.t.truncatedFraction || len >= 0.9 * this.maxNewTokens)) {
      alarms.push({
        kind: 'lengthToCap',
        step,
        message: `responses run to the length cap (mean ${len.toFixed(1)} of ${this.maxNewTokens}, ${(100 * trunc).toFixed(0)}% truncated)`,
        values: { response_length_mean: len, truncated_fraction: trunc, max_new_tokens: this.maxNewTokens },
      });
    }
    if (stats.repetition >= this.t.repetition) {
      alarms.push({
        kind: 'repetition',
        step,
        message: `responses repeat themselves: ${(100 * stats.repetition).toFixed(0)}% of their 3-grams are repeats`,
        values: { repetition: stats.repetition },
      });
    }
    if (Number.isFinite(stats.kl_mean)) {
      const h = this.klHistory;
      h.push(stats.kl_mean);
      if (h.length > 4) h.shift();
      if (h.length >= 3) {
        const [a, b, c] = h.slice(-3);
        const d1 = b - a, d2 = c - b;
        if (c > this.t.klFloor && d1 > 0 && d2 > d1) {
          alarms.push({
            kind: 'klAccelerating',
            step,
            message: `KL to the reference is accelerating: ${a.toFixed(4)} → ${b.toFixed(4)} → ${c.toFixed(4)} per token`,
            values: { kl_previous2: a, kl_previous: b, kl_mean: c },
          });
        }
      }
    }
    const ent = stats.entropy_mean;
    if (Number.isFinite(ent) && ent > 0) {
      if (this.firstEntropy === null) this.firstEntropy = ent;
      else if (ent < this.t.entropyRatio * this.firstEntropy) {
        alarms.push({
          kind: 'entropyCollapse',
          step,
          message: `the policy's entropy collapsed to ${ent.toFixed(3)} from ${this.firstEntropy.toFixed(3)}`,
          values: { entropy_mean: ent, entropy_first: this.firstEntropy },
        });
      }
    }
    return alarms;
  }
}

/** Appends one JSON object per line (created with its directory's existence assumed). */
/** Writes a file atomically: a temp file beside it, then rename (an interrupted write leaves the old file). */
export function writeFileAtomic(file: string, text: string): void {
  fs.mkdirSync(path.dirname(path.resolve(file)), { recursive: true });
  const tmp = `${file}.tmp-${process.pid}-${Date.now()}`;
  fs.writeFileSync(tmp, text);
  fs.renameSync(tmp, file);
}

export class JsonlLog {
  constructor(readonly path: string) {}
  write(record: Record<string, unknown>): void {
    fs.appendFileSync(this.path, `${JSON.stringify(record, (_k, v) => (typeof v === 'number' && !Number.isFinite(v) ? String(v) : v))}\n`);
  }
}

/** A one-line progress bar on a terminal (stderr): stage, bar, counts, rate, time left. */
export class ProgressBar {
  private start = Date.now();
  private stage = '';
  private lastDraw = 0;
  constructor(private readonly stream: NodeJS.WriteStream = process.stderr) {}

  static enabled(option: boolean | 'auto' | undefined): boolean {
    if (option === true) return true;
    if (option === false) return false;
    return Boolean(process.stderr.isTTY) && !process.env.CI;
  }

  update(stage: string, done: number, total: number, label = ''): void {
    const now = Date.now();
    if (stage !== this.stage) {
      this.stage = stage;
      this.start = now;
    }
    if (done < total && now - this.lastDraw < 100) return;
    this.lastDraw = now;
    const width = 24;
    const frac = total > 0 ? Math.min(1, done / total) : 0;
    const bar = '#'.repeat(Math.round(frac * width)).padEnd(width, '.');
    const secs = (now - this.start) / 1000;
    const rate = secs > 0 ? done / secs : 0;
    const left = rate > 0 ? (total - done) / rate : 0;
    const line = `${label}${stage} [${bar}] ${done}/${total} ${rate.toFixed(1)}/s ${left > 0 ? `${left.toFixed(0)}s left` : ''}`;
    this.stream.write(`\r${line.padEnd(78).slice(0, 100)}`);
    if (done >= total) this.stream.write('\n');
  }
}
