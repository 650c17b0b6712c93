// The console API's responses (ca/src/console*.rs). Times are unix seconds.

import { arr, bool, nullable, num, obj, str, type Infer } from "./decode";

const key = obj({
  id: str,
  kind: str,
  state: str,
  not_before: num,
  not_after: num,
  /** 0 (or null) when the key is not tainted. */
  tainted_at: nullable(num),
  parent: nullable(str),
});

const taint = obj({
  key_id: str,
  kind: str,
  tainted_at: num,
  remaining: num,
  remaining_until: nullable(num),
  replaced: num,
  cleared_after_s: nullable(num),
});

export const overview = obj({
  trust_domain: str,
  server_id: str,
  now: num,
  bundle_sequence: num,
  policy_revision: nullable(num),
  entries: num,
  agents: obj({ total: num, current: num, behind: num }),
  keys: arr(key),
  rotation: obj({
    phase: str,
    detail: str,
    /** Agents that have not delivered the current bundle (optional). */
    lagging: nullable(arr(obj({ agent: str, delivered: nullable(num), reported_at: nullable(num) }))),
  }),
  taints: arr(taint),
});
export type Overview = Infer<typeof overview>;
export type Key = Infer<typeof key>;
export type Taint = Infer<typeof taint>;

const agent = obj({
  spiffe_id: str,
  attestation_type: str,
  serial: str,
  expires_at: num,
  created_at: num,
  banned: bool,
  last_seen: nullable(num),
  bundle_sequence: nullable(num),
  bundle_behind: nullable(num),
  policy_revision: nullable(num),
  x509_streams: num,
  svids: num,
});
export const agents = obj({ agents: arr(agent) });
export type Agent = Infer<typeof agent>;

const identity = obj({
  entry_id: str,
  spiffe_id: str,
  parent_id: str,
  selectors: arr(str),
  admin: bool,
  dns_names: arr(str),
  /** null: the CA's default TTL. */
  x509_ttl_s: nullable(num),
  svid: nullable(
    obj({ serial: str, issued_at: num, not_after: num, issuer: str, tainted: bool }),
  ),
  last_rotation: nullable(num),
});
export const identities = obj({
  total: num,
  page: num,
  per_page: num,
  items: arr(identity),
});
export type Identity = Infer<typeof identity>;
export type Identities = Infer<typeof identities>;

const rule = obj({
  name: str,
  line: nullable(num),
  action: str,
  mode: str,
  from: arr(str),
  to: arr(str),
  ports: nullable(arr(num)),
  http: bool,
});
const edge = obj({ from: str, to: str, rule: str, action: str });
export const policy = obj({
  /** null (with policy null, no rules): no central policy has been applied. */
  revision: nullable(num),
  policy: nullable(str),
  default: str,
  mode: str,
  documents: arr(str),
  rules: arr(rule),
  graph: obj({ nodes: arr(obj({ id: str })), edges: arr(edge) }),
});
export type Policy = Infer<typeof policy>;
export type Rule = Infer<typeof rule>;
export type Edge = Infer<typeof edge>;

const trace = obj({
  name: str,
  line: nullable(num),
  action: str,
  mode: str,
  matched: bool,
  fail_closed: nullable(str),
  failed: nullable(str),
});
/** Exactly `meshid-proxy policy explain --json`. */
export const explain = obj({
  policy: str,
  mode: str,
  default: str,
  decision: str,
  allowed: bool,
  rule: nullable(obj({ name: str, index: num, line: nullable(num) })),
  rules: arr(trace),
});
export type Explain = Infer<typeof explain>;

const record = obj({ seq: num, time: num, kind: str, actor: str, summary: str });
const denial = obj({ caller: str, callee: str, rule: str, count: num, last_at: num });
export const activity = obj({
  records: arr(record),
  denials: arr(denial),
  /** false: no proxy reports denials to the CA yet (the table is empty for that reason). */
  denials_reported: nullable(bool),
});
export type ActivityRecord = Infer<typeof record>;
export type Denial = Infer<typeof denial>;

const service = obj({ spiffe_id: str, renewals: num, on_time: num, lapsed: num, share: num });
const fetcher = obj({ spiffe_id: str, issued: num, hours: arr(num) });
export const compliance = obj({
  window_s: num,
  /** The share of an SVID's life before which a renewal is on time (optional). */
  on_time_share: nullable(num),
  services: arr(service),
  top_fetchers: arr(fetcher),
});
export type Compliance = Infer<typeof compliance>;
export type Fetcher = Infer<typeof fetcher>;

export const apiError = obj({ error: str });

/** `/api/session`: how this browser was admitted. */
export const session = obj({ via: str, who: nullable(str) });
