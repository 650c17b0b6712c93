#!/usr/bin/env node
// Drives the CA's web console in Debian's Chromium (playwright-core, no downloaded browser) for
// the end-to-end tests, which start the CA and compare what the console shows with the CLI.
//
// Input: JSON in the environment variable CONSOLE_DRIVE:
//   {"url": "http://127.0.0.1:PORT",        the console's origin
//    "screenshots": "/abs/dir" | null,       where `pages` saves <page>.png (the 1280x800 viewport)
//    "timeout_ms": 10000,                    default bound of every wait (optional)
//    "ignore_https_errors": false,           for a console on HTTPS with the CA's own SVID
//    "client_cert": {"cert": "/p.pem", "key": "/k.pem"} | null,   an admin SVID to present
//    "steps": [{"op": "pages"}, ...]}
// Steps run in order in one browser page (so a login carries over) and stop at the first that
// fails. Ops: pages, search, explain, wait_activity, wait_taint, crawl, login (see each below).
//
// Output: ONE JSON line on stdout, {"ok": bool, "steps": [{"op", "ok", "ms", ...}], "error"?};
// exit status 0 when every step passed, 1 when one failed (its message also on stderr), 2 on
// bad input or when the browser cannot start.

import { spawn } from "node:child_process";
import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { chromium } from "playwright-core";

const PAGES = ["overview", "agents", "identities", "policy", "activity", "compliance"];
const OPS = new Set(["pages", "search", "explain", "wait_activity", "wait_taint", "crawl", "login"]);
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/** A step failed: the message says what was expected and what was seen. */
class StepFailed extends Error {}

/** Bad input: nothing was run. */
class Usage extends Error {}

function readInput() {
  const raw = process.env.CONSOLE_DRIVE;
  if (!raw) throw new Usage("set CONSOLE_DRIVE to the JSON input, e.g. {\"url\":\"http://127.0.0.1:8480\",\"steps\":[{\"op\":\"pages\"}]}");
  let input;
  try {
    input = JSON.parse(raw);
  } catch (e) {
    throw new Usage(`CONSOLE_DRIVE is not JSON: ${e.message}`);
  }
  if (typeof input !== "object" || input === null) throw new Usage("CONSOLE_DRIVE must be a JSON object");
  let url;
  try {
    url = new URL(input.url);
  } catch {
    throw new Usage(`CONSOLE_DRIVE.url: ${JSON.stringify(input.url)} is not a URL (e.g. "http://127.0.0.1:8480")`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") throw new Usage(`CONSOLE_DRIVE.url: ${url} is not http(s)`);
  if (input.screenshots != null && (typeof input.screenshots !== "string" || !input.screenshots.startsWith("/"))) {
    throw new Usage("CONSOLE_DRIVE.screenshots must be an absolute directory path or null");
  }
  if (!Array.isArray(input.steps) || input.steps.length === 0) throw new Usage("CONSOLE_DRIVE.steps must be a non-empty array");
  input.steps.forEach((s, i) => {
    if (typeof s !== "object" || s === null || !OPS.has(s.op)) {
      throw new Usage(`CONSOLE_DRIVE.steps[${i}]: op must be one of ${[...OPS].join(", ")}, got ${JSON.stringify(s?.op)}`);
    }
    const need = (field, type) => {
      if (typeof s[field] !== type) throw new Usage(`CONSOLE_DRIVE.steps[${i}] (${s.op}): "${field}" must be a ${type}`);
    };
    if (s.op === "search") (need("query", "string"), need("expect", "string"));
    if (s.op === "login") need("token", "string");
    if (s.op === "wait_activity") (need("kind", "string"), need("text", "string"), need("within_ms", "number"), checkTrigger(s, i, true));
    if (s.op === "wait_taint") (need("key_id", "string"), checkTrigger(s, i, false));
    if (s.op === "explain" && (!Array.isArray(s.pairs) || s.pairs.some((p) => typeof p?.from !== "string" || typeof p?.to !== "string"))) {
      throw new Usage(`CONSOLE_DRIVE.steps[${i}] (explain): "pairs" must be [{"from": "...", "to": "...", "port"?, "method"?, "path"?}]`);
    }
  });
  const origin = url.origin;
  return {
    origin,
    screenshots: input.screenshots ?? null,
    timeout: Number.isFinite(input.timeout_ms) ? input.timeout_ms : 10_000,
    ignoreHttpsErrors: input.ignore_https_errors === true,
    clientCert: input.client_cert ?? null,
    steps: input.steps,
  };
}

function checkTrigger(step, i, required) {
  const t = step.trigger;
  if (t == null && !required) return;
  if (typeof t !== "object" || t === null || !Array.isArray(t.cmd) || t.cmd.length === 0 || t.cmd.some((a) => typeof a !== "string")) {
    throw new Usage(`CONSOLE_DRIVE.steps[${i}] (${step.op}): "trigger" must be {"cmd": ["/path/to/bin", "arg", ...]}`);
  }
}

/** Runs a trigger command to completion; its exit and output tails go in the report. */
function runTrigger(trigger, timeout) {
  return new Promise((resolve) => {
    const started = performance.now();
    const [cmd, ...args] = trigger.cmd;
    const child = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...(trigger.env ?? {}) } });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d) => (stdout = (stdout + d).slice(-2000)));
    child.stderr.on("data", (d) => (stderr = (stderr + d).slice(-2000)));
    const timer = setTimeout(() => child.kill("SIGKILL"), timeout);
    const done = (code, signal, error) => {
      clearTimeout(timer);
      resolve({ cmd: trigger.cmd, code, signal, error, ms: Math.round(performance.now() - started), stdout: stdout.trim(), stderr: stderr.trim(), ended: performance.now() });
    };
    child.on("error", (e) => done(null, null, e.message));
    child.on("close", (code, signal) => done(code, signal, null));
  });
}

