//! The data port against a real listener: range reads, early reads of blocks being
//! fetched, failures and bad input.

use super::*;
use crate::block_store::BlockStore;
use crate::mounts::MountRegistry;
use granary_common::ufs::{LocalUfs, Ufs, UfsObject};
use granary_common::FsResult;
use granary_protos::frame::read_header;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A local UFS that counts range reads.
#[derive(Debug)]
struct Counting(LocalUfs, AtomicUsize);
impl Ufs for Counting {
    fn uri(&self) -> &str {
        self.0.uri()
    }
    fn list(&self, d: &[u8]) -> FsResult<Vec<UfsObject>> {
        self.0.list(d)
    }
    fn stat(&self, p: &[u8]) -> FsResult<UfsObject> {
        self.0.stat(p)
    }
    fn read_range(
        &self,
        p: &[u8],
        v: Fingerprint,
        o: u64,
        l: u64,
        s: &mut dyn std::io::Write,
    ) -> FsResult<u64> {
        self.1.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(50));
        self.0.read_range(p, v, o, l, s)
    }
}

type Gate = Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>;

/// Waits until `gate` opens. Bounded: a test failing before it opens the gate must not
/// hang in the runtime's drop, which waits for the blocking thread waiting here.
fn wait_open(gate: &Gate) {
    let open = gate.0.lock().unwrap();
    let limit = std::time::Duration::from_secs(30);
    drop(gate.1.wait_timeout_while(open, limit, |open| !*open));
}

/// A local UFS whose block fills (reads of more than `held_after` bytes) stop after
/// their first `held_after` bytes until the gate opens, and fail there once if
/// `fail_once`; shorter reads (direct ones) pass. Its uploads hold their last bytes
/// (`store_written`) until the gate opens too, as an S3 upload's last parts take a while
/// after the last chunk arrived.
#[derive(Debug)]
struct Gated {
    local: LocalUfs,
    held_after: u64,
    gate: Gate,
    fail_once: std::sync::atomic::AtomicBool,
    reads: std::sync::Mutex<Vec<(u64, u64)>>,
    uploads: Arc<UploadCounts>,
}

/// Uploads that reached their last bytes, and uploads that ended (completed or dropped).
#[derive(Debug, Default)]
struct UploadCounts {
    storing: AtomicUsize,
    ended: AtomicUsize,
}

impl Gated {
    fn new(local: LocalUfs, held_after: u64, open: bool, fail_once: bool) -> Self {
        Gated {
            local,
            held_after,
            gate: Arc::new((std::sync::Mutex::new(open), std::sync::Condvar::new())),
            fail_once: fail_once.into(),
            reads: Default::default(),
            uploads: Default::default(),
        }
    }
    fn open(&self) {
        *self.gate.0.lock().unwrap() = true;
        self.gate.1.notify_all();
    }
    /// Waits (at most 20 s) until `n` fills have started reading.
    async fn wait_for_fills(&self, n: usize) {
        until("the fills never started", || self.fills() >= n).await;
    }
    fn fills(&self) -> usize {
        let reads = self.reads.lock().unwrap();
        reads.iter().filter(|r| r.1 > self.held_after).count()
    }
}
impl Ufs for Gated {
    fn uri(&self) -> &str {
        self.local.uri()
    }
    fn list(&self, d: &[u8]) -> FsResult<Vec<UfsObject>> {
        self.local.list(d)
    }
    fn stat(&self, p: &[u8]) -> FsResult<UfsObject> {
        self.local.stat(p)
    }
    fn read_range(
        &self,
        p: &[u8],
        v: Fingerprint,
        o: u64,
        l: u64,
        s: &mut dyn std::io::Write,
    ) -> FsResult<u64> {
        self.reads.lock().unwrap().push((o, l));
        if l <= self.held_after {
            return self.local.read_range(p, v, o, l, s);
        }
        let first = self.local.read_range(p, v, o, self.held_after, s)?;
        wait_open(&self.gate);
        if self.fail_once.swap(false, Ordering::SeqCst) {
            return Err(FsError::ufs("connection reset"));
        }
        Ok(first + self.local.read_range(p, v, o + first, l - first, s)?)
    }
    fn create_upload(&self, p: &[u8]) -> FsResult<Box<dyn granary_common::ufs::UfsUpload>> {
        Ok(Box::new(HeldUpload {
            inner: Some(self.local.create_upload(p)?),
            gate: self.gate.clone(),
            counts: self.uploads.clone(),
        }))
    }
}

