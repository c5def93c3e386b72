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
    data_request, DataRequest, Hello, HelloReply, ReadBlockRequest, ReadBlockResponse, Status,
    WriteFileRequest, WriteFileResponse,
};
use granary_protos::frame::{encode_header, read_header};
use granary_protos::DATA_PROTOCOL_VERSION;

/// Idle connections kept per worker.
const MAX_IDLE_PER_WORKER: usize = 32;

struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
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
        let mut conn = Conn {
            reader: BufReader::with_capacity(64 << 10, s.try_clone()?),
            writer: s,
        };
        conn.writer
            .write_all(&encode_header(&Hello {
                version: DATA_PROTOCOL_VERSION,
                cluster_token: self.token.clone(),
            }))
            .map_err(|e| FsError::Unavailable(format!("worker {addr}: {e}")))?;
        let hello: HelloReply = read_header(&mut conn.reader).map_err(|e| frame_err(addr, e))?;
        if !hello.ok {
            return Err(FsError::Io(format!(
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
    conn.writer
        .write_all(&encode_header(&header))
        .map_err(gone)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    while offset < req.size {
        let want = (req.size - offset).min(buf.len() as u64) as usize;
        source.read_exact_at(&mut buf[..want], offset)?;
        conn.writer.write_all(&buf[..want]).map_err(gone)?;
        offset += want as u64;
    }
    conn.writer
        .set_read_timeout(Some(UPLOAD_ANSWER_TIMEOUT))
        .map_err(gone)?;
    let resp: Result<WriteFileResponse, _> = read_header(&mut conn.reader);
    conn.writer
        .set_read_timeout(Some(io_timeout))
        .map_err(gone)?;
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
    conn.writer
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
        _ => Err(FsError::Io(format!("worker {addr}: {error}"))),
    }
}
