//! The refusals this proxy counts for the CA's console, reported to its agent
//! (`PolicyDelivery.ReportDenials`), which forwards them to the CA: per (caller, callee, rule)
//! for policy denials on inbound listeners, and per reason for inbound handshakes refused
//! (`handshake:<reason>`, the caller unknown). Counts only, never a request or a certificate;
//! at most [`meshid_api::denials::MAX_KEYS`] distinct ones between two reports.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshid_api::denials::{Counts, Key, Tally};
use spiffe::SpiffeId;
use tokio::sync::watch;

/// How often the counts are sent, when there are any.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// The counts since the last report.
#[derive(Debug, Default)]
pub struct Denials {
    tally: Mutex<Tally>,
}

impl Denials {
    fn add(&self, caller: String, callee: Option<&SpiffeId>, rule: String) {
        let key = Key {
            caller,
            callee: callee.map(ToString::to_string).unwrap_or_default(),
            rule,
        };
        let mut tally = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        tally.add(key, 1, meshid_api::unix_now());
    }

    /// A request or connection of `caller` to `callee` denied by `rule` (`<default>`).
    pub fn policy(&self, caller: &SpiffeId, callee: Option<&SpiffeId>, rule: &str) {
        self.add(caller.to_string(), callee, rule.to_owned());
    }

    /// An inbound handshake to `callee` refused for `reason`.
    pub fn handshake(&self, callee: Option<&SpiffeId>, reason: &str) {
        self.add(String::new(), callee, format!("handshake:{reason}"));
    }

    fn take(&self) -> Option<(Counts, u64)> {
        let mut tally = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        (!tally.is_empty()).then(|| tally.take())
    }

    fn put_back(&self, counts: Counts) {
        let mut tally = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        tally.put_back(counts);
    }
}

/// Sends the counts to the agent at `endpoint` every [`REPORT_INTERVAL`] until `drain`; what a
/// failed report carried is sent with the next. An agent without the call is not asked again.
pub async fn report_loop(
    endpoint: String,
    denials: Arc<Denials>,
    mut drain: watch::Receiver<bool>,
) {
    use meshid_api::policy::policy_delivery_client::PolicyDeliveryClient;
    let mut tick = tokio::time::interval(REPORT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client: Option<PolicyDeliveryClient<tonic::transport::Channel>> = None;
    let failures = meshid_api::uds::admission::RateLimitedLog::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = drain.wait_for(|d| *d) => return,
        }
        let Some((counts, dropped)) = denials.take() else {
            continue;
        };
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "refusals past the report's bound were not reported"
            );
        }
        if counts.is_empty() {
            continue;
        }
        if client.is_none() {
            match crate::tls::workload_channel(&endpoint).await {
                Ok(channel) => client = Some(PolicyDeliveryClient::new(channel)),
                Err(e) => {
                    failures.info(|held| tracing::warn!(error = %e, held_back = held, "cannot reach the agent to report refusals; will retry"));
                    denials.put_back(counts);
                    continue;
                }
            }
        }
        let Some(c) = client.as_mut() else { continue };
        let report = meshid_api::policy::DenialReport {
            denials: counts
                .iter()
                .map(|(k, n, at)| meshid_api::policy::DenialCount {
                    caller: k.caller.clone(),
                    callee: k.callee.clone(),
                    rule: k.rule.clone(),
                    count: *n,
                    last_at: *at,
                })
                .collect(),
        };
        match c.report_denials(crate::tls::agent_request(report)).await {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                tracing::info!("the agent does not take denial reports; not reporting");
                return;
            }
            Err(s) => {
                failures.info(|held| tracing::warn!(code = ?s.code(), error = %s.message(), held_back = held, "the agent refused a denial report; will retry"));
                client = None;
                denials.put_back(counts);
            }
        }
    }
}