function triggerReport(t) {
  const { ended, ...rest } = t;
  return rest;
}

function assertTrigger(t) {
  if (t.error) throw new StepFailed(`trigger ${JSON.stringify(t.cmd)} did not start: ${t.error}`);
  if (t.code !== 0) {
    throw new StepFailed(`trigger ${JSON.stringify(t.cmd)} exited with ${t.code ?? t.signal}: ${t.stderr || t.stdout || "(no output)"}`);
  }
}

// What the browser saw, appended as it happens; each step reports the part during it.
const seen = { console: [], failed: [], http: [], aborted: 0, csp: {} };

function watch(page, origin) {
  page.on("console", (msg) => {
    if (msg.type() === "error") {
      const loc = msg.location();
      seen.console.push(`${msg.text()}${loc?.url ? ` (${loc.url}:${loc.lineNumber})` : ""}`);
    }
  });
  page.on("pageerror", (err) => seen.console.push(`uncaught: ${err.message}`));
  page.on("requestfailed", (req) => {
    const why = req.failure()?.errorText ?? "failed";
    // The console aborts requests it no longer needs (a superseded search, a page left).
    if (why.includes("ERR_ABORTED")) seen.aborted++;
    else seen.failed.push(`${req.method()} ${req.url()}: ${why}`);
  });
  page.on("response", (res) => {
    const url = new URL(res.url());
    if (url.origin !== origin) return; // reported by the request listener
    if (res.status() >= 400) seen.http.push(`${res.request().method()} ${url.pathname}${url.search}: ${res.status()}`);
    if (url.pathname === "/" || url.pathname.startsWith("/api/")) {
      seen.csp[url.pathname] = res.headers()["content-security-policy"] ?? null;
    }
  });
  page.on("request", (req) => {
    const url = new URL(req.url());
    if (url.origin !== origin && url.protocol !== "data:") seen.failed.push(`request to another origin: ${req.url()}`);
  });
}

function mark() {
  return { console: seen.console.length, failed: seen.failed.length, http: seen.http.length, aborted: seen.aborted };
}

function since(m) {
  return {
    console_errors: seen.console.slice(m.console),
    failed_requests: seen.failed.slice(m.failed),
    http_errors: seen.http.slice(m.http),
    aborted_requests: seen.aborted - m.aborted,
  };
}

/** Opens a page of the console and waits until its data is on screen. */
async function open(ctx, name, { reload = false } = {}) {
  const { page, origin, timeout } = ctx;
  const target = `${origin}/#/${name}`;
  if (reload || !page.url().startsWith(`${origin}/`)) {
    await page.goto(target, { timeout });
  } else {
    await page.evaluate((hash) => {
      location.hash = hash;
    }, `#/${name}`);
  }
  await waitLoaded(ctx, name);
}

async function waitLoaded(ctx, name) {
  const { page, timeout } = ctx;
  try {
    await page.locator(`[data-testid="page-${name}"][data-loaded="true"]`).waitFor({ timeout });
  } catch {
    const banner = await bannerText(page);
    const login = await page.getByTestId("login").count();
    throw new StepFailed(
      `page ${name} did not load within ${timeout} ms` +
        (login ? ": the login form is shown (log in first with a login step)" : "") +
        (banner ? `; error banner: ${banner}` : ""),
    );
  }
}

