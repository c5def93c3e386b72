//! Listening sockets.

use std::net::SocketAddr;

use tokio::net::TcpListener;

/// Binds `addr` and returns the listener with the address it actually got (port 0 picks
/// a free port).
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// A gRPC endpoint at `host:port` with TCP_NODELAY and the given connect timeout; over
/// TLS when this process installed TLS client settings (see [`crate::tls`]).
pub fn endpoint(
    addr: &str,
    connect_timeout: std::time::Duration,
) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    let host = host_of(addr);
    let (scheme, tls) = match crate::tls::grpc_client(host) {
        Some(tls) => ("https", Some(tls)),
        None => ("http", None),
    };
    let mut e = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        e = e.tls_config(tls)?;
    }
    Ok(e)
}

/// The address a server gives out as its own: `advertise` if set, else `listen` (with
/// this host's name in place of an unspecified IP).
pub fn advertised(advertise: Option<&String>, listen: SocketAddr) -> String {
    match advertise {
        Some(a) => a.clone(),
        None if listen.ip().is_unspecified() => {
            format!("{}:{}", crate::hostname(), listen.port())
        }
        None => listen.to_string(),
    }
}

/// The host part of `host:port` (`[v6]:port` too).
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// A lazily connecting gRPC channel to `host:port` with the given timeouts.
pub fn lazy_channel(
    addr: &str,
    connect_timeout: std::time::Duration,
    timeout: std::time::Duration,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    Ok(endpoint(addr, connect_timeout)?
        .timeout(timeout)
        .connect_lazy())
}
