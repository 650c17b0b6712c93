// Policy: the loaded mesh policy as a graph and a table of rules, and an explain form that asks
// the CA what the policy decides for one call and why (the same JSON as
// `meshid-proxy policy explain --json`).

import { ApiError, Unauthorized, getJson, isAbort, withQuery } from "../api";
import { clearError, describeError, showError } from "../banner";
import { h, on, replace, table } from "../dom";
import { policyGraph } from "../graph";
import { Page } from "../page";
import { explain, policy, type Explain, type Policy, type Rule } from "../schema";
import { token } from "../timeline";

const METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"];

function field(id: string, label: string, input: HTMLInputElement, hint?: string): HTMLElement {
  input.id = id;
  return h(
    "div",
    { class: "field" },
    h("label", { for: id }, label),
    input,
    hint ? h("span", { class: "hint" }, hint) : null,
  );
}

export class PolicyPage extends Page<Policy> {
  private readonly head = h("div", {});
  private readonly graph = h("div", { class: "graph-wrap" });
  private readonly rules = h("div", {});
  private readonly nodes = h("datalist", { id: "policy-nodes" });
  private readonly result = h("div", { "data-testid": "explain-result", "data-state": "empty", "data-request": 0, "aria-live": "polite" });
  private readonly from = h("input", { "data-testid": "explain-from", type: "text", required: true, list: "policy-nodes", autocomplete: "off", spellcheck: "false", placeholder: "spiffe://example.org/web" });
  private readonly to = h("input", { "data-testid": "explain-to", type: "text", required: true, list: "policy-nodes", autocomplete: "off", spellcheck: "false", placeholder: "spiffe://example.org/api" });
  private readonly port = h("input", { "data-testid": "explain-port", type: "number", min: 1, max: 65535, step: 1, inputmode: "numeric" });
  private readonly method = h("input", { "data-testid": "explain-method", type: "text", list: "http-methods", autocomplete: "off", spellcheck: "false" });
  private readonly path = h("input", { "data-testid": "explain-path", type: "text", autocomplete: "off", spellcheck: "false", placeholder: "/v1/items" });
  private explaining: AbortController | null = null;
  private requests = 0;

  constructor() {
    super("policy", "Policy");
    const form = on(
      h(
        "form",
        { class: "explain", "data-testid": "explain-form", "aria-labelledby": "h-explain" },
        h("h3", { id: "h-explain" }, "Explain a call"),
        h("p", { class: "hint" }, "What the policy decides when the caller connects to the callee, and which rule decides it. Leave port, method and path empty to ask about any."),
        h(
          "div",
          { class: "fields" },
          field("explain-from", "Caller", this.from),
          field("explain-to", "Callee", this.to),
          field("explain-port", "Port", this.port),
          field("explain-method", "HTTP method", this.method),
          field("explain-path", "HTTP path", this.path),
          h("div", { class: "field submit" }, h("button", { type: "submit", "data-testid": "explain-submit" }, "Explain")),
        ),
        this.nodes,
        h("datalist", { id: "http-methods" }, METHODS.map((m) => h("option", { value: m }))),
      ),
      {
        submit: (ev) => {
          ev.preventDefault();
          void this.explain();
        },
      },
    );
    this.root.append(
      this.head,
      form,
      this.result,
      h("section", { "aria-labelledby": "h-graph" }, h("h3", { id: "h-graph" }, "Who may call whom"), this.graph),
      h("section", { "aria-labelledby": "h-rules" }, h("h3", { id: "h-rules" }, "Rules"), this.rules),
    );
  }

  protected fetch(signal: AbortSignal): Promise<Policy> {
    return getJson("/api/policy", policy, signal);
  }

  protected render(p: Policy): void {
    replace(
      this.head,
      p.revision === null
        ? h("p", { class: "counts" }, h("span", { class: "warn" }, "No central policy has been applied yet"), `: every call gets the default (${p.default}).`)
        : h(
            "p",
            { class: "counts" },
            `Revision ${p.revision} of `,
            h("strong", {}, p.policy ?? "(unnamed)"),
            ` \u00b7 default ${p.default} \u00b7 mode ${p.mode} \u00b7 ${p.rules.length} rule${p.rules.length === 1 ? "" : "s"}`,
            p.documents.length ? ` \u00b7 documents: ${p.documents.join(", ")}` : "",
          ),
    );
    replace(this.nodes, p.graph.nodes.map((n) => h("option", { value: n.id })));
    replace(
      this.graph,
      p.graph.nodes.length === 0 && p.graph.edges.length === 0
        ? h("p", { class: "muted" }, "The policy names no identities.")
        : policyGraph(p.graph.nodes.map((n) => n.id), p.graph.edges, (this.graph.clientWidth || 1240) - 12),
      h(
        "p",
        { class: "legend" },
        h("span", { class: "swatch edge-allow" }, "allow"),
        h("span", { class: "swatch edge-deny" }, "deny"),
        h("span", { class: "swatch edge-other" }, "other (audit)"),
      ),
    );
    replace(this.rules, rulesTable(p.rules));
  }

