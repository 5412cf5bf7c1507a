// Drives corral's product firmware routes with Particle's own JavaScript client
// (particle-api-js): uploadProductFirmware (a Particle module, and one whose header names
// another product version), listProductFirmware, getProductFirmware,
// releaseProductFirmware, lockDeviceProductFirmware (with flash), unlockDeviceProductFirmware,
// markAsDevelopmentDevice, and the device's targeted_firmware_release_version after each.
// Prints ONE JSON document to stdout (same conventions as driver_devices.mjs).
//
// Input (environment):
//   CORRAL_COMPAT_BASE_URL    e.g. http://127.0.0.1:8123 (no trailing slash)
//   CORRAL_COMPAT_USERNAME    a user on the product's team
//   CORRAL_COMPAT_PASSWORD    that user's password
//   CORRAL_COMPAT_PRODUCT     product slug
//   CORRAL_COMPAT_PLAN        JSON: {binaries: {"<version>": base64}, badBinary: base64,
//                             device, group}
//   CORRAL_COMPAT_DEADLINE_MS optional; the driver gives up (exit 1) after this long (60000)

import { Particle, recorder } from './lib.mjs';

const env = process.env;
const baseUrl = env.CORRAL_COMPAT_BASE_URL;
const username = env.CORRAL_COMPAT_USERNAME;
const password = env.CORRAL_COMPAT_PASSWORD;
const product = env.CORRAL_COMPAT_PRODUCT;
const deadlineMs = Number(env.CORRAL_COMPAT_DEADLINE_MS || 60000);

function usage(text) {
    process.stderr.write(`driver_firmware.mjs: ${text}\n`);
    process.exit(2);
}

for (const [name, value] of Object.entries({
    BASE_URL: baseUrl, USERNAME: username, PASSWORD: password, PRODUCT: product,
    PLAN: env.CORRAL_COMPAT_PLAN,
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
for (const key of ['binaries', 'badBinary', 'device', 'group']) {
    if (plan[key] === undefined) {
        usage(`CORRAL_COMPAT_PLAN lacks "${key}"`);
    }
}

const particle = new Particle({ baseUrl });
const { step, run, finish, results } = recorder(baseUrl, { ordered: true });

const watchdog = setTimeout(() => {
    results.unexpected.push(`deadline: the driver did not finish in ${deadlineMs} ms`);
    finish(1);
    process.exit(1);
}, deadlineMs);

function binary(b64) {
    return Buffer.from(b64, 'base64');
}

async function main() {
    const login = await step('login', () => particle.login({ username, password }));
    const auth = login.ok ? login.body.access_token : undefined;
    if (!auth) {
        return;
    }
    const device = plan.device;
    const getDevice = (name) => step(name, () => particle.getDevice({ deviceId: device, product, auth }));

    await step('upload1', () => particle.uploadProductFirmware({
        file: binary(plan.binaries['1']), version: 1, title: 'First', description: 'the first one',
        product, auth,
    }));
    await step('upload2', () => particle.uploadProductFirmware({
        file: binary(plan.binaries['2']), version: 2, title: 'Second', product, auth,
    }));
    await step('uploadMismatch', () => particle.uploadProductFirmware({
        file: binary(plan.badBinary), version: 3, title: 'Wrong header', product, auth,
    }));
    await step('uploadSameVersion', () => particle.uploadProductFirmware({
        file: binary(plan.binaries['2']), version: 2, title: 'Again', product, auth,
    }));
    await step('list', () => particle.listProductFirmware({ product, auth }));
    await step('get1', () => particle.getProductFirmware({ version: 1, product, auth }));
    await step('getMissing', () => particle.getProductFirmware({ version: 99, product, auth }));

    await step('releaseDefault', () => particle.releaseProductFirmware({
        version: 1, product_default: true, groups: [], intelligent: false, product, auth,
    }));
    await getDevice('deviceAfterDefault');
    await step('releaseGroup', () => particle.releaseProductFirmware({
        version: 2, product_default: false, groups: [plan.group], intelligent: true, product, auth,
    }));
    await getDevice('deviceAfterGroup');
    await step('lock', () => particle.lockDeviceProductFirmware({
        deviceId: device, desiredFirmwareVersion: 1, flash: true, product, auth,
    }));
    await getDevice('deviceAfterLock');
    await step('unlock', () => particle.unlockDeviceProductFirmware({
        deviceId: device, product, auth,
    }));
    await getDevice('deviceAfterUnlock');
    await step('markDevelopment', () => particle.markAsDevelopmentDevice({
        deviceId: device, development: true, product, auth,
    }));
    await getDevice('deviceAfterDevelopment');
    await step('unmarkDevelopment', () => particle.markAsDevelopmentDevice({
        deviceId: device, development: false, product, auth,
    }));
    await step('listAfterRelease', () => particle.listProductFirmware({ product, auth }));
}

const exitCode = await run(main);
clearTimeout(watchdog);
finish(exitCode);
