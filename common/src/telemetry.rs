//! Structured logs (filtered by `RUST_LOG`) and the Prometheus metrics endpoint.

use std::net::SocketAddr;

/// Installs the global tracing subscriber; `RUST_LOG` overrides `default_filter`.
pub fn init_logging(default_filter: &str) {
    // raft-rs narrates every election and configuration step at INFO; our own lines say
    // what matters (leader changes). `RUST_LOG=raft=info` brings them back. fuser warns
    // "Unmount failed" when a mount unmounted from outside (`umount`) is let go, which is
    // a clean stop; a failed unmount of ours is logged by us.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{default_filter},raft=warn,fuser::mnt=error"))
    });
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours for a person at a terminal, plain text for journald and log files.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// Serves `/metrics` in Prometheus text format on `addr`. Must run inside a Tokio runtime.
pub fn serve_metrics(addr: SocketAddr) -> Result<(), String> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))
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
