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

/// A gRPC endpoint at `host:port` with TCP_NODELAY and the given connect timeout.
pub fn endpoint(
    addr: &str,
    connect_timeout: std::time::Duration,
) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true),
    )
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
