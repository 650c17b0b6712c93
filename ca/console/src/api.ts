// Requests to the console API: same-origin only, with the session cookie the browser holds
// (HttpOnly: this code never sees it). Every failure becomes an Error whose message says which
// request failed and why, for the error banner; a 401 also asks for the login form.

import { DecodeError, type Decoder } from "./decode";
import { apiError } from "./schema";
import { clock } from "./time";

/** The server answered 401: the login form is shown, the caller just stops. */
export class Unauthorized extends Error {
  constructor(path: string) {
    super(`${path}: not logged in`);
    this.name = "Unauthorized";
  }
}

/** Any other failure of an API request, with a message fit for the banner. */
export class ApiError extends Error {
  constructor(
    message: string,
    readonly status: number | null,
  ) {
    super(message);
    this.name = "ApiError";
  }
}

let unauthorized: () => void = () => {};

/** Sets what happens when any request answers 401 (main shows the login form). */
export function onUnauthorized(handler: () => void): void {
  unauthorized = handler;
}

export function isAbort(e: unknown): boolean {
  return e instanceof DOMException && e.name === "AbortError";
}

/** The `error` of a JSON error body, or a short description of a body that is not one. */
async function errorText(res: Response): Promise<string> {
  const text = await res.text().catch(() => "");
  try {
    return apiError(JSON.parse(text), "error body").error;
  } catch {
    const snippet = text.trim().slice(0, 200);
    return snippet ? `unexpected response body: ${snippet}` : "empty response body";
  }
}

async function send(method: string, path: string, init: RequestInit): Promise<Response> {
  let res: Response;
  try {
    res = await fetch(path, {
      ...init,
      method,
      credentials: "same-origin",
      cache: "no-store",
      redirect: "error",
    });
  } catch (e) {
    if (isAbort(e)) throw e;
    const why = e instanceof Error ? e.message : String(e);
    throw new ApiError(`${method} ${path}: could not reach the CA (${why})`, null);
  }
  const date = res.headers.get("date");
  if (date) clock.observe(Date.parse(date) / 1000);
  return res;
}

/** GETs `path` and decodes its JSON body. */
export async function getJson<T>(
  path: string,
  decode: Decoder<T>,
  signal?: AbortSignal,
): Promise<T> {
  const res = await send("GET", path, signal ? { signal } : {});
  if (res.status === 401) {
    unauthorized();
    throw new Unauthorized(path);
  }
  if (!res.ok) {
    const why = await errorText(res);
    throw new ApiError(`GET ${path}: ${res.status} ${res.statusText}: ${why}`.trim(), res.status);
  }
  let body: unknown;
  try {
    body = await res.json();
  } catch (e) {
    if (isAbort(e)) throw e;
    throw new ApiError(`GET ${path}: the response is not JSON`, res.status);
  }
  try {
    return decode(body, "");
  } catch (e) {
    if (e instanceof DecodeError) {
      throw new ApiError(`GET ${path}: unexpected response: ${e.message}`, res.status);
    }
    throw e;
  }
}

/** POSTs the login token; resolves when the session cookie is set (204). */
export async function login(token: string): Promise<void> {
  const res = await send("POST", "/api/login", {
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ token }),
  });
  if (res.status === 204 || res.ok) return;
  const why = await errorText(res);
  // A 401's error already says the login was refused, and why.
  throw new ApiError(res.status === 401 ? why : `login failed: ${res.status} ${res.statusText}: ${why}`, res.status);
}

/** Ends this browser's session (the cookie is cleared by the response). */
export async function logout(): Promise<void> {
  const res = await send("POST", "/api/logout", {
    headers: { "content-type": "application/json" },
    body: "{}",
  });
  if (res.status === 204 || res.ok) return;
  throw new ApiError(`logout failed: ${res.status} ${res.statusText}: ${await errorText(res)}`, res.status);
}

/** Builds `path?k=v&...`, leaving out empty values. */
export function withQuery(path: string, params: Record<string, string | number | null>): string {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== null && v !== "") q.set(k, String(v));
  }
  const qs = q.toString();
  return qs ? `${path}?${qs}` : path;
}