async function bannerText(page) {
  const banner = page.getByTestId("error");
  return (await banner.count()) ? (await banner.innerText()).replace(/\s+/g, " ").replace(/ ×$/, "").trim() : null;
}

/** `pages`: each page loads with no console error, failed request or error banner. */
async function opPages(ctx) {
  const { page, screenshots } = ctx;
  if (screenshots) await mkdir(screenshots, { recursive: true });
  const m = mark();
  const visited = [];
  let first = true;
  for (const name of PAGES) {
    const t0 = performance.now();
    await open(ctx, name, { reload: first });
    first = false;
    const banner = await bannerText(page);
    if (banner) throw new StepFailed(`page ${name} shows an error: ${banner}`);
    const entry = { page: name, ms: Math.round(performance.now() - t0) };
    if (screenshots) {
      entry.screenshot = join(screenshots, `${name}.png`);
      await page.screenshot({ path: entry.screenshot, fullPage: false });
    }
    visited.push(entry);
  }
  const trouble = since(m);
  const result = { visited, ...trouble, csp: { ...seen.csp } };
  const problems = [...trouble.console_errors.map((e) => `console error: ${e}`), ...trouble.failed_requests, ...trouble.http_errors.map((e) => `HTTP error: ${e}`)];
  if (problems.length) {
    result.error = `${problems.length} problem(s) while visiting the pages: ${problems.join("; ")}`;
  }
  return result;
}

/** `search`: typing a query into the identities search shows a row with the expected text. */
async function opSearch(ctx, step) {
  const { page, timeout } = ctx;
  await open(ctx, "identities");
  const input = page.getByTestId("identities-search");
  const t0 = performance.now();
  await input.fill(step.query);
  try {
    await page.waitForFunction(
      ({ expect, query }) =>
        document.querySelector('[data-testid="identities-search"]')?.value === query &&
        new URLSearchParams(location.hash.split("?")[1] ?? "").get("q") === query.trim() &&
        !document.querySelector('[data-testid="page-identities"]')?.hasAttribute("aria-busy") &&
        [...document.querySelectorAll('[data-testid="identity-row"]')].some((r) => r.textContent.includes(expect)),
      { expect: step.expect, query: step.query },
      { timeout, polling: 50 },
    );
  } catch {
    const rows = await page.getByTestId("identity-row").count();
    const pager = await page.getByTestId("identities-pager").innerText().catch(() => "?");
    const banner = await bannerText(page);
    throw new StepFailed(
      `search ${JSON.stringify(step.query)}: no row with ${JSON.stringify(step.expect)} within ${timeout} ms ` +
        `(${rows} rows shown, ${pager})${banner ? `; error banner: ${banner}` : ""}`,
    );
  }
  const ms = Math.round(performance.now() - t0);
  const rows = await page.getByTestId("identity-row").count();
  const pager = await page.getByTestId("identities-pager").innerText();
  return { found: true, ms, rows, pager };
}

/** `explain`: the explain form's decision and rule for each pair, in order. */
async function opExplain(ctx, step) {
  const { page, timeout } = ctx;
  await open(ctx, "policy");
  const results = [];
  for (const pair of step.pairs) {
    await page.getByTestId("explain-from").fill(pair.from);
    await page.getByTestId("explain-to").fill(pair.to);
    await page.getByTestId("explain-port").fill(pair.port == null ? "" : String(pair.port));
    await page.getByTestId("explain-method").fill(pair.method ?? "");
    await page.getByTestId("explain-path").fill(pair.path ?? "");
    const result = page.getByTestId("explain-result");
    const before = Number((await result.getAttribute("data-request")) ?? 0);
    await page.getByTestId("explain-submit").click();
    try {
      await page.waitForFunction(
        (prev) => {
          const el = document.querySelector('[data-testid="explain-result"]');
          return el && Number(el.dataset.request) > prev && (el.dataset.state === "done" || el.dataset.state === "error");
        },
        before,
        { timeout, polling: 50 },
      );
    } catch {
      throw new StepFailed(`explain ${pair.from} -> ${pair.to}: no answer within ${timeout} ms`);
    }
    if ((await result.getAttribute("data-state")) === "error") {
      results.push({ ...pair, decision: null, rule: null, error: await bannerText(page) });
      continue;
    }
    results.push({
      ...pair,
      decision: (await page.getByTestId("explain-decision").textContent())?.trim() ?? null,
      rule: (await page.getByTestId("explain-rule").textContent())?.trim() ?? null,
    });
  }
  return { results };
}

