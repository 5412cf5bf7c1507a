// Drives corral's integration routes with Particle's own JavaScript client
// (particle-api-js): createIntegration, listIntegrations, editIntegration, deleteIntegration
// in the sandbox, a product and an organization; the legacy createWebhook, listWebhooks and
// deleteWebhook in the sandbox and a product; and an invalid integration (a JSON error).
// Prints ONE JSON document to stdout (same conventions as driver_devices.mjs).
//
// Input (environment):
//   CORRAL_COMPAT_BASE_URL    e.g. http://127.0.0.1:8123 (no trailing slash)
//   CORRAL_COMPAT_USERNAME    an owner of the product and the organization
//   CORRAL_COMPAT_PASSWORD    that user's password
//   CORRAL_COMPAT_PRODUCT     product slug
//   CORRAL_COMPAT_ORG         organization slug
//   CORRAL_COMPAT_TARGET      a webhook URL (not called by these steps)
//   CORRAL_COMPAT_DEADLINE_MS optional; the driver gives up (exit 1) after this long (60000)

import { Particle, recorder } from './lib.mjs';

const env = process.env;
const baseUrl = env.CORRAL_COMPAT_BASE_URL;
const username = env.CORRAL_COMPAT_USERNAME;
const password = env.CORRAL_COMPAT_PASSWORD;
const product = env.CORRAL_COMPAT_PRODUCT;
const org = env.CORRAL_COMPAT_ORG;
const target = env.CORRAL_COMPAT_TARGET;
const deadlineMs = Number(env.CORRAL_COMPAT_DEADLINE_MS || 60000);

for (const [name, value] of Object.entries({
    BASE_URL: baseUrl, USERNAME: username, PASSWORD: password, PRODUCT: product, ORG: org,
    TARGET: target,
})) {
    if (!value) {
        process.stderr.write(`driver_integrations.mjs: set CORRAL_COMPAT_${name}\n`);
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

const webhook = {
    integration_type: 'Webhook', url: target, requestType: 'POST',
    json: { value: '{{{PARTICLE_EVENT_VALUE}}}' }, headers: { Authorization: 'Bearer abcdefghijkl' },
    responseTopic: 'hook-response/{{{PARTICLE_EVENT_NAME}}}', noDefaults: true,
};

async function main() {
    const login = await step('login', () => particle.login({ username, password }));
    const auth = login.ok ? login.body.access_token : undefined;
    if (!auth) {
        return;
    }
    for (const [label, scope] of [['sandbox', {}], ['product', { product }], ['org', { org }]]) {
        const created = await step(`${label}Create`, () => particle.createIntegration({
            event: `${label}-temp`, settings: webhook, ...scope, auth,
        }));
        await step(`${label}List`, () => particle.listIntegrations({ ...scope, auth }));
        const id = created.ok ? created.body.id : 'missing';
        await step(`${label}Edit`, () => particle.editIntegration({
            integrationId: id, event: `${label}-edited`,
            settings: { ...webhook, requestType: 'PUT', disabled: true }, ...scope, auth,
        }));
        await step(`${label}ListAfterEdit`, () => particle.listIntegrations({ ...scope, auth }));
        await step(`${label}Delete`, () => particle.deleteIntegration({
            integrationId: id, ...scope, auth,
        }));
        await step(`${label}ListAfterDelete`, () => particle.listIntegrations({ ...scope, auth }));
    }
    await step('createInvalid', () => particle.createIntegration({
        event: 'bad', settings: { integration_type: 'Webhook', url: 'ftp://nowhere' }, auth,
    }));
    for (const [label, scope] of [['sandbox', {}], ['product', { product }]]) {
        const created = await step(`${label}CreateWebhook`, () => particle.createWebhook({
            event: `${label}-legacy`, url: target, rejectUnauthorized: false,
            hook: { method: 'PUT', headers: { 'X-One': '1' }, responseEvent: 'answer' },
            ...scope, auth,
        }));
        await step(`${label}ListWebhooks`, () => particle.listWebhooks({ ...scope, auth }));
        const id = created.ok ? created.body.id : 'missing';
        await step(`${label}DeleteWebhook`, () => particle.deleteWebhook({
            hookId: id, ...scope, auth,
        }));
        await step(`${label}ListWebhooksAfterDelete`, () => particle.listWebhooks({ ...scope, auth }));
    }
}

const exitCode = await run(main);
clearTimeout(watchdog);
finish(exitCode);
