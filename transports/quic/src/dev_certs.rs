//! Development certificates (rcgen): a CA made in memory ([`DevCa`]) that issues node
//! certificates, and [`write_dev_certs`] for `agentfabric certs dev`. Production uses the
//! operator's CA.

use std::io;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::QuicConfig;
use crate::tls::invalid;

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
