//! A real S3-compatible server for tests and benchmarks: moto's (`pip install
//! 'moto[server]'`, which `.ci/run` does), on a free 127.0.0.1 port, killed on drop. Objects
//! are put and checked with a plain S3 client (boto3, `s3/s3tool.py`), not Granary's code.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::{free_port, wait_until, Proc};

const TOOL: &str = include_str!("../s3/s3tool.py");
/// Moto accepts any keys; these are what every process is given.
pub const ACCESS_KEY: &str = "granary-test";
pub const SECRET_KEY: &str = "granary-test-secret";

pub struct S3Server {
    pub endpoint: String,
    pub port: u16,
    /// Refuse keys moto's IAM does not know (every key: it knows none).
    check_keys: bool,
    proc: Option<Proc>,
    dir: tempfile::TempDir,
}

impl S3Server {
    pub fn start() -> anyhow::Result<S3Server> {
        Self::start_with(false)
    }

    /// A server that refuses every request as signed with unknown keys.
    pub fn start_refusing_keys() -> anyhow::Result<S3Server> {
        Self::start_with(true)
    }

    fn start_with(check_keys: bool) -> anyhow::Result<S3Server> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("s3tool.py"), TOOL)?;
        let port = free_port();
        let mut s = S3Server {
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            check_keys,
            proc: None,
            dir,
        };
        s.restart()?;
        Ok(s)
    }

    /// Starts the server (again, empty: moto keeps objects in memory).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
            .arg(self.port.to_string());
        if self.check_keys {
            cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", "0");
        }
        let log = self.dir.path().join("moto.log");
        let proc = Proc::spawn("moto", cmd, log)?;
        let up = wait_until("the S3 server (moto)", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
        if let Err(e) = up {
            let log = proc.log_text();
            if log.contains("No module named") {
                bail!("moto is not installed: pip install 'moto[server]' (.ci/run does)\n{log}");
            }
            return Err(e.context(log));
        }
        self.proc = Some(proc);
        Ok(())
    }

    /// Stops the server: requests to its endpoint are refused until [`S3Server::restart`].
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Freezes the server (SIGSTOP): requests reach it and wait, unanswered, until
    /// [`S3Server::thaw`] (an overloaded or stalled store).
    pub fn freeze(&self) {
        if let Some(p) = &self.proc {
            p.signal(libc::SIGSTOP);
        }
    }

    pub fn thaw(&self) {
        if let Some(p) = &self.proc {
            p.signal(libc::SIGCONT);
        }
    }

    /// The standard AWS environment pointing at this server.
    pub fn env(&self, cmd: &mut Command) {
        cmd.env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_REGION", "us-east-1");
    }

    /// The `[s3]` table of a master or worker config pointing at this server.
    pub fn config(&self) -> String {
        format!(
            "[s3]\nendpoint = \"{}\"\naccess_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\n",
            self.endpoint
        )
    }

    /// Runs the plain client (see `s3/s3tool.py` for the commands); returns its stdout.
    pub fn tool(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new("python3");
        cmd.arg(self.dir.path().join("s3tool.py")).args(args);
        self.env(&mut cmd);
        let out = cmd.output().context("running python3 s3tool.py")?;
        if !out.status.success() {
            bail!(
                "s3tool {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn make_bucket(&self, bucket: &str) -> anyhow::Result<()> {
        self.tool(&["mb", bucket]).map(|_| ())
    }

    /// Uploads every file under `dir` to `bucket` under `prefix`.
    pub fn put_tree(&self, dir: &Path, bucket: &str, prefix: &str) -> anyhow::Result<()> {
        let dir = dir.display().to_string();
        self.tool(&["put-tree", &dir, bucket, prefix]).map(|_| ())
    }

    /// Downloads every object under `prefix` into a fresh directory.
    pub fn get_tree(&self, bucket: &str, prefix: &str) -> anyhow::Result<tempfile::TempDir> {
        let out = tempfile::tempdir()?;
        let dir = out.path().display().to_string();
        self.tool(&["get-tree", bucket, prefix, &dir])?;
        Ok(out)
    }

    /// The object keys under `prefix`, sorted.
    pub fn keys(&self, bucket: &str, prefix: &str) -> anyhow::Result<Vec<String>> {
        let mut keys: Vec<String> = self
            .tool(&["ls", bucket, prefix])?
            .lines()
            .filter_map(|l| l.split_once(' ').map(|(_, k)| k.to_string()))
            .collect();
        keys.sort();
        Ok(keys)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("moto.log")
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
