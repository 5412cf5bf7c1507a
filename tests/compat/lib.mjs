// Shared by the particle-api-js drivers (driver.mjs, driver_devices.mjs): loading the library,
// turning its rejections into JSON-safe records, and recording each call as one "step".

import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';

const require = createRequire(import.meta.url);
export const Particle = require('particle-api-js');
// The package's "exports" hides package.json; its main file is lib/src/Particle.js.
const libMain = require.resolve('particle-api-js');
export const libVersion = JSON.parse(
    readFileSync(join(dirname(libMain), '..', '..', 'package.json'), 'utf8')).version;

// A plain, JSON-safe copy of what the library hands to its caller on rejection.
export function describeRejection(err) {
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

// The results document and the functions that fill it. With `ordered`, the document also
// lists step names in call order and a step name may be recorded only once.
export function recorder(baseUrl, { ordered = false } = {}) {
    const results = {
        library: { name: 'particle-api-js', version: libVersion },
        node: process.version,
        baseUrl,
        steps: {},
        ...(ordered ? { order: [] } : {}),
        unexpected: [],
    };

    async function step(name, fn) {
        if (ordered) {
            if (name in results.steps) {
                throw new Error(`step ${name} recorded twice`);
            }
            results.order.push(name);
        }
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

    // Run the driver's main(); a crash is recorded as unexpected. Returns the exit code.
    async function run(main) {
        try {
            await main();
        } catch (err) {
            results.unexpected.push(`driver crashed: ${err && err.stack ? err.stack : String(err)}`);
        }
        return results.unexpected.length ? 1 : 0;
    }

    function finish(exitCode) {
        process.stdout.write(`${JSON.stringify(results)}\n`);
        process.exitCode = exitCode;
    }

    return { results, step, skip, run, finish };
}
