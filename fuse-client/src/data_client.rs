//! Client side of the worker data port: pooled blocking TCP connections (FUSE threads are
//! plain threads), one request in flight per connection, several connections per worker.

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use granary_common::{FsError, FsResult};
use granary_protos::data::{
    data_request, DataRequest, EvictBlocksRequest, EvictBlocksResponse, Hello, HelloReply,
    ReadBlockRequest, ReadBlockResponse, Status, WriteFileRequest, WriteFileResponse,
};
use granary_protos::frame::{encode_header, read_header};
use granary_protos::DATA_PROTOCOL_VERSION;

/// Idle connections kept per worker.
const MAX_IDLE_PER_WORKER: usize = 32;

/// A connection's bytes: plain TCP, or TLS over it when this process has TLS settings.
enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &t.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(t) => t.flush(),
        }
    }
}

/// One request at a time: a write goes out only when the previous answer was read
/// whole, so writing under the read buffer is safe.
struct Conn {
    reader: BufReader<Stream>,
}

impl Conn {
    fn writer(&mut self) -> &mut Stream {
        self.reader.get_mut()
    }

    fn set_read_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.reader.get_ref().tcp().set_read_timeout(Some(t))
    }
}

pub struct DataClient {
    idle: Mutex<HashMap<String, Vec<Conn>>>,
    connect_timeout: Duration,
    io_timeout: Duration,
    token: String,
    /// Numbers requests, so an answer is matched to the request it belongs to.
    next_request: AtomicU64,
}

fn frame_err(addr: &str, e: granary_protos::frame::FrameError) -> FsError {
    FsError::Unavailable(format!("worker {addr}: {e}"))
}

impl DataClient {
    pub fn new(connect_timeout: Duration, io_timeout: Duration, token: &str) -> Self {
        DataClient {
            idle: Mutex::new(HashMap::new()),
            connect_timeout,
            io_timeout,
            token: token.to_string(),
            next_request: AtomicU64::new(1),
        }
    }

