//! A cluster serving TLS everywhere (masters' gRPC, workers' data port) from certificates
//! of a private CA: a mount configured with the CA reads and writes through it, the CLI
//! with `--tls-ca` talks to it, and a client without the CA is refused.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use granary_integration_tests::{bin, run_to_exit, Cluster, MasterSpec};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// A CA and a server certificate for 127.0.0.1 and localhost, as PEM files in `dir`:
/// (ca, cert, key).
fn certificates(dir: &Path) -> (String, String, String) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "granary test CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path.display().to_string()
    };
    (
        write("ca.pem", ca.pem()),
        write("cert.pem", server.pem()),
        write("key.pem", key.serialize_pem()),
    )
}

#[test]
fn a_tls_cluster_serves_mounts_and_the_cli_and_refuses_plain_clients() {
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(certs.path());
    // This test process's own calls (the harness's) go over TLS too.
    granary_common::tls::install_client(&granary_common::tls::TlsOptions {
        ca: Some(ca.clone().into()),
        ..Default::default()
    })
    .unwrap();
    let ufs = tempfile::tempdir().unwrap();
    std::fs::write(ufs.path().join("hello.txt"), b"over tls").unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(ufs.path().join("big.bin"), &big).unwrap();
    let tls = format!("[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\nca = \"{ca}\"\n");
    let c = Cluster::start(&MasterSpec {
        ufs: ufs.path().to_path_buf(),
        masters: 3,
        cluster_token: "secret".into(),
        tables: tls,
        ..Default::default()
    })
    .unwrap();

    // Short-circuit off: every byte crosses the worker's data port.
    let m = c
        .mount(
            "mnt",
            &format!("short_circuit = false\n[tls]\nca = \"{ca}\"\n"),
        )
        .unwrap();
    assert_eq!(
        std::fs::read(m.path.join("hello.txt")).unwrap(),
        b"over tls"
    );
    assert!(std::fs::read(m.path.join("big.bin")).unwrap() == big);
    std::fs::write(m.path.join("written.txt"), b"through the data port").unwrap();
    assert_eq!(
        std::fs::read(ufs.path().join("written.txt")).unwrap(),
        b"through the data port"
    );

    let cli = |tls_ca: Option<&str>| {
        let mut cmd = Command::new(bin("granary"));
        cmd.args(["fs", "ls", "/", "--cluster-token", "secret", "--master"])
            .arg(c.master_addr());
        if let Some(ca) = tls_ca {
            cmd.args(["--tls-ca", ca]);
        }
        cmd.env_remove("GRANARY_TLS_CA");
        cmd.output().unwrap()
    };
    let ok = cli(Some(&ca));
    assert!(ok.status.success(), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains("written.txt"));
    // Plain gRPC to a TLS server fails, and says where.
    let mut plain = Command::new(bin("granary"));
    plain
        .args(["admin", "report", "--cluster-token", "secret", "--master"])
        .arg(c.master_addr());
    let (code, out) = run_to_exit(plain, Duration::from_secs(60)).unwrap();
    assert_ne!(code, 0, "{out}");
    assert!(out.contains(&c.master_addr()), "{out}");

    // A wrong CA is refused too.
    let other = tempfile::tempdir().unwrap();
    let (other_ca, _, _) = certificates(other.path());
    let refused = cli(Some(&other_ca));
    assert!(!refused.status.success(), "{refused:?}");
}
