// The restore recipe `info` prints: what a destination QEMU must be started
// with to take a saved VM, as far as the stream tells it.
//
// QEMU checks, in order: the machine type (configuration section: "Machine
// type received is ..."), every RAM block by name and size (MEM_SIZE: "Size
// mismatch", "Unknown ramblock"), and every device section by name and
// instance ("Unknown savevm section or instance"). So the destination needs
// the same -machine, the same -m, a RAM block of the same name and size for
// each memory backend (a DIMM), one vCPU per saved `cpu` instance, and the
// same devices at the same PCI addresses. Disks, network backends and
// chardevs are not in the stream: the recipe cannot name them.
import * as path from 'node:path';
import type { DeviceInfo } from './info';

export interface RestoreRecipe {
  /** The emulator binary the machine type implies (qemu-system-x86_64 for pc/q35). */
  binary: string;
  /** -machine: the exact versioned type QEMU saved (e.g. pc-i440fx-7.2), or null when the stream has no configuration section. */
  machine: string | null;
  /** The block taken for main RAM (its length is -m), or null if none looks like it. */
  mainRam: { id: string; bytes: number } | null;
  /** Blocks of memory backends (-object memory-backend-*), which imply a device: a DIMM unless the source used them otherwise. */
  memoryBackends: Array<{ id: string; bytes: number }>;
  /** vCPUs: one `cpu` device state per vCPU. */
  cpus: number;
  /** DIMM slots (-m ...,slots=N) from the ACPI memory hotplug state, or null when the stream does not describe it. */
  slots: number | null;
  /** Devices at PCI addresses, with the RAM blocks they own (video RAM, option ROMs); `machine` when the machine type creates it. */
  pciDevices: Array<{ address: string; name: string; ramBlocks: string[]; machine: boolean }>;
  /** The other devices with state (the machine's own, ISA devices): present on the destination by the same options. */
  otherDevices: string[];
  /** Blocks the machine or its firmware options create (pc.bios, pc.rom, ACPI tables, flash). */
  firmwareBlocks: string[];
  /** The command line, ready to adapt. */
  argv: string[];
  commandLine: string;
}

/** Default main RAM block names (MachineClass default_ram_id) of the common machines. */
const MAIN_RAM_IDS = new Set(['pc.ram', 'microvm.ram', 'mach-virt.ram', 'ppc_spapr.ram', 's390.ram', 'riscv_virt_board.ram', 'sbsa-ref.ram']);
const FIRMWARE = /^(pc\.bios|pc\.rom|isa-bios|\/rom@|.*flash\d*$|.*\.bios$|.*\.rom$)/;
const PCI_PREFIX = /^([0-9a-f]{4}:)?([0-9a-f]{2}:[0-9a-f]{2}\.[0-7])\/(.+)$/i;

/** PCI functions the pc (i440FX) and q35 machines create themselves. */
function isMachinePci(machine: string | null, address: string): boolean {
  if (address === '00:00.0') return true;
  if (machine !== null && /q35/.test(machine)) return address.startsWith('00:1f.');
  return address.startsWith('00:01.');
}

/**
 * DIMM slots: the ACPI device (piix4_pm, ICH9-LPC) saves one "memory hotplug
 * device state" per slot, and QEMU fails the load ("Missing section footer")
 * when the destination has another number. VMDESCRIPTION gives the array's length.
 */
export function memoryHotplugSlots(vmdescription: unknown): number | null {
  let found: number | null = null;
  const walk = (node: unknown, inHotplug: boolean, depth: number): void => {
    if (found !== null || depth > 64 || !node || typeof node !== 'object') return;
    if (Array.isArray(node)) {
      for (const n of node) walk(n, inHotplug, depth + 1);
      return;
    }
    const o = node as Record<string, unknown>;
    const here = inHotplug || o.vmsd_name === 'memory hotplug state';
    if (here && o.name === 'devs' && typeof o.array_len === 'number') {
      found = o.array_len;
      return;
    }
    for (const v of Object.values(o)) walk(v, here, depth + 1);
  };
  walk(vmdescription, false, 0);
  return found;
}

function binaryFor(machine: string | null): string {
  if (machine === null || /^(pc|q35|microvm|isapc|xenfv|x-remote)/.test(machine)) return 'qemu-system-x86_64';
  if (/^(virt|sbsa|raspi|xlnx)/.test(machine)) return 'qemu-system-aarch64';
  if (/^(pseries|powernv)/.test(machine)) return 'qemu-system-ppc64';
  if (/^s390/.test(machine)) return 'qemu-system-s390x';
  return 'qemu-system-ARCH';
}

/** QEMU's size syntax, as exact as the length allows. */
function qemuSize(bytes: number): string {
  for (const [unit, n] of [['G', 2 ** 30], ['M', 2 ** 20], ['K', 2 ** 10]] as const) {
    if (bytes >= n && bytes % n === 0) return `${bytes / n}${unit}`;
  }
  return String(bytes);
}

