import pump from 'pump';

/** A stream of either family: streamx or Node.js. */
export type AnyStream = NodeJS.ReadableStream | NodeJS.WritableStream | { destroy(err?: Error | null): void; on(ev: string, fn: (...a: unknown[]) => void): unknown };

/**
 * pump (errors tear the whole pipeline down, backpressure end to end) as a
 * promise. pump's typings only know Node streams; streamx streams speak the
 * same protocol at run time.
 */
export function pumpAsync(...streams: AnyStream[]): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const list = streams as unknown as NodeJS.ReadWriteStream[];
    pump(list, (err?: Error) => (err ? reject(err) : resolve()));
  });
}
