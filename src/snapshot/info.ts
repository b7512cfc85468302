// `qemu-snap info`: what a raw migration stream or a snapshot image holds.
import { createReadStream, promises as fsp } from 'node:fs';
import { Writable } from 'streamx';
import { pumpAsync } from '../util/pump';
import { MigrationFramer } from '../migration/framer';
import type { MigrationRecord } from '../migration/records';
import { InputGate } from './input-gate';
import { openSnapshot, namePath } from './snapshot-image';
import { formatBytes } from '../util/size';
import { restoreRecipe, formatRecipe, RestoreRecipe } from './recipe';

export interface DeviceInfo {
  name: string;
  instanceId: number;
  version: number;
}

export interface SectionInfo {
  sectionId: number;
  name: string;
  instanceId: number;
  versionId: number;
}

export interface StreamInfo {
  kind: 'stream';
  file: string;
  machine: string | null;
  pageSize: number;
  ramBlocks: Array<{ id: string; length: number }>;
  /** PAGE and ZERO records: QEMU's ram.normal and ram.duplicate for this stream. */
  pages: { normal: number; zero: number };
  sections: SectionInfo[];
  commands: Array<{ name: string; offset: number }>;
  devices: DeviceInfo[];
  deviceStateBytes: number;
  vmdescriptionBytes: number;
  totalBytes: number;
  /** What a destination QEMU needs to take this stream (src/snapshot/recipe.ts). */
  restore: RestoreRecipe;
}

export interface ImageInfo {
  kind: 'image';
  file: string;
  machine: string | null;
  pageSize: number;
  ramBlocks: Array<{ id: string; length: number; offset: number }>;
  pages: { normal: number };
  leaderBytes: number;
  deviceStateBytes: number;
  devices: DeviceInfo[];
  qcow2: { clusterSize: number; virtualSize: number; vmStateOffset: number; allocatedBytes: number; fileBytes: number };
  /** What a destination QEMU needs to take this image (src/snapshot/recipe.ts). */
  restore: RestoreRecipe;
}

export type Info = StreamInfo | ImageInfo;

const QCOW2_MAGIC = 0x514649fb;

/** Progress of describing a stream: bytes read, page records seen. */
export type DescribeProgress = (bytes: number, pages: number) => void;

export async function describeFile(file: string, onProgress?: DescribeProgress): Promise<Info> {
  if (file === '-') return describeStream(process.stdin, '-', onProgress);
  const fh = await fsp.open(file, 'r');
  let magic = -1;
  try {
    const b = Buffer.alloc(4);
    const { bytesRead } = await fh.read(b, 0, 4, 0).catch((err: unknown) => {
      throw namePath(err, file);
    });
    if (bytesRead === 4) magic = b.readUInt32BE(0);
  } finally {
    await fh.close();
  }
  if (magic === QCOW2_MAGIC) return describeImage(file);
  return describeStream(createReadStream(file, { highWaterMark: 1 << 20 }), file, onProgress);
}

export async function describeStream(input: NodeJS.ReadableStream, file: string, onProgress?: DescribeProgress): Promise<StreamInfo> {
  const info: Omit<StreamInfo, 'restore'> = {
    kind: 'stream',
    file,
    machine: null,
    pageSize: 4096,
    ramBlocks: [],
    pages: { normal: 0, zero: 0 },
    sections: [],
    commands: [],
    devices: [],
    deviceStateBytes: 0,
    vmdescriptionBytes: 0,
    totalBytes: 0,
  };
  let vmdescription: unknown = null;
  const gate = new InputGate(input);
  const framer = new MigrationFramer();
  const sink = new Writable({
    write(data: unknown, cb: (err: Error | null) => void) {
      const r = data as MigrationRecord;
      switch (r.type) {
        case 'ram-page':
          info.pages.normal++;
          break;
        case 'ram-zero':
          info.pages.zero++;
          break;
        case 'configuration':
          info.machine = r.machine;
          if (r.pageSize) info.pageSize = r.pageSize;
          break;
        case 'ram-mem-size':
          info.ramBlocks = r.blocks.map((b) => ({ id: b.id, length: b.length }));
          break;
        case 'section-start':
        case 'section-full':
          info.sections.push({ sectionId: r.sectionId, name: r.idstr, instanceId: r.instanceId, versionId: r.versionId });
          break;
        case 'command':
          info.commands.push({ name: r.name, offset: r.offset });
          break;
        case 'device-state':
          info.deviceStateBytes += r.data.length;
          break;
        case 'vmdescription':
          vmdescription = r.json;
          info.devices = devicesOf(r.json);
          info.vmdescriptionBytes = r.raw.length;
          break;
      }
      cb(null);
    },
  });
  const timer = onProgress ? setInterval(() => onProgress(gate.bytes, info.pages.normal + info.pages.zero), 100) : null;
  try {
    await pumpAsync(gate, framer, sink);
  } finally {
    if (timer) clearInterval(timer);
  }
  info.totalBytes = gate.bytes;
  onProgress?.(gate.bytes, info.pages.normal + info.pages.zero);
  return { ...info, restore: restoreRecipe(file, 'stream', info.machine, info.ramBlocks, info.devices, vmdescription) };
}