/** A word the shell takes as it is, quoted only when it needs it. */
function shellWord(s: string): string {
  return /^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

export function restoreRecipe(
  file: string,
  kind: 'image' | 'stream',
  machine: string | null,
  ramBlocks: Array<{ id: string; length: number }>,
  devices: DeviceInfo[],
  vmdescription: unknown,
): RestoreRecipe {
  const firmwareBlocks: string[] = [];
  const memoryBackends: Array<{ id: string; bytes: number }> = [];
  const ownedBy = new Map<string, string[]>();
  let mainRam: { id: string; bytes: number } | null = null;
  const main = ramBlocks.find((b) => MAIN_RAM_IDS.has(b.id)) ?? ramBlocks.find((b) => !b.id.includes('/') && !FIRMWARE.test(b.id)) ?? null;
  if (main) mainRam = { id: main.id, bytes: main.length };
  for (const b of ramBlocks) {
    if (b === main) continue;
    const pci = PCI_PREFIX.exec(b.id);
    if (pci) {
      const list = ownedBy.get(pci[2].toLowerCase()) ?? [];
      list.push(pci[3]);
      ownedBy.set(pci[2].toLowerCase(), list);
    } else if (FIRMWARE.test(b.id) || b.id.includes('/')) {
      firmwareBlocks.push(b.id);
    } else {
      memoryBackends.push({ id: b.id, bytes: b.length });
    }
  }
  let cpus = 0;
  const pciDevices: RestoreRecipe['pciDevices'] = [];
  const otherDevices: string[] = [];
  for (const d of devices) {
    if (d.name === 'cpu') {
      cpus++;
      continue;
    }
    const pci = PCI_PREFIX.exec(d.name);
    if (pci) {
      const address = pci[2].toLowerCase();
      pciDevices.push({ address, name: pci[3], ramBlocks: ownedBy.get(address) ?? [], machine: isMachinePci(machine, address) });
      ownedBy.delete(address);
    } else if (!/^(cpu_common|apic|kvm-tpr-opt|kvmclock|timer|globalstate|acpi_build|PCIHost|PCIBUS|i2c_bus)$/.test(d.name)) {
      otherDevices.push(d.instanceId ? `${d.name}#${d.instanceId}` : d.name);
    }
  }
  // RAM owned by a PCI address with no device state (rare): still a device there.
  for (const [address, blocks] of ownedBy) pciDevices.push({ address, name: '?', ramBlocks: blocks, machine: isMachinePci(machine, address) });
  pciDevices.sort((a, b) => a.address.localeCompare(b.address));

  const slots = memoryHotplugSlots(vmdescription);
  const binary = binaryFor(machine);
  const argv = [binary];
  if (machine) argv.push('-machine', machine);
  if (mainRam) {
    let m = qemuSize(mainRam.bytes);
    // DIMMs need slots (as many as the source had: the ACPI device saves
    // one state per slot) and room above -m (the least that fits here).
    if (memoryBackends.length > 0 || (slots !== null && slots > 0)) {
      const extra = memoryBackends.reduce((n, b) => n + b.bytes, 0);
      m += `,slots=${slots ?? memoryBackends.length},maxmem=${qemuSize(mainRam.bytes + extra)}`;
    }
    argv.push('-m', m);
  }
  if (cpus > 0) argv.push('-smp', String(cpus));
  argv.push('-nodefaults');
  for (const b of memoryBackends) {
    argv.push('-object', `memory-backend-ram,id=${b.id},size=${qemuSize(b.bytes)}`, '-device', `pc-dimm,memdev=${b.id}`);
  }
  const abs = path.resolve(file);
  argv.push('-incoming', kind === 'image' ? `exec:qemu-snap load ${shellWord(abs)}` : `exec:cat ${shellWord(abs)}`);
  return {
    binary,
    machine,
    slots,
    mainRam,
    memoryBackends,
    cpus,
    pciDevices,
    otherDevices,
    firmwareBlocks,
    argv,
    commandLine: argv.map(shellWord).join(' '),
  };
}

/** The recipe as text lines for `info`. */
export function formatRecipe(r: RestoreRecipe): string[] {
  const lines = ['restore with (adapt: add the source\'s disks, network backends, -cpu, firmware options, and anything it had that holds no state):', `  ${r.commandLine}`];
  if (!r.machine) lines.push('  machine type: unknown (no configuration section): use the source\'s -machine');
  if (r.mainRam) lines.push(`  -m from RAM block ${r.mainRam.id} (${qemuSize(r.mainRam.bytes)})`);
  else lines.push('  -m: no main RAM block recognised: use the source\'s -m');
  for (const b of r.memoryBackends) {
    lines.push(`  RAM block ${b.id} (${qemuSize(b.bytes)}): a memory backend, here given to a pc-dimm; if the source used it otherwise (nvdimm, virtio-mem, -numa node,memdev=${b.id}), do the same`);
  }
  if (r.slots !== null && r.slots > 0) lines.push(`  slots=${r.slots} from the saved memory hotplug state (must match); maxmem is the least that fits: the source's value is best`);
  else if (r.memoryBackends.length > 0) lines.push('  slots/maxmem: use the source\'s values (the stream does not say them)');
  const pci = (machineOwn: boolean) =>
    r.pciDevices.filter((d) => d.machine === machineOwn).map((d) => `${d.address} ${d.name}${d.ramBlocks.length ? ` (${d.ramBlocks.join(', ')})` : ''}`);
  if (pci(false).length > 0) lines.push(`  PCI devices to add, each at its address (-device TYPE,addr=SLOT.FN; e.g. VGA for vga): ${pci(false).join('; ')}`);
  if (pci(true).length > 0) lines.push(`  PCI devices of the machine itself: ${pci(true).join('; ')}`);
  if (r.otherDevices.length > 0) lines.push(`  other devices with state (the machine's own, or from options such as -serial): ${r.otherDevices.join(', ')}`);
  if (r.firmwareBlocks.length > 0) lines.push(`  firmware RAM (comes with the machine and its -bios/pflash options): ${r.firmwareBlocks.join(', ')}`);
  return lines;
}
