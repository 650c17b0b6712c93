//! The policy in force: loaded and checked against the listeners before anything binds, and
//! reloaded while running (a valid new version replaces it for new connections and requests;
//! an invalid one is refused and the previous policy stays).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use meshid_policy::{Policy, PolicyError, Protocol};
use tokio::sync::watch;

use crate::config::{Config, InboundProtocol};
use crate::metrics::Metrics;
use crate::proxy::{drained, ActivePolicy};

/// The protocols of the inbound ports, for [`Policy::validate_ports`].
pub fn port_protocols(config: &Config) -> Vec<(u16, Protocol)> {
    config
        .inbound
        .iter()
        .filter_map(|l| match l.protocol {
            InboundProtocol::Tcp => Some((l.port, Protocol::Tcp)),
            InboundProtocol::Http => Some((l.port, Protocol::Http)),
            InboundProtocol::Detect => None,
        })
        .chain(
            config
                .transparent
                .iter()
                .flat_map(|t| t.tcp_ports.iter().map(|p| (*p, Protocol::Tcp))),
        )
        .collect()
}

/// The policy in force when no policy file is configured: every inbound caller refused.
pub fn deny_all() -> Result<Policy, PolicyError> {
    Policy::parse(
        "name: deny-all\ndefault: deny\nrules: []\n",
        "(no policy file)",
    )
}

/// Loads the policy file (or [`deny_all`]) and checks it against the listeners.
pub fn load_policy(path: Option<&Path>, ports: &[(u16, Protocol)]) -> Result<Policy, PolicyError> {
    let policy = match path {
        Some(p) => {
            check_policy_mode(p)?;
            Policy::load(p)?
        }
        None => deny_all()?,
    };
    policy.validate_ports(ports)?;
    Ok(policy)
}

/// A policy file any user may write is refused: whoever writes it decides who is let in.
fn check_policy_mode(path: &Path) -> Result<(), PolicyError> {
    meshid_api::config::check_not_world_writable(path, "policy file").map_err(|e| PolicyError::Io {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, e),
    })
}

/// Watches the policy file: a valid new version replaces the policy for new connections and
/// requests; an invalid one is logged and counted and the previous policy stays. Checks every
/// `interval` (and on SIGHUP), comparing content, so in-place edits, atomic renames and
/// Kubernetes ConfigMap symlink swaps are all seen.
pub async fn watch_policy(
    path: PathBuf,
    ports: Vec<(u16, Protocol)>,
    current: Arc<ArcSwap<ActivePolicy>>,
    metrics: Arc<Metrics>,
    interval: Duration,
    mut drain: watch::Receiver<bool>,
) {
    let mut last = tokio::fs::read(&path).await.ok();
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut missing_logged = false;
    // The contents last refused for the file's mode (logged once, not every interval).
    let mut refused_mode: Option<Vec<u8>> = None;
    loop {
        let hup_fut = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let forced = tokio::select! {
            () = tokio::time::sleep(interval) => false,
            () = hup_fut => true,
            () = drained(&mut drain) => return,
        };
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) => {
                if !missing_logged {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read the policy file; keeping the policy in force");
                    missing_logged = true;
                }
                continue;
            }
        };
        missing_logged = false;
        if !forced && last.as_deref() == Some(&bytes[..]) {
            continue;
        }
        let text = String::from_utf8_lossy(&bytes);
        let origin = path.display().to_string();
        if let Err(e) = check_policy_mode(&path) {
            // Refused for its mode: logged once per contents, looked at again every interval.
            if refused_mode.as_deref() != Some(&bytes[..]) {
                tracing::warn!(path = %origin, error = %e, "policy refused; the previous policy stays in force");
                metrics
                    .policy_reloads
                    .get_or_create(&crate::metrics::ReloadLabels { result: "error" })
                    .inc();
                refused_mode = Some(bytes);
            }
            continue;
        }
        refused_mode = None;
        let result = Policy::parse(&text, &origin).and_then(|p| {
            p.validate_ports(&ports)?;
            Ok(p)
        });
        last = Some(bytes);
        match result {
            Ok(policy) => {
                tracing::info!(path = %origin, policy = policy.name(), "policy reloaded");
                current.store(Arc::new(ActivePolicy::new(policy, &metrics)));
                metrics
                    .policy_reloads
                    .get_or_create(&crate::metrics::ReloadLabels { result: "ok" })
                    .inc();
            }
            Err(e) => {
                tracing::warn!(path = %origin, error = %e, "policy refused; the previous policy stays in force");
                metrics
                    .policy_reloads
                    .get_or_create(&crate::metrics::ReloadLabels { result: "error" })
                    .inc();
            }
        }
    }
}

