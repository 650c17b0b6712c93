// Agents: every attested node agent, whether it has the latest trust bundle, and what it serves.

import { getJson } from "../api";
import { breakable, h, replace, table } from "../dom";
import { Page } from "../page";
import { agents, type Agent } from "../schema";
import { when } from "../time";

type Agents = { agents: Agent[] };

function isBehind(a: Agent): boolean {
  return a.bundle_behind !== null && a.bundle_behind > 0;
}

export class AgentsPage extends Page<Agents> {
  private readonly body = h("div", {});

  constructor() {
    super("agents", "Agents");
    this.root.append(this.body);
  }

  protected fetch(signal: AbortSignal): Promise<Agents> {
    return getJson("/api/agents", agents, signal);
  }

  protected render({ agents: list }: Agents): void {
    const behind = list.filter(isBehind).length;
    const banned = list.filter((a) => a.banned).length;
    replace(
      this.body,
      h(
        "p",
        { class: "counts" },
        `${list.length} agent${list.length === 1 ? "" : "s"}, `,
        h("span", { class: behind > 0 ? "warn" : "" }, `${behind} behind on the trust bundle`),
        `, ${banned} banned`,
      ),
      table(
        { class: "data", "data-testid": "agents" },
        null,
        ["SPIFFE ID", "Attestation", "Serial", "Created", "Expires", "Last seen", "Bundle", { num: "Policy rev." }, { num: "X.509 streams" }, { num: "SVIDs" }],
        list.map(row),
        "No agents have attested yet.",
      ),
    );
  }
}

function row(a: Agent): HTMLTableRowElement {
  const behind = isBehind(a);
  const cls = [behind ? "behind" : "", a.banned ? "banned" : ""].join(" ").trim();
  let bundle: (HTMLElement | string)[];
  if (a.bundle_sequence === null) {
    bundle = [h("span", { class: "muted" }, "not delivered")];
  } else if (behind) {
    bundle = [String(a.bundle_sequence), " ", h("span", { class: "badge warn" }, `${a.bundle_behind} behind`)];
  } else {
    bundle = [String(a.bundle_sequence), " ", h("span", { class: "badge ok" }, "current")];
  }
  return h(
    "tr",
    { class: cls || null, "data-testid": "agent-row" },
    h(
      "td",
      { class: "mono id" },
      breakable(a.spiffe_id),
      a.banned ? [" ", h("span", { class: "badge bad" }, "banned")] : null,
    ),
    h("td", {}, a.attestation_type),
    h("td", { class: "mono" }, a.serial),
    h("td", {}, when(a.created_at)),
    h("td", {}, when(a.expires_at)),
    h("td", {}, when(a.last_seen)),
    h("td", {}, bundle),
    h("td", { class: "num" }, a.policy_revision ?? "\u2014"),
    h("td", { class: "num" }, a.x509_streams),
    h("td", { class: "num" }, a.svids),
  );
}
