//! The command-line arguments that say which cluster to talk to and how, shared by
//! `granary-fuse` and every `granary` command, so each flag means the same everywhere and
//! a flag given always wins over the config file.

use std::path::PathBuf;

use granary_common::config::ConfigError;
use granary_common::consistency::ReadConsistency;

use crate::MountConfig;

/// Where the masters are, the cluster's token and the read consistency.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClusterArgs {
    /// Master address host:port; repeat (or separate with commas) for every member. Any
    /// member will do: requests follow the leader. [default: 127.0.0.1:19998]
    #[arg(
        long = "master",
        env = "GRANARY_MASTER",
        value_delimiter = ',',
        global = true
    )]
    pub masters: Vec<String>,
    /// The cluster token, if the cluster sets one.
    #[arg(
        long,
        env = "GRANARY_CLUSTER_TOKEN",
        global = true,
        hide_env_values = true
    )]
    pub cluster_token: Option<String>,
    /// Consistency of metadata reads: linearizable, lease or bounded-staleness:<ms>
    /// [default: linearizable, or the mount config's].
    #[arg(long, global = true)]
    pub read_consistency: Option<ReadConsistency>,
    /// The CA certificate (PEM) of a cluster that serves TLS: every connection is TLS,
    /// checked against it.
    #[arg(long, env = "GRANARY_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// The name the servers' certificates carry, when it is not the host in the
    /// addresses.
    #[arg(long, env = "GRANARY_TLS_SERVER_NAME", global = true)]
    pub tls_server_name: Option<String>,
}

/// Where a command goes when no master is named.
pub const DEFAULT_MASTER: &str = "127.0.0.1:19998";

impl ClusterArgs {
    /// The master to ask (the first one named).
    pub fn master(&self) -> &str {
        self.masters.first().map_or(DEFAULT_MASTER, String::as_str)
    }

    pub fn token(&self) -> &str {
        self.cluster_token.as_deref().unwrap_or_default()
    }

    pub fn consistency(&self) -> ReadConsistency {
        self.read_consistency.unwrap_or_default()
    }

    /// Overrides `cfg` with what was given on the command line.
    pub fn apply_to(&self, cfg: &mut MountConfig) {
        if !self.masters.is_empty() {
            cfg.masters = self.masters.clone();
        }
        if let Some(token) = &self.cluster_token {
            cfg.cluster_token = token.clone();
        }
        if let Some(consistency) = self.read_consistency {
            cfg.read_consistency = consistency;
        }
        if let Some(ca) = &self.tls_ca {
            cfg.tls.ca = Some(ca.clone());
        }
        if let Some(name) = &self.tls_server_name {
            cfg.tls.server_name = Some(name.clone());
        }
    }

    /// Makes this process's connections TLS when `--tls-ca` is given.
    pub fn install_tls(&self) -> Result<(), granary_common::tls::TlsError> {
        granary_common::tls::install_client(&granary_common::tls::TlsOptions {
            ca: self.tls_ca.clone(),
            server_name: self.tls_server_name.clone(),
            ..Default::default()
        })
    }
}

/// A mount's arguments: the cluster, a config file and the mount point.
#[derive(Debug, Clone, clap::Args)]
pub struct MountArgs {
    /// TOML mount config (see README); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Empty directory to mount on.
    pub mountpoint: PathBuf,
}

impl MountArgs {
    /// The config file (or the defaults) with the command line's flags applied.
    pub fn config(&self, cluster: &ClusterArgs) -> Result<MountConfig, ConfigError> {
        let mut cfg: MountConfig = match &self.config {
            Some(p) => granary_common::config::load_toml(p)?,
            None => MountConfig::default(),
        };
        cluster.apply_to(&mut cfg);
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        cluster: ClusterArgs,
        #[command(flatten)]
        mount: MountArgs,
    }

    #[test]
    fn a_flag_given_wins_over_the_config_even_when_it_names_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mount.toml");
        std::fs::write(
            &file,
            "masters = [\"m1:1\"]\ncluster_token = \"file\"\nread_consistency = \"lease\"\n",
        )
        .unwrap();
        let config = file.to_str().unwrap();
        let cfg = |args: &[&str]| {
            let cli =
                Cli::parse_from([&["granary-fuse", "--config", config], args, &["/mnt"]].concat());
            cli.mount.config(&cli.cluster).unwrap()
        };
        let from_file = cfg(&[]);
        assert_eq!(from_file.read_consistency, ReadConsistency::Lease);
        assert_eq!(from_file.cluster_token, "file");
        assert_eq!(from_file.masters, ["m1:1"]);
        let flagged = cfg(&[
            "--read-consistency",
            "linearizable",
            "--cluster-token",
            "",
            "--master",
            "a:1,b:2",
            "--master",
            "c:3",
        ]);
        assert_eq!(flagged.read_consistency, ReadConsistency::Linearizable);
        assert_eq!(flagged.cluster_token, "");
        assert_eq!(flagged.masters, ["a:1", "b:2", "c:3"]);
    }

    #[test]
    fn the_arguments_are_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