/** `wait_activity`: after the trigger exits, how long until its audit record is on screen. */
async function opWaitActivity(ctx, step) {
  const { page, timeout } = ctx;
  await open(ctx, "activity");
  await page.getByTestId("activity-filter").selectOption("all");
  const match = { kind: step.kind, text: step.text };
  const newest = await page.evaluate(
    ({ kind, text }) =>
      Math.max(
        -Infinity,
        ...[...document.querySelectorAll('[data-testid="activity-row"]')]
          .filter((r) => r.dataset.kind === kind && r.textContent.includes(text))
          .map((r) => Number(r.dataset.seq)),
      ),
    match,
  );
  const trigger = await runTrigger(step.trigger, step.trigger.timeout_ms ?? 30_000);
  const result = { trigger: triggerReport(trigger) };
  assertTrigger(trigger);
  const within = step.within_ms;
  try {
    await page.waitForFunction(
      ({ kind, text, newest }) =>
        [...document.querySelectorAll('[data-testid="activity-row"]')].some(
          (r) => r.dataset.kind === kind && r.textContent.includes(text) && !(Number(r.dataset.seq) <= newest),
        ),
      { ...match, newest: Number.isFinite(newest) ? newest : null },
      { timeout: within + Math.max(timeout, 5000), polling: 25 },
    );
  } catch {
    const banner = await bannerText(page);
    throw new StepFailed(
      `no ${step.kind} row containing ${JSON.stringify(step.text)} appeared within ${within + Math.max(timeout, 5000)} ms of the trigger exiting` +
        (banner ? `; error banner: ${banner}` : ""),
    );
  }
  const now = performance.now();
  result.ms = Math.round(now - trigger.ended);
  result.ms_from_trigger_start = result.ms + trigger.ms;
  result.live = await page.getByTestId("live").getAttribute("data-state");
  if (result.ms > within) {
    result.error = `the ${step.kind} row appeared ${result.ms} ms after the trigger exited, more than ${within} ms (live indicator: ${result.live})`;
  }
  return result;
}

/** `wait_taint`: the remaining counts a taint row shows until it reaches 0. With `seen_file`,
 * the file is written once a count above 0 has been shown (the caller then lets the holders
 * re-issue, so that the count is seen falling). */
async function opWaitTaint(ctx, step) {
  const { page } = ctx;
  await open(ctx, "overview");
  const within = Number.isFinite(step.within_ms) ? step.within_ms : 60_000;
  const result = { values: [] };
  const t0 = performance.now();
  if (step.trigger) {
    const trigger = await runTrigger(step.trigger, step.trigger.timeout_ms ?? 30_000);
    result.trigger = triggerReport(trigger);
    assertTrigger(trigger);
  }
  const read = () =>
    page.evaluate((testid) => {
      const row = [...document.querySelectorAll("[data-testid]")].find((el) => el.getAttribute("data-testid") === testid);
      if (!row) return null;
      const text = row.querySelector('[data-testid="taint-remaining"]')?.textContent?.trim() ?? "";
      return /^\d+$/.test(text) ? Number(text) : `unreadable: ${text}`;
    }, `taint-${step.key_id}`);
  let appeared = false;
  for (;;) {
    const v = await read();
    if (result.values.length === 0 ? v !== null : v !== result.values[result.values.length - 1]) {
      if (v !== null || appeared) result.values.push(v);
    }
    if (typeof v === "string") throw new StepFailed(`taint-${step.key_id}: the remaining count is ${v}`);
    if (v !== null) appeared = true;
    if (typeof v === "number" && v > 0 && step.seen_file && !result.seen_file_written) {
      await writeFile(step.seen_file, String(v));
      result.seen_file_written = true;
    }
    if (appeared && v === 0) break;
    if (performance.now() - t0 > within) {
      const banner = await bannerText(page);
      throw new StepFailed(
        appeared
          ? `taint of ${step.key_id} did not reach 0 remaining within ${within} ms; saw ${JSON.stringify(result.values)}`
          : `no taint row for ${step.key_id} appeared within ${within} ms` + (banner ? `; error banner: ${banner}` : ""),
      );
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  result.ms = Math.round(performance.now() - t0);
  return result;
}

// What no console response may contain. Join tokens are 43 base64url characters (32 random
// bytes); console login tokens and sessions the same behind "mcl_" / "mcs_".
const SECRET_PATTERNS = [
  ["private key", /-----BEGIN[A-Z0-9 ]*PRIVATE KEY/g],
  ["JWT", /eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*/g],
  ["console token or session", /\bmc[ls]_[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])/g],
  ["join token", /(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])/g],
];

