#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;

const FULL: &str = "\
owner: payments
entries:
  - spiffe_id: spiffe://example.org/payments/web
    parent_id: spiffe://example.org/meshid/agent/join_token/3f2a
    selectors: [unix:uid:1000, unix:path:/usr/bin/web]
    x509_svid_ttl: 300
    jwt_svid_ttl: 5m
    dns_names: [web.payments.internal]
    federates_with: [partner.org]
    hint: web
    admin: false
  - spiffe_id: spiffe://example.org/payments/db
    parent_id: spiffe://example.org/meshid/agent/join_token/3f2a
    selectors:
      - unix:uid:1001
policies:
  - name: payments
    file: policies/payments.yaml
  - name: payments-batch
    inline: |
      default: deny
      rules:
        - name: batch-to-db
          from: [\"spiffe://example.org/payments/batch\"]
          to: [\"spiffe://example.org/payments/db\"]
";

fn err(text: &str) -> String {
    parse(text, "mesh.yaml").unwrap_err().to_string()
}

#[test]
fn a_full_file_reads_as_written() {
    let m = parse(FULL, "mesh.yaml").unwrap();
    assert_eq!(m.owner, "payments");
    assert_eq!(m.entries.len(), 2);
    let web = &m.entries[0];
    assert_eq!(web.at, "mesh.yaml:3:5");
    assert_eq!(
        web.spec,
        EntrySpec {
            id: None,
            spiffe_id: "spiffe://example.org/payments/web".into(),
            parent_id: "spiffe://example.org/meshid/agent/join_token/3f2a".into(),
            selectors: vec!["unix:uid:1000".into(), "unix:path:/usr/bin/web".into()],
            x509_svid_ttl: 300,
            jwt_svid_ttl: 300,
            dns_names: vec!["web.payments.internal".into()],
            federates_with: vec!["partner.org".into()],
            admin: false,
            hint: "web".into(),
        }
    );
    assert_eq!(m.entries[1].spec.selectors, ["unix:uid:1001"]);
    assert_eq!(m.entries[1].spec.x509_svid_ttl, 0);
    assert_eq!(
        m.policies[0].source,
        PolicySource::File("policies/payments.yaml".into())
    );
    let PolicySource::Inline {
        text,
        line_offset,
        column_offset,
    } = &m.policies[1].source
    else {
        panic!("{:?}", m.policies[1]);
    };
    assert!(text.starts_with("default: deny\nrules:\n"), "{text}");
    assert_eq!((*line_offset, *column_offset), (20, 6));
}

#[test]
fn inline_policy_errors_map_to_the_mesh_file() {
    // The bad pattern is on line 25 of the mesh file, column 17 (inside the list).
    let bad = FULL.replace(
        "to: [\"spiffe://example.org/payments/db\"]",
        "to: [\"example.org/payments/db\"]",
    );
    let m = parse(&bad, "mesh.yaml").unwrap();
    let PolicySource::Inline {
        text,
        line_offset,
        column_offset,
    } = &m.policies[1].source
    else {
        panic!()
    };
    let e = meshid_policy::Policy::parse(text, "x").unwrap_err();
    let (line, column) = e.location().unwrap();
    let (line, column) = (line + line_offset, column + column_offset);
    let source_line = bad.lines().nth(line - 1).unwrap();
    assert_eq!(line, 25, "{e}");
    assert_eq!(
        &source_line[column - 1..],
        "\"example.org/payments/db\"]",
        "{e}"
    );
}

#[test]
fn malformed_files_are_refused_at_the_place() {
    let entry = |extra: &str| {
        format!(
            "owner: a\nentries:\n  - spiffe_id: spiffe://example.org/w\n    parent_id: spiffe://example.org/p\n    selectors: [unix:uid:1]\n{extra}"
        )
    };
    let cases: &[(&str, String, &str)] = &[
        ("empty", String::new(), "mesh.yaml:1:1: the file is empty"),
        ("comment only", "# nothing\n".into(), "mesh.yaml:1:1: the file is empty"),
        ("no owner", "entries: []\n".into(), "mesh.yaml:1:1: missing `owner`"),
        ("bad owner", "owner: Payments\n".into(), "mesh.yaml:1:8: invalid owner label"),
        ("list as root", "- a\n".into(), "mesh.yaml:1:1: expected a mesh file"),
        ("unknown top key", "owner: a\nentrie: []\n".into(), "mesh.yaml:2:1: unknown key `entrie` in a mesh file"),
        ("federation later", "owner: a\nfederation: []\n".into(), "mesh.yaml:2:1: unknown key `federation`"),
        ("unknown entry key", entry("    ttl: 5\n"), "mesh.yaml:6:5: unknown key `ttl` in an entry"),
        ("bad selector", entry("").replace("[unix:uid:1]", "[unix:uid:1, unix:pid:2]"), "mesh.yaml:5:29: invalid selector \"unix:pid:2\""),
        ("no selectors", entry("").replace("[unix:uid:1]", "[]"), "mesh.yaml:5:16: an entry needs at least one selector"),
        ("selectors not a list", entry("").replace("[unix:uid:1]", "unix:uid:1"), "mesh.yaml:5:16: expected `selectors` as a list"),
        ("bad spiffe id", entry("").replace("spiffe://example.org/w", "spiffe://Example.org/w"), "mesh.yaml:3:16: invalid spiffe_id"),
        ("no path", entry("").replace("spiffe://example.org/w", "spiffe://example.org"), "mesh.yaml:3:16: spiffe_id \"spiffe://example.org\" has no path"),
        ("reserved path", entry("").replace("spiffe://example.org/w", "spiffe://example.org/meshid/agent/x"), "mesh.yaml:3:16: spiffe_id \"spiffe://example.org/meshid/agent/x\" is under /meshid/"),
        ("missing parent", entry("").replace("    parent_id: spiffe://example.org/p\n", ""), "mesh.yaml:3:5: missing `parent_id`"),
        ("ttl too long", entry("    x509_svid_ttl: 8d\n"), "mesh.yaml:6:20: x509_svid_ttl \"8d\" is out of range"),
        ("ttl not a duration", entry("    jwt_svid_ttl: soon\n"), "mesh.yaml:6:19: invalid jwt_svid_ttl"),
        ("ttl not whole seconds", entry("    jwt_svid_ttl: 500ms\n"), "mesh.yaml:6:19: jwt_svid_ttl \"500ms\" is not whole seconds"),
        ("admin not a bool", entry("    admin: yes\n"), "mesh.yaml:6:12: expected `admin: true` or `admin: false`"),
        ("bad dns name", entry("    dns_names: [\"-x.org\"]\n"), "mesh.yaml:6:17: invalid dns name"),
        ("bad federation", entry("    federates_with: [Partner.org]\n"), "mesh.yaml:6:22: invalid trust domain"),
        ("duplicate key", entry("    hint: a\n    hint: b\n"), "mesh.yaml:7:5: duplicate key `hint` (first on line 6)"),
        ("anchor", entry("    hint: &h a\n"), "mesh.yaml:6:11: anchors"),
        ("alias", "owner: &o a\n".into(), "mesh.yaml:1:8: anchors"),
        ("tag", entry("    hint: !secret a\n"), "mesh.yaml:6:11: YAML tags"),
        ("two documents", "owner: a\n---\nowner: b\n".into(), "mesh.yaml:2:1: only one YAML document"),
        ("bad YAML", "owner: [a\n".into(), "mesh.yaml:"),
        ("tab indentation", "owner: a\nentries:\n\t- x\n".into(), "mesh.yaml:3:"),
        (
            "duplicate entry",
            entry("  - spiffe_id: spiffe://example.org/w\n    parent_id: spiffe://example.org/p\n    selectors: [unix:uid:1, unix:uid:1]\n"),
            "mesh.yaml:6:5: entry spiffe://example.org/w (parent spiffe://example.org/p) with these selectors is already declared at mesh.yaml:3:5",
        ),
        ("policy without name", "owner: a\npolicies:\n  - file: p.yaml\n".into(), "mesh.yaml:3:5: missing `name`"),
        ("policy bad name", "owner: a\npolicies:\n  - {name: P, file: p.yaml}\n".into(), "mesh.yaml:3:12: invalid policy document name"),
        ("policy without text", "owner: a\npolicies:\n  - name: p\n".into(), "mesh.yaml:3:5: missing `file` or `inline`"),
        ("policy file and inline", "owner: a\npolicies:\n  - name: p\n    file: p.yaml\n    inline: |\n      rules: []\n".into(), "mesh.yaml:5:5: give either `file` or `inline`"),
        ("inline not a block", "owner: a\npolicies:\n  - name: p\n    inline: \"rules: []\"\n".into(), "mesh.yaml:4:5: write the policy document as a literal block"),
        ("inline folded", "owner: a\npolicies:\n  - name: p\n    inline: >\n      rules: []\n".into(), "mesh.yaml:4:5: write the policy document as a literal block"),
        ("duplicate policy", "owner: a\npolicies:\n  - {name: p, file: a.yaml}\n  - {name: p, file: b.yaml}\n".into(), "mesh.yaml:4:5: policy document `p` is already declared at mesh.yaml:3:5"),
        ("deep nesting", format!("owner: a\nentries: {}{}\n", "[".repeat(20), "]".repeat(20)), "mesh.yaml:2:"),
    ];
    for (name, text, want) in cases {
        let got = err(text);
        assert!(got.starts_with(want), "{name}: {got}\nwanted: {want}");
    }
}

#[test]
fn secrets_are_refused_not_ignored() {
    let pem = "-----BEGIN PRIVATE KEY-----\\nMIGHAgEAMBMGByqGSM49\\n-----END PRIVATE KEY-----";
    let jwt =
        "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzcGlmZmU6Ly9leGFtcGxlLm9yZyJ9.c2lnbmF0dXJlc2lnbmF0dXJl";
    let join = "Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4Zm9vYmFyYm1";
    assert_eq!(join.len(), 43);
    let cases = [
        (
            "owner: a\ntoken: abc\n",
            "mesh.yaml:2:1: `token` looks like a secret",
        ),
        (
            "owner: a\njoin_token: abc\n",
            "mesh.yaml:2:1: `join_token` looks like a secret",
        ),
        (
            "owner: a\nentries:\n  - private_key: x\n",
            "mesh.yaml:3:5: `private_key` looks like a secret",
        ),
        (
            "owner: a\nentries:\n  - {password: x}\n",
            "mesh.yaml:3:6: `password` looks like a secret",
        ),
        (
            "owner: a\nkey: x\n",
            "mesh.yaml:2:1: `key` looks like a secret",
        ),
    ];
    for (text, want) in cases {
        let got = err(text);
        assert!(got.starts_with(want), "{got}");
    }
    for (value, what) in [
        (pem, "a PEM private key"),
        (jwt, "a JWT"),
        (join, "a join token"),
    ] {
        let text = format!(
            "owner: a\nentries:\n  - spiffe_id: spiffe://example.org/w\n    parent_id: spiffe://example.org/p\n    selectors: [unix:uid:1]\n    hint: \"{value}\"\n"
        );
        let got = err(&text);
        assert!(
            got.starts_with(&format!("mesh.yaml:6:11: this looks like {what}")),
            "{got}"
        );
        // Inline policy documents are part of the file.
        let text = format!(
            "owner: a\npolicies:\n  - name: p\n    inline: |\n      # {value}\n      rules: []\n"
        );
        assert!(err(&text).contains(&format!("this looks like {what}")));
        // And comments.
        let text = format!("owner: a\n# {value}\n");
        assert!(
            err(&text).starts_with(&format!("mesh.yaml:2:1: this looks like {what}")),
            "{}",
            err(&text)
        );
    }
    // Nothing in an ordinary file looks like one.
    for ordinary in [
        "spiffe://example.org/meshid/agent/join_token/3f2a9c1b",
        "unix:sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "4f1c2d8e9a7b6c5d4e3f2a1b0c9d8e7f",
        "web-frontend-canary-eu-west-1-production-01",
        "eyJ.not.a.jwt",
    ] {
        assert_eq!(looks_secret(ordinary), None, "{ordinary}");
    }
    assert!(parse(FULL, "mesh.yaml").is_ok());
}

#[test]
fn a_directory_is_its_yaml_files_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("policies")).unwrap();
    std::fs::write(
        d.join("policies/payments.yaml"),
        "default: deny\nrules: []\n",
    )
    .unwrap();
    // A policy file of a subdirectory is not a mesh file; neither are other extensions.
    std::fs::write(d.join("README.md"), "not yaml").unwrap();
    std::fs::write(
        d.join("b.yml"),
        "owner: payments\nentries:\n  - {spiffe_id: \"spiffe://example.org/b\", parent_id: \"spiffe://example.org/p\", selectors: [\"unix:uid:2\"]}\n",
    )
    .unwrap();
    std::fs::write(
        d.join("a.yaml"),
        "owner: payments\nentries:\n  - {spiffe_id: \"spiffe://example.org/a\", parent_id: \"spiffe://example.org/p\", selectors: [\"unix:uid:1\"]}\npolicies:\n  - {name: payments, file: policies/payments.yaml}\n",
    )
    .unwrap();
    let m = load(d).unwrap();
    assert_eq!(m.owner, "payments");
    assert_eq!(m.files, [d.join("a.yaml"), d.join("b.yml")]);
    let ids: Vec<&str> = m
        .entries
        .iter()
        .map(|e| e.spec.spiffe_id.as_str())
        .collect();
    assert_eq!(ids, ["spiffe://example.org/a", "spiffe://example.org/b"]);
    assert_eq!(m.policies[0].text, "default: deny\nrules: []\n");
    assert_eq!(
        m.policies[0].origin,
        d.join("policies/payments.yaml").display().to_string()
    );
    assert_eq!(
        (m.policies[0].line_offset, m.policies[0].column_offset),
        (0, 0)
    );

    // The same entry in two files: refused, naming both.
    std::fs::write(
        d.join("c.yaml"),
        "owner: payments\nentries:\n  - {spiffe_id: \"spiffe://example.org/a\", parent_id: \"spiffe://example.org/p\", selectors: [\"unix:uid:1\"]}\n",
    )
    .unwrap();
    let e = load(d).unwrap_err().to_string();
    let (a, c) = (
        d.join("a.yaml").display().to_string(),
        d.join("c.yaml").display().to_string(),
    );
    assert!(
        e.starts_with(&format!("{c}:3:5: entry spiffe://example.org/a"))
            && e.contains(&format!("already declared at {a}:3:5")),
        "{e}"
    );
    // Another owner in one file of the directory.
    std::fs::write(d.join("c.yaml"), "owner: batch\n").unwrap();
    let e = load(d).unwrap_err().to_string();
    assert!(e.contains("owner `batch` differs from `payments`"), "{e}");
    std::fs::remove_file(d.join("c.yaml")).unwrap();

    // A policy file that holds a secret, a missing one, an empty directory.
    std::fs::write(
        d.join("policies/payments.yaml"),
        "rules: []\n# -----BEGIN EC PRIVATE KEY-----\n",
    )
    .unwrap();
    let e = load(d).unwrap_err().to_string();
    assert!(
        e.contains("policies/payments.yaml:2:1: this looks like a PEM private key"),
        "{e}"
    );
    std::fs::remove_file(d.join("policies/payments.yaml")).unwrap();
    let e = load(d).unwrap_err().to_string();
    assert!(e.contains("payments.yaml: cannot read"), "{e}");
    let empty = tempfile::tempdir().unwrap();
    let e = load(empty.path()).unwrap_err().to_string();
    assert!(e.contains("no *.yaml or *.yml file"), "{e}");
}

