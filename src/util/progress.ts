import { formatBytes } from './size';

/** Where a piece of work stands, for one progress line. */
export interface ProgressState {
  /** Bytes of guest RAM dealt with so far. */
  covered: number;
  /** Bytes of guest RAM in all; 0 while not known yet (before MEM_SIZE). */
  total: number;
  /** Bytes moved so far (stream bytes, or image bytes read): the rate. */
  moved: number;
  /**
   * How far the work is, 0..1, for the ETA (default covered / total); null
   * when there is no end to estimate (a live VM re-sending dirtied pages).
   */
  fraction?: number | null;
  /** Where the work is, e.g. "first pass", "re-sends". */
  stage?: string;
  /** Counts, e.g. "208043 data + 1200 zero pages". */
  detail?: string;
  /** What covered and total measure (default "RAM"), e.g. "of input" for info. */
  noun?: string;
}

/**
 * How progress is shown: `tty` rewrites one line in place (a few times a
 * second), `lines` writes a plain line every few seconds and a final one
 * (stderr is a file or a pipe: no carriage returns or escapes in it), `off`
 * writes nothing, so callers can report unconditionally.
 */
export type ProgressMode = 'off' | 'tty' | 'lines';

/** Progress of one command on stderr. */
export class ProgressLine {
  private last = 0;
  private readonly started = Date.now();
  private shown = false;
  private readonly everyMs: number;

  constructor(
    private readonly label: string,
    private readonly mode: ProgressMode,
    private readonly out: NodeJS.WritableStream = process.stderr,
    opts: { everyMs?: number } = {},
  ) {
    this.everyMs = opts.everyMs ?? (mode === 'tty' ? 250 : 5000);
    // A line-mode log starts counting from now: the first line after everyMs.
    this.last = mode === 'lines' ? this.started : 0;
  }

  update(state: ProgressState): void {
    if (this.mode === 'off') return;
    const now = Date.now();
    if (now - this.last < this.everyMs) return;
    this.last = now;
    this.write(this.format(state, now, false));
  }

  /** The final line. */
  done(state: ProgressState): void {
    if (this.mode === 'off') return;
    this.write(this.format(state, Date.now(), true));
    if (this.mode === 'tty') this.out.write('\n');
    this.shown = false;
  }

  /** Ends an in-place line without a final figure (before an error message). */
  clear(): void {
    if (this.mode === 'tty' && this.shown) this.out.write('\n');
    this.shown = false;
  }

  private write(line: string): void {
    if (this.mode === 'tty') {
      this.out.write(`\r${line}\x1b[K`);
      this.shown = true;
    } else {
      this.out.write(`${line}\n`);
    }
  }

  /** `save: 812 MiB of 2.0 GiB RAM (40%), first pass, 208043 data + 10 zero pages, 558 MiB/s, ETA 2 s` */
  format(state: ProgressState, now: number, final: boolean): string {
    const secs = Math.max((now - this.started) / 1000, 0.001);
    const parts: string[] = [];
    if (state.total > 0) {
      const pct = Math.min(100, Math.floor((state.covered / state.total) * 100));
      parts.push(`${formatBytes(state.covered)} of ${formatBytes(state.total)} ${state.noun ?? 'RAM'} (${pct}%)`);
    } else {
      parts.push(`${formatBytes(state.covered)} ${state.noun ?? 'RAM'}`);
    }
    if (state.stage) parts.push(state.stage);
    if (state.detail) parts.push(state.detail);
    parts.push(`${formatBytes(state.moved / secs)}/s`);
    if (final) {
      parts.push(`${formatBytes(state.moved)} in ${secs.toFixed(1)} s`);
    } else {
      const f = state.fraction === undefined ? (state.total > 0 ? state.covered / state.total : null) : state.fraction;
      parts.push(`ETA ${eta(f, secs)}`);
    }
    return `${this.label}: ${parts.join(', ')}`;
  }
}

/** Seconds left at the pace so far, once there is enough to go by. */
function eta(fraction: number | null, secs: number): string {
  if (fraction === null || !(fraction > 0.01) || secs < 0.5) return '?';
  const left = Math.max(0, (secs * (1 - Math.min(fraction, 1))) / fraction);
  return left < 60 ? `${Math.round(left)} s` : `${Math.floor(left / 60)} min ${Math.round(left % 60)} s`;
}
