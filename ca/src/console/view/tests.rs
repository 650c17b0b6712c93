use serde_json::json;

use super::*;

const H: i64 = 3600;

fn issue(v: &mut View, seq: i64, time: i64, entry: &str, agent: &str, ttl: i64, issuer: &str) {
    v.apply(
        seq,
        time,
        "svid.x509.issued",
        agent,
        &json!({"entry_id": entry, "spiffe_id": format!("spiffe://example.org/{entry}"),
                "serial": format!("{seq:x}"), "not_after": time + ttl, "issuer": issuer}),
    );
}

#[test]
fn the_latest_svid_of_each_entry_follows_the_log() {
    let mut v = View::default();
    let t = 100 * H;
    issue(&mut v, 1, t, "web", "agent-a", H, "k1");
    issue(&mut v, 2, t + 60, "api", "agent-a", H, "k1");
    issue(&mut v, 3, t + 1800, "web", "agent-a", H, "k2");
    let web = v.latest("web").unwrap();
    assert_eq!(
        (web.serial.as_str(), web.issuer.as_str(), web.issued_at),
        ("3", "k2", t + 1800)
    );
    assert_eq!(v.seq, 3);
    let per_agent = v.svids_per_agent(t + 1900);
    assert_eq!(per_agent.get("agent-a"), Some(&2));
    // api's expired by then; web's has not.
    assert_eq!(v.svids_per_agent(t + 3700).get("agent-a"), Some(&1));
    v.apply(
        4,
        t + 2000,
        "entry.deleted",
        "admin",
        &json!({"entry_id": "api"}),
    );
    assert!(v.latest("api").is_none());
    v.apply(
        5,
        t + 2100,
        "entry.rotated",
        "admin",
        &json!({"entry_id": "web"}),
    );
    assert_eq!(v.rotated("web"), Some(t + 2100));
}

#[test]
fn renewals_count_as_on_time_before_three_quarters_of_the_life() {
    let mut v = View::default();
    let t = 1000 * H;
    // web renews at half-life, twice; api at 80% once, then after expiry.
    issue(&mut v, 1, t, "web", "a", 1000, "k");
    issue(&mut v, 2, t + 500, "web", "a", 1000, "k");
    issue(&mut v, 3, t + 1000, "web", "a", 1000, "k");
    issue(&mut v, 4, t, "api", "a", 1000, "k");
    issue(&mut v, 5, t + 800, "api", "a", 1000, "k");
    issue(&mut v, 6, t + 2000, "api", "a", 1000, "k");
    // Exactly at 75% is on time; the same entry on another agent is another holder.
    issue(&mut v, 7, t, "db", "a", 1000, "k");
    issue(&mut v, 8, t + 750, "db", "a", 1000, "k");
    issue(&mut v, 9, t + 10, "db", "b", 1000, "k");
    let c = v.compliance(t + 2000);
    let by: HashMap<_, _> = c.iter().map(|c| (c.spiffe_id.as_str(), c)).collect();
    let web = by["spiffe://example.org/web"];
    assert_eq!((web.renewals, web.on_time), (2, 2));
    let api = by["spiffe://example.org/api"];
    assert_eq!((api.renewals, api.on_time), (2, 0));
    assert_eq!(api.share, 0.0);
    let db = by["spiffe://example.org/db"];
    assert_eq!((db.renewals, db.on_time), (1, 1));
    // At t + 2000 db's SVIDs (issued t + 750 and t + 10, 1000 s) have expired with no
    // successor: two lapses, in the share.
    assert_eq!((db.lapsed, db.share), (2, 1.0 / 3.0));
    assert_eq!(api.lapsed, 0, "its last SVID is still valid");
    // Worst first.
    assert_eq!(c[0].spiffe_id, "spiffe://example.org/api");
}

#[test]
fn the_window_drops_hours_older_than_a_day() {
    let mut v = View::default();
    let t = 5000 * H;
    for i in 0..30 {
        issue(&mut v, i + 1, t + i * H, "web", "a", 2 * H, "k");
    }
    issue(&mut v, 31, t + 29 * H + 5, "api", "a", H, "k");
    let now = t + 29 * H + 10;
    let top = v.top_fetchers(now, 10);
    assert_eq!(top[0].spiffe_id, "spiffe://example.org/web");
    assert_eq!(top[0].issued, 24, "only the last 24 hours");
    assert_eq!(top[0].hours, vec![1; 24]);
    assert_eq!(top[1].issued, 1);
    assert_eq!(top[1].hours[23], 1);
    assert_eq!(v.top_fetchers(now, 1).len(), 1);
    // A day later nothing is left.
    assert!(v.top_fetchers(now + 25 * H, 10).is_empty());
    // What is left: web's last SVID expired in the window with no successor, a lapse (api's
    // expired just before the window).
    let later = v.compliance(now + 25 * H);
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].spiffe_id, "spiffe://example.org/web");
    assert!(
        later
            .iter()
            .all(|c| (c.renewals, c.lapsed, c.share) == (0, 1, 0.0)),
        "{later:?}"
    );
    // Two days later nothing is left.
    assert!(v.compliance(now + 50 * H).is_empty());
}

