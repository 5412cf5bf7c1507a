// Drives corral's device routes with Particle's own JavaScript client (particle-api-js):
// import, product listing (paging, groups), get, rename, claim, remove/deny, unclaim, and
// customers. Prints ONE JSON document to stdout (same conventions as driver.mjs).
//
// Input (environment):
//   CORRAL_COMPAT_BASE_URL    e.g. http://127.0.0.1:8123 (no trailing slash)
//   CORRAL_COMPAT_USERNAME    an existing user on the product's team
//   CORRAL_COMPAT_PASSWORD    that user's password
//   CORRAL_COMPAT_PRODUCT     product slug
//   CORRAL_COMPAT_PRODUCT_ID  product id
//   CORRAL_COMPAT_CLIENT_ID   an OAuth client of the product ...
//   CORRAL_COMPAT_CLIENT_SECRET  ... and its secret
//   CORRAL_COMPAT_PLAN        JSON: which device IDs play which part (see `need` below)
//   CORRAL_COMPAT_DEADLINE_MS optional; the driver gives up (exit 1) after this long (60000)
//
// Every library call is one "step" recorded as {ok, statusCode, body, ...}. A rejection from
// the library (an HTTP error) is a result, not a crash: the Python test judges it. Anything
// else is "unexpected" (exit code 1). Missing input gives exit code 2.

import { Particle, recorder } from './lib.mjs';

const env = process.env;
const baseUrl = env.CORRAL_COMPAT_BASE_URL;
const username = env.CORRAL_COMPAT_USERNAME;
const password = env.CORRAL_COMPAT_PASSWORD;
const product = env.CORRAL_COMPAT_PRODUCT;
const productId = env.CORRAL_COMPAT_PRODUCT_ID;
const clientId = env.CORRAL_COMPAT_CLIENT_ID;
const clientSecret = env.CORRAL_COMPAT_CLIENT_SECRET;
const deadlineMs = Number(env.CORRAL_COMPAT_DEADLINE_MS || 60000);

function usage(text) {
    process.stderr.write(`driver_devices.mjs: ${text}\n`);
    process.exit(2);
}

for (const [name, value] of Object.entries({
    BASE_URL: baseUrl, USERNAME: username, PASSWORD: password, PRODUCT: product,
    PRODUCT_ID: productId, CLIENT_ID: clientId, CLIENT_SECRET: clientSecret,
    PLAN: env.CORRAL_COMPAT_PLAN,
})) {
    if (!value) {
        usage(`set CORRAL_COMPAT_${name}`);
    }
}
if (baseUrl.endsWith('/')) {
    usage('CORRAL_COMPAT_BASE_URL must not end with "/"');
}
let plan;
try {
    plan = JSON.parse(env.CORRAL_COMPAT_PLAN);
} catch (err) {
    usage(`CORRAL_COMPAT_PLAN is not JSON: ${err.message}`);
}
const need = ['fileLines', 'single', 'claim', 'remove', 'deny', 'foreign', 'group', 'newName',
    'customerEmail', 'customerPassword'];
for (const key of need) {
    if (plan[key] === undefined) {
        usage(`CORRAL_COMPAT_PLAN lacks "${key}"`);
    }
}

const particle = new Particle({ baseUrl });
const productClient = new Particle({ baseUrl, clientId, clientSecret });
const { results, step, run, finish } = recorder(baseUrl, { ordered: true });

// The whole run is bounded: print what we have and stop if the server hangs.
const watchdog = setTimeout(() => {
    results.unexpected.push(`deadline: the driver did not finish in ${deadlineMs} ms`);
    finish(1);
    process.exit(1);
}, deadlineMs);

function tokenOf(rec) {
    return rec.ok && rec.body && typeof rec.body.access_token === 'string'
        ? rec.body.access_token : undefined;
}

