// The QMP client against a scripted fake QEMU on a unix socket: greeting,
// capability negotiation, ids, typed errors, events, deadlines, a busy socket,
// a QEMU that goes away; fd passing with getfd (the fd arrives: a python
// receiver with recvmsg, when python3 is there); RFC argument order.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { QmpClient, QmpBusyError, QmpCommandError, QmpConnectionError, QmpTimeoutError } from '../../src/qmp/client';
import { MigrationSettings, socketPair } from '../../src/qmp/migration';
import { native } from '../../src/util/native';
import { rfcArguments } from '../../cli/rfc-args';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qemu-snap-unit-qmp-'));
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));
let n = 0;

type Handler = (msg: { execute: string; arguments?: Record<string, unknown>; id?: unknown }, reply: (o: object) => void, conn: net.Socket) => void;

/** A fake QEMU: greets (unless told not to), answers with `handler`. */
async function fakeQemu(handler: Handler, opts: { greet?: boolean } = {}): Promise<{ sock: string; server: net.Server; seen: string[] }> {
  const sock = path.join(dir, `fake-${++n}.sock`);
  const seen: string[] = [];
  const server = net.createServer((conn) => {
    if (opts.greet !== false) conn.write(JSON.stringify({ QMP: { version: { qemu: { major: 7, minor: 2, micro: 0 } }, capabilities: [] } }) + '\n');
    let buf = '';
    conn.setEncoding('utf8');
    conn.on('error', () => undefined);
    conn.on('data', (s: string) => {
      buf += s;
      let i: number;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        const msg = JSON.parse(line);
        seen.push(msg.execute);
        if (msg.execute === 'qmp_capabilities') conn.write(JSON.stringify({ return: {}, id: msg.id }) + '\n');
        else handler(msg, (o) => conn.write(JSON.stringify({ ...o, id: msg.id }) + '\n'), conn);
      }
    });
  });
  await new Promise<void>((r) => server.listen(sock, r));
  return { sock, server, seen };
}

test('greeting, qmp_capabilities, replies matched by id even out of order, version', async () => {
  const held: Array<() => void> = [];
  const f = await fakeQemu((msg, reply) => {
    // Answer the first command only after the second.
    if (msg.execute === 'slow') held.push(() => reply({ return: 'slow-done' }));
    else {
      reply({ return: { echo: msg.arguments } });
      held.splice(0).forEach((h) => h());
    }
  });
  const qmp = await QmpClient.connect(f.sock);
  assert.equal(qmp.version, { major: 7, minor: 2, micro: 0 });
  const slow = qmp.execute('slow');
  const fast = qmp.execute('echo', { a: 1 });
  assert.equal(await fast, { echo: { a: 1 } });
  assert.is(await slow, 'slow-done');
  assert.equal(f.seen.slice(0, 1), ['qmp_capabilities']);
  qmp.close();
  f.server.close();
});

test('errors are typed: QmpCommandError with class and desc', async () => {
  const f = await fakeQemu((_m, reply) => reply({ error: { class: 'GenericError', desc: 'There is no migration' } }));
  const qmp = await QmpClient.connect(f.sock);
  const err = await qmp.execute('migrate_cancel').catch((e: Error) => e);
  assert.instance(err, QmpCommandError);
  assert.is((err as QmpCommandError).errorClass, 'GenericError');
  assert.is((err as QmpCommandError).desc, 'There is no migration');
  qmp.close();
  f.server.close();
});

