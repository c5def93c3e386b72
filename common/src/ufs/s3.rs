//! An S3-compatible bucket as under-storage (`s3://bucket/prefix`), through `object_store`.
//! Directories are key prefixes (`/` delimited); `mkdir` leaves a hidden marker object
//! so an empty directory exists. A file's version is its size and its mtime, whose
//! sub-second part carries a hash of the ETag (S3 keeps whole seconds): an object
//! rewritten within a second still reads as changed. Files are written with multipart
//! uploads, visible only once complete. Renames are a copy and a delete per object: not
//! atomic, and a directory's take one round per object.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path;
use object_store::{GetOptions, GetRange, MultipartUpload, ObjectStore, PutPayload};
use serde::Deserialize;
use tokio::sync::Semaphore;

use super::{moved_away, Fingerprint, ObjectKind, Ufs, UfsObject, UfsUpload, UPLOAD_PREFIX};
use crate::bytesize::ByteSize;
use crate::error::{FsError, FsResult};
use crate::memory::MemoryLimiter;

/// The object that keeps an empty directory in existence (never listed).
pub const DIR_MARKER: &str = ".granary-dir";

/// How to reach S3: each unset key falls back to the standard AWS environment
/// (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_SESSION_TOKEN`, `AWS_PROFILE` with `~/.aws/credentials` and `~/.aws/config`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Options {
    /// Endpoint of an S3-compatible service (`http://minio:9000`); default: AWS.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    /// Profile in `~/.aws/credentials` and `~/.aws/config`.
    pub profile: Option<String>,
    /// `https://bucket.endpoint/` addressing (AWS's) instead of `https://endpoint/bucket/`
    /// (most S3-compatible services'); default: virtual-hosted on AWS, path style on a
    /// custom endpoint.
    pub virtual_hosted_style: Option<bool>,
    /// Requests in flight at once from this process.
    pub max_concurrent_requests: usize,
    /// Part size of multipart uploads (at least 5 MiB)...
    pub part_size: ByteSize,
    /// ...this many sent at once by one upload.
    pub upload_parts_in_flight: usize,
    /// A block missing from a worker's cache is read with ranged GETs of this size...
    pub read_part_size: ByteSize,
    /// ...this many at once (within `max_concurrent_requests`).
    pub read_parts_in_flight: usize,
    /// One request's timeout.
    pub request_timeout_ms: u64,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            profile: None,
            virtual_hosted_style: None,
            max_concurrent_requests: 32,
            part_size: ByteSize(16 << 20),
            upload_parts_in_flight: 4,
            read_part_size: ByteSize(8 << 20),
            read_parts_in_flight: 4,
            request_timeout_ms: 60_000,
        }
    }
}

impl S3Options {
    /// Refuses sizes and counts S3 or this client cannot work with, naming the key.
    pub fn check(&self) -> FsResult<()> {
        if !(5 << 20..=5 << 30).contains(&self.part_size.0) {
            return Err(FsError::InvalidArgument(format!(
                "[s3] part_size {}: S3 takes parts of 5MiB to 5GiB",
                self.part_size
            )));
        }
        if self.read_part_size.0 < 64 << 10 {
            return Err(FsError::InvalidArgument(format!(
                "[s3] read_part_size {}: at least 64KiB",
                self.read_part_size
            )));
        }
        for (key, n) in [
            ("read_parts_in_flight", self.read_parts_in_flight),
            ("upload_parts_in_flight", self.upload_parts_in_flight),
            ("max_concurrent_requests", self.max_concurrent_requests),
            ("request_timeout_ms", self.request_timeout_ms as usize),
        ] {
            if n == 0 {
                return Err(FsError::InvalidArgument(format!(
                    "[s3] {key} 0: at least 1"
                )));
            }
        }
        Ok(())
    }

    /// These options with the settings another process shared (see
    /// [`super::Ufs::shared_options`]) where these leave them unset.
    pub fn with_shared(&self, shared: &BTreeMap<String, String>) -> S3Options {
        let mut out = self.clone();
        let pick = |mine: &mut Option<String>, key: &str| {
            if mine.is_none() {
                *mine = shared.get(key).cloned();
            }
        };
        pick(&mut out.endpoint, "endpoint");
        pick(&mut out.region, "region");
        if out.virtual_hosted_style.is_none() {
            out.virtual_hosted_style = shared
                .get("virtual_hosted_style")
                .and_then(|v| v.parse().ok());
        }
        out
    }
}