#[test]
fn activity_is_newest_first_bounded_and_summarized_from_an_allowlist() {
    let mut v = View::default();
    for i in 1..=(RECENT as i64 + 10) {
        v.apply(i, i, "policy.apply", "admin", &json!({"revision": i}));
    }
    let recent = v.recent(3);
    assert_eq!(recent[0].seq, RECENT as i64 + 10);
    assert_eq!(
        recent[0].summary,
        format!("revision={}", RECENT as i64 + 10)
    );
    assert_eq!(v.recent(10_000).len(), RECENT);
    let s = summary(
        "token.created",
        &json!({"token_hash": "abcd", "csr": "MIIB", "token": "secret", "spiffe_id": "spiffe://example.org/x",
                "reason": "line one\nline two"}),
    );
    assert_eq!(
        s,
        "spiffe_id=spiffe://example.org/x reason=line oneline two"
    );
    assert_eq!(summary("agent.banned", &json!({})), "agent.banned");
    // A revocation: its target, then the certificates it listed.
    let s = summary(
        "svid.revoked",
        &json!({"reason": "stolen", "ca_server": "ca-1", "target": {"spiffe_id": "spiffe://example.org/web"},
                "certificates": [
                    {"serial": "0a", "spiffe_id": "spiffe://example.org/web", "issuer": "int-1"},
                    {"serial": "0b", "spiffe_id": "spiffe://example.org/web", "issuer": "int-1"}]}),
    );
    assert_eq!(
        s,
        "spiffe_id=spiffe://example.org/web reason=stolen certificates=2 serials=0a,0b spiffe_ids=spiffe://example.org/web"
    );
}

#[test]
fn reported_denials_add_up_and_age_out_of_the_window() {
    let mut v = View::default();
    let t = 100 * H;
    let report = |caller: &str, rule: &str, count: u64, at: i64| {
        json!({"denials": [{"caller": caller, "callee": "spiffe://example.org/api", "rule": rule,
                            "count": count, "last_at": at}], "total": count})
    };
    v.apply(
        1,
        t,
        "denials.reported",
        "agent-a",
        &report("spiffe://example.org/web", "<default>", 3, t - 1),
    );
    v.apply(
        2,
        t + 5,
        "denials.reported",
        "agent-a",
        &report("spiffe://example.org/web", "<default>", 2, t + 4),
    );
    v.apply(
        3,
        t + 6,
        "denials.reported",
        "agent-b",
        &report("", "handshake:untrusted", 1, t + 6),
    );
    let d = v.denials(t + 10, 10);
    assert_eq!(d.len(), 2);
    assert_eq!(
        (d[0].rule.as_str(), d[0].count, d[0].last_at),
        ("handshake:untrusted", 1, t + 6)
    );
    assert_eq!(
        (d[1].caller.as_str(), d[1].count, d[1].last_at),
        ("spiffe://example.org/web", 5, t + 4)
    );
    assert_eq!(v.denials(t + 10, 1).len(), 1);
    assert_eq!(v.recent(1)[0].summary, "total=1 counts=1");
    // A day after the last, gone.
    assert!(v.denials(t + 6 + 24 * H + 1, 10).is_empty());
}

#[test]
fn a_full_denial_table_drops_the_tenth_seen_longest_ago() {
    let mut v = View::default();
    let t = 1000 * H;
    let list: Vec<serde_json::Value> = (0..MAX_DENIALS)
        .map(|i| json!({"caller": format!("spiffe://example.org/c{i}"), "callee": "spiffe://example.org/api",
                        "rule": "r", "count": 1, "last_at": t + i as i64}))
        .collect();
    v.apply(1, t, "denials.reported", "agent", &json!({"denials": list}));
    assert_eq!(v.denials(t + 20_000, usize::MAX).len(), MAX_DENIALS);
    v.apply(2, t, "denials.reported", "agent", &json!({"denials": [
        {"caller": "spiffe://example.org/new", "callee": "spiffe://example.org/api", "rule": "r", "count": 1, "last_at": t + 20_000}]}));
    let d = v.denials(t + 20_000, usize::MAX);
    assert!(
        d.len() < MAX_DENIALS && d.len() >= MAX_DENIALS * 9 / 10,
        "{}",
        d.len()
    );
    assert_eq!(d[0].caller, "spiffe://example.org/new");
    assert!(
        d.iter().all(|x| x.caller != "spiffe://example.org/c0"),
        "the oldest went"
    );
}

#[test]
fn pruning_forgets_what_the_window_cannot_show() {
    let mut v = View::default();
    let t = 100 * H;
    issue(&mut v, 1, t, "web", "agent-a", H, "k");
    issue(&mut v, 2, t + 10, "api", "agent-b", 48 * H, "k");
    let now = t + 30 * H;
    v.prune(now);
    // web's holder expired before the window and nothing of it is in the window: gone; api's
    // SVID is still valid.
    assert!(v.compliance(now).is_empty());
    assert_eq!(v.holders.len(), 1);
    assert_eq!(v.services.len(), 1);
    // web's service name is no longer interned; both agents are (each holds a latest SVID).
    assert!(!v.agents.contains_key("spiffe://example.org/web"));
    assert!(v.agents.contains_key("spiffe://example.org/api"));
    assert!(v.agents.contains_key("agent-a") && v.agents.contains_key("agent-b"));
    // The latest SVID of each entry stays for the identities page.
    assert!(v.latest("web").is_some() && v.latest("api").is_some());
}
