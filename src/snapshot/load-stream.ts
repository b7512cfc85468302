// createLoadStream: the precopy stream of an image as a Readable, for
// composing (`pipeline(createLoadStream(img), socket)`). Postcopy needs the
// destination's return path, so it stays with loadSnapshot.
import { PassThrough, Readable } from 'streamx';
import { loadSnapshot, LoadOptions, LoadResult } from './load';

export type LoadStreamOptions = Omit<LoadOptions, 'output' | 'stdout' | 'postcopy' | 'returnPath' | 'onEvent'> & {
  /** Called with the load's figures once the whole stream has been handed to the reader. */
  onDone?(result: LoadResult): void;
};

/**
 * The migration stream of `imagePath` (precopy) as a streamx Readable. Bad
 * images and failed RAM digests destroy the stream with the load's error;
 * destroying the stream stops the load.
 */
export function createLoadStream(imagePath: string, opts: LoadStreamOptions = {}): Readable & NodeJS.ReadableStream {
  const out = new PassThrough();
  const stop = new AbortController();
  let finished = false;
  const outer = opts.signal;
  const onOuterAbort = () => stop.abort(outer?.reason);
  if (outer?.aborted) onOuterAbort();
  outer?.addEventListener('abort', onOuterAbort);
  out.on('close', () => {
    if (!finished) stop.abort('the stream was closed by its reader');
  });
  const { onDone, ...load } = opts;
  loadSnapshot(imagePath, { ...load, stdout: out as unknown as NodeJS.WritableStream, signal: stop.signal }).then(
    (r) => {
      finished = true;
      outer?.removeEventListener('abort', onOuterAbort);
      onDone?.(r);
    },
    (err: Error) => {
      finished = true;
      outer?.removeEventListener('abort', onOuterAbort);
      out.destroy(err);
    },
  );
  // A streamx stream speaks Node's stream protocol: typed so that Node's
  // pipeline() and .pipe() take it.
  return out as unknown as Readable & NodeJS.ReadableStream;
}