/// Where the central policy comes from and how this proxy takes it.
#[derive(Debug, Clone)]
pub struct CentralSource {
    /// The agent's Workload API endpoint.
    pub endpoint: String,
    /// The proxy's own SPIFFE ID, when configured: only the rules about it are kept.
    pub own: Option<spiffe::SpiffeId>,
    /// The inbound ports and their protocols, which a revision must fit.
    pub ports: Vec<(u16, Protocol)>,
    /// `policy_cache`.
    pub cache: Option<PathBuf>,
}

impl CentralSource {
    /// From the configuration.
    pub fn new(config: &Config) -> Self {
        Self {
            endpoint: config.workload_api_socket.clone(),
            own: config.spiffe_id.clone(),
            ports: port_protocols(config),
            cache: config.policy_cache.clone(),
        }
    }
}

/// A central policy revision as this proxy enforces it: the rules whose `to` can match its own
/// SPIFFE ID when it is configured (the agent hands over the rules of every SPIFFE ID the
/// proxy's process may hold, which may include those of other workloads of the same user),
/// checked against the listeners.
fn own_rules(
    text: &str,
    origin: &str,
    own: Option<&spiffe::SpiffeId>,
    ports: &[(u16, Protocol)],
) -> Result<Policy, PolicyError> {
    let policy = Policy::parse(text, origin)?;
    let policy = match own {
        Some(id) => policy.restricted_to(std::slice::from_ref(id)),
        None => policy,
    };
    policy.validate_ports(ports)?;
    Ok(policy)
}

/// Puts a central policy revision in force.
fn put_in_force(
    policy: Policy,
    number: u64,
    current: &ArcSwap<ActivePolicy>,
    revision: &std::sync::atomic::AtomicU64,
    metrics: &Arc<Metrics>,
) {
    current.store(Arc::new(ActivePolicy::new(policy, metrics)));
    revision.store(number, std::sync::atomic::Ordering::Release);
    metrics
        .policy_revision
        .set(i64::try_from(number).unwrap_or(i64::MAX));
    metrics
        .policy_reloads
        .get_or_create(&crate::metrics::ReloadLabels { result: "ok" })
        .inc();
}

/// What `policy_cache` holds: the last revision received, as the agent sent it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Cached {
    revision: u64,
    spiffe_ids: Vec<String>,
    policy: String,
}

/// Keeps `update` in the policy cache (written whole, mode 0600); a failure is logged and the
/// policy stays in force.
async fn keep(path: &Path, update: &meshid_api::policy::PolicyUpdate) {
    let cached = Cached {
        revision: update.revision,
        spiffe_ids: update.spiffe_ids.clone(),
        policy: update.policy.clone(),
    };
    let path = path.to_owned();
    let written = tokio::task::spawn_blocking(move || {
        let json = serde_json::to_vec(&cached).map_err(std::io::Error::other)?;
        meshid_api::files::write_private(&path, &json)
    })
    .await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(revision = update.revision, error = %e, "cannot keep the central policy in policy_cache (it stays in force)");
        }
        Err(e) => tracing::warn!(error = %e, "cannot keep the central policy in policy_cache"),
    }
}

