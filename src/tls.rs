//! TLS between nodes (`raft.tls-enabled yes`): rustls configurations built from Redis's own
//! certificate settings, and the words the logs use for a failed handshake. Pure Rust, no
//! Redis API: `redis/tls.rs` reads the file names from Redis and calls `build`.
//!
//! TLS 1.3 only, with mutual authentication: every node presents its certificate and checks
//! the peer's against the CA (`tls-ca-cert-file` / `tls-ca-cert-dir`). As Redis does for its
//! own replication and cluster bus, the peer's host name is not checked (nodes are addressed
//! by IP and NAT; what is trusted is the CA): a custom verifier runs webpki's full chain check
//! and accepts only the "not valid for this name" outcome on top of a valid chain.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore,
    ServerConfig, SignatureScheme,
};

/// Redis's certificate settings, as read from its configuration (empty: not set).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: String,
    pub key_file: String,
    pub ca_cert_file: String,
    pub ca_cert_dir: String,
    /// Presented when this node connects, if set (else `cert_file`), as Redis does.
    pub client_cert_file: String,
    pub client_key_file: String,
    /// Redis's `tls-key-file-pass`: encrypted keys are not supported here (refused).
    pub key_file_pass: bool,
}

/// Both ends of a node's TLS: the bus's acceptor (`server`) and its connectors (`client`).
pub struct TlsConfig {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConfig")
    }
}

/// The TLS configuration currently in force; replaced when Redis's certificate settings
/// change (CONFIG SET), so new connections use the new files and open ones keep going.
#[derive(Clone, Default, Debug)]
pub struct TlsHandle(Arc<RwLock<Option<Arc<TlsConfig>>>>);

impl TlsHandle {
    pub fn new(cfg: TlsConfig) -> TlsHandle {
        TlsHandle(Arc::new(RwLock::new(Some(Arc::new(cfg)))))
    }

    pub fn current(&self) -> Option<Arc<TlsConfig>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, cfg: TlsConfig) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(cfg));
    }
}

/// The server name a connector puts in its ClientHello. Not checked (see the module comment).
pub fn server_name() -> ServerName<'static> {
    ServerName::DnsName(
        rustls::pki_types::DnsName::try_from("redis-raft-node")
            .expect("a valid constant DNS name")
            .to_owned(),
    )
}