#[test]
fn positions_count_lines_as_yaml_does() {
    // A lone carriage return ends a line in YAML: positions, and the secret check's, agree.
    let e = err("owner: a\r\rentrie: []\n");
    assert!(e.starts_with("mesh.yaml:3:1: unknown key `entrie`"), "{e}");
    let e = err("owner: a\r\r# Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4Zm9vYmFyYm1\n");
    assert!(
        e.starts_with("mesh.yaml:3:1: this looks like a join token"),
        "{e}"
    );
}

#[test]
fn an_error_at_the_end_is_inside_the_file() {
    // The parser points past the end of a file without a final line break (found by fuzzing).
    for (text, want) in [
        ("%%", "mesh.yaml:1:3: invalid YAML"),
        ("owner: [a", "mesh.yaml:1:"),
    ] {
        let e = err(text);
        assert!(e.starts_with(want), "{text:?}: {e}");
    }
}

#[test]
fn an_empty_document_is_refused_inside_the_file() {
    let e = err("---");
    assert!(e.starts_with("mesh.yaml:1:4: expected a mesh file"), "{e}");
}

const FEDERATIONS: &str = "\
owner: payments
federations:
  - trust_domain: partner.org
    endpoint_url: https://ca.partner.org:8443
    profile: https_spiffe
    endpoint_spiffe_id: spiffe://partner.org/meshid/server
    bundle_file: bundles/partner.json
  - trust_domain: web.org
    endpoint_url: https://web.org
    profile: https_web