function violations(path, body, forbidden) {
  const out = [];
  const redact = (s) => `${s.slice(0, 8)}…(${s.length} chars)`;
  for (const [kind, re] of SECRET_PATTERNS) {
    for (const m of body.matchAll(re)) {
      // 43 characters of one case or no digit are words and hex, not 256 random bits.
      if (kind === "join token" && !(/[0-9]/.test(m[0]) && /[a-z]/.test(m[0]) && /[A-Z]/.test(m[0]))) continue;
      out.push({ path, kind, at: m.index, excerpt: redact(m[0]) });
    }
  }
  for (const literal of forbidden) {
    let at = body.indexOf(literal);
    while (at !== -1) {
      out.push({ path, kind: "forbidden literal", at, excerpt: redact(literal) });
      at = body.indexOf(literal, at + 1);
    }
  }
  return out;
}

/** `crawl`: every GET the console serves, scanned for secrets and checked for a CSP. */
async function opCrawl(ctx, step) {
  const { page, origin, timeout } = ctx;
  if (!page.url().startsWith(`${origin}/`)) await page.goto(`${origin}/`, { timeout });
  const forbidden = Array.isArray(step.forbidden) ? step.forbidden.filter((s) => typeof s === "string" && s) : [];
  const responses = [];
  const found = [];
  const problems = [];
  const get = async (path) => {
    const res = await page.request.get(`${origin}${path}`, { timeout, failOnStatusCode: false, maxRedirects: 0 });
    const body = await res.text();
    const csp = res.headers()["content-security-policy"] ?? null;
    responses.push({ path, status: res.status(), bytes: Buffer.byteLength(body), csp: csp !== null });
    if (res.status() !== 200) problems.push(`GET ${path}: ${res.status()} ${body.slice(0, 200)}`);
    if (csp === null) problems.push(`GET ${path}: no content-security-policy header`);
    found.push(...violations(path, body, forbidden));
    return body;
  };
  const json = (text) => {
    try {
      return JSON.parse(text);
    } catch {
      return null;
    }
  };
  await get("/");
  await get("/assets/app.js");
  await get("/assets/app.css");
  await get("/api/overview");
  await get("/api/agents");
  const first = json(await get("/api/identities?page=1&per_page=50"));
  const last = Math.max(1, Math.ceil((first?.total ?? 0) / 50));
  for (const p of [...new Set([2, Math.ceil(last / 2), last])].filter((p) => p > 1 && p <= last)) {
    await get(`/api/identities?page=${p}&per_page=50`);
  }
  const query = typeof step.query === "string" ? step.query : first?.items?.[0]?.spiffe_id?.split("/").pop() || "spiffe";
  await get(`/api/identities?q=${encodeURIComponent(query)}&page=1&per_page=50`);
  const policy = json(await get("/api/policy"));
  const edge = policy?.graph?.edges?.[0];
  if (edge) {
    await get(`/api/policy/explain?from=${encodeURIComponent(edge.from)}&to=${encodeURIComponent(edge.to)}`);
  }
  await get("/api/activity?limit=100");
  await get("/api/compliance");
  // The event stream never ends: read its headers and its first bytes in the page, then stop.
  const events = await page.evaluate(async (ms) => {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), ms);
    try {
      const res = await fetch("/api/events", { credentials: "same-origin", signal: ctl.signal });
      const reader = res.body.getReader();
      const first = await reader.read();
      ctl.abort();
      return {
        status: res.status,
        type: res.headers.get("content-type"),
        csp: res.headers.get("content-security-policy"),
        head: first.value ? new TextDecoder().decode(first.value) : "",
      };
    } catch (e) {
      return { error: String(e) };
    } finally {
      clearTimeout(timer);
    }
  }, timeout);
  if (events.error) {
    problems.push(`GET /api/events: ${events.error}`);
  } else {
    responses.push({ path: "/api/events", status: events.status, bytes: events.head.length, csp: events.csp !== null });
    if (events.status !== 200) problems.push(`GET /api/events: ${events.status}`);
    if (!events.type?.startsWith("text/event-stream")) problems.push(`GET /api/events: content-type ${events.type}, not text/event-stream`);
    if (events.csp === null) problems.push("GET /api/events: no content-security-policy header");
    found.push(...violations("/api/events", events.head, forbidden));
  }
  const result = { responses, violations: found };
  if (found.length) problems.push(`${found.length} secret-shaped string(s): ${found.map((v) => `${v.kind} in ${v.path}`).join(", ")}`);
  if (problems.length) result.error = problems.join("; ");
  return result;
}

