// Drives corral's ledger routes with Particle's own JavaScript client (particle-api-js):
// createLedger, listLedgers, getLedger, updateLedger, setLedgerInstance (Replace and Merge),
// getLedgerInstance, listLedgerInstances, listLedgerInstanceVersions,
// getLedgerInstanceVersion, deleteLedgerInstance and archiveLedger, in the sandbox and an
// organization; and the errors: an unknown ledger and a document that breaks its schema.
// Prints ONE JSON document to stdout (same conventions as driver_devices.mjs).
//
// Input (environment):
//   CORRAL_COMPAT_BASE_URL    e.g. http://127.0.0.1:8123 (no trailing slash)
//   CORRAL_COMPAT_USERNAME    an owner of the organization and the product
//   CORRAL_COMPAT_PASSWORD    that user's password
//   CORRAL_COMPAT_ORG         organization slug
//   CORRAL_COMPAT_PRODUCT     a product of that organization (slug)
//   CORRAL_COMPAT_DEADLINE_MS optional; the driver gives up (exit 1) after this long (60000)

import { Particle, recorder } from './lib.mjs';

const env = process.env;
const baseUrl = env.CORRAL_COMPAT_BASE_URL;
const username = env.CORRAL_COMPAT_USERNAME;
const password = env.CORRAL_COMPAT_PASSWORD;
const org = env.CORRAL_COMPAT_ORG;
const product = env.CORRAL_COMPAT_PRODUCT;
const deadlineMs = Number(env.CORRAL_COMPAT_DEADLINE_MS || 60000);

for (const [name, value] of Object.entries({
    BASE_URL: baseUrl, USERNAME: username, PASSWORD: password, ORG: org, PRODUCT: product,
})) {
    if (!value) {
        process.stderr.write(`driver_ledgers.mjs: set CORRAL_COMPAT_${name}\n`);
        process.exit(2);
    }
}

const particle = new Particle({ baseUrl });
const { step, run, finish, results } = recorder(baseUrl, { ordered: true });

const watchdog = setTimeout(() => {
    results.unexpected.push(`deadline: the driver did not finish in ${deadlineMs} ms`);
    finish(1);
    process.exit(1);
}, deadlineMs);

async function main() {
    const login = await step('login', () => particle.login({ username, password }));
    const auth = login.ok ? login.body.access_token : undefined;
    if (!auth) {
        return;
    }
    for (const [label, scope] of [['sandbox', {}], ['org', { org }]]) {
        const ledgerName = `${label}-config`;
        await step(`${label}Create`, () => particle.createLedger({
            ledger: { name: ledgerName, description: 'settings', scope: 'Product',
                direction: 'Downstream' }, ...scope, auth,
        }));
        await step(`${label}List`, () => particle.listLedgers({ scope: 'Product', ...scope, auth }));
        await step(`${label}Get`, () => particle.getLedger({ ledgerName, ...scope, auth }));
        await step(`${label}Update`, () => particle.updateLedger({
            ledgerName, ledger: { description: 'new words' }, ...scope, auth,
        }));
        const scopeValue = label === 'org' ? product : 'owner';
        const inst = { ledgerName, scopeValue, ...scope, auth };
        await step(`${label}Set`, () => particle.setLedgerInstance({
            ...inst, instance: { data: { interval: 60, net: { ssid: 'a', tries: 3 } } },
        }));
        await step(`${label}Merge`, () => particle.setLedgerInstance({
            ...inst, instance: { data: { net: { ssid: 'b' } } }, setMode: 'Merge',
        }));
        await step(`${label}GetInstance`, () => particle.getLedgerInstance(inst));
        await step(`${label}ListInstances`, () => particle.listLedgerInstances({
            ledgerName, page: 1, perPage: 10, ...scope, auth,
        }));
        await step(`${label}Versions`, () => particle.listLedgerInstanceVersions(inst));
        await step(`${label}Version1`, () => particle.getLedgerInstanceVersion({
            ...inst, version: '1',
        }));
        await step(`${label}DeleteInstance`, () => particle.deleteLedgerInstance(inst));
        await step(`${label}GetDeleted`, () => particle.getLedgerInstance(inst));
        await step(`${label}Archive`, () => particle.archiveLedger({ ledgerName, ...scope, auth }));
    }
    await step('unknownLedger', () => particle.getLedger({ ledgerName: 'nope', auth }));
    await step('createStrict', () => particle.post({
        uri: '/v1/ledgers', auth,
        data: { ledger: { name: 'strict', scope: 'Owner', direction: 'CloudOnly',
            schema: { type: 'object', properties: { n: { type: 'integer' } } } } },
    }));
    await step('schemaViolation', () => particle.setLedgerInstance({
        ledgerName: 'strict', scopeValue: 'owner', instance: { data: { n: 'text' } }, auth,
    }));
}

const exitCode = await run(main);
clearTimeout(watchdog);
finish(exitCode);