";

#[test]
fn federations_read_as_written_and_their_bundles_from_beside_the_file() {
    let m = parse(FEDERATIONS, "mesh.yaml").unwrap();
    assert_eq!(m.federations.len(), 2);
    let p = &m.federations[0];
    assert_eq!(
        (p.at.as_str(), p.trust_domain.as_str(), p.profile.as_str()),
        ("mesh.yaml:3:5", "partner.org", "https_spiffe")
    );
    assert_eq!(
        p.bundle,
        FederationBundle::File("bundles/partner.json".into())
    );
    assert_eq!(m.federations[1].bundle, FederationBundle::None);
    assert_eq!(m.federations[1].endpoint_spiffe_id, "");

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("bundles")).unwrap();
    std::fs::write(dir.path().join("bundles/partner.json"), "{\"keys\": []}").unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), FEDERATIONS).unwrap();
    let loaded = load(&dir.path().join("mesh.yaml")).unwrap();
    assert_eq!(
        loaded.federations[0].bundle,
        FederationBundle::Text("{\"keys\": []}".into())
    );
    std::fs::remove_file(dir.path().join("bundles/partner.json")).unwrap();
    let e = load(&dir.path().join("mesh.yaml")).unwrap_err().to_string();
    assert!(
        e.contains("bundles/partner.json") && e.contains("cannot read"),
        "{e}"
    );
}