/// `key = value` pairs of section `[section]` of an INI file (the AWS profile files).
fn ini_section(text: &str, section: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') && line.ends_with(']') {
            inside = line[1..line.len() - 1].trim() == section;
        } else if inside {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    out
}

/// A profile's settings from `~/.aws/credentials` and `~/.aws/config`.
fn profile_settings(profile: &str) -> Vec<(String, String)> {
    let Some(home) = std::env::var_os("HOME") else {
        return Vec::new();
    };
    let home = std::path::PathBuf::from(home);
    let read = |var: &str, default: &str| {
        let path = std::env::var_os(var)
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| home.join(default));
        std::fs::read_to_string(path).unwrap_or_default()
    };
    let mut settings = ini_section(
        &read("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials"),
        profile,
    );
    let config_section = match profile {
        "default" => "default".to_string(),
        p => format!("profile {p}"),
    };
    settings.extend(ini_section(
        &read("AWS_CONFIG_FILE", ".aws/config"),
        &config_section,
    ));
    settings
}

fn bad_uri(uri: &str, why: &str) -> FsError {
    FsError::InvalidArgument(format!("UFS URI `{uri}`: {why}"))
}

pub struct S3Ufs {
    uri: String,
    bucket: String,
    endpoint: String,
    region: String,
    virtual_hosted_style: bool,
    /// Key prefix of the UFS root ("" or "a/b").
    root: String,
    store: Arc<AmazonS3>,
    /// Runs the store's futures: callers are plain threads.
    rt: Option<tokio::runtime::Runtime>,
    requests: Arc<Semaphore>,
    part_size: usize,
    upload_parts_in_flight: usize,
    read_part_size: u64,
    read_parts_in_flight: usize,
    /// Bytes of parts fetched ahead of their readers, process-wide: parts stream in
    /// faster than a slow cache disk takes them. Up to `max_concurrent_requests` parts,
    /// beyond that only each reader's next one.
    read_memory: Arc<MemoryLimiter>,
    opened_ns: i64,
}

impl std::fmt::Debug for S3Ufs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Ufs").field("uri", &self.uri).finish()
    }
}

