// Drives corral's event streams, cloud publish, function calls and variable reads with
// Particle's own JavaScript client (particle-api-js): getEventStream (mine, a device with a
// name filter, a product, an organization), publishEvent (personal and product),
// callFunction and getVariable (sandbox and product paths), their errors, and keep-alives.
// Prints ONE JSON document to stdout (same conventions as driver.mjs).
//
// Input (environment):
//   CORRAL_COMPAT_BASE_URL    e.g. http://127.0.0.1:8123 (no trailing slash)
//   CORRAL_COMPAT_USERNAME    the product owner ...
//   CORRAL_COMPAT_PASSWORD    ... and their password
//   CORRAL_COMPAT_PLAN        JSON: product, org, online (a connected device with functions
//                             led/emit and variables count/greeting), offline (a device of
//                             the product with no session), idleMs (the stream idle timeout
//                             to set; the server's keep-alive must be shorter)
//   CORRAL_COMPAT_DEADLINE_MS optional; the driver gives up (exit 1) after this long (60000)
//
// The device's "emit" function publishes a "temp" event with its argument as data, so the
// driver can see a device event arrive on its streams.

import { Particle, describeRejection, recorder } from './lib.mjs';

const env = process.env;
const baseUrl = env.CORRAL_COMPAT_BASE_URL;
const username = env.CORRAL_COMPAT_USERNAME;
const password = env.CORRAL_COMPAT_PASSWORD;
const deadlineMs = Number(env.CORRAL_COMPAT_DEADLINE_MS || 60000);
const WAIT_MS = 5000;

function usage(text) {
    process.stderr.write(`driver_sessions.mjs: ${text}\n`);
    process.exit(2);
}

for (const [name, value] of Object.entries({
    BASE_URL: baseUrl, USERNAME: username, PASSWORD: password, PLAN: env.CORRAL_COMPAT_PLAN,
})) {
    if (!value) {
        usage(`set CORRAL_COMPAT_${name}`);
    }
}
let plan;
try {
    plan = JSON.parse(env.CORRAL_COMPAT_PLAN);
} catch (err) {
    usage(`CORRAL_COMPAT_PLAN is not JSON: ${err.message}`);
}
for (const key of ['product', 'org', 'online', 'offline', 'idleMs']) {
    if (plan[key] === undefined) {
        usage(`CORRAL_COMPAT_PLAN lacks "${key}"`);
    }
}

const particle = new Particle({ baseUrl });
const { results, step, run, finish } = recorder(baseUrl, { ordered: true });
results.streams = {};
const open = [];

const watchdog = setTimeout(() => {
    results.unexpected.push(`deadline: the driver did not finish in ${deadlineMs} ms`);
    for (const s of open) {
        s.abort();
    }
    finish(1);
    process.exit(1);
}, deadlineMs);

// Open a stream and record what it receives: {opened, events: [...], disconnects}. A stream
// that fails to open records the library's rejection ({statusCode, errorDescription, body}).
async function stream(label, options) {
    const rec = { opened: false, events: [], disconnects: 0 };
    results.streams[label] = rec;
    try {
        const s = await particle.getEventStream(options);
        rec.opened = true;
        s.on('event', (e) => rec.events.push(e));
        s.on('disconnect', () => { rec.disconnects += 1; });
        open.push(s);
        return s;
    } catch (err) {
        if (err instanceof Error) {
            rec.rejection = describeRejection(err);
            results.unexpected.push(`${label}: ${err.message}`);
        } else {
            rec.rejection = {
                statusCode: err.statusCode ?? null, errorDescription: err.errorDescription ?? null,
                body: err.body ?? null,
            };
        }
        return null;
    }
}

// Wait until the stream `label` has received an event named `name` (bounded).
async function arrived(label, name) {
    const rec = results.streams[label];
    const until = Date.now() + WAIT_MS;
    while (Date.now() < until) {
        if (rec && rec.events.some((e) => e.name === name)) {
            return true;
        }
        await new Promise((r) => setTimeout(r, 20));
    }
    results.unexpected.push(`${label}: no "${name}" event within ${WAIT_MS} ms`);
    return false;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
    const login = await step('login', () => particle.login({ username, password }));
    const auth = login.ok ? login.body.access_token : undefined;
    if (!auth) {
        return;
    }
    const { product, org, online, offline } = plan;

    // --- streams (particle-api-js appends ?nonce=<float> to each) ------------------------
    await stream('mine', { deviceId: 'mine', name: 'compat', auth });
    const device = await stream('device', { deviceId: online, name: 'temp', auth });
    await stream('product', { product, auth });
    await stream('productDevice', { product, deviceId: online, auth });
    await stream('org', { org, auth });
    await stream('noPrefix', { auth });
    await stream('badToken', { deviceId: 'mine', auth: 'f'.repeat(40) });
    await stream('otherProduct', { product: 'no-such-product', auth });

    // --- publish -------------------------------------------------------------------------
    await step('publishMine', () => particle.publishEvent({
        name: 'compat/hello', data: 'hi', isPrivate: true, auth,
    }));
    await arrived('mine', 'compat/hello');
    await step('publishProduct', () => particle.publishEvent({
        name: 'compat-product', data: 'p', product, auth,
    }));
    await arrived('product', 'compat-product');
    await arrived('org', 'compat-product');
    await step('publishReserved', () => particle.publishEvent({
        name: 'spark/fake', data: 'x', auth,
    }));

    // --- functions -----------------------------------------------------------------------
    await step('callLed', () => particle.callFunction({
        deviceId: online, name: 'led', argument: 'on', auth,
    }));
    await step('callEmitProduct', () => particle.callFunction({
        deviceId: online, name: 'emit', argument: '21.5', product, auth,
    }));
    await arrived('device', 'temp');
    await arrived('productDevice', 'temp');
    await step('callMissing', () => particle.callFunction({
        deviceId: online, name: 'nope', argument: '', auth,
    }));
    await step('callOffline', () => particle.callFunction({
        deviceId: offline, name: 'led', argument: 'on', auth,
    }));

    // --- variables -----------------------------------------------------------------------
    await step('getCount', () => particle.getVariable({ deviceId: online, name: 'count', auth }));
    await step('getGreetingProduct', () => particle.getVariable({
        deviceId: online, name: 'greeting', product, auth,
    }));
    await step('getMissing', () => particle.getVariable({
        deviceId: online, name: 'nope', auth,
    }));

    // --- keep-alive: with a short client idle timeout the stream must stay up ------------
    if (device) {
        // the library re-arms its idle timer with `timeout` on every chunk; arm it now too,
        // so a server that sent nothing would be caught
        device.timeout = plan.idleMs;
        device.startIdleTimeout();
        const before = results.streams.device.disconnects;
        await sleep(plan.idleMs * 3);
        results.keepalive = { idleMs: plan.idleMs, disconnects: results.streams.device.disconnects - before };
    }
}

const exitCode = await run(main);
for (const s of open) {
    s.abort();
}
clearTimeout(watchdog);
finish(exitCode);
// A stream that dropped may have a reconnect timer pending, which abort() does not cancel
// (the library keeps reconnecting forever): leave explicitly.
process.exit(exitCode);
