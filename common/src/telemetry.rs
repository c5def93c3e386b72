//! Structured logs (filtered by `RUST_LOG`) and the Prometheus metrics endpoint.

use std::net::SocketAddr;

/// Installs the global tracing subscriber; `RUST_LOG` overrides `default_filter`.
pub fn init_logging(default_filter: &str) {
    let asked = std::env::var("RUST_LOG")
        .ok()
        .filter(|f| !f.trim().is_empty());
    let filter = asked
        .as_deref()
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(with_quiet_libraries(f)).ok())
        .unwrap_or_else(|| {
            tracing_subscriber::EnvFilter::new(with_quiet_libraries(default_filter))
        });
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours for a person at a terminal, plain text for journald and log files.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// The master's counters without labels (see [`serve_metrics`]).
pub const MASTER_COUNTERS: &[&str] = &[
    "granary_master_applied_commands_total",
    "granary_master_listings_ahead_total",
    "granary_master_read_index_rounds_total",
    "granary_master_stale_reads_total",
    "granary_master_ufs_listings_total",
];

/// The worker's counters without labels.
pub const WORKER_COUNTERS: &[&str] = &[
    "granary_worker_cache_hits_total",
    "granary_worker_cache_misses_total",
    "granary_worker_checksum_failures_total",
    "granary_worker_early_reads_total",
    "granary_worker_evictions_total",
    "granary_worker_served_bytes_total",
    "granary_worker_ufs_bytes_total",
    "granary_worker_ufs_direct_bytes_total",
    "granary_worker_ufs_direct_reads_total",
    "granary_worker_ufs_fetches_total",
    "granary_worker_uploaded_bytes_total",
];

/// The mount's counters without labels.
pub const CLIENT_COUNTERS: &[&str] = &[
    "granary_client_metadata_failures_total",
    "granary_client_lookups_total",
    "granary_client_opens_total",
    "granary_client_passthrough_opens_total",
    "granary_client_remote_bytes_total",
    "granary_client_short_circuit_bytes_total",
    "granary_client_uploaded_bytes_total",
];

/// `filter` with libraries' noise turned down unless it names them itself: raft-rs
/// narrates every election and configuration step at INFO, where our own lines say what
/// matters (leader changes; `raft=info` brings them back); fuser warns "Unmount failed"
/// when a mount unmounted from outside (`umount`) is let go, which is a clean stop (a
/// failed unmount of ours is logged by us).
fn with_quiet_libraries(filter: &str) -> String {
    let mut out = filter.to_string();
    for (library, quiet) in [("raft", "raft=warn"), ("fuser", "fuser::mnt=error")] {
        // A directive's target is a module path: `raft` or `raft::…`, not
        // `granary_master::raft`.
        let names = |directive: &str| {
            let target = directive.split(['=', '[']).next().unwrap_or_default();
            target == library || target.starts_with(&format!("{library}::"))
        };
        if !filter.split(',').any(|d| names(d.trim())) {
            out.push(',');
            out.push_str(quiet);
        }
    }
    out
}

/// Serves `/metrics` in Prometheus text format on `addr`, with `counters` shown at 0
/// until they count something: a series that appears only at its first event leaves
/// `rate()` and alerts on it blind until then. Must run inside a Tokio runtime.
pub fn serve_metrics(addr: SocketAddr, counters: &[&[&'static str]]) -> Result<(), String> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    for &name in counters.iter().copied().flatten() {
        metrics::counter!(name).increment(0);
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM (systemd stops services with SIGTERM).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn libraries_stay_quiet_unless_the_filter_names_them() {
        use super::with_quiet_libraries as quiet;
        assert_eq!(quiet("info"), "info,raft=warn,fuser::mnt=error");
        assert_eq!(quiet("info,raft=info"), "info,raft=info,fuser::mnt=error");
        assert_eq!(quiet("debug,fuser=debug"), "debug,fuser=debug,raft=warn");
        assert_eq!(
            quiet("info,granary_master::raft=debug"),
            "info,granary_master::raft=debug,raft=warn,fuser::mnt=error"
        );
        assert_eq!(
            quiet("raft::raw_node=debug"),
            "raft::raw_node=debug,fuser::mnt=error"
        );
    }
}