impl Drop for S3Ufs {
    /// Without waiting: the last reference may go inside another runtime, where a
    /// blocking shutdown panics.
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl S3Ufs {
    /// Opens `s3://bucket[/prefix]`; reaches nothing yet (see [`Ufs::check`]).
    pub fn open(uri: &str, opts: &S3Options) -> FsResult<Self> {
        opts.check()?;
        let rest = uri
            .strip_prefix("s3://")
            .ok_or_else(|| bad_uri(uri, "not s3://bucket/prefix"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad_uri(uri, "no bucket"));
        }
        let root = prefix.trim_matches('/').to_string();
        if !root.is_empty() {
            Path::parse(&root).map_err(|e| bad_uri(uri, &e.to_string()))?;
        }
        let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
        let profile = opts
            .profile
            .clone()
            .or_else(|| std::env::var("AWS_PROFILE").ok());
        if let Some(p) = &profile {
            for (k, v) in profile_settings(p) {
                let key = match k.as_str() {
                    "aws_access_key_id" => AmazonS3ConfigKey::AccessKeyId,
                    "aws_secret_access_key" => AmazonS3ConfigKey::SecretAccessKey,
                    "aws_session_token" => AmazonS3ConfigKey::Token,
                    "region" => AmazonS3ConfigKey::Region,
                    "endpoint_url" => AmazonS3ConfigKey::Endpoint,
                    _ => continue,
                };
                b = b.with_config(key, v);
            }
        }
        let set = |b: AmazonS3Builder, key, v: &Option<String>| match v {
            Some(v) => b.with_config(key, v),
            None => b,
        };
        b = set(b, AmazonS3ConfigKey::Endpoint, &opts.endpoint);
        b = set(b, AmazonS3ConfigKey::Region, &opts.region);
        b = set(b, AmazonS3ConfigKey::AccessKeyId, &opts.access_key_id);
        b = set(
            b,
            AmazonS3ConfigKey::SecretAccessKey,
            &opts.secret_access_key,
        );
        b = set(b, AmazonS3ConfigKey::Token, &opts.session_token);
        let endpoint = b
            .get_config_value(&AmazonS3ConfigKey::Endpoint)
            .unwrap_or_else(|| "AWS S3".into());
        let custom = endpoint != "AWS S3";
        if custom && !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(FsError::InvalidArgument(format!(
                "[s3] endpoint `{endpoint}` (or AWS_ENDPOINT_URL, or the profile's endpoint_url): \
                 needs its scheme, e.g. http://{endpoint}"
            )));
        }
        let virtual_hosted_style = opts.virtual_hosted_style.unwrap_or(!custom);
        b = b.with_virtual_hosted_style_request(virtual_hosted_style);
        let region = b
            .get_config_value(&AmazonS3ConfigKey::Region)
            .unwrap_or_else(|| "us-east-1".into());
        b = b.with_region(&region);
        b = b.with_client_options(
            object_store::ClientOptions::new()
                .with_timeout(Duration::from_millis(opts.request_timeout_ms))
                .with_connect_timeout(Duration::from_secs(5))
                .with_allow_http(endpoint.starts_with("http://")),
        );
        b = b.with_retry(object_store::RetryConfig {
            max_retries: 3,
            retry_timeout: Duration::from_secs(30),
            ..Default::default()
        });
        let store = b
            .build()
            .map_err(|e| bad_uri(uri, &format!("bucket {bucket} at {endpoint}: {e}")))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("granary-s3")
            .enable_all()
            .build()
            .map_err(|e| FsError::io(format!("S3 runtime: {e}")))?;
        Ok(S3Ufs {
            uri: uri.to_string(),
            bucket: bucket.to_string(),
            endpoint,
            region,
            virtual_hosted_style,
            root,
            store: Arc::new(store),
            rt: Some(rt),
            requests: Arc::new(Semaphore::new(opts.max_concurrent_requests)),
            part_size: opts.part_size.0 as usize,
            upload_parts_in_flight: opts.upload_parts_in_flight,
            read_part_size: opts.read_part_size.0,
            read_parts_in_flight: opts.read_parts_in_flight,
            read_memory: MemoryLimiter::new(
                opts.read_part_size.0 * opts.max_concurrent_requests as u64,
                "granary_s3_read_buffer_bytes",
            ),
            opened_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i64),
        })
    }

    /// Runs `f` on the store's runtime and waits for it, from any thread (a runtime's
    /// own threads included: this one is separate).
    fn run<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> FsResult<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        let requests = self.requests.clone();
        self.runtime().spawn(async move {
            let _turn = requests.acquire_owned().await;
            let _ = tx.send(f.await);
        });
        rx.recv().map_err(|_| FsError::io("the S3 runtime stopped"))
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.rt
            .as_ref()
            .expect("the runtime lives as long as the UFS")
    }

    /// The object key of a UFS path.
    fn key(&self, path: &[u8]) -> FsResult<Path> {
        let rel = std::str::from_utf8(path).map_err(|_| {
            FsError::InvalidArgument(format!(
                "{}: S3 keys are UTF-8",
                String::from_utf8_lossy(path)
            ))
        })?;
        let full = match (self.root.is_empty(), rel.is_empty()) {
            (true, _) => rel.to_string(),
            (false, true) => self.root.clone(),
            (false, false) => format!("{}/{rel}", self.root),
        };
        Path::parse(&full)
            .map_err(|e| FsError::InvalidArgument(format!("{full}: not an S3 key here: {e}")))
    }

    fn child_key(&self, dir: &Path, name: &str) -> FsResult<Path> {
        let full = match dir.as_ref() {
            "" => name.to_string(),
            d => format!("{d}/{name}"),
        };
        Path::parse(&full).map_err(|e| FsError::InvalidArgument(format!("{full}: {e}")))
    }

    /// Starts a ranged GET of `key`; its pieces arrive on the receiver. Dropping the
    /// receiver cancels it.
    fn spawn_part(
        &self,
        key: Path,
        range: std::ops::Range<u64>,
    ) -> tokio::sync::mpsc::UnboundedReceiver<Result<PartPiece, object_store::Error>> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (store, requests) = (self.store.clone(), self.requests.clone());
        self.runtime().spawn(async move {
            let get = async {
                let _turn = requests.acquire_owned().await;
                let opts = GetOptions {
                    range: Some(GetRange::Bounded(range)),
                    ..Default::default()
                };
                let got = match store.get_opts(&key, opts).await {
                    Ok(got) => got,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                if tx.send(Ok(PartPiece::Version(got.meta.clone()))).is_err() {
                    return;
                }
                let mut stream = got.into_stream();
                let mut gathered = bytes::BytesMut::new();
                while let Some(chunk) = stream.next().await {
                    match chunk {
                        Ok(chunk) => gathered.extend_from_slice(&chunk),
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                    if gathered.len() >= PIECE
                        && tx
                            .send(Ok(PartPiece::Bytes(gathered.split().freeze())))
                            .is_err()
                    {
                        return;
                    }
                }
                if !gathered.is_empty() {
                    let _ = tx.send(Ok(PartPiece::Bytes(gathered.freeze())));
                }
            };
            // A reader that stopped (an error, a stale version) cancels its parts
            // wherever they are: waiting for a turn, for an answer, or streaming.
            tokio::select! {
                _ = tx.closed() => {}
                _ = get => {}
            }
        });
        rx
    }

    /// What a store error means here, naming the bucket and endpoint.
    fn error(&self, what: &str, e: object_store::Error) -> FsError {
        let at = format!("s3://{} at {}", self.bucket, self.endpoint);
        match e {
            object_store::Error::NotFound { path, .. } => {
                FsError::NotFound(format!("{path} in {at}"))
            }
            object_store::Error::AlreadyExists { path, .. } => {
                FsError::Exists(format!("{path} in {at}"))
            }
            object_store::Error::PermissionDenied { path, source }
            | object_store::Error::Unauthenticated { path, source } => FsError::PermissionDenied(
                format!("{what} {path} in {at}: {source} (check the credentials)"),
            ),
            other => {
                let text = other.to_string();
                let refused = [
                    "InvalidAccessKeyId",
                    "SignatureDoesNotMatch",
                    "AccessDenied",
                    "403 Forbidden",
                ];
                if text.contains("NoSuchBucket") {
                    FsError::ufs_from(
                        format!(
                            "{what}: bucket {} does not exist at {}",
                            self.bucket, self.endpoint
                        ),
                        other,
                    )
                } else if refused.iter().any(|r| text.contains(r)) {
                    FsError::PermissionDenied(format!(
                        "{what} in {at}: refused (check the credentials): {}",
                        s3_code(&text)
                    ))
                } else {
                    FsError::ufs_from(format!("{what} in {at}: {text}"), other)
                }
            }
        }
    }

    fn file_object(name: Vec<u8>, meta: &object_store::ObjectMeta) -> UfsObject {
        UfsObject {
            name,
            kind: ObjectKind::File,
            size: meta.size,
            mtime_ns: version_stamp(meta),
            mode: 0o644,
            symlink_target: Vec::new(),
            owner: None,
        }
    }

    /// S3 keeps no directory times: directories show when this process opened the UFS.
    fn dir_object(&self, name: Vec<u8>) -> UfsObject {
        UfsObject {
            name,
            kind: ObjectKind::Directory,
            size: 0,
            mtime_ns: self.opened_ns,
            mode: 0o755,
            symlink_target: Vec::new(),
            owner: None,
        }
    }

    /// Every key under `prefix` (recursively).
    fn keys_under(&self, prefix: &Path) -> FsResult<Vec<Path>> {
        let store = self.store.clone();
        let listing = format!("listing {prefix}");
        let prefix = prefix.clone();
        self.run(async move {
            let mut listed = store.list(Some(&prefix));
            let mut keys = Vec::new();
            while let Some(m) = listed.next().await {
                keys.push(m?.location);
            }
            Ok(keys)
        })?
        .map_err(|e| self.error(&listing, e))
    }
}

