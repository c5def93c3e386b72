//! Test harness for whole-cluster tests: starts real `granary-master`, `granary-worker` and
//! `granary-fuse` processes on free 127.0.0.1 ports with fresh temp directories, and
//! guarantees that every process is killed and every mount is unmounted when the guard
//! drops, also when a test fails.

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Path of a workspace binary (`cargo build --workspace --bins` must have run).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
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
        cmd.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
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
        while start.elapsed() < timeout {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.child = None;
                    return Some(st);
                }
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
    pub ufs: PathBuf,
    pub block_size: &'static str,
}

/// A master, a worker and their directories.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub master: Proc,
    pub master_port: u16,
    pub worker: Option<Proc>,
    pub worker_metrics_port: u16,
    worker_data_port: u16,
}

impl Cluster {
    pub fn master_addr(&self) -> String {
        format!("127.0.0.1:{}", self.master_port)
    }

    pub fn start(spec: &MasterSpec) -> anyhow::Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let master_port = free_port();
        let cfg = dir.path().join("master.toml");
        std::fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:{master_port}\"\ndata_dir = \"{}\"\nufs = \"{}\"\nblock_size = \"{}\"\nworker_heartbeat_ms = 200\nworker_timeout_ms = 3000\n",
                dir.path().join("master").display(),
                spec.ufs.display(),
                spec.block_size
            ),
        )?;
        let mut cmd = Command::new(bin("granary-master"));
        cmd.arg("--config").arg(&cfg);
        let master = Proc::spawn("master", cmd, dir.path().join("master.log"))?;
        wait_until("master port", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", master_port)).is_ok()
        })
        .with_context(|| {
            std::fs::read_to_string(dir.path().join("master.log")).unwrap_or_default()
        })?;
        let mut c = Cluster {
            dir,
            master,
            master_port,
            worker: None,
            worker_metrics_port: 0,
            worker_data_port: free_port(),
        };
        c.start_worker("1GiB")?;
        Ok(c)
    }

    /// (Re)starts the worker with the same cache directory and the given capacity.
    pub fn start_worker(&mut self, capacity: &str) -> anyhow::Result<()> {
        if let Some(mut w) = self.worker.take() {
            w.kill();
        }
        self.worker_metrics_port = free_port();
        let cfg = self.dir.path().join("worker.toml");
        std::fs::write(
            &cfg,
            format!(
                "masters = [\"{}\"]\ndata_listen = \"127.0.0.1:{}\"\ncache_dir = \"{}\"\ncapacity = \"{capacity}\"\nmetrics_listen = \"127.0.0.1:{}\"\n",
                self.master_addr(),
                self.worker_data_port,
                self.dir.path().join("cache").display(),
                self.worker_metrics_port
            ),
        )?;
        let mut cmd = Command::new(bin("granary-worker"));
        cmd.arg("--config").arg(&cfg);
        let n = std::fs::read_dir(self.dir.path())?.count();
        let worker = Proc::spawn(
            "worker",
            cmd,
            self.dir.path().join(format!("worker-{n}.log")),
        )?;
        let id_path = self.dir.path().join("cache/worker_id");
        let master = self.master_addr();
        wait_until("worker registration", Duration::from_secs(20), || {
            let Ok(id) = std::fs::read_to_string(&id_path) else {
                return false;
            };
            list_workers(&master)
                .map(|ws| ws.contains(&id))
                .unwrap_or(false)
                && TcpStream::connect(("127.0.0.1", self.worker_data_port)).is_ok()
        })
        .with_context(|| worker.log_text())?;
        self.worker = Some(worker);
        Ok(())
    }

    pub fn worker_ufs_fetches(&self) -> anyhow::Result<f64> {
        scrape_counter(self.worker_metrics_port, "granary_worker_ufs_fetches_total")
    }

    /// Mounts with extra TOML lines appended to the mount config.
    pub fn mount(&self, name: &str, extra_config: &str) -> anyhow::Result<Mount> {
        let mnt = self.dir.path().join(name);
        std::fs::create_dir_all(&mnt)?;
        let cfg = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!("masters = [\"{}\"]\n{extra_config}\n", self.master_addr()),
        )?;
        Mount::start(&cfg, &mnt, self.dir.path().join(format!("{name}.log")))
    }
}

/// Worker ids the master currently lists.
pub fn list_workers(master: &str) -> anyhow::Result<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut c =
            granary_protos::v1::master_client::MasterClient::connect(format!("http://{master}"))
                .await?;
        let ws = c
            .list_workers(granary_protos::v1::ListWorkersRequest {})
            .await?
            .into_inner()
            .workers;
        Ok(ws
            .into_iter()
            .map(|w| w.worker_id)
            .collect::<Vec<_>>()
            .join(","))
    })
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