    fn connect(&self, addr: &str) -> FsResult<Conn> {
        let sockaddr = addr
            .to_socket_addrs()
            .map_err(|e| FsError::Unavailable(format!("worker {addr}: {e}")))?
            .next()
            .ok_or_else(|| FsError::Unavailable(format!("worker {addr}: no address")))?;
        let s = TcpStream::connect_timeout(&sockaddr, self.connect_timeout)
            .map_err(|e| FsError::Unavailable(format!("worker {addr}: {e}")))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(self.io_timeout))?;
        s.set_write_timeout(Some(self.io_timeout))?;
        let stream = match granary_common::tls::data_client() {
            Some((config, opts)) => {
                let name = opts
                    .name_for(granary_common::net::host_of(addr))
                    .map_err(|e| FsError::InvalidArgument(e.to_string()))?;
                let tls = rustls::ClientConnection::new(config, name)
                    .map_err(|e| FsError::Unavailable(format!("worker {addr}: TLS: {e}")))?;
                Stream::Tls(Box::new(rustls::StreamOwned::new(tls, s)))
            }
            None => Stream::Plain(s),
        };
        let mut conn = Conn {
            reader: BufReader::with_capacity(64 << 10, stream),
        };
        conn.writer()
            .write_all(&encode_header(&Hello {
                version: DATA_PROTOCOL_VERSION,
                cluster_token: self.token.clone(),
            }))
            .map_err(|e| FsError::Unavailable(format!("worker {addr}: {e}")))?;
        let hello: HelloReply = read_header(&mut conn.reader).map_err(|e| frame_err(addr, e))?;
        if !hello.ok {
            return Err(FsError::io(format!(
                "worker {addr} refused the connection: {}",
                hello.error
            )));
        }
        Ok(conn)
    }

    fn checkout(&self, addr: &str) -> FsResult<(Conn, bool)> {
        if let Some(c) = self
            .idle
            .lock()
            .expect("pool lock")
            .get_mut(addr)
            .and_then(|v| v.pop())
        {
            return Ok((c, true));
        }
        Ok((self.connect(addr)?, false))
    }

    fn checkin(&self, addr: &str, conn: Conn) {
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.entry(addr.to_string()).or_default();
        if list.len() < MAX_IDLE_PER_WORKER {
            list.push(conn);
        }
    }

    /// Runs one exchange on a connection to `addr`. A pooled connection may have died
    /// with a worker restart: the exchange is retried once on a new one (reads and whole
    /// uploads are idempotent).
    fn on_connection<T>(
        &self,
        addr: &str,
        mut exchange: impl FnMut(&mut Conn) -> FsResult<T>,
    ) -> FsResult<T> {
        for _ in 0..2 {
            let (mut conn, pooled) = self.checkout(addr)?;
            match exchange(&mut conn) {
                Ok(out) => {
                    self.checkin(addr, conn);
                    return Ok(out);
                }
                Err(e) if pooled => {
                    tracing::debug!(worker = addr, error = %e, "pooled data connection failed; reconnecting");
                }
                Err(e) => return Err(e),
            }
        }
        Err(FsError::Unavailable(format!(
            "worker {addr}: connection keeps failing"
        )))
    }

    /// Sends `req` to the worker at `addr`; returns its response header and payload.
    pub fn request(
        &self,
        addr: &str,
        mut req: ReadBlockRequest,
    ) -> FsResult<(ReadBlockResponse, Vec<u8>)> {
        req.request_id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (resp, payload) = self.on_connection(addr, |conn| exchange(conn, addr, &req))?;
        status_error(addr, resp.status, &resp.error)?;
        Ok((resp, payload))
    }

    /// Uploads `req.size` bytes of `source` (from offset 0) as a whole file; returns the
    /// worker's answer once the UFS object is under its final name.
    pub fn upload(
        &self,
        addr: &str,
        mut req: WriteFileRequest,
        source: &std::fs::File,
    ) -> FsResult<WriteFileResponse> {
        req.request_id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let resp = self.on_connection(addr, |conn| {
            send_file(conn, addr, &req, source, self.io_timeout)
        })?;
        status_error(addr, resp.status, &resp.error)?;
        Ok(resp)
    }

    /// Has the worker at `addr` drop its cached blocks `indexes` of `file_id`; returns
    /// the blocks and bytes it dropped.
    pub fn evict(&self, addr: &str, file_id: u64, indexes: Vec<u32>) -> FsResult<(u64, u64)> {
        let req = EvictBlocksRequest {
            request_id: self.next_request.fetch_add(1, Ordering::Relaxed),
            file_id,
            indexes,
        };
        let resp = self.on_connection(addr, |conn| {
            let gone = |e: std::io::Error| FsError::Unavailable(format!("worker {addr}: {e}"));
            let header = DataRequest {
                op: Some(data_request::Op::Evict(req.clone())),
            };
            conn.writer()
                .write_all(&encode_header(&header))
                .map_err(gone)?;
            let resp: EvictBlocksResponse =
                read_header(&mut conn.reader).map_err(|e| frame_err(addr, e))?;
            if resp.request_id != req.request_id {
                return Err(FsError::Unavailable(format!(
                    "worker {addr}: response out of order"
                )));
            }
            Ok(resp)
        })?;
        status_error(addr, resp.status, &resp.error)?;
        Ok((resp.blocks, resp.bytes))
    }

    /// Forgets every pooled connection to `addr` (after the worker went away).
    pub fn forget(&self, addr: &str) {
        self.idle.lock().expect("pool lock").remove(addr);
    }
}

/// How long the answer to an upload may take after its last byte: the worker makes the
/// whole file durable first.
pub(crate) const UPLOAD_ANSWER_TIMEOUT: Duration = Duration::from_secs(600);

fn send_file(
    conn: &mut Conn,
    addr: &str,
    req: &WriteFileRequest,
    source: &std::fs::File,
    io_timeout: Duration,
) -> FsResult<WriteFileResponse> {
    use std::os::unix::fs::FileExt;
    let gone = |e: std::io::Error| FsError::Unavailable(format!("worker {addr}: {e}"));
    let header = DataRequest {
        op: Some(data_request::Op::Write(req.clone())),
    };
    conn.writer()
        .write_all(&encode_header(&header))
        .map_err(gone)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    while offset < req.size {
        let want = (req.size - offset).min(buf.len() as u64) as usize;
        source.read_exact_at(&mut buf[..want], offset)?;
        conn.writer().write_all(&buf[..want]).map_err(gone)?;
        offset += want as u64;
    }
    conn.writer().flush().map_err(gone)?;
    conn.set_read_timeout(UPLOAD_ANSWER_TIMEOUT).map_err(gone)?;
    let resp: Result<WriteFileResponse, _> = read_header(&mut conn.reader);
    conn.set_read_timeout(io_timeout).map_err(gone)?;
    let resp = resp.map_err(|e| frame_err(addr, e))?;
    if resp.request_id != req.request_id {
        return Err(FsError::Unavailable(format!(
            "worker {addr}: response out of order"
        )));
    }
    Ok(resp)
}

