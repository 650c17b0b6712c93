//! `meshid-bench console`: the console's identities API with 10,000 entries (issue 17's
//! target: p99 under 100 ms). The entries belong to the bench's agent, which signs every one,
//! so each row carries its SVID from the console's audit-fed view. Timed, with one client and
//! then with 8 at once, each request on a new connection (as a browser's first request is):
//! random pages of 50, a search that matches a handful, a search that matches every entry
//! (the whole list filtered, its last page), and, as the floor in the same run, the CA's
//! `/healthz` on its ops listener (the same HTTP stack answering nothing).

use std::time::{Duration, Instant};

use super::{connect_unix, create_entries, entry_specs, fmt_d, wait_signed, Lat, Stack};

/// Entries registered.
const ENTRIES: usize = 10_000;
/// Requests per case and client count.
const REQUESTS: usize = 1_000;

/// A row of the table: its name, the listener it calls (`ops` or `console`), its paths.
type Case = (
    &'static str,
    &'static str,
    Box<dyn Fn(usize) -> String + Sync>,
);

/// One request; the status must be 200.
fn get(addr: &str, path: &str) -> u64 {
    let t = Instant::now();
    let (code, body) =
        meshid_tests::http_get(addr, path).unwrap_or_else(|| panic!("GET {path} failed"));
    assert_eq!(code, 200, "GET {path}: {body}");
    u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// `REQUESTS` requests from `clients` threads, each path from `path(i)`.
fn timed(clients: usize, addr: &str, path: &(dyn Fn(usize) -> String + Sync)) -> Lat {
    let mut lat = Lat::default();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                s.spawn(move || {
                    (0..REQUESTS / clients)
                        .map(|i| get(addr, &path(c * 7919 + i)))
                        .collect::<Vec<u64>>()
                })
            })
            .collect();
        for h in handles {
            lat.add(h.join().unwrap());
        }
    });
    lat
}

pub(super) async fn run(st: &mut Stack, console: &str) {
    let admin = connect_unix(&st.ca.socket).await;
    eprintln!("console: registering {ENTRIES} entries");
    let specs = entry_specs(&st.agent_id, st.uid + 1, "c", 0..ENTRIES);
    create_entries(&admin, specs, 16).await;
    wait_signed(st.agent(), ENTRIES + 1, Duration::from_secs(600)).await;
    // The console's view follows the audit log every 250 ms: wait until it has every SVID.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, body) =
            meshid_tests::http_get(console, "/api/identities?q=bench/c/9999&per_page=1").unwrap();
        if body.contains("\"serial\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the console never showed the last SVID: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, body) = meshid_tests::http_get(console, "/api/identities?per_page=1").unwrap();
    assert!(
        body.contains(&format!("\"total\":{}", ENTRIES + 1)),
        "{body}"
    );
    let ops = st.ca.ops_address.clone();
    let pages = ENTRIES / 50;
    let cases: [Case; 4] = [
        (
            "floor: CA /healthz",
            "ops",
            Box::new(|_| "/healthz".to_owned()),
        ),
        (
            "identities, a random page of 50",
            "console",
            Box::new(move |i| format!("/api/identities?page={}&per_page=50", 1 + (i * 37) % pages)),
        ),
        (
            "identities, search matching ~11",
            "console",
            Box::new(|i| format!("/api/identities?q=bench/c/{}&per_page=50", 100 + i % 800)),
        ),
        (
            "identities, search matching all, last page",
            "console",
            Box::new(move |_| format!("/api/identities?q=bench/c/&page={pages}&per_page=50")),
        ),
    ];
    println!(
        "\n### console: the identities API with {} entries\n",
        ENTRIES + 1
    );
    println!("Each request on a new connection; {REQUESTS} requests per row; p99 target 100 ms.\n");
    println!("| case | clients | p50 | p99 | max | p99 ÷ floor p99 |");
    println!("|---|---|---|---|---|---|");
    let mut worst = Duration::ZERO;
    for clients in [1, 8] {
        let mut floor = Duration::ZERO;
        for (name, target, path) in &cases {
            let addr = if *target == "ops" {
                ops.as_str()
            } else {
                console
            };
            let lat = tokio::task::block_in_place(|| timed(clients, addr, path.as_ref()));
            let p99 = lat.p(0.99);
            if *target == "ops" {
                floor = p99;
            } else {
                worst = worst.max(p99);
            }
            println!(
                "| {name} | {clients} | {} | {} | {} | {:.1} |",
                fmt_d(lat.p(0.5)),
                fmt_d(p99),
                fmt_d(lat.p(1.0)),
                p99.as_secs_f64() / floor.as_secs_f64().max(1e-9)
            );
        }
    }
    println!(
        "\nWorst console p99: {} — target under 100 ms: **{}**",
        fmt_d(worst),
        if worst < Duration::from_millis(100) {
            "met"
        } else {
            "missed"
        }
    );
}