struct Setup<U> {
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    addr: std::net::SocketAddr,
    ufs: Arc<U>,
    data: Vec<u8>,
    mtime_ns: i64,
    block_size: u64,
}

async fn setup() -> Setup<Counting> {
    setup_with(300_000, 128 * 1024, |local| {
        Counting(local, AtomicUsize::new(0))
    })
    .await
}

/// A worker serving a file `f.bin` of `len` bytes in blocks of `block_size`, from a
/// local UFS wrapped by `wrap`.
async fn setup_with<U: Ufs + 'static>(
    len: u32,
    block_size: u64,
    wrap: impl FnOnce(LocalUfs) -> U,
) -> Setup<U> {
    let ufs_dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4099) as u8).collect();
    std::fs::write(ufs_dir.path().join("f.bin"), &data).unwrap();
    let md = std::fs::metadata(ufs_dir.path().join("f.bin")).unwrap();
    let ufs = Arc::new(wrap(
        LocalUfs::open("file://test", ufs_dir.path().to_str().unwrap()).unwrap(),
    ));
    let mounts = Arc::new(MountRegistry::default());
    mounts.insert(0, 1, ufs.clone());
    let cache = tempfile::tempdir().unwrap();
    let (store, _) = BlockStore::open(cache.path(), 1 << 30, 0.9, 0.8).unwrap();
    let server = Arc::new(DataServer {
        fetcher: Arc::new(BlockFetcher::new(Arc::new(store), mounts)),
        worker_id: "w".into(),
        hostname: "h".into(),
        token: CheckToken::new(""),
        tls: None,
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server.serve(listener));
    Setup {
        _dirs: (ufs_dir, cache),
        addr,
        ufs,
        data,
        mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        block_size,
    }
}

fn connect(addr: std::net::SocketAddr, version: u32) -> (TcpStream, HelloReply) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&encode_header(&Hello {
        version,
        cluster_token: String::new(),
    }))
    .unwrap();
    let reply = read_header(&mut s).unwrap();
    (s, reply)
}

fn request<U>(s: &Setup<U>, index: u32, offset: u64, length: u64) -> ReadBlockRequest {
    ReadBlockRequest {
        request_id: 9,
        file_id: 5,
        index,
        mount_id: 1,
        ufs_path: b"f.bin".to_vec(),
        file_size: s.data.len() as u64,
        file_mtime_ns: s.mtime_ns,
        block_size: s.block_size,
        offset,
        length,
        local_path_only: false,
        cached_only: false,
    }
}