/// The `<Code>` and `<Message>` of an S3 error body, else the whole text.
fn s3_code(text: &str) -> String {
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let start = text.find(&open)? + open.len();
        let len = text[start..].find(&format!("</{name}>"))?;
        Some(text[start..start + len].to_string())
    };
    match (tag("Code"), tag("Message")) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c,
        _ => text.to_string(),
    }
}

/// Seconds of the last modification, with a hash of the ETag as the nanoseconds: a
/// version stamp that changes with the content even within one second.
fn version_stamp(meta: &object_store::ObjectMeta) -> i64 {
    let secs = meta.last_modified.timestamp();
    let etag_hash = meta.e_tag.as_deref().map_or(0, |t| {
        t.bytes().fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        })
    });
    secs * 1_000_000_000 + (etag_hash % 1_000_000_000) as i64
}

/// `Stale` unless the object at `path` is now at `version` (a HEAD).
fn check_version(ufs: &Arc<S3Ufs>, path: &[u8], version: Fingerprint) -> FsResult<()> {
    match ufs.stat(path) {
        Ok(now) => version.check(path, now.size, now.mtime_ns),
        Err(FsError::NotFound(_)) => Err(moved_away(path)),
        Err(e) => Err(e),
    }
}

/// What a ranged GET hands the reader: the object's version as it was served, then its
/// bytes.
enum PartPiece {
    Version(object_store::ObjectMeta),
    Bytes(bytes::Bytes),
}

