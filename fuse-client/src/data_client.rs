//! Client side of the worker data port: pooled blocking TCP connections (FUSE threads are
//! plain threads), one request in flight per connection, several connections per worker.

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use granary_common::{FsError, FsResult};
use granary_protos::data::{
    data_request, DataRequest, EvictBlocksRequest, EvictBlocksResponse, Hello, HelloReply,
    ReadBlockRequest, ReadBlockResponse, Status, WriteFileRequest, WriteFileResponse,
};
use granary_protos::frame::{encode_header, read_header};
use granary_protos::v1::WorkerInfo;

use crate::worker_list::data_addr;
use granary_protos::DATA_PROTOCOL_VERSION;

/// Idle connections kept per worker.
const MAX_IDLE_PER_WORKER: usize = 32;
/// How long an answer is awaited before the worker is checked on, and between checks.
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// Checks in a row a worker fails (a new connection's handshake unanswered) before a
/// request waiting on it is given up.
const FAILED_CHECKS: u32 = 2;
/// How long a worker that could not be reached, or stopped answering, is passed over
/// while another one is there: past the masters' dropping of a silent worker (10 s by
/// default) and their next listing.
const PASS_OVER: Duration = Duration::from_secs(15);

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
    check_every: Duration,
    /// Workers (data addresses) the last exchange with failed below their answers: no
    /// connection, or none that answered; when.
    failed: Mutex<HashMap<String, Instant>>,
    token: String,
    /// Numbers requests, so an answer is matched to the request it belongs to.
    next_request: AtomicU64,
}

fn frame_err(addr: &str, e: granary_protos::frame::FrameError) -> FsError {
    FsError::Unavailable(format!("worker {addr}: {e}"))
}

/// Refuses an answer to another request than the one sent on the connection.
fn in_order(addr: &str, answered: u64, sent: u64) -> FsResult<()> {
    match answered == sent {
        true => Ok(()),
        false => Err(FsError::Unavailable(format!(
            "worker {addr}: response out of order"
        ))),
    }
}

