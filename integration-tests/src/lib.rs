//! Test harness for whole-cluster tests: starts real `granary-master`, `granary-worker` and
//! `granary-fuse` processes on free 127.0.0.1 ports with fresh temp directories, and
//! guarantees that every process is killed and every mount is unmounted when the guard
//! drops, also when a test fails.

pub mod posix;
pub mod s3;

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Path of a workspace binary: next to the running executable (a release build running
/// `granary bench`) or one level up (a test in `target/<profile>/deps`). `cargo build
/// --workspace --bins` must have run.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let here = exe.parent().expect("exe dir");
    for dir in [here, here.parent().unwrap_or(here)] {
        let path = dir.join(name);
        if path.exists() {
            return path;
        }
    }
    panic!(
        "{name} is missing next to {}: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        exe.display()
    );
}

/// A port for a process to listen on. Drawn below the kernel's ephemeral range: a port
/// from that range can be taken by any outgoing connection (another test's gRPC client)
/// between this call and the process binding it, and the process we wait for would then
/// be someone else. Reserved for the rest of this process: tests run as processes of
/// their own, and two drawing the same free port before either bound it made one fail
/// with "Address already in use".
pub fn free_port() -> u16 {
    use rand::Rng;
    let mut rng = rand::rng();
    loop {
        let port = rng.random_range(20_000..32_000);
        if reserve_port(port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Takes `port`'s lock file under the temp directory, held until this process exits
/// (the kernel drops the lock then, however it ends). False if another process holds it.
fn reserve_port(port: u16) -> bool {
    use std::os::fd::AsRawFd;
    static HELD: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("granary-test-ports");
    let file = std::fs::create_dir_all(&dir).and_then(|_| {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
    });
    let Ok(file) = file else {
        // No place for locks: the bind check alone.
        return true;
    };
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return false;
    }
    HELD.lock().expect("held ports").push(file);
    true
}

/// close(2) with its result: dropping a `File` ignores it, and on Granary the close is
/// where written data is uploaded and committed.
pub fn close(f: std::fs::File) -> std::io::Result<()> {
    use std::os::fd::IntoRawFd;
    // SAFETY: the descriptor is ours and closed exactly once.
    if unsafe { libc::close(f.into_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn cpu_set(cores: &[usize]) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cores {
        // SAFETY: CPU_SET bounds-checks against the set's size.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    set
}

/// The cores this thread may run on (a container's cpuset may not start at 0).
pub fn allowed_cores() -> anyhow::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid cpu_set_t of the size passed.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    anyhow::ensure!(
        rc == 0,
        "sched_getaffinity: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: CPU_ISSET bounds-checks against the set's size.
    Ok((0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// Confines the calling thread to the cores in `set`. Only a syscall: also safe between
/// fork and exec.
fn set_affinity(set: &libc::cpu_set_t) -> std::io::Result<()> {
    // SAFETY: a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Confines the calling thread, and every thread and process it starts afterwards, to
/// `cores`.
pub fn pin_to_cores(cores: &[usize]) -> anyhow::Result<()> {
    set_affinity(&cpu_set(cores)).with_context(|| format!("sched_setaffinity({cores:?})"))
}

pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// A child process killed (SIGKILL) on drop; its stderr goes to a log file.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> anyhow::Result<Proc> {
        let f = std::fs::File::create(&log)?;
        cmd.stdout(Stdio::null()).stderr(f).stdin(Stdio::null());
        // The binaries' own default filter unless the test run sets one.
        if let Ok(filter) = std::env::var("RUST_LOG") {
            cmd.env("RUST_LOG", filter);
        }
        let child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal (e.g. SIGTERM for a clean stop).
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill() on our own child's pid.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// Waits for exit up to `timeout`; returns the exit status if it exited.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        // Reaped already (or never started): nothing to wait for.
        while let Some(c) = self.child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                return Some(st);
            }
            if start.elapsed() >= timeout {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a command to completion; returns (exit code, stderr).
pub fn run_to_exit(mut cmd: Command, timeout: Duration) -> anyhow::Result<(i32, String)> {
    let dir = tempfile::tempdir()?;
    let mut p = Proc::spawn(
        "cmd",
        std::mem::replace(&mut cmd, Command::new("true")),
        dir.path().join("log"),
    )?;
    let st = p
        .wait_exit(timeout)
        .context("command did not exit in time")?;
    Ok((st.code().unwrap_or(-1), p.log_text()))
}

/// The names in `dir`, sorted.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

pub fn is_mounted(path: &Path) -> bool {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(path.to_str().unwrap_or("")))
}

/// Unmounts whatever is at `path`: fusermount3, then a lazy umount.
pub fn force_unmount(path: &Path) {
    if !is_mounted(path) {
        return;
    }
    let _ = Command::new("fusermount3")
        .arg("-u")
        .arg(path)
        .stderr(Stdio::null())
        .status();
    if is_mounted(path) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(path)
            .stderr(Stdio::null())
            .status();
    }
}

/// Fetches `/metrics` and returns the value of a counter (0 if never incremented).
pub fn scrape_counter(port: u16, name: &str) -> anyhow::Result<f64> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    std::io::Write::write_all(
        &mut s,
        b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

pub struct MasterSpec {
    /// A directory, or a UFS URI (`s3://bucket/prefix`).
    pub ufs: PathBuf,
    pub block_size: &'static str,
    /// Members of the Raft group (ids 1..=masters).
    pub masters: u64,
    pub cluster_token: String,
    /// The masters' `peer_token` (empty: they use the cluster token).
    pub peer_token: String,
    pub snapshot_threshold: u64,
    /// The masters' `metadata_sync_interval`.
    pub metadata_sync_interval: &'static str,
    /// When not empty, master `id` runs on the cores `master_cores[id - 1]`. Benchmarks use
    /// it to stand in for masters on separate machines.
    pub master_cores: Vec<Vec<usize>>,
    /// The metadata shard this group serves, and (for a shard other than 0) where it gets
    /// the routing table.
    pub shard_id: u16,
    pub routing: Vec<String>,
    /// The masters' `store_cache` (their page cache).
    pub store_cache: String,
    /// Start a worker with the group (a shard's group other than 0's needs none: workers
    /// follow the routing table to it).
    pub worker: bool,
    /// TOML tables appended to every master's and worker's config (`[s3]`).
    pub tables: String,
    /// Masters serve Prometheus metrics (see [`Cluster::master_counter`]).
    pub master_metrics: bool,
}

impl Default for MasterSpec {
    fn default() -> Self {
        MasterSpec {
            ufs: PathBuf::new(),
            block_size: "64KiB",
            masters: 1,
            cluster_token: String::new(),
            peer_token: String::new(),
            snapshot_threshold: 10_000,
            metadata_sync_interval: "never",
            master_cores: Vec::new(),
            shard_id: 0,
            routing: Vec::new(),
            store_cache: "1GiB".into(),
            master_metrics: false,
            worker: true,
            tables: String::new(),
        }
    }
}

/// One master process slot; `proc` is None while it is down.
pub struct MasterProc {
    pub proc: Option<Proc>,
    pub port: u16,
    /// Its Prometheus port, with `MasterSpec::master_metrics`.
    pub metrics_port: Option<u16>,
}

/// A master group, a worker and their directories.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub spec: MasterSpec,
    pub masters: std::collections::BTreeMap<u64, MasterProc>,
    /// The initial members, as written into every master's config.
    initial: Vec<u64>,
    pub worker: Option<Proc>,
    pub worker_metrics_port: u16,
    worker_data_port: u16,
    rt: std::sync::Arc<tokio::runtime::Runtime>,
}

type Authenticated =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, TokenHeader>;
/// A client of a master's `Namespace` service.
pub type Client = granary_protos::v1::namespace_client::NamespaceClient<Authenticated>;
/// A client of a master's `Admin` service.
pub type AdminClient = granary_protos::v1::admin_client::AdminClient<Authenticated>;
/// A client of a master's (or a router's) `Routing` service.
pub type RoutingClient = granary_protos::v1::routing_client::RoutingClient<Authenticated>;

/// Adds the cluster token to test clients' calls.
#[derive(Clone)]
pub struct TokenHeader(pub String);

impl tonic::service::Interceptor for TokenHeader {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if !self.0.is_empty() {
            req.metadata_mut()
                .insert("x-granary-token", self.0.parse().expect("ascii token"));
        }
        Ok(req)
    }
}

fn toml_list(addrs: &[String]) -> String {
    addrs
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Cluster {
    pub fn start(spec: &MasterSpec) -> anyhow::Result<Cluster> {
        let spec = MasterSpec {
            ufs: spec.ufs.clone(),
            cluster_token: spec.cluster_token.clone(),
            peer_token: spec.peer_token.clone(),
            master_cores: spec.master_cores.clone(),
            routing: spec.routing.clone(),
            store_cache: spec.store_cache.clone(),
            tables: spec.tables.clone(),
            ..*spec
        };
        let dir = tempfile::tempdir()?;
        let initial: Vec<u64> = (1..=spec.masters).collect();
        let masters = initial
            .iter()
            .map(|&id| {
                (
                    id,
                    MasterProc {
                        proc: None,
                        port: free_port(),
                        metrics_port: spec.master_metrics.then(free_port),
                    },
                )
            })
            .collect();
        let mut c = Cluster {
            dir,
            spec,
            masters,
            initial,
            worker: None,
            worker_metrics_port: 0,
            worker_data_port: free_port(),
            // Multi-threaded so several threads can call through it at once.
            rt: std::sync::Arc::new(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()?,
            ),
        };
        for id in c.initial.clone() {
            c.start_master(id)?;
        }
        c.leader(Duration::from_secs(20))?;
        if c.spec.worker {
            c.start_worker("1GiB")?;
        }
        Ok(c)
    }

    /// Starts `binary --config cfg`, logging to a fresh file named after `name`, on the
    /// given cores if any.
    fn spawn(
        &self,
        binary: &str,
        name: &str,
        cfg: &Path,
        cores: Option<Vec<usize>>,
    ) -> anyhow::Result<Proc> {
        let mut cmd = Command::new(bin(binary));
        cmd.arg("--config").arg(cfg);
        if let Some(cores) = cores {
            use std::os::unix::process::CommandExt;
            let set = cpu_set(&cores);
            // SAFETY: set_affinity makes one syscall and allocates nothing.
            unsafe {
                cmd.pre_exec(move || set_affinity(&set));
            }
        }
        let n = std::fs::read_dir(self.dir.path())?.count();
        Proc::spawn(name, cmd, self.dir.path().join(format!("{name}-{n}.log")))
    }

    pub fn master_addr(&self) -> String {
        self.master_addrs()[0].clone()
    }

    pub fn addr_of(&self, id: u64) -> String {
        format!("127.0.0.1:{}", self.masters[&id].port)
    }

    /// Addresses of every master slot, running or not.
    pub fn master_addrs(&self) -> Vec<String> {
        self.masters.keys().map(|&id| self.addr_of(id)).collect()
    }

    /// (Re)starts master `id` with its data directory. A slot not among the initial
    /// members (or after a wipe) starts in join mode.
    pub fn start_master(&mut self, id: u64) -> anyhow::Result<()> {
        let port = self
            .masters
            .entry(id)
            .or_insert(MasterProc {
                proc: None,
                port: free_port(),
                metrics_port: self.spec.master_metrics.then(free_port),
            })
            .port;
        let metrics = match self.masters[&id].metrics_port {
            Some(p) => format!("metrics_listen = \"127.0.0.1:{p}\"\n"),
            None => String::new(),
        };
        let data = self.dir.path().join(format!("master-{id}"));
        let join = !self.initial.contains(&id)
            || self.dir.path().join(format!("master-{id}.wiped")).exists();
        let members: Vec<String> = self
            .initial
            .iter()
            .map(|&i| format!("{i}@{}", self.addr_of(i)))
            .collect();
        let cfg = self.dir.path().join(format!("master-{id}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "id = {id}\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nufs = \"{}\"\nblock_size = \"{}\"\nmembers = [{}]\njoin = {join}\ncluster_token = \"{}\"\npeer_token = \"{}\"\nsnapshot_threshold = {}\nworker_heartbeat_ms = 200\nworker_timeout_ms = 3000\nmetadata_sync_interval = \"{}\"\nshard_id = {}\nrouting = [{}]\nstore_cache = \"{}\"\n{metrics}{}",
                data.display(),
                self.spec.ufs.display(),
                self.spec.block_size,
                toml_list(&members),
                self.spec.cluster_token,
                self.spec.peer_token,
                self.spec.snapshot_threshold,
                self.spec.metadata_sync_interval,
                self.spec.shard_id,
                toml_list(&self.spec.routing),
                self.spec.store_cache,
                self.spec.tables,
            ),
        )?;
        let cores = self.spec.master_cores.get(id as usize - 1).cloned();
        let proc = self.spawn("granary-master", &format!("master-{id}"), &cfg, cores)?;
        wait_until("master port", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .with_context(|| proc.log_text())?;
        self.masters.get_mut(&id).expect("slot").proc = Some(proc);
        // The port answering must be this master, not another process that took it. It
        // binds the port before it opens its log (a repair after a kill takes a while),
        // so ask until something answers.
        let mut who = None;
        wait_until("the master to answer", Duration::from_secs(30), || {
            who = self.quorum_info(id).ok().map(|q| q.id);
            who.is_some()
        })
        .with_context(|| format!("port {port} of master {id}"))?;
        anyhow::ensure!(
            who == Some(id),
            "port {port} of master {id} is answered by {who:?}"
        );
        Ok(())
    }

    pub fn kill_master(&mut self, id: u64) {
        if let Some(mut p) = self.masters.get_mut(&id).and_then(|m| m.proc.take()) {
            p.kill();
        }
    }

    /// Sends a signal (SIGSTOP/SIGCONT) to a running master.
    pub fn signal_master(&self, id: u64, sig: i32) {
        if let Some(p) = self.masters.get(&id).and_then(|m| m.proc.as_ref()) {
            p.signal(sig);
        }
    }

    /// Deletes a stopped master's data; it rejoins in join mode when started again.
    pub fn wipe_master(&mut self, id: u64) -> anyhow::Result<()> {
        self.kill_master(id);
        let _ = std::fs::remove_dir_all(self.dir.path().join(format!("master-{id}")));
        std::fs::write(self.dir.path().join(format!("master-{id}.wiped")), b"")?;
        Ok(())
    }

    pub fn client(&self, addr: &str) -> anyhow::Result<Client> {
        self.client_on(addr, &self.rt)
    }

    /// A client for membership changes: the leader answers one only once it is done (a
    /// new member caught up and promoted takes up to a minute and more). A shorter
    /// timeout would give up on a change that then completes, and every retry would
    /// fail ("already a member").
    pub fn admin_client(&self, addr: &str) -> anyhow::Result<AdminClient> {
        Ok(AdminClient::new(self.channel(
            addr,
            &self.rt,
            Duration::from_secs(90),
        )?))
    }

    /// [`Self::on_leader`] for an admin `call` (a membership change), for a minute.
    pub fn admin_on_leader<T, F, Fut>(&self, call: F) -> anyhow::Result<T>
    where
        F: Fn(AdminClient) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.on_leader_with(Duration::from_secs(60), |a| self.admin_client(a), call)
    }

    /// Starts master `id` (joining the group) and adds it to the group as a member.
    pub fn add_master(&mut self, id: u64) -> anyhow::Result<()> {
        self.start_master(id)?;
        let addr = self.addr_of(id);
        self.admin_on_leader(|mut cl| {
            let addr = addr.clone();
            async move {
                cl.add_member(granary_protos::v1::AddMemberRequest { id, addr })
                    .await
            }
        })?;
        Ok(())
    }

    /// A client whose connection is driven by `rt` (the harness's own runtime has one
    /// thread, too few for a load generator).
    pub fn client_on(&self, addr: &str, rt: &tokio::runtime::Runtime) -> anyhow::Result<Client> {
        Ok(Client::new(self.channel(
            addr,
            rt,
            Duration::from_secs(5),
        )?))
    }

    fn channel(
        &self,
        addr: &str,
        rt: &tokio::runtime::Runtime,
        timeout: Duration,
    ) -> anyhow::Result<Authenticated> {
        let _g = rt.enter();
        // TLS when the test installed client settings (granary_common::tls).
        let ch = granary_common::net::endpoint(addr, Duration::from_millis(500))?
            .timeout(timeout)
            .connect_lazy();
        Ok(Authenticated::new(
            ch,
            TokenHeader(self.spec.cluster_token.clone()),
        ))
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Quorum info as master `id` sees it.
    pub fn quorum_info(&self, id: u64) -> anyhow::Result<granary_protos::v1::QuorumInfoReply> {
        let mut c =
            AdminClient::new(self.channel(&self.addr_of(id), &self.rt, Duration::from_secs(5))?);
        Ok(self
            .rt
            .block_on(c.quorum_info(granary_protos::v1::QuorumInfoRequest {}))?
            .into_inner())
    }

    /// The id of the running master that says it leads (waits up to `timeout`).
    pub fn leader(&self, timeout: Duration) -> anyhow::Result<u64> {
        let mut found = None;
        wait_until("a leader", timeout, || {
            found = self
                .masters
                .iter()
                .filter(|(_, m)| m.proc.is_some())
                .find_map(|(&id, _)| {
                    self.quorum_info(id)
                        .ok()
                        .filter(|q| q.role == "leader")
                        .map(|_| id)
                });
            found.is_some()
        })?;
        Ok(found.expect("found"))
    }

    /// Runs `call` on the leader, following leader changes until `timeout`.
    pub fn on_leader<T, F, Fut>(&self, timeout: Duration, call: F) -> anyhow::Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.on_leader_with(timeout, |a| self.client(a), call)
    }

    /// [`Self::on_leader`] with a client of any service, made by `client`.
    fn on_leader_with<C, T, F, Fut>(
        &self,
        timeout: Duration,
        client: impl Fn(&str) -> anyhow::Result<C>,
        call: F,
    ) -> anyhow::Result<T>
    where
        F: Fn(C) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let start = Instant::now();
        loop {
            let last = match self.leader(
                timeout
                    .saturating_sub(start.elapsed())
                    .max(Duration::from_millis(100)),
            ) {
                Ok(id) => match self.rt.block_on(call(client(&self.addr_of(id))?)) {
                    Ok(r) => return Ok(r.into_inner()),
                    // An answer, not a failure to reach the leader: the caller reads its code.
                    Err(s)
                        if s.code() == tonic::Code::AlreadyExists
                            || s.code() == tonic::Code::NotFound =>
                    {
                        return Err(s.into());
                    }
                    Err(s) => s.message().to_string(),
                },
                Err(e) => e.to_string(),
            };
            if start.elapsed() > timeout {
                bail!("no leader answered within {timeout:?}: {last}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A client for creates that needs no access to the cluster (usable while another
    /// thread kills and restarts masters).
    pub fn writer(&self) -> Writer {
        Writer {
            addrs: self.master_addrs(),
            token: self.spec.cluster_token.clone(),
            rt: self.rt.clone(),
        }
    }

    /// Creates `/name` through the leader; Ok once acknowledged.
    pub fn create(&self, name: &str) -> anyhow::Result<()> {
        self.writer().create(name, Duration::from_secs(30))
    }

    /// Whether `/name` exists, asked of the leader.
    pub fn exists(&self, name: &str) -> anyhow::Result<bool> {
        let req = granary_protos::v1::LookupRequest {
            parent: 1,
            name: name.as_bytes().to_vec(),
        };
        match self.on_leader(Duration::from_secs(30), |mut c| {
            let req = req.clone();
            async move { c.lookup(req).await }
        }) {
            Ok(_) => Ok(true),
            Err(e)
                if e.downcast_ref::<tonic::Status>()
                    .is_some_and(|s| s.code() == tonic::Code::NotFound) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// (Re)starts the worker with the same cache directory and the given capacity.
    pub fn start_worker(&mut self, capacity: &str) -> anyhow::Result<()> {
        self.kill_worker();
        self.worker_metrics_port = free_port();
        let cfg = self.dir.path().join("worker.toml");
        std::fs::write(
            &cfg,
            format!(
                "masters = [{}]\ncluster_token = \"{}\"\ndata_listen = \"127.0.0.1:{}\"\ncache_dir = \"{}\"\ncapacity = \"{capacity}\"\nmetrics_listen = \"127.0.0.1:{}\"\n{}",
                toml_list(&self.master_addrs()),
                self.spec.cluster_token,
                self.worker_data_port,
                self.dir.path().join("cache").display(),
                self.worker_metrics_port,
                self.spec.tables,
            ),
        )?;
        let worker = self.spawn("granary-worker", "worker", &cfg, None)?;
        let id_path = self.dir.path().join("cache/worker_id");
        wait_until(
            "worker registration with the leader",
            Duration::from_secs(20),
            || {
                let Ok(id) = std::fs::read_to_string(&id_path) else {
                    return false;
                };
                // After a restart the id file and the leader's list (until the old
                // registration expires) predate this process: its own log says when it
                // has registered.
                worker.log_text().contains("registered with master")
                    && self
                        .worker_ids_on_leader()
                        .map(|ws| ws.contains(&id))
                        .unwrap_or(false)
                    && TcpStream::connect(("127.0.0.1", self.worker_data_port)).is_ok()
            },
        )
        .with_context(|| worker.log_text())?;
        self.worker = Some(worker);
        Ok(())
    }

    /// Starts another worker (its own cache, ports and log) following this group's table;
    /// with `shards`, it serves only those (a separate cluster's worker).
    pub fn start_extra_worker(&self, name: &str, shards: &[u16]) -> anyhow::Result<Proc> {
        let cfg = self.dir.path().join(format!("{name}.toml"));
        let shards: Vec<String> = shards.iter().map(u16::to_string).collect();
        std::fs::write(
            &cfg,
            format!(
                "masters = [{}]\ncluster_token = \"{}\"\ndata_listen = \"127.0.0.1:{}\"\ncache_dir = \"{}\"\ncapacity = \"1GiB\"\nshards = [{}]\nmetrics_listen = \"127.0.0.1:{}\"\n{}",
                toml_list(&self.master_addrs()),
                self.spec.cluster_token,
                free_port(),
                self.dir.path().join(format!("{name}-cache")).display(),
                shards.join(", "),
                free_port(),
                self.spec.tables,
            ),
        )?;
        let worker = self.spawn("granary-worker", name, &cfg, None)?;
        wait_until("the worker to register", Duration::from_secs(20), || {
            worker.log_text().contains("registered with master")
        })
        .with_context(|| worker.log_text())?;
        Ok(worker)
    }

    /// Starts a `granary-router` over this group (shard 0's); returns it and its address.
    pub fn start_router(&self, name: &str) -> anyhow::Result<(Proc, String)> {
        let port = free_port();
        let cfg = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:{port}\"\nmasters = [{}]\ncluster_token = \"{}\"\n",
                toml_list(&self.master_addrs()),
                self.spec.cluster_token,
            ),
        )?;
        let router = self.spawn("granary-router", name, &cfg, None)?;
        wait_until("the router port", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .with_context(|| router.log_text())?;
        Ok((router, format!("127.0.0.1:{port}")))
    }

    /// A client of the `Routing` service at `addr` (a master or a router).
    pub fn routing_client(&self, addr: &str) -> anyhow::Result<RoutingClient> {
        Ok(RoutingClient::new(self.channel(
            addr,
            &self.rt,
            Duration::from_secs(30),
        )?))
    }

    /// Adds shard `id` (served by `masters`) to the routing table this group keeps.
    pub fn add_shard(&self, id: u32, masters: Vec<String>) -> anyhow::Result<u64> {
        let leader = self.addr_of(self.leader(Duration::from_secs(10))?);
        let req = granary_protos::v1::AddShardRequest {
            shard: Some(granary_protos::v1::ShardInfo { id, masters }),
        };
        let mut c = self.routing_client(&leader)?;
        Ok(self.rt.block_on(c.add_shard(req))?.into_inner().version)
    }

    /// Pins `prefix` to shard `shard` in the routing table this group keeps.
    pub fn pin(&self, prefix: &str, shard: u32) -> anyhow::Result<u64> {
        let leader = self.addr_of(self.leader(Duration::from_secs(10))?);
        let req = granary_protos::v1::PinPrefixRequest {
            prefix: prefix.as_bytes().to_vec(),
            shard,
        };
        let mut c = self.routing_client(&leader)?;
        Ok(self.rt.block_on(c.pin_prefix(req))?.into_inner().version)
    }

    /// Waits until every running master of this group works by routing table `version`
    /// or newer.
    pub fn wait_for_table(&self, version: u64) -> anyhow::Result<()> {
        wait_until("the routing table", Duration::from_secs(30), || {
            self.masters
                .iter()
                .filter(|(_, m)| m.proc.is_some())
                .all(|(&id, _)| {
                    self.routing_client(&self.addr_of(id))
                        .ok()
                        .and_then(|mut c| {
                            self.rt
                                .block_on(c.get_routing_table(
                                    granary_protos::v1::GetRoutingTableRequest {},
                                ))
                                .ok()
                        })
                        .is_some_and(|t| t.into_inner().version >= version)
                })
        })
    }

    /// Sends `sig` to the worker.
    pub fn signal_worker(&self, sig: i32) {
        if let Some(w) = &self.worker {
            w.signal(sig);
        }
    }

    /// Kills the worker (SIGKILL).
    pub fn kill_worker(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.kill();
        }
    }

    /// Worker ids the current leader lists.
    pub fn worker_ids_on_leader(&self) -> anyhow::Result<Vec<String>> {
        let r = self.on_leader(Duration::from_secs(2), |mut c| async move {
            c.list_workers(granary_protos::v1::ListWorkersRequest {})
                .await
        })?;
        Ok(r.workers.into_iter().map(|w| w.worker_id).collect())
    }

    /// A counter of master `id` (started with `MasterSpec::master_metrics`).
    pub fn master_counter(&self, id: u64, name: &str) -> anyhow::Result<f64> {
        let port = self
            .masters
            .get(&id)
            .and_then(|m| m.metrics_port)
            .context("the master serves no metrics (MasterSpec::master_metrics)")?;
        scrape_counter(port, name)
    }

    pub fn worker_ufs_fetches(&self) -> anyhow::Result<f64> {
        scrape_counter(self.worker_metrics_port, "granary_worker_ufs_fetches_total")
    }

    pub fn worker_cache_used_bytes(&self) -> anyhow::Result<f64> {
        scrape_counter(self.worker_metrics_port, "granary_worker_cache_used_bytes")
    }

    /// Mounts with extra TOML lines appended to the mount config.
    pub fn mount(&self, name: &str, extra_config: &str) -> anyhow::Result<Mount> {
        self.mount_on(name, &self.master_addrs(), extra_config)
    }

    /// Mounts with `masters` (routers, say) as where the mount starts.
    pub fn mount_on(
        &self,
        name: &str,
        masters: &[String],
        extra_config: &str,
    ) -> anyhow::Result<Mount> {
        let mnt = self.dir.path().join(name);
        std::fs::create_dir_all(&mnt)?;
        let cfg = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "masters = [{}]\ncluster_token = \"{}\"\nstaging_dir = \"{}\"\n{extra_config}\n",
                toml_list(masters),
                self.spec.cluster_token,
                self.dir.path().join(format!("{name}.staging")).display()
            ),
        )?;
        Mount::start(&cfg, &mnt, self.dir.path().join(format!("{name}.log")))
    }
}

/// A `granary-fuse` process and its mount point; unmounted and killed on drop.
pub struct Mount {
    pub path: PathBuf,
    pub proc: Proc,
}

impl Mount {
    pub fn start(cfg: &Path, mnt: &Path, log: PathBuf) -> anyhow::Result<Mount> {
        let mut cmd = Command::new(bin("granary-fuse"));
        cmd.arg("--config").arg(cfg).arg(mnt);
        let proc = Proc::spawn("granary-fuse", cmd, log)?;
        let m = Mount {
            path: mnt.to_path_buf(),
            proc,
        };
        wait_until("FUSE mount", Duration::from_secs(20), || is_mounted(mnt))
            .with_context(|| m.proc.log_text())?;
        Ok(m)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.proc.signal(libc::SIGTERM);
        if self.proc.wait_exit(Duration::from_secs(5)).is_none() {
            self.proc.kill();
        }
        force_unmount(&self.path);
    }
}

/// Creates entries through whichever master leads, trying every address.
pub struct Writer {
    addrs: Vec<String>,
    token: String,
    rt: std::sync::Arc<tokio::runtime::Runtime>,
}

impl Writer {
    /// Creates `/name`; Ok once acknowledged (an `AlreadyExists` answer counts: an earlier
    /// attempt was applied but its answer was lost with a dying leader).
    pub fn create(&self, name: &str, timeout: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        let req = granary_protos::v1::CreateRequest {
            parent: 1,
            name: name.as_bytes().to_vec(),
            kind: granary_protos::v1::FileKind::File as i32,
            mode: 0o644,
            ..Default::default()
        };
        loop {
            for addr in &self.addrs {
                let _g = self.rt.enter();
                let ch = granary_common::net::endpoint(addr, Duration::from_millis(300))?
                    .timeout(Duration::from_secs(3))
                    .connect_lazy();
                let mut c = Client::new(Authenticated::new(ch, TokenHeader(self.token.clone())));
                match self.rt.block_on(c.create(req.clone())) {
                    Ok(_) => return Ok(()),
                    Err(s) if s.code() == tonic::Code::AlreadyExists => return Ok(()),
                    Err(_) => {}
                }
            }
            if start.elapsed() > timeout {
                bail!("no master acknowledged creating {name} within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_free_port_is_handed_out_once() {
        let port = super::free_port();
        assert!(!super::reserve_port(port), "port {port} reserved twice");
    }
}