fn exchange(
    conn: &mut Conn,
    addr: &str,
    req: &ReadBlockRequest,
) -> FsResult<(ReadBlockResponse, Vec<u8>)> {
    let wrapped = DataRequest {
        op: Some(data_request::Op::Read(req.clone())),
    };
    conn.writer()
        .write_all(&encode_header(&wrapped))
        .map_err(|e| FsError::Unavailable(format!("worker {addr}: {e}")))?;
    let resp: ReadBlockResponse = read_header(&mut conn.reader).map_err(|e| frame_err(addr, e))?;
    if resp.request_id != req.request_id {
        return Err(FsError::Unavailable(format!(
            "worker {addr}: response out of order"
        )));
    }
    let mut payload = Vec::new();
    if resp.status == Status::Ok as i32 && resp.local_path.is_empty() {
        if resp.length > req.length {
            return Err(FsError::Unavailable(format!(
                "worker {addr}: sent more than asked"
            )));
        }
        payload = vec![0u8; resp.length as usize];
        conn.reader
            .read_exact(&mut payload)
            .map_err(|e| FsError::Unavailable(format!("worker {addr}: {e}")))?;
    }
    Ok((resp, payload))
}

/// The error a worker's answer status stands for (`Ok` when there is none). A missing
/// UFS object is EIO, as read(2) and close(2) report data errors.
pub(crate) fn status_error(addr: &str, status: i32, error: &str) -> FsResult<()> {
    let error = error.to_string();
    match Status::try_from(status).unwrap_or(Status::IoError) {
        Status::Ok => Ok(()),
        Status::Stale => Err(FsError::Stale(error)),
        Status::Unavailable => Err(FsError::Unavailable(format!("worker {addr}: {error}"))),
        Status::BadRequest => Err(FsError::InvalidArgument(error)),
        Status::NoSpace => Err(FsError::NoSpace(format!("worker {addr}: {error}"))),
        Status::FileTooBig => Err(FsError::FileTooBig(format!("worker {addr}: {error}"))),
        Status::PermissionDenied => {
            Err(FsError::PermissionDenied(format!("worker {addr}: {error}")))
        }
        _ => Err(FsError::io(format!("worker {addr}: {error}"))),
    }
}

#[cfg(test)]
mod tests {
    //! The data client against a scripted worker on a loopback port.

    use super::*;
    use std::net::TcpListener;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    /// How the scripted worker answers one read.
    #[derive(Clone, Copy)]
    enum Answer {
        /// `length` bytes of `b'x'`, with the request's id.
        Bytes(u64),
        /// An answer to some other request.
        WrongId,
        /// More bytes than were asked for.
        TooMuch,
        /// The connection closes without an answer (a worker that restarted).
        Hangup,
        Status(Status),
    }

    /// Serves connections on a loopback port: a handshake checking `token`, then reads
    /// answered by `script` (one answer per read, in order; the last repeats).
    struct Worker {
        addr: String,
        connections: Arc<AtomicUsize>,
    }

