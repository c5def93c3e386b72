//! Optional TLS (rustls) for every gRPC service and the workers' data port. A process is
//! given one `[tls]` table: servers present `cert`/`key`, clients trust `ca` (a
//! private CA's certificate, or the server certificate itself). Set once at startup, it
//! applies to every connection the process makes, so call sites need not carry it. The
//! cluster token is checked as before, inside the encrypted connection.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsOptions {
    /// PEM certificate chain this process presents as a server (masters, routers,
    /// workers' data port).
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// PEM certificate(s) this process trusts as a client: connections are TLS only
    /// when this is set.
    pub ca: Option<PathBuf>,
    /// Name to verify servers' certificates against, when addresses are IPs or names
    /// the certificates do not carry (default: the host of each address).
    pub server_name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("[tls] {key} = {path}: {error}")]
    File {
        key: &'static str,
        path: String,
        error: String,
    },
    #[error("[tls] cert and key go together: set both or neither")]
    HalfIdentity,
    #[error("[tls] {0}")]
    Config(String),
    #[error("TLS client settings were already installed differently in this process")]
    Reinstalled,
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        key,
        path: path.display().to_string(),
        error: e.to_string(),
    })
}

fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(key, path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::File {
            key,
            path: path.display().to_string(),
            error: format!("not PEM certificates: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::File {
            key,
            path: path.display().to_string(),
            error: "no certificate in it".into(),
        });
    }
    Ok(certs)
}

/// ring, not aws-lc-rs: no C toolchain build (the build stays quick on a fresh machine);
/// rustls marks it deprecated only for lacking post-quantum key exchange.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsOptions {
    /// Whether this process serves TLS.
    pub fn serves(&self) -> bool {
        self.cert.is_some()
    }

    /// Checks the files now, so a bad path stops the process at startup naming the key.
    pub fn validate(&self) -> Result<(), TlsError> {
        if self.cert.is_some() != self.key.is_some() {
            return Err(TlsError::HalfIdentity);
        }
        if self.serves() {
            self.rustls_server()?;
        }
        if self.ca.is_some() {
            self.rustls_client()?;
        }
        Ok(())
    }

    /// The server side for the data port; `None` without a certificate.
    pub fn rustls_server(&self) -> Result<Option<Arc<rustls::ServerConfig>>, TlsError> {
        let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
            return Ok(None);
        };
        let chain = certs("cert", cert)?;
        let pem = read("key", key)?;
        let key_der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::File {
            key: "key",
            path: key.display().to_string(),
            error: format!("not a PEM private key: {e}"),
        })?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .map_err(|e| TlsError::Config(format!("cert and key: {e}")))?;
        Ok(Some(Arc::new(config)))
    }

    /// The server side for gRPC; `None` without a certificate.
    pub fn grpc_server(&self) -> Result<Option<tonic::transport::ServerTlsConfig>, TlsError> {
        let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
            return Ok(None);
        };
        let identity = tonic::transport::Identity::from_pem(read("cert", cert)?, read("key", key)?);
        Ok(Some(
            tonic::transport::ServerTlsConfig::new().identity(identity),
        ))
    }

    /// The client side for the data port; `None` without a CA.
    pub fn rustls_client(&self) -> Result<Option<Arc<rustls::ClientConfig>>, TlsError> {
        let Some(ca) = &self.ca else {
            return Ok(None);
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in certs("ca", ca)? {
            roots.add(c).map_err(|e| TlsError::File {
                key: "ca",
                path: ca.display().to_string(),
                error: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Some(Arc::new(config)))
    }

    /// The name a server at `host` must prove.
    pub fn name_for(&self, host: &str) -> Result<ServerName<'static>, TlsError> {
        let name = self.server_name.as_deref().unwrap_or(host);
        ServerName::try_from(name.to_string())
            .map_err(|e| TlsError::Config(format!("server name `{name}`: {e}")))
    }
}

/// What this process's clients use: set once from its `[tls]` table.
struct ClientTls {
    options: TlsOptions,
    data: Option<Arc<rustls::ClientConfig>>,
    grpc_ca: Option<tonic::transport::Certificate>,
}

static CLIENT: OnceLock<ClientTls> = OnceLock::new();

/// Makes every connection this process opens use `options` (TLS when `ca` is set).
/// Calling it again with the same options is harmless; with others it is an error.
pub fn install_client(options: &TlsOptions) -> Result<(), TlsError> {
    options.validate()?;
    let grpc_ca = match &options.ca {
        Some(ca) => Some(tonic::transport::Certificate::from_pem(read("ca", ca)?)),
        None => None,
    };
    let tls = ClientTls {
        data: options.rustls_client()?,
        options: options.clone(),
        grpc_ca,
    };
    let installed = CLIENT.get_or_init(|| tls);
    if installed.options != *options {
        return Err(TlsError::Reinstalled);
    }
    Ok(())
}

/// The data port's client side, when TLS is on.
pub fn data_client() -> Option<(Arc<rustls::ClientConfig>, &'static TlsOptions)> {
    let c = CLIENT.get()?;
    Some((c.data.clone()?, &c.options))
}

/// The gRPC client side for a server at `host`, when TLS is on.
pub fn grpc_client(host: &str) -> Option<tonic::transport::ClientTlsConfig> {
    let c = CLIENT.get()?;
    let ca = c.grpc_ca.clone()?;
    let name = c.options.server_name.as_deref().unwrap_or(host);
    Some(
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(ca)
            .domain_name(name),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_name_the_key() {
        let half = TlsOptions {
            cert: Some("/x.pem".into()),
            ..Default::default()
        };
        assert!(matches!(half.validate(), Err(TlsError::HalfIdentity)));
        let missing = TlsOptions {
            ca: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let e = missing.validate().unwrap_err().to_string();
        assert!(e.contains("ca = /nonexistent/ca.pem"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let e = TlsOptions {
            ca: Some(junk),
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("no certificate"), "{e}");
        assert!(TlsOptions::default().validate().is_ok());
    }
}
