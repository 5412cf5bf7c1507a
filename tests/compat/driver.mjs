// Drives a running corral server with Particle's own JavaScript client (particle-api-js),
// the way a user of that library would, and prints ONE JSON document to stdout.
//
// Input (environment):
//   CORRAL_COMPAT_BASE_URL   e.g. http://127.0.0.1:8123 (no trailing slash)
//   CORRAL_COMPAT_USERNAME   an existing user
//   CORRAL_COMPAT_PASSWORD   that user's password
//   CORRAL_COMPAT_PRODUCT    product slug (optional: product steps are skipped without it)
//   CORRAL_COMPAT_PRODUCT_ID product id (optional)
//
// Every library call is one "step" recorded as {ok, statusCode, body, ...}. A rejection
// from the library (an HTTP error) is a result, not a crash: the Python test judges it.
// Anything else (a bug here, a network error, a non-Error rejection) is "unexpected": it is
// recorded too, and the exit code is then 1. Missing input gives exit code 2.

import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';

const require = createRequire(import.meta.url);
const Particle = require('particle-api-js');
// The package's "exports" hides package.json; its main file is lib/src/Particle.js.
const libMain = require.resolve('particle-api-js');
const libVersion = JSON.parse(
    readFileSync(join(dirname(libMain), '..', '..', 'package.json'), 'utf8')).version;

const env = process.env;
const baseUrl = env.CORRAL_COMPAT_BASE_URL;
const username = env.CORRAL_COMPAT_USERNAME;
const password = env.CORRAL_COMPAT_PASSWORD;
const productSlug = env.CORRAL_COMPAT_PRODUCT || '';
const productId = env.CORRAL_COMPAT_PRODUCT_ID || '';

if (!baseUrl || !username || !password) {
    process.stderr.write('driver.mjs: set CORRAL_COMPAT_BASE_URL, _USERNAME and _PASSWORD\n');
    process.exit(2);
}
if (baseUrl.endsWith('/')) {
    process.stderr.write('driver.mjs: CORRAL_COMPAT_BASE_URL must not end with "/"\n');
    process.exit(2);
}

const particle = new Particle({ baseUrl });
const results = {
    library: { name: 'particle-api-js', version: libVersion },
    node: process.version,
    baseUrl,
    steps: {},
    unexpected: [],
};

// A plain, JSON-safe copy of what the library hands to its caller on rejection.
function describeRejection(err) {
    const out = { ok: false };
    if (!(err instanceof Error)) {
        out.unexpected = true;
        out.message = `non-Error rejection: ${String(err)}`;
        return out;
    }
    out.message = err.message;
    out.statusCode = err.statusCode ?? null;
    out.shortErrorDescription = err.shortErrorDescription ?? null;
    out.errorDescription = err.errorDescription ?? null;
    const body = err.body;
    if (body instanceof Error) {
        // The library could not JSON.parse the error body (or the request never got a response).
        out.bodyIsJson = false;
        out.bodyErrorName = body.name;
        out.bodyErrorMessage = body.message;
        out.body = null;
    } else if (body && typeof body === 'object') {
        out.bodyIsJson = true;
        out.body = {};
        for (const [k, v] of Object.entries(body)) {
            if (k !== 'response') { // the library attaches the fetch Response here
                out.body[k] = v;
            }
        }
        const resp = body.response;
        if (resp && resp.headers && typeof resp.headers.get === 'function') {
            out.contentType = resp.headers.get('content-type');
        }
    } else {
        out.bodyIsJson = false;
        out.body = body ?? null;
    }
    if (typeof out.statusCode !== 'number') {
        // No HTTP status: a network error or a bug, never a server answer.
        out.unexpected = true;
    }
    return out;
}

async function step(name, fn) {
    try {
        const res = await fn();
        results.steps[name] = { ok: true, statusCode: res.statusCode, body: res.body };
    } catch (err) {
        const rec = describeRejection(err);
        results.steps[name] = rec;
        if (rec.unexpected) {
            results.unexpected.push(`${name}: ${rec.message}`);
        }
    }
    return results.steps[name];
}

function skip(name, why) {
    results.steps[name] = { ok: false, skipped: why };
}

async function main() {
    const login = await step('login', () => particle.login({ username, password }));
    const token = login.ok && login.body ? login.body.access_token : undefined;

    if (typeof token === 'string' && token) {
        const auth = token;
        await step('getUserInfo', () => particle.getUserInfo({ auth }));
        await step('listProducts', () => particle.listProducts({ auth }));
        if (productSlug) {
            await step('getProduct', () => particle.getProduct({ product: productSlug, auth }));
            await step('listTeamMembers', () => particle.listTeamMembers({ product: productSlug, auth }));
        } else {
            skip('getProduct', 'no product was seeded');
            skip('listTeamMembers', 'no product was seeded');
        }
        if (productId) {
            await step('getProductById', () => particle.getProduct({ product: productId, auth }));
        } else {
            skip('getProductById', 'no product was seeded');
        }
        await step('getProductMissing', () => particle.getProduct({
            product: 'corral-compat-no-such-product', auth,
        }));
    } else {
        for (const name of ['getUserInfo', 'listProducts', 'getProduct', 'listTeamMembers',
            'getProductById', 'getProductMissing']) {
            skip(name, 'login failed');
        }
    }

    // Negative cases that need no valid token.
    await step('getUserInfoBadToken', () => particle.getUserInfo({ auth: '0'.repeat(40) }));
    await step('loginWrongPassword', () => particle.login({
        username, password: `${password}-wrong`,
    }));
}

let exitCode = 0;
try {
    await main();
} catch (err) {
    results.unexpected.push(`driver crashed: ${err && err.stack ? err.stack : String(err)}`);
}
if (results.unexpected.length) {
    exitCode = 1;
}
process.stdout.write(`${JSON.stringify(results)}\n`);
process.exitCode = exitCode;