    impl Worker {
        fn start(token: &'static str, script: Vec<Answer>) -> Worker {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let connections = Arc::new(AtomicUsize::new(0));
            let script = Arc::new(Mutex::new(script));
            let conns = connections.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { return };
                    conns.fetch_add(1, Ordering::SeqCst);
                    let script = script.clone();
                    std::thread::spawn(move || serve(stream, token, &script));
                }
            });
            Worker { addr, connections }
        }
    }

    fn serve(mut s: TcpStream, token: &str, script: &Mutex<Vec<Answer>>) {
        let hello: Hello = match read_header(&mut s) {
            Ok(h) => h,
            Err(_) => return,
        };
        let ok = hello.cluster_token == token;
        let reply = HelloReply {
            ok,
            error: if ok {
                String::new()
            } else {
                "wrong cluster token".into()
            },
            ..Default::default()
        };
        if s.write_all(&encode_header(&reply)).is_err() || !ok {
            return;
        }
        while let Ok(req) = read_header::<DataRequest, _>(&mut s) {
            let Some(data_request::Op::Read(r)) = req.op else {
                return;
            };
            let answer = {
                let mut script = script.lock().unwrap();
                if script.len() > 1 {
                    script.remove(0)
                } else {
                    script[0]
                }
            };
            let (resp, payload) = match answer {
                Answer::Bytes(n) => (ok_header(r.request_id, n), vec![b'x'; n as usize]),
                Answer::WrongId => (ok_header(r.request_id + 1, 0), Vec::new()),
                Answer::TooMuch => (
                    ok_header(r.request_id, r.length + 1),
                    vec![b'x'; r.length as usize + 1],
                ),
                Answer::Hangup => return,
                Answer::Status(status) => (
                    ReadBlockResponse {
                        request_id: r.request_id,
                        status: status as i32,
                        error: "scripted".into(),
                        ..Default::default()
                    },
                    Vec::new(),
                ),
            };
            if s.write_all(&encode_header(&resp)).is_err() || s.write_all(&payload).is_err() {
                return;
            }
        }
    }

    fn ok_header(request_id: u64, length: u64) -> ReadBlockResponse {
        ReadBlockResponse {
            request_id,
            length,
            ..Default::default()
        }
    }

    fn read(length: u64) -> ReadBlockRequest {
        ReadBlockRequest {
            length,
            ..Default::default()
        }
    }

    fn client(token: &str) -> DataClient {
        DataClient::new(Duration::from_secs(2), Duration::from_secs(5), token)
    }

    #[test]
    fn connections_are_reused_and_a_dead_pooled_one_is_replaced() {
        let w = Worker::start(
            "t",
            vec![
                Answer::Bytes(3),
                Answer::Bytes(3),
                Answer::Hangup,
                Answer::Bytes(3),
            ],
        );
        let c = client("t");
        for _ in 0..2 {
            let (resp, data) = c.request(&w.addr, read(3)).unwrap();
            assert_eq!((resp.length, data), (3, b"xxx".to_vec()));
        }
        assert_eq!(
            w.connections.load(Ordering::SeqCst),
            1,
            "one pooled connection"
        );
        // The pooled connection dies mid-exchange: the read is asked again on a new one.
        assert_eq!(c.request(&w.addr, read(3)).unwrap().1, b"xxx");
        assert_eq!(w.connections.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn answers_that_do_not_fit_the_request_are_refused() {
        let w = Worker::start("t", vec![Answer::WrongId]);
        let err = client("t").request(&w.addr, read(3)).unwrap_err();
        assert!(
            err.is_retryable() && err.to_string().contains("out of order"),
            "{err}"
        );

        let w = Worker::start("t", vec![Answer::TooMuch]);
        let err = client("t").request(&w.addr, read(3)).unwrap_err();
        assert!(err.to_string().contains("more than asked"), "{err}");
    }

    #[test]
    fn worker_statuses_and_refusals_map_to_errnos() {
        for (status, errno) in [
            (Status::Stale, libc::ESTALE),
            (Status::Unavailable, libc::EIO),
            (Status::BadRequest, libc::EINVAL),
            (Status::IoError, libc::EIO),
            (Status::NoSpace, libc::ENOSPC),
            (Status::FileTooBig, libc::EFBIG),
            (Status::PermissionDenied, libc::EACCES),
        ] {
            let w = Worker::start("t", vec![Answer::Status(status)]);
            let err = client("t").request(&w.addr, read(1)).unwrap_err();
            assert_eq!(err.errno(), errno, "{status:?}: {err}");
        }
        let w = Worker::start("t", vec![Answer::Bytes(1)]);
        let err = client("wrong").request(&w.addr, read(1)).unwrap_err();
        assert!(err.to_string().contains("refused the connection"), "{err}");
        let err = client("t").request("127.0.0.1:1", read(1)).unwrap_err();
        assert!(err.is_retryable(), "nobody listening: {err}");
    }
}