fn exchange(sock: &mut TcpStream, req: &ReadBlockRequest) -> (ReadBlockResponse, Vec<u8>) {
    let wrapped = DataRequest {
        op: Some(data_request::Op::Read(req.clone())),
    };
    sock.write_all(&encode_header(&wrapped)).unwrap();
    let resp: ReadBlockResponse = read_header(sock).unwrap();
    let mut payload = vec![
        0u8;
        if resp.status == 0 && resp.local_path.is_empty() {
            resp.length as usize
        } else {
            0
        }
    ];
    sock.read_exact(&mut payload).unwrap();
    (resp, payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_read_the_ufs_once() {
    let s = Arc::new(setup().await);
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let s = s.clone();
            tokio::task::spawn_blocking(move || {
                let (mut sock, hello) = connect(s.addr, DATA_PROTOCOL_VERSION);
                assert!(hello.ok);
                let (resp, bytes) = exchange(&mut sock, &request(&s, 1, i * 100, 1000));
                assert_eq!(resp.status, 0, "{}", resp.error);
                let start = 128 * 1024 + i as usize * 100;
                assert_eq!(bytes, s.data[start..start + 1000]);
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    assert_eq!(
        s.ufs.1.load(Ordering::SeqCst),
        1,
        "one UFS read for 16 concurrent misses"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_file_deleted_behind_the_worker_is_fetched_again() {
    let s = Arc::new(setup().await);
    let cache = s._dirs.1.path().to_path_buf();
    let s2 = s.clone();
    tokio::task::spawn_blocking(move || {
        let (mut sock, hello) = connect(s2.addr, DATA_PROTOCOL_VERSION);
        assert!(hello.ok);
        let (resp, bytes) = exchange(&mut sock, &request(&s2, 1, 0, 1000));
        assert_eq!(resp.status, 0, "{}", resp.error);
        assert_eq!(bytes, s2.data[128 * 1024..128 * 1024 + 1000]);
        for layout in ["files", "blocks"] {
            for shard in std::fs::read_dir(cache.join(layout)).unwrap() {
                for f in std::fs::read_dir(shard.unwrap().path()).unwrap() {
                    std::fs::remove_file(f.unwrap().path()).unwrap();
                }
            }
        }
        let (resp, bytes) = exchange(&mut sock, &request(&s2, 1, 10, 1000));
        assert_eq!(resp.status, 0, "{}", resp.error);
        assert_eq!(bytes, s2.data[128 * 1024 + 10..128 * 1024 + 1010]);
    })
    .await
    .unwrap();
    assert_eq!(s.ufs.1.load(Ordering::SeqCst), 2, "fetched again once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_and_bad_requests_never_take_the_server_down() {
    let s = setup().await;
    let addr = s.addr;
    let req_past_end = request(&s, 2, 40_000, 10_000);
    let req_escape = ReadBlockRequest {
        ufs_path: b"../etc/passwd".to_vec(),
        ..request(&s, 0, 0, 10)
    };
    let last = request(&s, 2, s.data.len() as u64 - 2 * 128 * 1024 - 10, 10);
    let data = s.data.clone();
    tokio::task::spawn_blocking(move || {
        // Garbage, an oversized header and a truncated frame: the connection closes.
        for junk in [
            &b"\xff\xff\xff\xffjunk"[..],
            &[0, 0, 0, 3, 1, 2][..],
            b"\x00\x00\x00\x05\x08\x96\x01\xff\xff",
        ] {
            let mut sock = TcpStream::connect(addr).unwrap();
            sock.write_all(junk).unwrap();
            sock.shutdown(std::net::Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            let _ = sock.read_to_end(&mut rest);
        }
        let (_, hello) = connect(addr, 99);
        assert!(!hello.ok && hello.error.contains("version"));

        let (mut sock, hello) = connect(addr, DATA_PROTOCOL_VERSION);
        assert!(hello.ok);
        let (resp, _) = exchange(&mut sock, &req_past_end);
        assert_eq!(resp.status, Status::BadRequest as i32, "{}", resp.error);
        let (resp, _) = exchange(&mut sock, &req_escape);
        assert_ne!(resp.status, Status::Ok as i32);
        // The same connection still serves a valid request.
        let (resp, bytes) = exchange(&mut sock, &last);
        assert_eq!(resp.status, 0, "{}", resp.error);
        assert_eq!(bytes, data[data.len() - 10..]);
    })
    .await
    .unwrap();
}

const MIB: u64 = 1 << 20;

/// An accepted connection whose reads give up after 20 s (a build that waits for
/// what a test holds back fails instead of hanging).
fn session(addr: std::net::SocketAddr) -> TcpStream {
    let (sock, hello) = connect(addr, DATA_PROTOCOL_VERSION);
    assert!(hello.ok, "{}", hello.error);
    sock.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    sock
}

fn short_circuit<U>(s: &Setup<U>, offset: u64, length: u64) -> ReadBlockRequest {
    ReadBlockRequest {
        local_path_only: true,
        ..request(s, 0, offset, length)
    }
}

/// A fill held after its first MiB: ranges within it are answered (over the data port
/// and to a short-circuit client alike), a range far past it is read from the UFS, and
/// the block is cached whole once the fill goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_range_is_served_before_its_block_is_cached() {
    let s = Arc::new(
        setup_with(6 * MIB as u32, 8 * MIB, |local| {
            Gated::new(local, MIB, false, false)
        })
        .await,
    );
    let s2 = s.clone();
    tokio::task::spawn_blocking(move || {
        let mut sock = session(s2.addr);
        let (resp, bytes) = exchange(&mut sock, &request(&s2, 0, 4096, 65536));
        assert_eq!(resp.status, 0, "{}", resp.error);
        assert_eq!(bytes, s2.data[4096..4096 + 65536]);

        let (resp, bytes) = exchange(&mut sock, &short_circuit(&s2, 100, 1000));
        assert_eq!((resp.status, resp.local_path.as_str()), (0, ""));
        assert_eq!(bytes, s2.data[100..1100]);

        let far = 5 * MIB + 512 * 1024;
        let (resp, bytes) = exchange(&mut sock, &request(&s2, 0, far, 4096));
        assert_eq!(resp.status, 0, "{}", resp.error);
        assert_eq!(bytes, s2.data[far as usize..far as usize + 4096]);
        assert!(s2.ufs.reads.lock().unwrap().contains(&(far, 4096)));

        s2.ufs.open();
        let (resp, _) = exchange(&mut sock, &short_circuit(&s2, 0, 0));
        assert_eq!(resp.status, 0, "{}", resp.error);
        let cached = std::fs::read(&resp.local_path).unwrap();
        let at = resp.local_offset as usize;
        assert_eq!(cached[at..at + 6 * MIB as usize], s2.data[..]);
        // Cached now: a short-circuit read of a range gets the cache file.
        let (resp, _) = exchange(&mut sock, &short_circuit(&s2, 100, 1000));
        assert!(!resp.local_path.is_empty());
    })
    .await
    .unwrap();
    assert_eq!(s.ufs.fills(), 1, "one fill for all readers of the block");
}

/// A fill of a shared data file failing after its first MiB: a range it had written
/// was served before, a reader waiting for a range past it gets the error, and the
/// next read fetches the block again (never the withdrawn bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fill_fails_its_readers_and_the_next_read_fetches_again() {
    let s = Arc::new(
        setup_with(10 * MIB as u32, 8 * MIB, |local| {
            Gated::new(local, MIB, false, true)
        })
        .await,
    );
    let at = 2 * MIB as usize;
    // This reader's request makes the fill, so it waits on that fill whatever the
    // timing.
    let waiting = {
        let s = s.clone();
        std::thread::spawn(move || {
            exchange(&mut session(s.addr), &request(&s, 0, at as u64, 4096)).0
        })
    };
    s.ufs.wait_for_fills(1).await;
    let s2 = s.clone();
    tokio::task::spawn_blocking(move || {
        let mut sock = session(s2.addr);
        let (resp, bytes) = exchange(&mut sock, &request(&s2, 0, 0, 4096));
        assert_eq!(resp.status, 0, "{}", resp.error);
        assert_eq!(bytes, s2.data[..4096]);
        s2.ufs.open();
        let resp = waiting.join().unwrap();
        assert_eq!(resp.status, Status::UfsError as i32, "{}", resp.error);
        for offset in [0, at] {
            let (resp, bytes) = exchange(&mut sock, &request(&s2, 0, offset as u64, 4096));
            assert_eq!(resp.status, 0, "{}", resp.error);
            assert_eq!(bytes, s2.data[offset..offset + 4096]);
        }
        let (resp, _) = exchange(&mut sock, &short_circuit(&s2, 0, 0));
        let cached = std::fs::read(&resp.local_path).unwrap();
        let from = resp.local_offset as usize;
        assert_eq!(
            cached[from..from + 8 * MIB as usize],
            s2.data[..8 * MIB as usize]
        );
    })
    .await
    .unwrap();
    assert_eq!(s.ufs.fills(), 2);
}

/// With every fill's turn taken by fills held by the UFS, a read of another cold
/// block is read from the UFS directly, and starts no fill of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_fill_waits_for_its_turn_is_read_from_the_ufs() {
    use crate::fetcher::MAX_RUNNING_FILLS;
    let block = 128 * 1024;
    let blocks = MAX_RUNNING_FILLS as u64 + 1;
    let s = Arc::new(
        setup_with((blocks * block) as u32, block, |local| {
            Gated::new(local, block / 2, false, false)
        })
        .await,
    );
    let held: Vec<_> = (0..MAX_RUNNING_FILLS as u32)
        .map(|i| {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut sock = session(s.addr);
                let (resp, bytes) = exchange(&mut sock, &request(&s, i, block - 1000, 1000));
                assert_eq!(resp.status, 0, "{}", resp.error);
                let at = (i as u64 * block + block - 1000) as usize;
                assert_eq!(bytes, s.data[at..at + 1000]);
            })
        })
        .collect();
    s.ufs.wait_for_fills(MAX_RUNNING_FILLS).await;
    let s2 = s.clone();
    tokio::task::spawn_blocking(move || {
        let mut sock = session(s2.addr);
        let last = MAX_RUNNING_FILLS as u32;
        let (resp, bytes) = exchange(&mut sock, &request(&s2, last, 0, 1000));
        assert_eq!(resp.status, 0, "{}", resp.error);
        let at = (last as u64 * block) as usize;
        assert_eq!(bytes, s2.data[at..at + 1000]);
        assert!(s2.ufs.reads.lock().unwrap().contains(&(at as u64, 1000)));
        s2.ufs.open();
    })
    .await
    .unwrap();
    for h in held {
        h.join().unwrap();
    }
    assert_eq!(
        s.ufs.fills(),
        MAX_RUNNING_FILLS,
        "no fill for the block read directly"
    );
}

/// A short-circuit read of a whole cold block (a small file read at once) waits for
/// the block and gets its cache file, not the bytes over the socket; a read of its
/// tail alone gets the bytes (here read directly: the fill is held far before it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_circuit_read_of_a_whole_cold_block_gets_the_cache_file() {
    let len = 6 * MIB;
    let s = Arc::new(
        setup_with(len as u32, 8 * MIB, |local| {
            Gated::new(local, MIB, false, false)
        })
        .await,
    );
    let s2 = s.clone();
    tokio::task::spawn_blocking(move || {
        let mut sock = session(s2.addr);
        let (resp, bytes) = exchange(&mut sock, &short_circuit(&s2, len - 8, 8));
        assert_eq!((resp.status, resp.local_path.as_str()), (0, ""));
        assert_eq!(bytes, s2.data[len as usize - 8..]);
        s2.ufs.open();
        let (resp, bytes) = exchange(&mut sock, &short_circuit(&s2, 0, len));
        assert_eq!(resp.status, 0, "{}", resp.error);
        assert!(bytes.is_empty() && !resp.local_path.is_empty());
        let cached = std::fs::read(&resp.local_path).unwrap();
        let at = resp.local_offset as usize;
        assert_eq!(cached[at..at + len as usize], s2.data[..]);
    })
    .await
    .unwrap();
}

/// An upload of [`Gated`].
struct HeldUpload {
    inner: Option<Box<dyn granary_common::ufs::UfsUpload>>,
    gate: Gate,
    counts: Arc<UploadCounts>,
}
impl Write for HeldUpload {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.inner.as_mut().unwrap().write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.as_mut().unwrap().flush()
    }
}
impl granary_common::ufs::UfsUpload for HeldUpload {
    fn store_written(&mut self) -> FsResult<()> {
        self.counts.storing.fetch_add(1, Ordering::SeqCst);
        wait_open(&self.gate);
        self.inner.as_mut().unwrap().store_written()
    }
    fn complete(mut self: Box<Self>, durable: bool) -> FsResult<UfsObject> {
        self.inner.take().unwrap().complete(durable)
    }
}
impl Drop for HeldUpload {
    fn drop(&mut self) {
        drop(self.inner.take());
        self.counts.ended.fetch_add(1, Ordering::SeqCst);
    }
}

/// Sends an upload of `payload` to `name` and returns the connection, answer unread.
fn send_upload(addr: std::net::SocketAddr, name: &str, payload: &[u8]) -> TcpStream {
    let (mut sock, hello) = connect(addr, DATA_PROTOCOL_VERSION);
    assert!(hello.ok);
    let req = WriteFileRequest {
        request_id: 1,
        file_id: 6,
        mount_id: 1,
        ufs_path: name.as_bytes().to_vec(),
        size: payload.len() as u64,
        block_size: 4096,
        durable: false,
    };
    let wrapped = DataRequest {
        op: Some(data_request::Op::Write(req)),
    };
    sock.write_all(&encode_header(&wrapped)).unwrap();
    sock.write_all(payload).unwrap();
    sock
}

/// Waits (20 s at most) until `cond` holds; fails with `what` then.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_whose_client_went_away_before_it_completed_is_not_published() {
    // No read is held.
    let s = setup_with(1000, 4096, |local| {
        Gated::new(local, u64::MAX, false, false)
    })
    .await;
    let counts = s.ufs.uploads.clone();
    let payload = vec![7u8; 10_000];
    // Every byte sent, then killed while the worker stores the last of them.
    let gone = send_upload(s.addr, "gone.bin", &payload);
    let waiting = send_upload(s.addr, "kept.bin", &payload);
    until("both uploads reach their last bytes", || {
        counts.storing.load(Ordering::SeqCst) == 2
    })
    .await;
    drop(gone);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    s.ufs.open();
    let mut waiting = waiting;
    let answer: WriteFileResponse =
        tokio::task::spawn_blocking(move || read_header(&mut waiting).unwrap())
            .await
            .unwrap();
    assert_eq!(answer.status, 0, "{}", answer.error);
    until("both uploads end", || {
        counts.ended.load(Ordering::SeqCst) == 2
    })
    .await;
    assert_eq!(s.ufs.local.stat(b"kept.bin").unwrap().size, 10_000);
    assert!(
        s.ufs.local.stat(b"gone.bin").is_err(),
        "published without its client"
    );
}