impl DataClient {
    pub fn new(connect_timeout: Duration, io_timeout: Duration, token: &str) -> Self {
        DataClient {
            idle: Mutex::new(HashMap::new()),
            connect_timeout,
            io_timeout,
            check_every: CHECK_EVERY,
            failed: Mutex::new(HashMap::new()),
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
        // A worker that is stopped still completes connections (the kernel does), so its
        // handshake is given no longer than a connection.
        s.set_read_timeout(Some(self.connect_timeout))?;
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
        let hello: HelloReply = read_header(&mut conn.reader).map_err(|e| match e {
            granary_protos::frame::FrameError::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                FsError::Unavailable(format!(
                    "worker {addr}: no answer to a new connection within {:?}",
                    self.connect_timeout
                ))
            }
            e => frame_err(addr, e),
        })?;
        if !hello.ok {
            return Err(FsError::io(format!(
                "worker {addr} refused the connection: {}",
                hello.error
            )));
        }
        conn.set_read_timeout(self.io_timeout)
            .map_err(|e| FsError::Unavailable(format!("worker {addr}: {e}")))?;
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
    /// uploads are idempotent). A worker no exchange reached is passed over for a while
    /// (see [`Self::usable`]).
    fn on_connection<T>(
        &self,
        addr: &str,
        mut exchange: impl FnMut(&mut Conn) -> FsResult<T>,
    ) -> FsResult<T> {
        let result = (|| {
            for _ in 0..2 {
                let (mut conn, pooled) = self.checkout(addr)?;
                match exchange(&mut conn) {
                    Ok(out) => {
                        self.checkin(addr, conn);
                        return Ok(out);
                    }
                    // A worker that stopped answering would not answer a new one.
                    Err(e) if pooled && !matches!(e, FsError::TimedOut(_)) => {
                        tracing::debug!(worker = addr, error = %e, "pooled data connection failed; reconnecting");
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(FsError::Unavailable(format!(
                "worker {addr}: connection keeps failing"
            )))
        })();
        let mut failed = self.failed.lock().expect("failed workers lock");
        match &result {
            Err(e) if e.is_retryable() => {
                failed.insert(addr.to_string(), Instant::now());
            }
            _ => {
                failed.remove(addr);
            }
        }
        result
    }

    /// Whether the data port of the worker at `addr` failed lately (no connection, or
    /// no answer).
    pub fn failed_lately(&self, addr: &str) -> bool {
        self.failed
            .lock()
            .expect("failed workers lock")
            .get(addr)
            .is_some_and(|at| at.elapsed() < PASS_OVER)
    }

    /// `workers` less those whose data port failed lately (no connection, or no answer),
    /// unless that leaves none.
    pub fn usable(&self, workers: &Arc<Vec<WorkerInfo>>) -> Arc<Vec<WorkerInfo>> {
        let mut failed = self.failed.lock().expect("failed workers lock");
        if failed.is_empty() {
            return workers.clone();
        }
        failed.retain(|_, at| at.elapsed() < PASS_OVER);
        let usable: Vec<WorkerInfo> = workers
            .iter()
            .filter(|w| !failed.contains_key(&data_addr(w)))
            .cloned()
            .collect();
        match usable.len() {
            0 => workers.clone(),
            n if n == workers.len() => workers.clone(),
            _ => Arc::new(usable),
        }
    }

    /// Waits until `conn` has an answer to read, `bound` at most, checking on the
    /// worker meanwhile (see [`Watch`]).
    fn await_answer(&self, conn: &Conn, addr: &str, bound: Duration) -> FsResult<()> {
        let mut watch = Watch::new(self, addr, bound);
        loop {
            if !conn.reader.buffer().is_empty() {
                return Ok(());
            }
            let left = bound.saturating_sub(watch.since.elapsed());
            if readable(conn.reader.get_ref().tcp(), left.min(self.check_every))
                .map_err(|e| FsError::Unavailable(format!("worker {addr}: {e}")))?
            {
                return Ok(());
            }
            watch.check("answer")?;
        }
    }

    /// Sends an upload: its header, then `req.size` bytes of `source` (from offset 0).
    /// A worker that stops taking them is checked on (see [`Watch`]) rather than waited
    /// for until the write timeout; one that takes nothing for `io_timeout` is given up on
    /// even if it answers the checks. Its socket's timeouts are the check interval
    /// meanwhile: a TLS write also reads (alerts, tickets) and would wait out the read
    /// timeout.
    fn send_file(
        &self,
        conn: &mut Conn,
        addr: &str,
        req: &WriteFileRequest,
        source: &std::fs::File,
    ) -> FsResult<()> {
        use std::os::unix::fs::FileExt;
        let gone = |e: std::io::Error| FsError::Unavailable(format!("worker {addr}: {e}"));
        let timeouts = |c: &Conn, t: Duration| {
            let tcp = c.reader.get_ref().tcp();
            tcp.set_write_timeout(Some(t))
                .and_then(|()| tcp.set_read_timeout(Some(t)))
        };
        timeouts(conn, self.check_every).map_err(gone)?;
        let mut watch = Watch::new(self, addr, self.io_timeout);
        let sent = (|| {
            let header = DataRequest {
                op: Some(data_request::Op::Write(req.clone())),
            };
            write_watched(conn, &mut watch, &encode_header(&header))?;
            let mut buf = vec![0u8; 1 << 20];
            let mut offset = 0u64;
            while offset < req.size {
                let want = (req.size - offset).min(buf.len() as u64) as usize;
                source.read_exact_at(&mut buf[..want], offset)?;
                write_watched(conn, &mut watch, &buf[..want])?;
                offset += want as u64;
            }
            loop {
                match conn.writer().flush() {
                    Ok(()) => return Ok(()),
                    Err(e) if timed_out(&e) => watch.check("progress taking the upload")?,
                    Err(e) => return Err(gone(e)),
                }
            }
        })();
        timeouts(conn, self.io_timeout).map_err(gone)?;
        sent
    }

    /// Sends `req` to the worker at `addr`; returns its response header and payload.
    pub fn request(
        &self,
        addr: &str,
        mut req: ReadBlockRequest,
    ) -> FsResult<(ReadBlockResponse, Vec<u8>)> {
        req.request_id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (resp, payload) = self.on_connection(addr, |conn| {
            send_read(conn, addr, &req)?;
            self.await_answer(conn, addr, self.io_timeout)?;
            read_answer(conn, addr, &req)
        })?;
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
            self.send_file(conn, addr, &req, source)?;
            self.await_answer(conn, addr, UPLOAD_ANSWER_TIMEOUT)?;
            let resp: WriteFileResponse =
                read_header(&mut conn.reader).map_err(|e| frame_err(addr, e))?;
            in_order(addr, resp.request_id, req.request_id)?;
            Ok(resp)
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
            in_order(addr, resp.request_id, req.request_id)?;
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

/// Checks on a worker that is slow to take a request or to answer it: each check is a
/// new connection's handshake, which a busy worker (one waiting on the UFS) still answers
/// at once. A stopped or wedged one fails [`FAILED_CHECKS`] checks in a row and is given
/// up on, and so is one that made no progress for `bound`.
struct Watch<'a> {
    client: &'a DataClient,
    addr: &'a str,
    bound: Duration,
    /// The start, or the last progress.
    since: Instant,
    failed_checks: u32,
}

impl<'a> Watch<'a> {
    fn new(client: &'a DataClient, addr: &'a str, bound: Duration) -> Self {
        Watch {
            client,
            addr,
            bound,
            since: Instant::now(),
            failed_checks: 0,
        }
    }

    fn progressed(&mut self) {
        self.since = Instant::now();
    }

    /// One check while waiting for `what`; an error once the worker counts as stopped.
    fn check(&mut self, what: &str) -> FsResult<()> {
        if self.since.elapsed() >= self.bound {
            return Err(FsError::TimedOut(format!(
                "worker {}: no {what} within {:?}",
                self.addr, self.bound
            )));
        }
        match self.client.connect(self.addr) {
            Ok(check) => {
                self.failed_checks = 0;
                self.client.checkin(self.addr, check);
                Ok(())
            }
            Err(e) => {
                self.failed_checks += 1;
                if self.failed_checks < FAILED_CHECKS {
                    return Ok(());
                }
                Err(FsError::TimedOut(format!(
                    "worker {} stopped answering: no {what} for {:?}, and a new connection \
                     to it got none either ({e})",
                    self.addr,
                    self.since.elapsed()
                )))
            }
        }
    }
}

/// A blocking socket's send or receive timeout ran out.
fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Writes all of `buf`, checking on the worker each time a write times out (a write
/// that times out has taken nothing, on TCP and TLS alike).
fn write_watched(conn: &mut Conn, watch: &mut Watch<'_>, mut buf: &[u8]) -> FsResult<()> {
    let addr = watch.addr;
    while !buf.is_empty() {
        match conn.writer().write(buf) {
            Ok(0) => {
                return Err(FsError::Unavailable(format!(
                    "worker {addr}: connection closed"
                )))
            }
            Ok(n) => {
                buf = &buf[n..];
                watch.progressed();
            }
            Err(e) if timed_out(&e) => watch.check("progress taking the upload")?,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FsError::Unavailable(format!("worker {addr}: {e}"))),
        }
    }
    Ok(())
}

fn send_read(conn: &mut Conn, addr: &str, req: &ReadBlockRequest) -> FsResult<()> {
    let wrapped = DataRequest {
        op: Some(data_request::Op::Read(req.clone())),
    };
    conn.writer()
        .write_all(&encode_header(&wrapped))
        .map_err(|e| FsError::Unavailable(format!("worker {addr}: {e}")))
}

/// Whether `s` has bytes to read (or a hangup to report) within `wait`.
fn readable(s: &TcpStream, wait: Duration) -> std::io::Result<bool> {
    let mut fd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = wait.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one pollfd that outlives the call.
    match unsafe { libc::poll(&mut fd, 1, ms) } {
        -1 => {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => Ok(false),
                _ => Err(e),
            }
        }
        n => Ok(n > 0),
    }
}

fn read_answer(
    conn: &mut Conn,
    addr: &str,
    req: &ReadBlockRequest,
) -> FsResult<(ReadBlockResponse, Vec<u8>)> {
    let resp: ReadBlockResponse = read_header(&mut conn.reader).map_err(|e| frame_err(addr, e))?;
    in_order(addr, resp.request_id, req.request_id)?;
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
        /// One byte after this many milliseconds (a worker waiting on the UFS).
        Late(u64),
        Status(Status),
    }

    /// Serves connections on a loopback port: a handshake checking `token`, then reads
    /// answered by `script` (one answer per read, in order; the last repeats).
    struct Worker {
        addr: String,
        connections: Arc<AtomicUsize>,
        /// Set: answers nothing more, as a stopped process (the kernel still completes
        /// connections).
        stopped: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Worker {
        fn start(token: &'static str, script: Vec<Answer>) -> Worker {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let connections = Arc::new(AtomicUsize::new(0));
            let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let script = Arc::new(Mutex::new(script));
            let (conns, stop) = (connections.clone(), stopped.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { return };
                    conns.fetch_add(1, Ordering::SeqCst);
                    let (script, stop) = (script.clone(), stop.clone());
                    std::thread::spawn(move || serve(stream, token, &script, &stop));
                }
            });
            Worker {
                addr,
                connections,
                stopped,
            }
        }
    }

    fn serve(
        mut s: TcpStream,
        token: &str,
        script: &Mutex<Vec<Answer>>,
        stopped: &std::sync::atomic::AtomicBool,
    ) {
        let hang_if_stopped = || {
            while stopped.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        let hello: Hello = match read_header(&mut s) {
            Ok(h) => h,
            Err(_) => return,
        };
        hang_if_stopped();
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
            let r = match req.op {
                Some(data_request::Op::Read(r)) => r,
                Some(data_request::Op::Write(w)) => {
                    // Takes the payload a chunk at a time, none while stopped.
                    let mut left = w.size as usize;
                    let mut chunk = vec![0u8; 64 << 10];
                    while left > 0 {
                        hang_if_stopped();
                        let n = left.min(chunk.len());
                        if s.read_exact(&mut chunk[..n]).is_err() {
                            return;
                        }
                        left -= n;
                    }
                    let answer = WriteFileResponse {
                        request_id: w.request_id,
                        ..Default::default()
                    };
                    if s.write_all(&encode_header(&answer)).is_err() {
                        return;
                    }
                    continue;
                }
                _ => return,
            };
            hang_if_stopped();
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
                Answer::Late(ms) => {
                    std::thread::sleep(Duration::from_millis(ms));
                    (ok_header(r.request_id, 1), vec![b'x'])
                }
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

    fn worker_at(addr: &str) -> WorkerInfo {
        let (host, port) = addr.rsplit_once(':').unwrap();
        WorkerInfo {
            worker_id: addr.into(),
            host: host.into(),
            data_port: port.parse().unwrap(),
            ..Default::default()
        }
    }

    /// A client that checks on a worker every 100 ms, and waits a minute for answers.
    fn checking_client() -> DataClient {
        let mut c = DataClient::new(Duration::from_millis(500), Duration::from_secs(60), "t");
        c.check_every = Duration::from_millis(100);
        c
    }

    #[test]
    fn a_stopped_worker_is_given_up_on_and_passed_over_while_another_is_there() {
        let w = Worker::start("t", vec![Answer::Bytes(1)]);
        let c = checking_client();
        assert_eq!(c.request(&w.addr, read(1)).unwrap().1, b"x");
        w.stopped.store(true, Ordering::SeqCst);
        let asked = Instant::now();
        let err = c.request(&w.addr, read(1)).unwrap_err();
        // Given up on long before the minute an answer may take.
        assert!(asked.elapsed() < Duration::from_secs(30), "{err}");
        assert!(
            err.is_retryable() && err.to_string().contains("stopped answering"),
            "{err}"
        );
        let other = Worker::start("t", vec![Answer::Bytes(1)]);
        assert!(c.failed_lately(&w.addr) && !c.failed_lately(&other.addr));
        let both = Arc::new(vec![worker_at(&w.addr), worker_at(&other.addr)]);
        let usable: Vec<String> = c.usable(&both).iter().map(data_addr).collect();
        assert_eq!(usable, [other.addr.as_str()]);
        let alone = Arc::new(vec![worker_at(&w.addr)]);
        assert_eq!(c.usable(&alone).len(), 1, "the only worker is still tried");
        // Back, it answers and is used again.
        w.stopped.store(false, Ordering::SeqCst);
        assert_eq!(c.request(&w.addr, read(1)).unwrap().1, b"x");
        assert_eq!(c.usable(&both).len(), 2);
        assert!(!c.failed_lately(&w.addr));
    }

    #[test]
    fn an_upload_to_a_worker_that_stopped_taking_it_is_given_up_on() {
        let w = Worker::start("t", vec![Answer::Bytes(1)]);
        let c = checking_client();
        let mut source = tempfile::tempfile().unwrap();
        source.write_all(&vec![7u8; 64 << 20]).unwrap();
        let upload = |size: u64| WriteFileRequest {
            size,
            ..Default::default()
        };
        c.upload(&w.addr, upload(1 << 20), &source).unwrap();
        // Stopped with the upload's connection pooled: the socket buffers fill, then
        // nothing more goes out.
        w.stopped.store(true, Ordering::SeqCst);
        let asked = Instant::now();
        let err = c.upload(&w.addr, upload(64 << 20), &source).unwrap_err();
        assert!(asked.elapsed() < Duration::from_secs(30), "{err}");
        assert!(
            err.is_retryable() && err.to_string().contains("stopped answering"),
            "{err}"
        );
        assert!(c.failed_lately(&w.addr));
        w.stopped.store(false, Ordering::SeqCst);
    }

    #[test]
    fn a_worker_slow_to_answer_but_answering_checks_is_waited_for() {
        let w = Worker::start("t", vec![Answer::Late(1000)]);
        let (_, data) = checking_client().request(&w.addr, read(1)).unwrap();
        assert_eq!(data, b"x");
    }
}
