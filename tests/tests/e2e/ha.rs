//! High availability under load, with the real binaries: three CA servers share one PostgreSQL
//! database and an upstream root; two agents each list all three; two proxies carry requests
//! between them while entries change and 4 s SVIDs rotate. `kill -9` of the server each agent
//! is attached to, one after the other: the agents reattach to a survivor in milliseconds,
//! clients see no failed request and no SVID lapses, and issuance goes on on the last server.
//! Then the database itself: a PostgreSQL restart and a short outage, during which the servers
//! refuse writes (and say so), agents keep serving, and everything acknowledged is kept.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use meshid_tests::{ca_cli, http_get, metric_value, wait_for, Agent, Ca};

use crate::proxy::support::{id, serial, tail, web_to_api_proxies, HttpBackend, Node};
use crate::proxy::{fresh_client, keepalive_client, ClientStats, StopOnDrop, ALLOW_WEB_TO_API};

/// An upstream root for the trust domain, made with openssl: every CA server issues under it.
fn upstream_root(dir: &Path) -> (String, String) {
    let (cert, key) = (dir.join("root.crt.pem"), dir.join("root.key.pem"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/O=meshid HA test root",
        ])
        .args([
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-addext",
            "subjectAltName=URI:spiffe://example.org",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    (cert.display().to_string(), key.display().to_string())
}

/// Three servers `ca-1..3` on `url`, in `dir/ca-N`.
fn servers(dir: &Path, url: &str) -> Vec<Ca> {
    let (cert, key) = upstream_root(dir);
    (1..=3)
        .map(|n| {
            let d = dir.join(format!("ca-{n}"));
            std::fs::create_dir_all(&d).unwrap();
            let cfg = d.join("ca.toml");
            std::fs::write(
                &cfg,
                format!("datastore = \"{url}\"\n[ca]\nupstream_cert = \"{cert}\"\nupstream_key = \"{key}\"\n"),
            )
            .unwrap();
            Ca::start(&d, &["--config", &cfg.display().to_string(), "--server-id", &format!("ca-{n}")])
        })
        .collect()
}

/// An agent whose first CA is `first` and then the others of `all`, in order.
fn node(dir: &Path, name: &str, all: &[Ca], first: usize, token: (String, String)) -> Node {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let others: Vec<String> = (1..all.len())
        .map(|i| format!("\"{}\"", all[(first + i) % all.len()].node_address))
        .collect();
    let cfg = d.join("agent.toml");
    std::fs::write(
        &cfg,
        format!("extra_server_addresses = [{}]\n", others.join(", ")),
    )
    .unwrap();
    let agent = Agent::start_with(
        &d,
        &all[first],
        &token.0,
        &["--config".into(), cfg.display().to_string()],
    );
    Node {
        agent,
        agent_id: token.1,
    }
}

fn agent_metric(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let (code, body) = http_get(&agent.ops_address, "/metrics")?;
    (code == 200).then(|| metric_value(&body, name, labels))
}

/// `kill -9` the server, and the time until `agent` has a new session with a survivor.
fn kill_and_time_reattach(ca: &mut Ca, agent: &Agent) -> Duration {
    let before = agent_metric(agent, "meshid_agent_ca_reconnects_total", &[]).unwrap();
    let t0 = Instant::now();
    ca.proc.signal("KILL");
    loop {
        let reconnects =
            agent_metric(agent, "meshid_agent_ca_reconnects_total", &[]).unwrap_or(before);
        let connected = agent_metric(agent, "meshid_agent_ca_connected", &[]).unwrap_or(0.0);
        if reconnects > before && connected == 1.0 {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the agent did not reattach"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The server (`ca-N`) each agent last reported to, by agent SPIFFE ID, from `ca`'s view.
fn attached(ca: &Ca) -> Vec<(String, String)> {
    let out = ca.ok(&["agent", "list", "--output", "json"]);
    let all: serde_json::Value = serde_json::from_str(&out).unwrap();
    all.as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["spiffe_id"].as_str().unwrap_or("").to_owned(),
                a["delivery_server_id"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

#[test]
fn ca_servers_killed_under_load_then_the_database_restarted() {
    let _serial = serial();
    let Some(pg) = meshid_tests::postgres_cluster() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut cas = servers(dir, &pg.admin_url);
    let (t_web, t_api) = (cas[0].join_token(), cas[0].join_token());
    for (entry, parent) in [("web", &t_web.1), ("api", &t_api.1)] {
        cas[0].entry_for_this_uid(entry, &id(entry), parent, &["--x509-ttl", "4s"]);
    }
    // web's agent starts on ca-1, api's on ca-2: each kill takes one agent's server away.
    let web_node = node(dir, "web-node", &cas, 0, t_web);
    let api_node = node(dir, "api-node", &cas, 1, t_api);
    let backend = HttpBackend::start();
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, ALLOW_WEB_TO_API).unwrap();
    let (mut api, mut web, web_out, _) =
        web_to_api_proxies(dir, &web_node, &api_node, &policy, backend.addr());

    let stop = AtomicBool::new(false);
    let killed = AtomicUsize::new(0);
    let sockets: Vec<std::path::PathBuf> = cas.iter().map(|c| c.socket.clone()).collect();
    let mut reattach = Vec::new();
    let (clients, churn, expired_seen) = std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let mut handles: Vec<_> = (0..2)
            .map(|i| {
                let (addr, stop) = (&web_out, &stop);
                s.spawn(move || keepalive_client(addr, stop, &format!("ka{i}")))
            })
            .collect();
        handles.extend((0..2).map(|i| {
            let (addr, stop) = (&web_out, &stop);
            s.spawn(move || fresh_client(addr, stop, &format!("fresh{i}")))
        }));
        // Entries change all along, on whichever servers are alive (an operator's client that
        // lists every server: one that cannot be reached is skipped, as a load balancer does).
        let churn = {
            let (stop, killed, sockets, parent) = (&stop, &killed, &sockets, &web_node.agent_id);
            s.spawn(move || {
                let mut failures = Vec::new();
                let mut n = 0;
                // A call cut by the kill is retried on another server; if the first attempt
                // had committed, the retry finds it done ("already exists" / "not found").
                let run = |n: usize, args: &[&str]| -> Result<(), String> {
                    let mut last = String::new();
                    let mut cut = false;
                    for k in 0..3 {
                        let live = &sockets[killed.load(Ordering::SeqCst)..];
                        let out = ca_cli(&live[(n + k) % live.len()], args);
                        if out.status.success() {
                            return Ok(());
                        }
                        last = String::from_utf8_lossy(&out.stderr).into_owned();
                        if cut && (last.contains("already exists") || last.contains("not found")) {
                            return Ok(());
                        }
                        cut = last.contains("cannot connect")
                            || last.contains("transport error")
                            || last.contains("h2 protocol error")
                            || last.contains("connection");
                        if !cut {
                            break;
                        }
                    }
                    Err(last)
                };
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let (entry, spiffe_id) = (format!("churn-{n}"), id(&format!("churn/{n}")));
                    if let Err(e) = run(
                        n,
                        &[
                            "entry",
                            "create",
                            "--id",
                            &entry,
                            "--spiffe-id",
                            &spiffe_id,
                            "--parent-id",
                            parent,
                            "--selector",
                            "unix:uid:65001",
                            "--x509-ttl",
                            "4s",
                        ],
                    ) {
                        failures.push(format!("create {entry}: {e}"));
                    }
                    if n > 3 {
                        let old = format!("churn-{}", n - 3);
                        if let Err(e) = run(n, &["entry", "delete", &old]) {
                            failures.push(format!("delete {old}: {e}"));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
                (n, failures)
            })
        };
        // No SVID ever lapses at either agent.
        let watch = {
            let (stop, agents) = (&stop, [&web_node.agent, &api_node.agent]);
            s.spawn(move || {
                let mut worst = 0.0f64;
                while !stop.load(Ordering::SeqCst) {
                    for a in agents {
                        if let Some(v) =
                            agent_metric(a, "meshid_agent_svids", &[("state", "expired")])
                        {
                            worst = worst.max(v);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                worst
            })
        };
        std::thread::sleep(Duration::from_secs(3));
        killed.store(1, Ordering::SeqCst);
        reattach.push(("web", kill_and_time_reattach(&mut cas[0], &web_node.agent)));
        std::thread::sleep(Duration::from_secs(5));
        killed.store(2, Ordering::SeqCst);
        reattach.push(("api", kill_and_time_reattach(&mut cas[1], &api_node.agent)));
        // Several SVID lifetimes on the last server alone.
        std::thread::sleep(Duration::from_secs(10));
        stop.store(true, Ordering::SeqCst);
        let clients: Vec<ClientStats> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        (clients, churn.join().unwrap(), watch.join().unwrap())
    });
    let ok: u64 = clients.iter().map(|c| c.ok).sum();
    let failures: Vec<&String> = clients.iter().flat_map(|c| c.failures.iter()).collect();
    eprintln!(
        "HA: reattach {reattach:?}; {ok} requests ok, {} failed; {} entry changes, {} failed",
        failures.len(),
        churn.0,
        churn.1.len()
    );
    assert!(
        failures.is_empty(),
        "{} failed requests, first: {:?}\nweb:\n{}\napi:\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        tail(&web.proc.log_text(), 15),
        tail(&api.proc.log_text(), 15)
    );
    assert!(
        churn.1.is_empty(),
        "entry changes failed: {:?}",
        &churn.1[..churn.1.len().min(5)]
    );
    assert_eq!(expired_seen, 0.0, "an SVID lapsed");
    for (who, t) in &reattach {
        assert!(
            *t < Duration::from_secs(5),
            "{who}'s agent took {t:?} to reattach"
        );
    }
    for c in clients
        .iter()
        .filter(|c| c.connects > 0 && !c.local_ports.is_empty())
    {
        assert_eq!(c.connects, 1, "a keep-alive client had to reconnect");
    }
    assert!(ok > 200, "only {ok} requests");
    // Both agents are on ca-3, which issued everything since.
    let survivor = &cas[2];
    wait_for(
        Duration::from_secs(10),
        "both agents reporting to ca-3",
        || {
            let a = attached(survivor);
            (a.len() == 2 && a.iter().all(|(_, s)| s == "ca-3")).then_some(())
        },
    );
    survivor.entry_for_this_uid("late", &id("late"), &web_node.agent_id, &[]);
    let fetched = wait_for(Duration::from_secs(10), "an SVID for a new entry", || {
        let out = Command::new(meshid_tests::bin_dir().join("meshid-agent"))
            .args(["api", "fetch", "x509", "--socket"])
            .arg(&web_node.agent.socket)
            .output()
            .unwrap();
        let t = String::from_utf8_lossy(&out.stdout).into_owned();
        t.contains(&id("late")).then_some(t)
    });
    assert!(fetched.contains(&id("late")));
    assert!(survivor.ok(&["audit", "verify"]).contains("audit log OK"));

    // The database restarted (fast shutdown) while the mesh runs: writes are refused while it is
    // down, with a clear error; everything acknowledged before is there after; the server
    // recovers by itself.
    // 4 s SVIDs cannot outlast an outage; 60 s ones can (what a production TTL gives, many
    // times over): both proxies hold one before the database goes.
    for e in ["web", "api"] {
        survivor.ok(&["entry", "update", e, "--x509-ttl", "60s"]);
    }
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    wait_for(
        Duration::from_secs(20),
        "60 s SVIDs at both proxies",
        || {
            [&web, &api]
                .iter()
                .all(|p| p.metric("meshid_proxy_svid_expiry_timestamp_seconds", &[]) > now() + 40.0)
                .then_some(())
        },
    );
    let before = survivor.ok(&["entry", "list"]);
    pg.stop("fast");
    let down = Instant::now();
    let out = ca_cli(
        &survivor.socket,
        &[
            "entry",
            "create",
            "--spiffe-id",
            &id("during"),
            "--parent-id",
            &web_node.agent_id,
            "--selector",
            "unix:uid:65002",
        ],
    );
    assert!(
        !out.status.success(),
        "a write went through without a database"
    );
    let refusal = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        refusal.contains("the datastore cannot be reached, so nothing was changed"),
        "{refusal}"
    );
    assert!(
        down.elapsed() < Duration::from_secs(10),
        "the refusal took {:?}",
        down.elapsed()
    );
    wait_for(Duration::from_secs(10), "readyz to say not ready", || {
        (http_get(&survivor.ops_address, "/readyz")?.0 == 503).then_some(())
    });
    // Agents and proxies keep serving meanwhile: new connections are made.
    let mut client = crate::proxy::support::request_once(&web_out, "GET", "/during-outage");
    assert!(
        matches!(&client, Ok(r) if r.status == 200),
        "{client:?}\nweb:\n{}\napi:\n{}\nweb agent:\n{}\nca-3:\n{}",
        tail(&web.proc.log_text(), 10),
        tail(&api.proc.log_text(), 10),
        tail(&web_node.agent.proc.log_text(), 10),
        tail(&survivor.proc.log_text(), 10)
    );
    std::thread::sleep(Duration::from_secs(8).saturating_sub(down.elapsed()));
    pg.start();
    let back = Instant::now();
    wait_for(Duration::from_secs(30), "the server ready again", || {
        (http_get(&survivor.ops_address, "/readyz")?.0 == 200).then_some(())
    });
    eprintln!(
        "HA: database back; the CA server ready again {:?} later",
        back.elapsed()
    );
    survivor.ok(&[
        "entry",
        "create",
        "--id",
        "after",
        "--spiffe-id",
        &id("after"),
        "--parent-id",
        &web_node.agent_id,
        "--selector",
        "unix:uid:65003",
    ]);
    let after = survivor.ok(&["entry", "list"]);
    for line in before.lines().filter(|l| l.contains("spiffe://")) {
        assert!(
            after.contains(line.split_whitespace().next().unwrap()),
            "lost: {line}"
        );
    }
    assert!(!after.contains(&id("during")), "a refused write appeared");
    assert!(survivor.ok(&["audit", "verify"]).contains("audit log OK"));
    client = crate::proxy::support::request_once(&web_out, "GET", "/after-outage");
    assert!(matches!(&client, Ok(r) if r.status == 200), "{client:?}");
    for p in [&mut api, &mut web] {
        p.proc.check_alive();
    }
}
