//! gRPC calls to a server in this same process without a socket. `granary local` runs
//! its master next to its mount: over loopback TCP each metadata call cost two HTTP/2
//! codecs, the kernel's TCP stack both ways and a hand-off to and from the server's
//! runtime threads (~40% of the CPU of a rename on two cores). A registered service is
//! called directly instead: its future runs on the caller's thread, inside the server's
//! runtime context so what it spawns, its timers and its blocking work stay the server's.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{LazyLock, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::Body;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Request = http::Request<Body>;
type Response = http::Response<Body>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A server's service as callers in this process reach it.
pub type LocalService = BoxCloneSyncService<Request, Response, Infallible>;

static SERVERS: LazyLock<RwLock<HashMap<String, LocalService>>> =
    LazyLock::new(|| RwLock::new(HashMap::new()));

thread_local! {
    static MAY_BLOCK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the server code running now may block its thread: it runs for a caller in
/// this process whose thread waits for the answer anyway (not a runtime worker shared by
/// other tasks), so blocking work needs no hand-off to the blocking pool and back.
pub fn may_block() -> bool {
    MAY_BLOCK.with(|b| b.get())
}

/// Polls a server's future with the server's runtime entered.
struct InRuntime {
    handle: tokio::runtime::Handle,
    fut: BoxFuture<Result<Response, Infallible>>,
}

impl Future for InRuntime {
    type Output = Result<Response, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let blocking_ok = match tokio::runtime::Handle::try_current() {
            Ok(h) => h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread,
            Err(_) => true,
        };
        let before = MAY_BLOCK.with(|b| b.replace(blocking_ok));
        let _entered = this.handle.enter();
        let polled = this.fut.as_mut().poll(cx);
        MAY_BLOCK.with(|b| b.set(before));
        polled
    }
}

/// `svc` as callers in this process reach it: called on their threads within the
/// runtime `handle` (the server's).
pub fn local_service<S, B>(svc: S, handle: tokio::runtime::Handle) -> LocalService
where
    S: Service<Request, Response = http::Response<B>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let svc = tower::service_fn(move |req: Request| {
        let svc = svc.clone();
        let fut = async move { svc.oneshot(req).await.map(|r| r.map(Body::new)) };
        InRuntime {
            fut: Box::pin(fut),
            handle: handle.clone(),
        }
    });
    BoxCloneSyncService::new(svc)
}

/// Lets calls to `addr` from this process reach `svc` directly, until [`withdraw`].
pub fn register(addr: &str, svc: LocalService) {
    SERVERS
        .write()
        .expect("in-process servers lock")
        .insert(addr.to_string(), svc);
}

pub fn withdraw(addr: &str) {
    SERVERS
        .write()
        .expect("in-process servers lock")
        .remove(addr);
}

/// A channel to a gRPC server: over the network, or straight to one in this process.
#[derive(Clone)]
pub enum GrpcChannel {
    Remote(tonic::transport::Channel),
    Local {
        svc: LocalService,
        /// One call's bound, as the remote channel's.
        timeout: Duration,
    },
}

/// A lazily connecting channel to `host:port` with the given timeouts; in-process when
/// a server of this process registered that address.
pub fn channel(
    addr: &str,
    connect_timeout: Duration,
    timeout: Duration,
) -> Result<GrpcChannel, tonic::transport::Error> {
    let local = SERVERS
        .read()
        .expect("in-process servers lock")
        .get(addr)
        .cloned();
    Ok(match local {
        Some(svc) => GrpcChannel::Local { svc, timeout },
        None => GrpcChannel::Remote(crate::net::lazy_channel(addr, connect_timeout, timeout)?),
    })
}

impl Service<Request> for GrpcChannel {
    type Response = Response;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            GrpcChannel::Remote(c) => c.poll_ready(cx).map_err(Into::into),
            GrpcChannel::Local { .. } => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Request) -> Self::Future {
        match self {
            GrpcChannel::Remote(c) => {
                let fut = c.call(req);
                Box::pin(async move { fut.await.map_err(Into::into) })
            }
            GrpcChannel::Local { svc, timeout } => {
                let fut = svc.clone().oneshot(req);
                let timeout = *timeout;
                Box::pin(async move {
                    match tokio::time::timeout(timeout, fut).await {
                        Ok(Ok(r)) => Ok(r),
                        Ok(Err(never)) => match never {},
                        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                            "no answer within {timeout:?}"
                        ))
                        .into()),
                    }
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_local_call_runs_in_the_server_runtime() {
        let server_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("server-rt")
            .enable_all()
            .build()
            .unwrap();
        // What the service spawns must run on the server's threads.
        let svc = tower::service_fn(|_req: Request| async {
            // The test's caller is a worker of a multi-threaded runtime.
            assert!(!may_block());
            let name = tokio::spawn(async { std::thread::current().name().map(str::to_string) })
                .await
                .unwrap()
                .unwrap_or_default();
            Ok::<_, Infallible>(http::Response::new(Body::new(name)))
        });
        register(
            "in-process-test:1",
            local_service(svc, server_rt.handle().clone()),
        );
        let mut ch = channel(
            "in-process-test:1",
            Duration::from_secs(1),
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(matches!(ch, GrpcChannel::Local { .. }));
        let reply = ch.call(http::Request::new(Body::empty())).await.unwrap();
        let body = http_body_util::BodyExt::collect(reply.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&body[..], b"server-rt");
        withdraw("in-process-test:1");
        let ch = channel(
            "in-process-test:1",
            Duration::from_secs(1),
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(matches!(ch, GrpcChannel::Remote(_)));
        server_rt.shutdown_background();
    }
}