test('events reach listeners and waitEvent; a missing event times out', async () => {
  const f = await fakeQemu((msg, reply, conn) => {
    reply({ return: {} });
    conn.write(JSON.stringify({ event: 'STOP', data: {}, timestamp: { seconds: 1, microseconds: 2 } }) + '\n');
    conn.write(JSON.stringify({ event: 'MIGRATION', data: { status: 'active' } }) + '\n');
    conn.write(JSON.stringify({ event: 'MIGRATION', data: { status: 'completed' } }) + '\n');
    conn.write(JSON.stringify({ event: 'RESUME', data: {} }) + '\n');
    void msg;
  });
  const qmp = await QmpClient.connect(f.sock);
  const names: string[] = [];
  qmp.onEvent((ev) => names.push(ev.event));
  const completed = qmp.waitEvent('MIGRATION', 2000, (ev) => ev.data.status === 'completed');
  await qmp.execute('go');
  assert.equal((await completed).data, { status: 'completed' });
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(names, ['STOP', 'MIGRATION', 'MIGRATION', 'RESUME']);
  const err = await qmp.waitEvent('SHUTDOWN', 100).catch((e: Error) => e);
  assert.instance(err, QmpTimeoutError);
  qmp.close();
  f.server.close();
});

test('a command QEMU never answers times out; a QEMU that goes away fails pending commands at once', async () => {
  const f = await fakeQemu((msg, _reply, conn) => {
    if (msg.execute === 'die') conn.destroy();
  });
  const qmp = await QmpClient.connect(f.sock, { commandTimeoutMs: 150 });
  const t0 = Date.now();
  const timeout = await qmp.execute('hang').catch((e: Error) => e);
  assert.instance(timeout, QmpTimeoutError);
  assert.ok(Date.now() - t0 < 2000);
  const pending = qmp.execute('hang', undefined, { timeoutMs: 60_000 });
  const gone = (await qmp.execute('die', undefined, { timeoutMs: 60_000 }).catch((e: Error) => e)) as Error;
  assert.instance(gone, QmpConnectionError);
  assert.match(gone.message, /QEMU closed the connection/);
  assert.instance(await pending.catch((e: Error) => e), QmpConnectionError);
  assert.ok(qmp.closed);
  assert.instance(await qmp.execute('after').catch((e: Error) => e), QmpConnectionError);
  f.server.close();
});

test('a socket that accepts but never greets is reported busy within the greeting timeout', async () => {
  const f = await fakeQemu(() => undefined, { greet: false });
  const t0 = Date.now();
  const err = (await QmpClient.connect(f.sock, { greetingTimeoutMs: 300 }).catch((e: Error) => e)) as Error;
  assert.instance(err, QmpBusyError);
  assert.match(err.message, /^QMP socket busy: another client is connected/);
  assert.ok(Date.now() - t0 < 2000);
  f.server.close();
  const none = (await QmpClient.connect(path.join(dir, 'nothing.sock')).catch((e: Error) => e)) as Error;
  assert.instance(none, QmpConnectionError);
  assert.match(none.message, /no such socket/);
});

test('MigrationSettings changes only what differs and puts it back in one command each', async () => {
  const caps: Record<string, boolean> = { 'return-path': false, 'background-snapshot': false, xbzrle: true, events: false };
  const params: Record<string, unknown> = { 'max-bandwidth': 134217728, 'downtime-limit': 300 };
  const log: string[] = [];
  const f = await fakeQemu((msg, reply) => {
    if (msg.execute === 'query-migrate-capabilities') return reply({ return: Object.entries(caps).map(([capability, state]) => ({ capability, state })) });
    if (msg.execute === 'query-migrate-parameters') return reply({ return: { ...params } });
    if (msg.execute === 'migrate-set-capabilities') {
      const list = msg.arguments?.capabilities as Array<{ capability: string; state: boolean }>;
      log.push(`caps ${list.map((c) => `${c.capability}=${c.state}`).join(',')}`);
      for (const c of list) caps[c.capability] = c.state;
      return reply({ return: {} });
    }
    if (msg.execute === 'migrate-set-parameters') {
      log.push(`params ${JSON.stringify(msg.arguments)}`);
      Object.assign(params, msg.arguments);
      return reply({ return: {} });
    }
    reply({ error: { class: 'CommandNotFound', desc: msg.execute } });
  });
  const qmp = await QmpClient.connect(f.sock);
  const s = new MigrationSettings(qmp);
  const before = { caps: { ...caps }, params: { ...params } };
  await s.apply({ 'return-path': true, xbzrle: false, 'not-in-this-qemu': false, events: false }, { 'max-bandwidth': 100e9, 'downtime-limit': 300 });
  assert.equal(log, ['caps return-path=true,xbzrle=false', 'params {"max-bandwidth":100000000000}']);
  await s.restore();
  assert.equal({ caps, params }, before);
  assert.is(log.length, 4);
  qmp.close();
  f.server.close();
});

