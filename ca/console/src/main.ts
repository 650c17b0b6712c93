// The console's entry point: hash routing between the six pages, live updates, and the login
// form that any 401 brings up.

import { Unauthorized, getJson, login, logout, onUnauthorized } from "./api";
import { clearAllErrors, clearError, describeError, mountBanner, showError } from "./banner";
import { h, on, replace } from "./dom";
import { Live, Throttle, type LiveState } from "./live";
import type { Page } from "./page";
import { ActivityPage } from "./pages/activity";
import { AgentsPage } from "./pages/agents";
import { CompliancePage } from "./pages/compliance";
import { IdentitiesPage } from "./pages/identities";
import { OverviewPage } from "./pages/overview";
import { PolicyPage } from "./pages/policy";
import { overview, session } from "./schema";
import { byId, setTrustDomain } from "./shell";
import { tick } from "./time";

const ROUTES: Record<string, (params: URLSearchParams) => Page<unknown>> = {
  overview: () => new OverviewPage(),
  agents: () => new AgentsPage(),
  identities: (params) => new IdentitiesPage(params),
  policy: () => new PolicyPage(),
  activity: () => new ActivityPage(),
  compliance: () => new CompliancePage(),
};

const main = byId("main");
const nav = byId("nav");
const indicator = byId("live");
let current: Page<unknown> | null = null;
let loginShown = false;

/** `#/identities?q=web` → ["identities", q=web]; anything unknown → overview. */
function route(): [string, URLSearchParams] {
  const m = /^#\/([a-z]+)(?:\?(.*))?$/.exec(location.hash);
  const name = m?.[1];
  if (name && name in ROUTES) return [name, new URLSearchParams(m?.[2] ?? "")];
  return ["overview", new URLSearchParams()];
}

function mount(): void {
  if (loginShown) return;
  const [name, params] = route();
  if (!location.hash.startsWith(`#/${name}`)) history.replaceState(null, "", `#/${name}`);
  current?.dispose();
  clearAllErrors();
  const make = ROUTES[name];
  if (!make) return;
  const page = make(params);
  current = page;
  for (const a of nav.querySelectorAll<HTMLAnchorElement>("a[data-page]")) {
    if (a.dataset["page"] === name) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  replace(main, page.root);
  void page.refresh();
}

const throttle = new Throttle(async () => {
  await current?.update();
});

const live = new Live(
  () => throttle.request(),
  (state: LiveState, detail: string) => {
    indicator.dataset["state"] = state;
    indicator.title = detail;
    replace(indicator, { connecting: "connecting", live: "live", polling: "polling", paused: "paused" }[state]);
  },
);

function showLogin(): void {
  if (loginShown) return;
  loginShown = true;
  live.stop();
  throttle.cancel();
  current?.dispose();
  current = null;
  const token = h("input", {
    id: "login-token",
    "data-testid": "login-token",
    type: "password",
    autocomplete: "off",
    required: true,
    spellcheck: "false",
  });
  const submit = h("button", { type: "submit", "data-testid": "login-submit" }, "Log in");
  const form = on(
    h(
      "form",
      { class: "login", "data-testid": "login", "aria-labelledby": "h-login" },
      h("h2", { id: "h-login" }, "Log in to the console"),
      h(
        "p",
        {},
        "This console needs a login token. On the CA host, run ",
        h("code", {}, "meshid-ca console token"),
        " and paste the token here. It is used once; the session it opens lives in an HttpOnly cookie.",
      ),
      h("label", { for: "login-token" }, "Login token"),
      token,
      submit,
    ),
    {
      submit: (ev) => {
        ev.preventDefault();
        submit.disabled = true;
        login(token.value)
          .then(() => {
            clearError("login");
            location.reload();
          })
          .catch((e: unknown) => {
            showError("login", describeError(e));
            submit.disabled = false;
            token.select();
          });
      },
    },
  );
  replace(main, form);
  token.focus();
}

function boot(): void {
  mountBanner(byId("banner"));
  onUnauthorized(showLogin);
  window.addEventListener("hashchange", mount);
  window.setInterval(tick, 15000);
  mount();
  live.start();
  showSession();
  // The header shows the trust domain whatever page opened first.
  if (route()[0] !== "overview") {
    getJson("/api/overview", overview)
      .then((o) => setTrustDomain(o.trust_domain))
      .catch((e: unknown) => {
        if (e instanceof Unauthorized) return; // the login form is up
        showError("header", `trust domain for the header: ${describeError(e)}`);
      });
  }
}

/** The header says how this browser was admitted; a session gets a logout button. */
function showSession(): void {
  getJson("/api/session", session)
    .then((s) => {
      const slot = byId("session");
      const text =
        s.via === "admin"
          ? `admin ${s.who ?? ""}`
          : s.via === "session"
            ? `session (token by ${s.who ?? "?"})`
            : "this host";
      const children: Node[] = [document.createTextNode(text)];
      if (s.via === "session") {
        const out = h("button", { type: "button", class: "logout", "data-testid": "logout" }, "Log out");
        out.addEventListener("click", () => {
          logout()
            .then(() => window.location.reload())
            .catch((e: unknown) => showError("logout", describeError(e)));
        });
        children.push(out);
      }
      slot.replaceChildren(...children);
    })
    .catch((e: unknown) => {
      if (e instanceof Unauthorized) return; // the login form is up
      showError("header", `session for the header: ${describeError(e)}`);
    });
}

try {
  boot();
} catch (e) {
  console.error(e);
  showError("boot", `the console failed to start: ${describeError(e)}`);
}