/// Bytes a part's stream gathers before handing them over.
const PIECE: usize = 1 << 20;

/// `len` bytes from `offset` in ranges of at most `part` bytes.
fn part_ranges(offset: u64, len: u64, part: u64) -> Vec<std::ops::Range<u64>> {
    let end = offset + len;
    (offset..end)
        .step_by(part.max(1) as usize)
        .map(|start| start..(start + part).min(end))
        .collect()
}

/// A file being written: parts of `part_size` go out as they fill, up to
/// `upload_parts_in_flight` at once, the rest at `complete`. Dropped without completing,
/// the upload is aborted.
struct S3Upload {
    ufs: Arc<S3Ufs>,
    key: Path,
    upload: Option<Box<dyn MultipartUpload>>,
    buffer: Vec<u8>,
    /// Parts on their way, oldest first: each answers once stored.
    sending: VecDeque<std::sync::mpsc::Receiver<Result<(), object_store::Error>>>,
}

impl S3Upload {
    fn send_part(&mut self) -> std::io::Result<()> {
        while self.sending.len() >= self.ufs.upload_parts_in_flight {
            self.wait_oldest()?;
        }
        let data = std::mem::take(&mut self.buffer);
        let part = self
            .upload
            .as_mut()
            .expect("an open upload")
            .put_part(PutPayload::from(data));
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let requests = self.ufs.requests.clone();
        self.ufs.runtime().spawn(async move {
            let _turn = requests.acquire_owned().await;
            let _ = tx.send(part.await);
        });
        self.sending.push_back(rx);
        Ok(())
    }

    /// Waits for the oldest part on its way; its error, if it failed.
    fn wait_oldest(&mut self) -> std::io::Result<()> {
        let Some(part) = self.sending.pop_front() else {
            return Ok(());
        };
        let stored = part
            .recv()
            .map_err(|_| std::io::Error::other("the S3 runtime stopped"))?;
        stored.map_err(|e| {
            std::io::Error::other(self.ufs.error(&format!("uploading {}", self.key), e))
        })
    }
}

