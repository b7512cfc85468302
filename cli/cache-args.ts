// --cache / -n/--nocache / --aio, parsed the same way for every command
// that takes them (save, load, save --qmp).
import type minimist from 'minimist';
import { UsageError } from '../src/util/size';
import { AIO_MODES, CACHE_MODES, AioMode, CacheMode, isAioMode, isCacheMode } from '../src/util/direct-io';

function oneValue(v: unknown, what: string): string | undefined {
  if (v === undefined) return undefined;
  if (Array.isArray(v)) throw new UsageError(`${what} given more than once`);
  if (typeof v !== 'string' || v === '') throw new UsageError(`${what} needs a value`);
  return v;
}

export function cacheOptions(args: minimist.ParsedArgs): { cache: CacheMode | undefined; aio: AioMode | undefined } {
  const cacheArg = oneValue(args.cache, '--cache');
  if (cacheArg !== undefined && !isCacheMode(cacheArg)) throw new UsageError(`--cache: '${cacheArg}' is not one of ${CACHE_MODES.join(', ')}`);
  if (args.nocache === true && cacheArg !== undefined && cacheArg !== 'none') throw new UsageError(`-n/--nocache means --cache=none, not --cache=${cacheArg}`);
  const aioArg = oneValue(args.aio, '--aio');
  if (aioArg !== undefined && !isAioMode(aioArg)) throw new UsageError(`--aio: '${aioArg}' is not one of ${AIO_MODES.join(', ')}`);
  return { cache: args.nocache === true ? 'none' : (cacheArg as CacheMode | undefined), aio: aioArg as AioMode | undefined };
}
