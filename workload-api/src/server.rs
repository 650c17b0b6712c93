//! `meshid-agent run`: the manager, the Workload API socket and the ops listener.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use crate::cache::Snapshot;
use crate::manager::{Manager, Stats};

/// Binds the Workload API socket. Its directory is created with mode 0755 and the socket made
/// connectable by every local user (mode 0777): the Workload API authenticates callers by
/// attestation, not by file permissions, exactly as the SPIFFE Workload Endpoint requires. A
/// stale socket is replaced; a live one is an error.
pub fn bind_workload_socket(path: &Path) -> io::Result<UnixListener> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            std::fs::create_dir_all(parent)?;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running agent", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
    Ok(listener)
}

#[derive(Clone)]
struct OpsState {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    stats: Arc<Stats>,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<OpsState>) -> impl IntoResponse {
    if s.snapshots.borrow().synced {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not yet synchronized with the CA\n",
        )
    }
}

async fn metrics(State(s): State<OpsState>) -> impl IntoResponse {
    let snap = s.snapshots.borrow().clone();
    let with_svid = snap.identities.iter().filter(|i| i.svid.is_some()).count();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let expired = snap
        .identities
        .iter()
        .filter(|i| i.svid.as_ref().is_some_and(|v| v.not_after <= now))
        .count();
    let st = &s.stats;
    let body = format!(
        "# HELP meshid_agent_entries Registration entries this agent holds.\n# TYPE meshid_agent_entries gauge\nmeshid_agent_entries {}\n\
# HELP meshid_agent_svids SVIDs held, by state.\n# TYPE meshid_agent_svids gauge\nmeshid_agent_svids{{state=\"current\"}} {}\nmeshid_agent_svids{{state=\"expired\"}} {}\nmeshid_agent_svids{{state=\"pending\"}} {}\n\
# HELP meshid_agent_svids_signed_total SVIDs signed by the CA for this agent.\n# TYPE meshid_agent_svids_signed_total counter\nmeshid_agent_svids_signed_total {}\n\
# HELP meshid_agent_rotations_total SVIDs replaced by rotation.\n# TYPE meshid_agent_rotations_total counter\nmeshid_agent_rotations_total {}\n\
# HELP meshid_agent_sign_errors_total Signing requests the CA refused.\n# TYPE meshid_agent_sign_errors_total counter\nmeshid_agent_sign_errors_total {}\n\
# HELP meshid_agent_ca_connected 1 while the sync stream to the CA is open.\n# TYPE meshid_agent_ca_connected gauge\nmeshid_agent_ca_connected {}\n\
# HELP meshid_agent_ca_reconnects_total Reconnections to the CA.\n# TYPE meshid_agent_ca_reconnects_total counter\nmeshid_agent_ca_reconnects_total {}\n\
# HELP meshid_agent_bundle_sequence Sequence of the trust bundle held.\n# TYPE meshid_agent_bundle_sequence gauge\nmeshid_agent_bundle_sequence {}\n",
        snap.identities.len(),
        with_svid - expired,
        expired,
        snap.identities.len() - with_svid,
        st.signed.load(Ordering::Relaxed),
        st.rotations.load(Ordering::Relaxed),
        st.sign_errors.load(Ordering::Relaxed),
        st.connected.load(Ordering::Relaxed),
        st.reconnects.load(Ordering::Relaxed),
        snap.bundle.sequence,
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        body,
    )
}

/// Serves until `shutdown` completes: the manager's CA session, the Workload API on `socket`,
/// and `/healthz`, `/readyz`, `/metrics` on `ops`.
pub async fn run(
    manager: Manager,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    socket: UnixListener,
    ops: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let stats = Arc::clone(&manager.stats);
    let minter = Arc::new(manager.minter());
    let manager_task = tokio::spawn(manager.run(stop_rx.clone()));

    let api = crate::service::WorkloadApi::new(
        snapshots.clone(),
        Arc::new(crate::attest::Attestor::new()),
        minter,
    );
    let mut api_stop = stop_rx.clone();
    let api_task = tokio::spawn(api.serve(socket, async move {
        let _ = api_stop.changed().await;
    }));

    let mut ops_stop = stop_rx;
    let router = axum::Router::new()
        .route("/healthz", axum::routing::get(healthz))
        .route("/readyz", axum::routing::get(readyz))
        .route("/metrics", axum::routing::get(metrics))
        .with_state(OpsState { snapshots, stats });
    let ops_task = tokio::spawn(async move {
        axum::serve(ops, router)
            .with_graceful_shutdown(async move {
                let _ = ops_stop.changed().await;
            })
            .await
    });

    tracing::info!("meshid-agent serving");
    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = manager_task.await;
    let api_result = api_task.await;
    let ops_result = ops_task.await;
    api_result??;
    ops_result??;
    Ok(())
}
