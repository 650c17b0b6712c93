use super::*;

fn ip(last: u8) -> IpAddr {
    IpAddr::from([198, 18, 0, last])
}

fn admission(limits: Limits) -> Arc<Admission> {
    Admission::new(limits, Arc::new(Metrics::new()))
}

fn small() -> Limits {
    Limits {
        pending: 4,
        pending_per_source: 2,
        connections: 3,
        connections_per_source: 2,
        ..Limits::default()
    }
}

fn limited(a: &Admission, reason: &'static str) -> u64 {
    a.metrics
        .node_connections_limited
        .get_or_create(&ReasonLabels { reason })
        .get()
}

#[test]
fn a_source_past_its_pending_budget_is_refused_and_others_are_not() {
    let a = admission(small());
    let _p1 = a.begin(ip(1)).unwrap();
    let p2 = a.begin(ip(1)).unwrap();
    assert_eq!(a.begin(ip(1)).unwrap_err(), "source_pending");
    let _q = a.begin(ip(2)).unwrap();
    assert_eq!(limited(&a, "source_pending"), 1);
    // A finished (or failed) handshake frees its slot.
    drop(p2);
    let _p3 = a.begin(ip(1)).unwrap();
    assert_eq!(a.counts(), (3, 0));
}

#[tokio::test]
async fn a_full_table_sheds_the_oldest_pending_handshake() {
    let a = admission(small());
    let mut oldest = a.begin(ip(1)).unwrap();
    let _others: Vec<Pending> = [2, 3, 4].iter().map(|&n| a.begin(ip(n)).unwrap()).collect();
    let _newest = a.begin(ip(5)).unwrap();
    tokio::time::timeout(Duration::from_secs(1), oldest.shed())
        .await
        .expect("the oldest is told it was shed");
    assert_eq!(limited(&a, "shed"), 1);
    assert_eq!(a.counts(), (4, 0));
    // Its source's budget was given back.
    let _again = a.begin(ip(1)).unwrap();
    let _again2 = a.begin(ip(1)).unwrap();
    // A shed handshake that finishes anyway holds no pending slot.
    drop(oldest);
    assert_eq!(a.counts().0, 4);
}

#[test]
fn open_connections_are_capped_globally_and_per_source() {
    let a = admission(small());
    let c1 = a.begin(ip(1)).unwrap().open().unwrap();
    let _c2 = a.begin(ip(1)).unwrap().open().unwrap();
    assert_eq!(a.begin(ip(1)).unwrap_err(), "source_connections");
    let _c3 = a.begin(ip(2)).unwrap().open().unwrap();
    assert_eq!(a.begin(ip(3)).unwrap_err(), "connections");
    // Pending slots taken before the caps filled are refused when they finish.
    drop(c1);
    let late = a.begin(ip(3)).unwrap();
    let _c4 = a.begin(ip(4)).unwrap().open().unwrap();
    assert_eq!(late.open().unwrap_err(), "connections");
    assert_eq!(a.counts(), (0, 3));
    assert_eq!(a.metrics.node_connections.get(), 3);
}
