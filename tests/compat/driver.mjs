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

import { Particle, recorder } from './lib.mjs';

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
const { step, skip, run, finish } = recorder(baseUrl);

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

finish(await run(main));