async function main() {
    const auth = tokenOf(await step('login', () => particle.login({ username, password })));
    if (!auth) {
        return; // the Python test reports the failed login; every later step is then missing
    }

    // --- import -------------------------------------------------------------------------
    // A .txt file as the CLI would upload it: CRLF line ends, a blank line, one invalid ID.
    const file = Buffer.from(`${plan.fileLines.join('\r\n')}\r\n\r\n`, 'utf8');
    await step('importFile', () => particle.addDeviceToProduct({ product, file, auth }));
    await step('importOne', () => particle.addDeviceToProduct({
        product, deviceId: plan.single, auth,
    }));
    await step('importOneAgain', () => particle.addDeviceToProduct({
        product, deviceId: plan.single, auth,
    }));

    // --- listing: paging (the library sends per_page) and groups ------------------------
    for (const page of [1, 2, 3]) {
        await step(`listPage${page}`, () => particle.listDevices({
            product, page, perPage: 2, auth,
        }));
    }
    await step('listAllById', () => particle.listDevices({ product: productId, auth }));
    await step('listGroup', () => particle.listDevices({ product, groups: [plan.group], auth }));

    // --- get and rename ------------------------------------------------------------------
    await step('getDevice', () => particle.getDevice({ deviceId: plan.single, product, auth }));
    await step('renameDevice', () => particle.renameDevice({
        deviceId: plan.single, name: plan.newName, product, auth,
    }));
    await step('getDeviceAfterRename', () => particle.getDevice({
        deviceId: plan.single, product, auth,
    }));

    // --- claiming ------------------------------------------------------------------------
    await step('claimDevice', () => particle.claimDevice({ deviceId: plan.claim, auth }));
    await step('listMyDevices', () => particle.listDevices({ auth }));
    await step('getMyDevice', () => particle.getDevice({ deviceId: plan.claim, auth }));
    await step('claimForeign', () => particle.claimDevice({ deviceId: plan.foreign, auth }));

    // --- remove from the product, deny ---------------------------------------------------
    await step('removeDevice', () => particle.removeDevice({
        deviceId: plan.remove, product, auth,
    }));
    await step('getRemoved', () => particle.getDevice({ deviceId: plan.remove, product, auth }));
    await step('denyDevice', () => particle.removeDevice({
        deviceId: plan.deny, product, deny: true, auth,
    }));
    await step('getDenied', () => particle.getDevice({ deviceId: plan.deny, product, auth }));
    await step('listDenied', () => particle.listDevices({ product, deviceId: plan.deny, auth }));

    // --- unclaim (removeDevice without product) ------------------------------------------
    await step('unclaimDevice', () => particle.removeDevice({ deviceId: plan.claim, auth }));
    await step('listMyDevicesAfterUnclaim', () => particle.listDevices({ auth }));
    await step('getUnclaimed', () => particle.getDevice({ deviceId: plan.claim, product, auth }));

    // --- customers (form-encoded with the product's client credentials, no bearer) -------
    const customer = tokenOf(await step('createCustomer', () => productClient.createCustomer({
        product: productId, email: plan.customerEmail, password: plan.customerPassword,
    })));
    const wrongClient = new Particle({ baseUrl, clientId, clientSecret: `${clientSecret}-wrong` });
    await step('createCustomerWrongSecret', () => wrongClient.createCustomer({
        product: productId, email: `other-${plan.customerEmail}`,
        password: plan.customerPassword,
    }));
    if (customer) {
        await step('customerListDevices', () => particle.listDevices({ auth: customer }));
        await step('customerClaim', () => particle.claimDevice({
            deviceId: plan.single, auth: customer,
        }));
        await step('customerListAfterClaim', () => particle.listDevices({ auth: customer }));
    }
    const customerLogin = tokenOf(await step('customerLogin', () => productClient.login({
        username: plan.customerEmail, password: plan.customerPassword,
    })));
    if (customerLogin) {
        await step('customerLoginListDevices', () => particle.listDevices({
            auth: customerLogin,
        }));
    }
}

const exitCode = await run(main);
clearTimeout(watchdog);
finish(exitCode);
