export {
  OrderedBlockWriter,
  BlockWriteTarget,
  BlockWrite,
  OrderedBlockWriterOptions,
  OrderedBlockWriterEvents,
  DEFAULT_MAX_IN_FLIGHT,
  DEFAULT_HIGH_WATER_MARK,
  segmentPieces,
} from './ordered-writer';
export {
  OrderedBlockReader,
  BlockReadSource,
  ReadPlanEntry,
  BlockRead,
  OrderedBlockReaderOptions,
  HOLE_WEIGHT,
  DEFAULT_MAX_URGENT_IN_FLIGHT,
} from './ordered-reader';
export {
  BlockWriteError,
  BlockReadError,
  InvalidBlockWriteError,
  InvalidBlockReadError,
  BlockReaderEndedError,
} from './errors';