export async function describeImage(file: string): Promise<ImageInfo> {
  const snap = await openSnapshot(file);
  try {
    const st = await fsp.stat(file);
    const devices = devicesOf(snap.vmdescription);
    const machine = snap.configuration?.machine ?? null;
    return {
      kind: 'image',
      file,
      machine,
      pageSize: snap.header.pageSize,
      ramBlocks: snap.blocks.map((b) => ({ id: b.id, length: b.length, offset: b.offset })),
      pages: { normal: snap.header.dataPages },
      leaderBytes: snap.leader.length,
      deviceStateBytes: snap.deviceState.length,
      devices,
      qcow2: {
        clusterSize: snap.image.clusterSize,
        virtualSize: snap.image.virtualSize,
        vmStateOffset: snap.image.vmStateOffset,
        allocatedBytes: snap.image.allocatedBytes(),
        fileBytes: st.size,
      },
      restore: restoreRecipe(file, 'image', machine, snap.blocks, devices, snap.vmdescription),
    };
  } finally {
    await snap.image.close();
  }
}

/** Devices named by a VMDESCRIPTION document (`{"devices": [{"name", "instance_id", "version"}]}`). */
function devicesOf(json: unknown): DeviceInfo[] {
  if (!json || typeof json !== 'object') return [];
  const devices = (json as { devices?: unknown }).devices;
  if (!Array.isArray(devices)) return [];
  const out: DeviceInfo[] = [];
  for (const d of devices) {
    if (!d || typeof d !== 'object') continue;
    const o = d as Record<string, unknown>;
    out.push({
      name: typeof o.name === 'string' ? o.name : '?',
      instanceId: typeof o.instance_id === 'number' ? o.instance_id : 0,
      version: typeof o.version === 'number' ? o.version : 0,
    });
  }
  return out;
}

export function formatInfo(info: Info): string {
  const lines: string[] = [];
  const blockLines = (blocks: Array<{ id: string; length: number; offset?: number }>) =>
    blocks.map((b) => `  ${b.id.padEnd(28)} ${formatBytes(b.length).padStart(10)}${b.offset !== undefined ? `  at disk offset 0x${b.offset.toString(16)}` : ''}`);
  const deviceLine = (devs: DeviceInfo[]) =>
    devs.length ? `devices (${devs.length}): ${devs.map((d) => (d.instanceId ? `${d.name}#${d.instanceId}` : d.name)).join(', ')}` : 'devices: unknown (no VMDESCRIPTION)';
  if (info.kind === 'stream') {
    lines.push(`file: ${info.file} (migration stream, ${info.totalBytes} bytes)`);
    lines.push(`machine: ${info.machine ?? 'unknown (no configuration section)'}`);
    lines.push(`page size: ${info.pageSize}`);
    lines.push(`RAM blocks (${info.ramBlocks.length}):`, ...blockLines(info.ramBlocks));
    lines.push(`pages: ${info.pages.normal} data, ${info.pages.zero} zero`);
    lines.push(`sections: ${info.sections.map((s) => `${s.name} (id ${s.sectionId}, version ${s.versionId})`).join(', ') || 'none'}`);
    if (info.commands.length) lines.push(`commands: ${info.commands.map((c) => c.name).join(', ')}`);
    lines.push(`device state: ${info.deviceStateBytes} bytes${info.vmdescriptionBytes ? `, VMDESCRIPTION ${info.vmdescriptionBytes} bytes` : ''}`);
    lines.push(deviceLine(info.devices));
  } else {
    lines.push(`file: ${info.file} (qemu-snap snapshot image, ${info.qcow2.fileBytes} bytes on disk, ${info.qcow2.allocatedBytes} allocated)`);
    lines.push(`machine: ${info.machine ?? 'unknown'}`);
    lines.push(`page size: ${info.pageSize}`);
    lines.push(`RAM blocks (${info.ramBlocks.length}):`, ...blockLines(info.ramBlocks));
    lines.push(`data pages: ${info.pages.normal}`);
    lines.push(`leader: ${info.leaderBytes} bytes, device state: ${info.deviceStateBytes} bytes`);
    lines.push(deviceLine(info.devices));
    lines.push(`qcow2: cluster size ${info.qcow2.clusterSize}, virtual size ${info.qcow2.virtualSize}, VM state at 0x${info.qcow2.vmStateOffset.toString(16)}`);
  }
  lines.push(...formatRecipe(info.restore));
  return lines.join('\n') + '\n';
}
