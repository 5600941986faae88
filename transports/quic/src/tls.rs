//! TLS 1.3 configuration (rustls with the `ring` provider) and development certificates (rcgen).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::QuicConfig;

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(cfg: &QuicConfig) -> io::Result<Arc<rustls::RootCertStore>> {
    if cfg.ca_cert.is_empty() {
        return Err(invalid(
            "quic: no CA certificate configured (QuicConfig::ca_cert): peers cannot be \
             authenticated"
                .into(),
        ));
    }
    let mut store = rustls::RootCertStore::empty();
    for c in &cfg.ca_cert {
        store
            .add(c.clone())
            .map_err(|e| invalid(format!("quic: bad CA certificate: {e}")))?;
    }
    Ok(Arc::new(store))
}

fn identity(cfg: &QuicConfig) -> Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    match (&cfg.key, cfg.cert_chain.is_empty()) {
        (Some(k), false) => Some((cfg.cert_chain.clone(), k.clone_key())),
        _ => None,
    }
}

/// The rustls server configuration: TLS 1.3 only, our ALPN, client certificates required (signed
/// by the configured CA) unless `require_client_auth` is off.
pub(crate) fn server_config(cfg: &QuicConfig) -> io::Result<rustls::ServerConfig> {
    let provider = provider();
    let roots = roots(cfg)?;
    let builder =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
    let builder = if cfg.require_client_auth {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    let verifier = builder
        .build()
        .map_err(|e| invalid(format!("quic: client certificate verifier: {e}")))?;
    let (chain, key) = identity(cfg).ok_or_else(|| {
        invalid("quic: a listening node needs a certificate chain and a key".into())
    })?;
    let mut sc = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| invalid(format!("quic: TLS versions: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| invalid(format!("quic: certificate or key refused: {e}")))?;
    sc.alpn_protocols = vec![cfg.alpn.as_bytes().to_vec()];
    Ok(sc)
}

/// The rustls client configuration: TLS 1.3 only, the server verified against the configured CA,
/// our certificate presented when we have one.
pub(crate) fn client_config(cfg: &QuicConfig) -> io::Result<rustls::ClientConfig> {
    let provider = provider();
    let roots = roots(cfg)?;
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| invalid(format!("quic: server certificate verifier: {e}")))?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| invalid(format!("quic: TLS versions: {e}")))?
        .with_webpki_verifier(verifier);
    let mut cc = match identity(cfg) {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| invalid(format!("quic: certificate or key refused: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    cc.alpn_protocols = vec![cfg.alpn.as_bytes().to_vec()];
    Ok(cc)
}

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| invalid(format!("{}: {e}", path.display())))?
        .collect();
    let certs = certs.map_err(|e| invalid(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(format!("{}: no certificate in it", path.display())));
    }
    Ok(certs)
}

/// Reads the private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> io::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| invalid(format!("{}: {e}", path.display())))
}

fn rc(e: rcgen::Error) -> io::Error {
    io::Error::other(format!("certificate generation: {e}"))
}

/// A development certificate authority (self-signed, generated in memory). Production uses the
/// operator's CA; this one exists so the demo and the tests need no manual step.
pub struct DevCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate issued by a [`DevCa`], with its key.
pub struct Issued {
    /// The certificate chain (the leaf only: the CA is the trust root).
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
    /// The certificate in PEM.
    pub cert_pem: String,
    /// The key in PEM.
    pub key_pem: String,
}

impl DevCa {
    /// A new CA named `name`.
    pub fn new(name: &str) -> io::Result<DevCa> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "agentfabric development");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().map_err(rc)?;
        let cert = params.self_signed(&key).map_err(rc)?;
        Ok(DevCa { cert, key })
    }

    /// The CA certificate (the trust root to put in [`QuicConfig::ca_cert`]).
    pub fn cert(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// The CA certificate in PEM.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// Issues a node certificate for `name`, valid as both TLS server and client, with the
    /// subject alternative names `name`, `localhost`, 127.0.0.1 and ::1.
    pub fn issue(&self, name: &str) -> io::Result<Issued> {
        self.issue_with(name, |_| {})
    }

    /// Like [`DevCa::issue`], with the parameters adjusted by `tweak` (e.g. validity dates).
    pub fn issue_with(
        &self,
        name: &str,
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> io::Result<Issued> {
        let mut sans = vec![name.to_owned()];
        if name != "localhost" {
            sans.push("localhost".into());
        }
        let mut params = CertificateParams::new(sans).map_err(rc)?;
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        tweak(&mut params);
        let key = KeyPair::generate().map_err(rc)?;
        let cert = params.signed_by(&key, &self.cert, &self.key).map_err(rc)?;
        Ok(Issued {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A [`QuicConfig`] for node `name`: this CA as the trust root, a fresh certificate.
    pub fn node_config(&self, name: &str) -> io::Result<QuicConfig> {
        let issued = self.issue(name)?;
        Ok(QuicConfig::new(vec![self.cert()], issued.chain, issued.key))
    }
}

/// What [`write_dev_certs`] wrote.
#[derive(Debug, Clone)]
pub struct DevCertFiles {
    /// `DIR/ca.pem`: the CA certificate (trust root).
    pub ca_cert: PathBuf,
    /// `DIR/ca.key`: the CA's key (keep it to issue more node certificates).
    pub ca_key: PathBuf,
    /// Per node: (name, `DIR/NAME.pem`, `DIR/NAME.key`).
    pub nodes: Vec<(String, PathBuf, PathBuf)>,
}

/// Writes a development CA and one certificate per node name to `dir` (created if needed):
/// `ca.pem`, `ca.key`, and `NAME.pem` / `NAME.key` for each node. Keys are written with mode
/// 0600. Load them with [`QuicConfig::from_pem_files`].
pub fn write_dev_certs(dir: &Path, nodes: &[&str]) -> io::Result<DevCertFiles> {
    std::fs::create_dir_all(dir)?;
    let ca = DevCa::new("agentfabric development CA")?;
    let ca_cert = dir.join("ca.pem");
    let ca_key = dir.join("ca.key");
    std::fs::write(&ca_cert, ca.cert_pem())?;
    write_private(&ca_key, ca.key.serialize_pem().as_bytes())?;
    let mut out = Vec::new();
    for name in nodes {
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
            return Err(invalid(format!("bad node name {name:?} for a file name")));
        }
        let issued = ca.issue(name)?;
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, issued.cert_pem)?;
        write_private(&key, issued.key_pem.as_bytes())?;
        out.push(((*name).to_owned(), cert, key));
    }
    Ok(DevCertFiles {
        ca_cert,
        ca_key,
        nodes: out,
    })
}

fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)?.write_all(data)
}