#[test]
fn malformed_federations_are_refused_at_their_position() {
    for (text, want) in [
        (
            "owner: a\nfederations:\n  - endpoint_url: https://x\n    profile: https_web\n",
            "mesh.yaml:3:5: missing `trust_domain`",
        ),
        (
            "owner: a\nfederations:\n  - trust_domain: Bad_TD\n    endpoint_url: https://x\n    profile: https_web\n",
            "mesh.yaml:3:19: invalid trust domain",
        ),
        (
            "owner: a\nfederations:\n  - trust_domain: p.org\n    endpoint_url: https://x\n    profile: web\n",
            "mesh.yaml:5:14: profile \"web\": use https_web or https_spiffe",
        ),
        (
            "owner: a\nfederations:\n  - trust_domain: p.org\n    endpoint_url: https://x\n    profile: https_web\n    bundle: x\n",
            "mesh.yaml:6:5: unknown key `bundle`",
        ),
        (
            "owner: a\nfederations:\n  - {trust_domain: p.org, endpoint_url: https://x, profile: https_web}\n  - {trust_domain: p.org, endpoint_url: https://y, profile: https_web}\n",
            "already declared at mesh.yaml:3:5",
        ),
        ("owner: a\nfederations: partner.org\n", "mesh.yaml:2:14: expected `federations` as a list"),
    ] {
        let e = err(text);
        assert!(e.contains(want), "{text:?}: {e}");
    }
}