impl Write for S3Upload {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(buf);
        if self.buffer.len() >= self.ufs.part_size {
            self.send_part()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl UfsUpload for S3Upload {
    /// The buffered bytes go as the last part (a part smaller than 5 MiB may only be
    /// the last).
    fn store_written(&mut self) -> FsResult<()> {
        if !self.buffer.is_empty() {
            self.send_part()?;
        }
        while !self.sending.is_empty() {
            self.wait_oldest()?;
        }
        Ok(())
    }

    fn complete(mut self: Box<Self>, _durable: bool) -> FsResult<UfsObject> {
        // An acknowledged S3 write is durable: nothing more for `durable`.
        self.store_written()?;
        let mut upload = self.upload.take().expect("an open upload");
        let store = self.ufs.store.clone();
        let key = self.key.clone();
        let meta = self
            .ufs
            .run(async move {
                if let Err(e) = upload.complete().await {
                    // Its parts would otherwise stay in the bucket (billed, unseen) until
                    // a lifecycle rule clears them.
                    let _ = upload.abort().await;
                    return Err(e);
                }
                store.head(&key).await
            })?
            .map_err(|e| {
                self.ufs
                    .error(&format!("completing the upload of {}", self.key), e)
            })?;
        let name = self.key.filename().unwrap_or_default().as_bytes().to_vec();
        Ok(S3Ufs::file_object(name, &meta))
    }
}

impl Drop for S3Upload {
    fn drop(&mut self) {
        // A part still being stored may outlive an abort sent before it ends, and stay
        // in the bucket.
        for part in self.sending.drain(..) {
            let _ = part.recv();
        }
        if let Some(mut upload) = self.upload.take() {
            let _ = self.ufs.run(async move { upload.abort().await });
        }
    }
}

impl Ufs for Arc<S3Ufs> {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn shared_options(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if self.endpoint.contains("://") {
            out.insert("endpoint".into(), self.endpoint.clone());
        }
        out.insert("region".into(), self.region.clone());
        out.insert(
            "virtual_hosted_style".into(),
            self.virtual_hosted_style.to_string(),
        );
        out
    }

    fn list(&self, dir: &[u8]) -> FsResult<Vec<UfsObject>> {
        let prefix = self.key(dir)?;
        let store = self.store.clone();
        let p = prefix.clone();
        let listed = self
            .run(async move { store.list_with_delimiter(Some(&p)).await })?
            .map_err(|e| self.error(&format!("listing {prefix}"), e))?;
        let mut out: std::collections::BTreeMap<Vec<u8>, UfsObject> = Default::default();
        for d in &listed.common_prefixes {
            if let Some(name) = d.filename() {
                out.insert(
                    name.as_bytes().to_vec(),
                    self.dir_object(name.as_bytes().to_vec()),
                );
            }
        }
        for o in &listed.objects {
            let Some(name) = o.location.filename() else {
                continue;
            };
            // The directory's own marker or key, uploads in progress: not entries. An
            // object named like a directory (a `dir/` key of another tool) is the directory.
            if name == DIR_MARKER
                || o.location == prefix
                || name.as_bytes().starts_with(UPLOAD_PREFIX)
                || out.contains_key(name.as_bytes())
            {
                continue;
            }
            out.insert(
                name.as_bytes().to_vec(),
                S3Ufs::file_object(name.as_bytes().to_vec(), o),
            );
        }
        if out.is_empty() && !dir.is_empty() {
            // An empty listing of a path that is neither a prefix nor a marker's: missing.
            self.stat(dir)?;
        }
        Ok(out.into_values().collect())
    }

    fn stat(&self, path: &[u8]) -> FsResult<UfsObject> {
        let name = path
            .rsplit(|&b| b == b'/')
            .next()
            .unwrap_or_default()
            .to_vec();
        if path.is_empty() {
            return Ok(self.dir_object(name));
        }
        let key = self.key(path)?;
        let store = self.store.clone();
        let k = key.clone();
        let head = self.run(async move { store.head(&k).await })?;
        match head {
            Ok(meta) => return Ok(S3Ufs::file_object(name, &meta)),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.error(&format!("stat {key}"), e)),
        }
        // A directory is a prefix with something under it.
        let store = self.store.clone();
        let k = key.clone();
        let any = self
            .run(async move { store.list(Some(&k)).next().await })?
            .transpose()
            .map_err(|e| self.error(&format!("stat {key}"), e))?;
        match any {
            Some(_) => Ok(self.dir_object(name)),
            None => Err(FsError::NotFound(format!(
                "{key} in s3://{} at {}",
                self.bucket, self.endpoint
            ))),
        }
    }

    fn read_ahead(&self) -> u64 {
        self.read_part_size
            .saturating_mul(self.read_parts_in_flight as u64)
    }

    fn read_range(
        &self,
        path: &[u8],
        version: Fingerprint,
        offset: u64,
        len: u64,
        sink: &mut dyn Write,
    ) -> FsResult<u64> {
        let key = self.key(path)?;
        // Past the end of this version there is nothing to ask for (a GET would fail).
        let len = len.min(version.size.saturating_sub(offset));
        if len == 0 {
            return check_version(self, path, version).map(|()| 0);
        }
        // Parts are fetched `read_parts_in_flight` at a time (one S3 stream is far slower
        // than the disk it fills) and copied out in order as they stream in, a MiB at a
        // time (a hand-over per network chunk costs a thread wake-up per few KiB).
        let mut ranges = part_ranges(offset, len, self.read_part_size)
            .into_iter()
            .peekable();
        let mut running = VecDeque::new();
        let mut copied = 0u64;
        loop {
            while running.len() < self.read_parts_in_flight {
                let Some(range) = ranges.peek() else { break };
                // The next part to copy always goes (a read must go on); the others
                // only while they fit.
                let want = range.end - range.start;
                let room = match running.is_empty() {
                    true => self.read_memory.reserve(want, want),
                    false => match self.read_memory.try_reserve(want) {
                        Some(room) => room,
                        None => break,
                    },
                };
                let range = ranges.next().expect("peeked");
                running.push_back((self.spawn_part(key.clone(), range), want, room));
            }
            let Some((mut part, want, _room)) = running.pop_front() else {
                return Ok(copied);
            };
            let mut got = 0u64;
            while let Some(piece) = part.blocking_recv() {
                match piece {
                    Ok(PartPiece::Version(meta)) => {
                        version.check(path, meta.size, version_stamp(&meta))?
                    }
                    Ok(PartPiece::Bytes(bytes)) => {
                        sink.write_all(&bytes)?;
                        got += bytes.len() as u64;
                    }
                    Err(object_store::Error::NotFound { .. }) => return Err(moved_away(path)),
                    // A range past the end of a file that shrank (416): say that. Any
                    // other error as it is: a HEAD of a store that stopped answering
                    // would only wait as long again.
                    Err(e) if e.to_string().contains("416 Range Not Satisfiable") => {
                        drop(running);
                        let e = self.error(&format!("reading {key}"), e);
                        return Err(match check_version(self, path, version) {
                            Err(stale @ FsError::Stale(_)) => stale,
                            _ => e,
                        });
                    }
                    Err(e) => return Err(self.error(&format!("reading {key}"), e)),
                }
            }
            if got != want {
                return Err(FsError::ufs(format!(
                    "reading {key}: {got} of a part's {want} bytes came in s3://{} at {}",
                    self.bucket, self.endpoint
                )));
            }
            copied += got;
        }
    }

    fn create_upload(&self, path: &[u8]) -> FsResult<Box<dyn UfsUpload>> {
        let key = self.key(path)?;
        let store = self.store.clone();
        let k = key.clone();
        let upload = self
            .run(async move { store.put_multipart(&k).await })?
            .map_err(|e| self.error(&format!("starting an upload of {key}"), e))?;
        Ok(Box::new(S3Upload {
            ufs: self.clone(),
            key,
            upload: Some(upload),
            buffer: Vec::new(),
            sending: VecDeque::new(),
        }))
    }

    fn mkdir(&self, path: &[u8]) -> FsResult<UfsObject> {
        if self.stat(path).is_ok() {
            return Err(FsError::Exists(String::from_utf8_lossy(path).into_owned()));
        }
        let dir = self.key(path)?;
        let marker = self.child_key(&dir, DIR_MARKER)?;
        let store = self.store.clone();
        self.run(async move { store.put(&marker, PutPayload::new()).await })?
            .map_err(|e| self.error(&format!("mkdir {dir}"), e))?;
        self.stat(path)
    }

    fn symlink(&self, _target: &[u8], path: &[u8]) -> FsResult<UfsObject> {
        Err(FsError::Unsupported(format!(
            "{}: S3 has no symbolic links",
            String::from_utf8_lossy(path)
        )))
    }

    fn remove(&self, path: &[u8], directory: bool) -> FsResult<()> {
        let key = self.key(path)?;
        let found = self.stat(path)?;
        match (directory, found.kind) {
            (false, ObjectKind::Directory) => {
                return Err(FsError::IsDir(String::from_utf8_lossy(path).into_owned()))
            }
            (true, ObjectKind::File) => {
                return Err(FsError::NotDir(String::from_utf8_lossy(path).into_owned()))
            }
            _ => {}
        }
        let doomed = if directory {
            let under = self.keys_under(&key)?;
            let marker = self.child_key(&key, DIR_MARKER)?;
            if under.iter().any(|k| *k != marker) {
                return Err(FsError::NotEmpty(
                    String::from_utf8_lossy(path).into_owned(),
                ));
            }
            under
        } else {
            vec![key]
        };
        for k in doomed {
            let store = self.store.clone();
            let removing = format!("removing {k}");
            self.run(async move { store.delete(&k).await })?
                .map_err(|e| self.error(&removing, e))?;
        }
        Ok(())
    }

    /// Copy then delete, object by object: not atomic (a crash midway leaves both names).
    fn rename(&self, from: &[u8], to: &[u8]) -> FsResult<()> {
        let (src, dst) = (self.key(from)?, self.key(to)?);
        let found = self.stat(from)?;
        let moves: Vec<(Path, Path)> = match found.kind {
            ObjectKind::Directory => {
                if let Ok(target) = self.stat(to) {
                    if target.kind != ObjectKind::Directory {
                        return Err(FsError::NotDir(String::from_utf8_lossy(to).into_owned()));
                    }
                    if !self.list(to)?.is_empty() {
                        return Err(FsError::NotEmpty(String::from_utf8_lossy(to).into_owned()));
                    }
                }
                let strip = src.as_ref().len();
                self.keys_under(&src)?
                    .into_iter()
                    .map(|k| {
                        let tail = k.as_ref()[strip..].trim_start_matches('/').to_string();
                        let to = self.child_key(&dst, &tail)?;
                        Ok((k, to))
                    })
                    .collect::<FsResult<_>>()?
            }
            _ => {
                if let Ok(target) = self.stat(to) {
                    if target.kind == ObjectKind::Directory {
                        return Err(FsError::IsDir(String::from_utf8_lossy(to).into_owned()));
                    }
                }
                vec![(src, dst)]
            }
        };
        for (a, b) in moves {
            let store = self.store.clone();
            let renaming = format!("renaming {a} to {b}");
            self.run(async move {
                store.copy(&a, &b).await?;
                store.delete(&a).await
            })?
            .map_err(|e| self.error(&renaming, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_come_from_the_aws_files() {
        let text = "[default]\naws_access_key_id = A\n[other]\naws_access_key_id=B\nregion = eu\n";
        assert_eq!(
            ini_section(text, "default"),
            vec![("aws_access_key_id".into(), "A".into())]
        );
        assert_eq!(ini_section(text, "other").len(), 2);
        assert!(ini_section(text, "missing").is_empty());
    }

    #[test]
    fn uris_name_a_bucket_and_a_prefix() {
        let opts = S3Options {
            endpoint: Some("http://127.0.0.1:9".into()),
            access_key_id: Some("a".into()),
            secret_access_key: Some("b".into()),
            ..Default::default()
        };
        let u = S3Ufs::open("s3://data/sets/imagenet/", &opts).unwrap();
        assert_eq!(
            (u.bucket.as_str(), u.root.as_str()),
            ("data", "sets/imagenet")
        );
        assert_eq!(
            u.key(b"train/x.jpg").unwrap().as_ref(),
            "sets/imagenet/train/x.jpg"
        );
        assert_eq!(u.key(b"").unwrap().as_ref(), "sets/imagenet");
        assert!(S3Ufs::open("s3:///x", &opts).is_err());
        assert!(S3Ufs::open("s3://b/a/../c", &opts).is_err());
    }

    #[test]
    fn bad_options_name_their_key() {
        let opts = S3Options {
            endpoint: Some("127.0.0.1:9".into()),
            ..Default::default()
        };
        let e = S3Ufs::open("s3://data", &opts).err().unwrap().to_string();
        assert!(
            e.contains("endpoint") && e.contains("http://127.0.0.1:9"),
            "{e}"
        );
        let wrong = [
            (
                S3Options {
                    part_size: ByteSize(1 << 20),
                    ..Default::default()
                },
                "part_size 1.0MiB",
            ),
            (
                S3Options {
                    read_part_size: ByteSize(4 << 10),
                    ..Default::default()
                },
                "read_part_size 4.0KiB",
            ),
            (
                S3Options {
                    read_parts_in_flight: 0,
                    ..Default::default()
                },
                "read_parts_in_flight",
            ),
            (
                S3Options {
                    upload_parts_in_flight: 0,
                    ..Default::default()
                },
                "upload_parts_in_flight",
            ),
            (
                S3Options {
                    request_timeout_ms: 0,
                    ..Default::default()
                },
                "request_timeout_ms 0",
            ),
        ];
        for (opts, key) in wrong {
            let opts = S3Options {
                endpoint: Some("https://s3.example.com".into()),
                ..opts
            };
            let e = S3Ufs::open("s3://data", &opts).err().unwrap().to_string();
            assert!(e.contains(key), "{e}");
        }
    }

    #[test]
    fn a_range_splits_into_parts_that_cover_it_exactly() {
        assert_eq!(part_ranges(10, 25, 10), vec![10..20, 20..30, 30..35]);
        assert_eq!(part_ranges(0, 20, 10), vec![0..10, 10..20]);
        assert_eq!(part_ranges(5, 3, 10), vec![5..8]);
    }
}
