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