test('getfd sends the descriptor as SCM_RIGHTS with the command', async () => {
  const mod = native();
  const py = spawnSync('python3', ['-c', 'import socket; print(hasattr(socket, "recv_fds"))'], { encoding: 'utf8' });
  if (!mod?.sendFd || py.stdout.trim() !== 'True') {
    assert.unreachable(`needs the native module and python3 >= 3.9 (native: ${!!mod?.sendFd}, python: ${py.stdout.trim() || py.stderr})`);
    return;
  }
  // A fake QEMU in python: greets, answers qmp_capabilities, then receives
  // getfd with its descriptor and writes "hello" to it.
  const sock = path.join(dir, 'py.sock');
  const script = `
import socket, json, os, sys
srv = socket.socket(socket.AF_UNIX); srv.bind(sys.argv[1]); srv.listen(1); print('ready', flush=True)
c, _ = srv.accept()
c.sendall(b'{"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2}}}}\\n')
f = c.makefile('rb')
m = json.loads(f.readline()); c.sendall(json.dumps({"return": {}, "id": m["id"]}).encode() + b'\\n')
data, fds, flags, addr = socket.recv_fds(c, 4096, 4)
m = json.loads(data.split(b'\\n')[0])
assert m["execute"] == "getfd" and m["arguments"]["fdname"] == "test-fd", m
assert len(fds) == 1, fds
os.write(fds[0], b'hello')
os.close(fds[0])
c.sendall(json.dumps({"return": {}, "id": m["id"]}).encode() + b'\\n')
`;
  const child = spawn('python3', ['-c', script, sock], { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise<void>((r) => child.stdout.once('data', () => r()));
  const qmp = await QmpClient.connect(sock);
  const [ours, theirs] = socketPair();
  await qmp.getfd('test-fd', theirs);
  fs.closeSync(theirs);
  const buf = Buffer.alloc(16);
  const got = fs.readSync(ours, buf, 0, 16, null);
  assert.is(buf.subarray(0, got).toString(), 'hello');
  fs.closeSync(ours);
  qmp.close();
  await new Promise((r) => child.on('close', r));
});

test('RFC order: options before the command move after it', () => {
  assert.equal(rfcArguments(['-s', '1G', '-S', '4096', 'save', 'vm.qcow2']), ['save', '-s', '1G', '-S', '4096', 'vm.qcow2']);
  assert.equal(rfcArguments(['-p', '10', 'load', 'x.qcow2']), ['load', '-p', '10', 'x.qcow2']);
  assert.equal(rfcArguments(['--postcopy=10', 'load', 'x.qcow2']), ['load', '--postcopy=10', 'x.qcow2']);
  assert.equal(rfcArguments(['-V']), ['--version']);
  assert.equal(rfcArguments(['-q', '-V', 'save', 'x']), ['--version']);
  assert.equal(rfcArguments(['-h']), ['--help']);
  assert.equal(rfcArguments(['save', '-s', '1G', 'x']), ['save', '-s', '1G', 'x']);
  // The RFC's cache options before the command: -n alone, --cache/--aio with a value as the next word or after '='.
  assert.equal(rfcArguments(['-n', 'save', 'vm.qcow2']), ['save', '-n', 'vm.qcow2']);
  assert.equal(rfcArguments(['--cache', 'none', '--aio', 'threads', 'load', 'x.qcow2']), ['load', '--cache', 'none', '--aio', 'threads', 'x.qcow2']);
  assert.equal(rfcArguments(['--cache=unsafe', 'save', 'x']), ['save', '--cache=unsafe', 'x']);
  assert.throws(() => rfcArguments(['-s']), /needs a value/);
  assert.throws(() => rfcArguments(['-q']), /missing command/);
});

test.run();
