// Save a running VM from code over QMP, the way `qemu-snap save --qmp` does:
// QEMU gets a socketpair end with getfd, capabilities and parameters are put
// back afterwards, the VM runs on. Then restore it into a second QEMU started
// with `-S -incoming defer`, when its QMP socket is given.
// Usage: node dist/examples/qmp-save.js QMP_SOCKET IMAGE [DEST_QMP_SOCKET]
//
// In your own code, import from 'qemu-snap' instead of '../src'.
import { saveViaQmp, restoreViaQmp, QmpClient } from '../src';

async function main(): Promise<void> {
  const [sock, imagePath, destSock] = process.argv.slice(2);
  if (!sock || !imagePath) throw new Error('usage: qmp-save QMP_SOCKET IMAGE [DEST_QMP_SOCKET]');
  const qmp = await QmpClient.connect(sock);
  try {
    qmp.onEvent((ev) => {
      if (ev.event === 'MIGRATION') console.error(`qmp-save: QEMU migration ${String(ev.data.status)}`);
    });
    const r = await saveViaQmp(qmp, imagePath, { force: true });
    console.error(`qmp-save: saved ${r.imagePath} in ${Math.round(r.wallMs)} ms; QEMU total-time ${r.migration['total-time']} ms; VM ${r.runState.status}`);
  } finally {
    qmp.close();
  }
  if (destSock) {
    const back = await restoreViaQmp(destSock, imagePath);
    console.error(`qmp-save: restored: running after ${Math.round(back.runningMs ?? -1)} ms, completed after ${Math.round(back.completedMs)} ms; VM ${back.runState.status}`);
  }
}

main().catch((err: Error) => {
  console.error(`qmp-save: ${err.message}`);
  process.exit(1);
});