// ring, not aws-lc-rs: no cmake/nasm at build time. rustls deprecates ring's provider for
// lacking post-quantum key exchange; X25519 and the NIST curves are what Redis offers too.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds both configurations from the files. Err: which setting or file is wrong and why.
pub fn build(files: &TlsFiles) -> Result<TlsConfig, String> {
    if files.cert_file.is_empty() || files.key_file.is_empty() {
        return Err("raft.tls-enabled needs Redis's tls-cert-file and tls-key-file".into());
    }
    if files.ca_cert_file.is_empty() && files.ca_cert_dir.is_empty() {
        return Err("raft.tls-enabled needs Redis's tls-ca-cert-file or tls-ca-cert-dir".into());
    }
    if files.key_file_pass {
        return Err(
            "raft.tls-enabled: encrypted private keys (tls-key-file-pass) are not supported; \
             give an unencrypted PEM key"
                .into(),
        );
    }
    let roots = Arc::new(load_roots(files)?);
    let server_chain = load_certs("tls-cert-file", &files.cert_file)?;
    let server_key = load_key("tls-key-file", &files.key_file)?;
    let (client_chain, client_key) = if files.client_cert_file.is_empty() {
        (server_chain.clone(), server_key.clone_key())
    } else {
        let key_file = if files.client_key_file.is_empty() {
            &files.key_file
        } else {
            &files.client_key_file
        };
        (
            load_certs("tls-client-cert-file", &files.client_cert_file)?,
            load_key("tls-client-key-file", key_file)?,
        )
    };
    let p = provider();
    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), p.clone())
        .build()
        .map_err(|e| format!("cannot check client certificates against the CA: {e}"))?;
    let mut server = ServerConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS 1.3: {e}"))?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(server_chain, server_key)
        .map_err(|e| format!("tls-cert-file / tls-key-file: {e}"))?;
    // Bus connections are long-lived and never resumed: no tickets to send or keep.
    server.send_tls13_tickets = 0;
    let webpki = WebPkiServerVerifier::builder_with_provider(roots, p.clone())
        .build()
        .map_err(|e| format!("cannot check server certificates against the CA: {e}"))?;
    let mut client = ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS 1.3: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
        .with_client_auth_cert(client_chain, client_key)
        .map_err(|e| format!("client certificate / key: {e}"))?;
    client.resumption = rustls::client::Resumption::disabled();
    Ok(TlsConfig {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

fn load_certs(setting: &str, path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{setting} {path}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{setting} {path}: no PEM certificate in it"));
    }
    Ok(certs)
}

fn load_key(setting: &str, path: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{setting} {path}: {e}"))
}

fn load_roots(files: &TlsFiles) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    if !files.ca_cert_file.is_empty() {
        for cert in load_certs("tls-ca-cert-file", &files.ca_cert_file)? {
            roots
                .add(cert)
                .map_err(|e| format!("tls-ca-cert-file {}: {e}", files.ca_cert_file))?;
        }
    }
    if !files.ca_cert_dir.is_empty() {
        let dir = Path::new(&files.ca_cert_dir);
        let entries = std::fs::read_dir(dir)
            .map_err(|e| format!("tls-ca-cert-dir {}: {e}", files.ca_cert_dir))?;
        // Bounded by the directory; files that hold no certificate are skipped, as OpenSSL's
        // hashed directories also hold CRLs and links.
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(it) = CertificateDer::pem_file_iter(&path) else {
                continue;
            };
            for cert in it.flatten() {
                let _ = roots.add(cert);
            }
        }
    }
    if roots.is_empty() {
        return Err("tls-ca-cert-file / tls-ca-cert-dir hold no usable CA certificate".into());
    }
    Ok(roots)
}

/// webpki's server check without the host name (see the module comment).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain (issuer, validity, signatures) before the name, so a name
        // error means the chain was good.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Why a TLS handshake failed, in words for the log: `e` is what the handshake returned.
pub fn describe_failure(e: &std::io::Error) -> String {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted => format!(
                "the peer closed the connection during the TLS handshake ({e}): does it have \
                 raft.tls-enabled yes?"
            ),
            _ => e.to_string(),
        };
    };
    use rustls::Error as E;
    match tls {
        E::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => {
                "its certificate is not signed by our CA (tls-ca-cert-file / tls-ca-cert-dir)"
                    .into()
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("its certificate has expired ({c})")
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!("its certificate is not valid yet ({c})")
            }
            other => format!("its certificate is refused: {other}"),
        },
        E::NoCertificatesPresented => "it presented no certificate".into(),
        E::AlertReceived(alert) => {
            let why = match alert {
                AlertDescription::UnknownCA => "our certificate is not signed by its CA",
                AlertDescription::CertificateExpired => "our certificate has expired (or is not valid yet)",
                AlertDescription::BadCertificate
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateRequired => "it does not accept our certificate",
                AlertDescription::ProtocolVersion => "it does not speak TLS 1.3",
                _ => "it ended the handshake",
            };
            format!("it refused the TLS handshake: {why} (alert {alert:?})")
        }
        E::InvalidMessage(_) => format!(
            "not a TLS record from the peer ({tls}): plain TCP on a TLS bus? (raft.tls-enabled no there?)"
        ),
        other => other.to_string(),
    }
}

/// The first bytes of every TLS connection (a handshake record, legacy version 3.x).
pub fn looks_like_tls(first: &[u8]) -> bool {
    first.len() >= 2 && first[0] == 0x16 && first[1] == 0x03
}
