import { formatBytes } from './size';

/**
 * One status line on stderr, rewritten in place at most a few times a second.
 * Silent unless enabled, so callers can report unconditionally.
 */
export class ProgressLine {
  private last = 0;
  private readonly started = Date.now();
  private shown = false;

  constructor(private readonly enabled: boolean, private readonly out: NodeJS.WriteStream = process.stderr) {}

  update(bytes: number, pages: number, extra = ''): void {
    if (!this.enabled) return;
    const now = Date.now();
    if (now - this.last < 250) return;
    this.last = now;
    this.render(bytes, pages, extra, now);
  }

  done(bytes: number, pages: number, extra = ''): void {
    if (!this.enabled) return;
    this.render(bytes, pages, extra, Date.now());
    this.out.write('\n');
    this.shown = false;
  }

  /** Ends the line without a final figure (before an error message). */
  clear(): void {
    if (this.enabled && this.shown) this.out.write('\n');
    this.shown = false;
  }

  private render(bytes: number, pages: number, extra: string, now: number): void {
    const secs = Math.max((now - this.started) / 1000, 0.001);
    const rate = formatBytes(bytes / secs);
    const line = `${formatBytes(bytes)}  ${pages} pages  ${rate}/s  ${secs.toFixed(1)} s${extra ? '  ' + extra : ''}`;
    this.out.write(`\r${line}\x1b[K`);
    this.shown = true;
  }
}