/** `login`: the login form comes up, takes the token, and the overview loads. */
async function opLogin(ctx, step) {
  const { page, origin, timeout } = ctx;
  await page.goto(`${origin}/`, { timeout });
  const form = page.getByTestId("login");
  try {
    await form.waitFor({ timeout });
  } catch {
    throw new StepFailed(`the login form (data-testid="login") did not appear within ${timeout} ms`);
  }
  const type = await page.getByTestId("login-token").getAttribute("type");
  const autocomplete = await page.getByTestId("login-token").getAttribute("autocomplete");
  if (type !== "password" || autocomplete !== "off") {
    throw new StepFailed(`the token input must be type=password autocomplete=off, is type=${type} autocomplete=${autocomplete}`);
  }
  await page.getByTestId("login-token").fill(step.token);
  await form.locator('button[type="submit"]').click();
  if (step.expect === "error") {
    try {
      await page.getByTestId("error").waitFor({ timeout });
    } catch {
      throw new StepFailed(`a refused login showed no error within ${timeout} ms`);
    }
    return { logged_in: false, error_shown: await bannerText(page) };
  }
  await waitLoaded(ctx, "overview");
  return { logged_in: true };
}

const RUN = { pages: opPages, search: opSearch, explain: opExplain, wait_activity: opWaitActivity, wait_taint: opWaitTaint, crawl: opCrawl, login: opLogin };

async function main() {
  let input;
  try {
    input = readInput();
  } catch (e) {
    if (!(e instanceof Usage)) throw e;
    console.log(JSON.stringify({ ok: false, steps: [], error: e.message }));
    console.error(`drive: ${e.message}`);
    return 2;
  }
  const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
  const report = { ok: true, steps: [] };
  let browser;
  try {
    // A non-persistent context: Playwright gives Chromium a fresh temporary profile and
    // removes it on close.
    browser = await chromium.launch({ executablePath, args: CHROMIUM_ARGS, timeout: 30_000 });
  } catch (e) {
    const msg = `cannot start Chromium at ${executablePath} (set CHROMIUM, or apt-get install chromium): ${e.message.split("\n")[0]}`;
    console.log(JSON.stringify({ ok: false, steps: [], error: msg }));
    console.error(`drive: ${msg}`);
    return 2;
  }
  try {
    const context = await browser.newContext({
      viewport: { width: 1280, height: 800 },
      ignoreHTTPSErrors: input.ignoreHttpsErrors,
      serviceWorkers: "block",
      ...(input.clientCert ? { clientCertificates: [{ origin: input.origin, certPath: input.clientCert.cert, keyPath: input.clientCert.key }] } : {}),
    });
    context.setDefaultTimeout(input.timeout);
    const page = await context.newPage();
    watch(page, input.origin);
    const ctx = { page, origin: input.origin, timeout: input.timeout, screenshots: input.screenshots };
    for (const [i, step] of input.steps.entries()) {
      const t0 = performance.now();
      const entry = { op: step.op, ok: true };
      try {
        Object.assign(entry, await RUN[step.op](ctx, step));
      } catch (e) {
        entry.error = e instanceof StepFailed ? e.message : `${e.name}: ${e.message.split("\n")[0]}`;
      }
      entry.ms_total = Math.round(performance.now() - t0);
      if (entry.error) {
        entry.ok = false;
        report.ok = false;
        report.error = `step ${i} (${step.op}): ${entry.error}`;
      }
      report.steps.push(entry);
      if (!entry.ok) break;
    }
  } finally {
    await browser.close().catch(() => {});
  }
  console.log(JSON.stringify(report));
  if (!report.ok) {
    console.error(`drive: ${report.error}`);
    return 1;
  }
  return 0;
}

main().then(
  (code) => process.exit(code),
  (e) => {
    console.log(JSON.stringify({ ok: false, steps: [], error: `drive.mjs failed: ${e.message}` }));
    console.error(`drive: ${e.stack ?? e}`);
    process.exit(2);
  },
);