  override dispose(): void {
    this.explaining?.abort();
    super.dispose();
  }

  private async explain(): Promise<void> {
    const port = this.port.value.trim();
    if (port !== "" && !/^\d+$/.test(port)) {
      showError("explain", `explain: port must be a number from 1 to 65535, not \u201c${port}\u201d`);
      return;
    }
    this.explaining?.abort();
    const ctl = new AbortController();
    this.explaining = ctl;
    const request = ++this.requests;
    this.result.dataset["state"] = "pending";
    this.result.dataset["request"] = String(request);
    this.result.setAttribute("aria-busy", "true");
    const path = withQuery("/api/policy/explain", {
      from: this.from.value.trim(),
      to: this.to.value.trim(),
      port,
      method: this.method.value.trim(),
      path: this.path.value.trim(),
    });
    try {
      const r = await getJson(path, explain, ctl.signal);
      if (ctl.signal.aborted) return;
      clearError("explain");
      replace(this.result, explainView(r));
      this.result.dataset["state"] = "done";
    } catch (e) {
      if (ctl.signal.aborted || isAbort(e)) return;
      this.result.dataset["state"] = "error";
      replace(this.result);
      if (e instanceof Unauthorized) return;
      if (!(e instanceof ApiError)) console.error(e);
      showError("explain", `explain: ${describeError(e)}`);
    } finally {
      if (this.explaining === ctl) {
        this.explaining = null;
        this.result.removeAttribute("aria-busy");
      }
    }
  }
}

function list(items: readonly string[]): HTMLElement | string {
  return items.length ? h("ul", { class: "plain" }, items.map((i) => h("li", { class: "mono" }, i))) : "\u2014";
}

function rulesTable(rules: readonly Rule[]): HTMLTableElement {
  return table(
    { class: "data", "data-testid": "rules" },
    null,
    [{ num: "#" }, "Rule", { num: "Line" }, "Action", "Mode", "From", "To", "Ports", "HTTP"],
    rules.map((r, i) =>
      h(
        "tr",
        { class: `action-${token(r.action)}`, "data-rule": r.name },
        h("td", { class: "num" }, i),
        h("td", { class: "mono" }, r.name),
        h("td", { class: "num" }, r.line ?? "\u2014"),
        h("td", {}, h("span", { class: `pill action-${token(r.action)}` }, r.action)),
        h("td", {}, r.mode),
        h("td", {}, list(r.from)),
        h("td", {}, list(r.to)),
        h("td", {}, r.ports === null ? "any" : r.ports.join(", ")),
        h("td", {}, r.http ? "yes" : "no"),
      ),
    ),
    "The policy has no rules: every call gets the default.",
  );
}

function explainView(r: Explain): HTMLElement[] {
  const verdict = h(
    "p",
    { class: `verdict ${r.allowed ? "allowed" : "denied"}` },
    h("span", { class: "muted" }, "Decision: "),
    h("strong", { "data-testid": "explain-decision" }, r.decision),
    h("span", { class: "muted" }, r.rule ? " by rule " : " by "),
    h("code", { "data-testid": "explain-rule" }, r.rule ? r.rule.name : "(default)"),
    r.rule
      ? h("span", { class: "muted" }, ` (rule #${r.rule.index}${r.rule.line === null ? "" : `, line ${r.rule.line}`})`)
      : h("span", { class: "muted" }, ` (no rule matched; default ${r.default})`),
    h("span", { class: "muted" }, ` \u00b7 ${r.allowed ? "allowed" : "not allowed"} \u00b7 policy ${r.policy}, mode ${r.mode}`),
  );
  const trace = table(
    { class: "data trace", "data-testid": "explain-trace" },
    "How each rule was evaluated, in order",
    [{ num: "#" }, "Rule", { num: "Line" }, "Action", "Mode", "Matched", "Failed on", "Fail-closed"],
    r.rules.map((t, i) =>
      h(
        "tr",
        { class: [t.matched ? "matched" : "", r.rule && r.rule.index === i ? "decisive" : ""].join(" ").trim() || null },
        h("td", { class: "num" }, i),
        h("td", { class: "mono" }, t.name),
        h("td", { class: "num" }, t.line ?? "\u2014"),
        h("td", {}, t.action),
        h("td", {}, t.mode),
        h("td", {}, t.matched ? "yes" : "no"),
        h("td", {}, t.failed ?? "\u2014"),
        h("td", {}, t.fail_closed ?? "\u2014"),
      ),
    ),
    "No rules were evaluated.",
  );
  return [verdict, trace];
}