/// At start: puts the revision kept in `cache` in force, if there is one that is this proxy's
/// (it names `spiffe_id`, when one is configured), parses, and fits the listeners. The agent's
/// stream replaces it as soon as it answers. Anything else is logged and every caller stays
/// refused until the agent answers.
pub fn read_back(
    source: &CentralSource,
    current: &ArcSwap<ActivePolicy>,
    revision: &std::sync::atomic::AtomicU64,
    metrics: &Arc<Metrics>,
) {
    let Some(cache) = &source.cache else { return };
    let (spiffe_id, ports) = (source.own.as_ref(), &source.ports);
    let origin = cache.display().to_string();
    let bytes = match std::fs::read(cache) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::warn!(path = %origin, error = %e, "cannot read policy_cache; waiting for the agent");
            return;
        }
    };
    let kept = check_policy_mode(cache)
        .map_err(|e| e.to_string())
        .and_then(|()| serde_json::from_slice::<Cached>(&bytes).map_err(|e| e.to_string()))
        .and_then(|c| {
            if let Some(id) = spiffe_id {
                if !c.spiffe_ids.iter().any(|s| *s == id.to_string()) {
                    return Err(format!("kept for {:?}, not for {id}", c.spiffe_ids));
                }
            }
            let policy = own_rules(
                &c.policy,
                &format!("{origin} (revision {})", c.revision),
                spiffe_id,
                ports,
            )
            .map_err(|e| e.to_string())?;
            Ok((c.revision, policy))
        });
    match kept {
        Ok((0, _)) => {}
        Ok((number, policy)) => {
            tracing::info!(revision = number, path = %origin, "central policy in force, read back from policy_cache until the agent answers");
            put_in_force(policy, number, current, revision, metrics);
        }
        Err(e) => {
            tracing::warn!(path = %origin, error = %e, "policy_cache refused; every inbound caller is refused until the agent answers");
        }
    }
}

/// Follows the central policy from the node agent (`policy_source = "agent"`): the rules of the
/// CA's policy that concern this proxy's SPIFFE IDs, on the agent's `PolicyDelivery.Watch`
/// stream. A revision that does not parse or does not fit the listeners is refused (the one in
/// force stays); while the agent is away the last revision stays in force, and the stream is
/// opened again. `revision` holds the revision in force (0 until the first: every inbound
/// caller refused, and the proxy not ready).
pub async fn follow_policy(
    source: CentralSource,
    current: Arc<ArcSwap<ActivePolicy>>,
    revision: Arc<std::sync::atomic::AtomicU64>,
    metrics: Arc<Metrics>,
    drain: watch::Receiver<bool>,
) {
    use meshid_api::policy::policy_delivery_client::PolicyDeliveryClient;
    let CentralSource {
        endpoint,
        own,
        ports,
        cache,
    } = source;
    let (endpoint, own, ports, cache, current, revision, metrics) = (
        &endpoint, &own, &ports, &cache, &current, &revision, &metrics,
    );
    crate::tls::keep_following(
        "policy stream from the agent (the policy in force stays)",
        endpoint,
        drain,
        || async move {
            let channel = crate::tls::workload_channel(endpoint).await?;
            let mut stream = PolicyDeliveryClient::new(channel)
                .watch(crate::tls::agent_request(
                    meshid_api::policy::WatchPolicyRequest {},
                ))
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            while let Some(update) = stream
                .message()
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            {
                let origin = format!("central policy revision {}", update.revision);
                let result = own_rules(&update.policy, &origin, own.as_ref(), ports);
                match result {
                    Ok(policy) if update.revision == 0 => {
                        tracing::warn!(policy = policy.name(), "the agent has no central policy yet (none applied at the CA): every inbound caller is refused");
                    }
                    Ok(policy) => {
                        tracing::info!(revision = update.revision, rules = policy.rule_count(), spiffe_ids = ?update.spiffe_ids, "central policy in force");
                        put_in_force(policy, update.revision, current, revision, metrics);
                        if let Some(path) = cache {
                            keep(path, &update).await;
                        }
                    }
                    Err(e) => {
                        tracing::error!(revision = update.revision, error = %e, "central policy refused; the policy in force stays");
                        metrics
                            .policy_reloads
                            .get_or_create(&crate::metrics::ReloadLabels { result: "error" })
                            .inc();
                    }
                }
            }
            anyhow::Ok(())
        },
    )
    .await;
}
