//! Development certificates (rcgen): a CA made in memory or read back from its files ([`DevCa`])
//! that issues node certificates, and [`write_dev_certs`] for `agentfabric certs dev`.
//! Production uses the operator's CA.

use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::QuicConfig;
use crate::tls::{invalid, load_certs};

fn rc(e: rcgen::Error) -> io::Error {
    io::Error::other(format!("certificate generation: {e}"))
}

/// A development certificate authority (self-signed). Production uses the operator's CA; this
/// one exists so the demo and the tests need no manual step.
pub struct DevCa {
    /// What rcgen signs with: the CA's name and key usages (for a CA read from files, a
    /// certificate made again from its subject name and key, never written anywhere).
    issuer: rcgen::Certificate,
    /// The CA certificate peers trust (for a CA read from files, the one in the file).
    der: CertificateDer<'static>,
    pem: String,
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

/// The parameters of a development CA certificate named `dn`.
fn ca_params(dn: DistinguishedName) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

impl DevCa {
    /// A new CA named `name` followed by a random suffix (e.g. `agentfabric dev CA 3fa29c01d2e4b7a8`).
    ///
    /// No two CAs share a name, so a certificate signed by another development CA is refused
    /// as one of an unknown issuer (rustls's `UnknownIssuer`). Under one shared name the
    /// verifier took the other CA's certificate for its issuer and reported only a bad
    /// signature (`BadSignature`, TLS alert "decrypt error").
    pub fn new(name: &str) -> io::Result<DevCa> {
        let key = KeyPair::generate().map_err(rc)?;
        // The suffix: the last bytes of the CA's public key (random with the key).
        let raw = key.public_key_raw();
        let suffix: String = raw[raw.len().saturating_sub(8)..]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        DevCa::with_key(&format!("{name} {suffix}"), key)
    }

    /// A new CA named exactly `common_name`, signed with `key`.
    pub(crate) fn with_key(common_name: &str, key: KeyPair) -> io::Result<DevCa> {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "agentfabric development");
        let cert = ca_params(dn).self_signed(&key).map_err(rc)?;
        Ok(DevCa {
            der: cert.der().clone(),
            pem: cert.pem(),
            issuer: cert,
            key,
        })
    }

    /// The CA in `cert` (PEM, e.g. `ca.pem`) and its key in `key` (PKCS#8 PEM, e.g. `ca.key`),
    /// as [`write_dev_certs`] wrote them, to issue more node certificates that chain to the
    /// same trust root. Refused with a reason: a file that cannot be read or holds no
    /// certificate or key, a key that is not the certificate's, or a subject name this module
    /// cannot reproduce exactly (it handles the names of CAs made here).
    pub fn from_pem_files(cert: &Path, key: &Path) -> io::Result<DevCa> {
        let der = load_certs(cert)?.swap_remove(0);
        let pem = std::fs::read_to_string(cert)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", cert.display())))?;
        let key_pem = std::fs::read_to_string(key)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", key.display())))?;
        let key_pair = KeyPair::from_pem(&key_pem).map_err(|e| {
            invalid(format!(
                "{}: not a private key in PKCS#8 PEM that rcgen can sign with: {e}",
                key.display()
            ))
        })?;
        let bad_cert = |why: &str| invalid(format!("{}: {why}", cert.display()));
        let (_, parsed) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| bad_cert(&format!("not an X.509 certificate: {e}")))?;
        if parsed.public_key().raw != key_pair.public_key_der().as_slice() {
            return Err(invalid(format!(
                "{} is not the key of the certificate in {}",
                key.display(),
                cert.display()
            )));
        }
        let params = CertificateParams::from_ca_cert_der(&der)
            .map_err(|e| bad_cert(&format!("not a CA certificate rcgen can issue under: {e}")))?;
        let issuer = ca_params(params.distinguished_name)
            .self_signed(&key_pair)
            .map_err(rc)?;
        // The issued certificates' issuer name must be the CA's subject name byte for byte.
        let again = x509_parser::parse_x509_certificate(issuer.der())
            .map(|(_, c)| c.subject().as_raw().to_vec())
            .ok();
        if again.as_deref() != Some(parsed.subject().as_raw()) {
            return Err(bad_cert(
                "its subject name cannot be reproduced exactly (not made by agentfabric certs dev?)",
            ));
        }
        Ok(DevCa {
            issuer,
            der,
            pem,
            key: key_pair,
        })
    }

    /// The CA certificate (the trust root to put in [`QuicConfig::ca_cert`]).
    pub fn cert(&self) -> CertificateDer<'static> {
        self.der.clone()
    }

    /// The CA certificate in PEM.
    pub fn cert_pem(&self) -> String {
        self.pem.clone()
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
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(rc)?;
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
    /// Whether the CA is new (`false`: the directory's CA was kept and issued the nodes'
    /// certificates).
    pub ca_created: bool,
    /// Per node: (name, `DIR/NAME.pem`, `DIR/NAME.key`).
    pub nodes: Vec<(String, PathBuf, PathBuf)>,
}

/// How [`write_dev_certs_with`] treats files that are there already.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DevCertOptions {
    /// Replace the certificate and key of a node that has them already (`agentfabric certs
    /// dev --force`). The CA is kept either way.
    pub force: bool,
}

/// Why [`write_dev_certs`] wrote nothing (or, for [`DevCertError::Io`], stopped).
#[derive(Debug)]
#[non_exhaustive]
pub enum DevCertError {
    /// A node's certificate or key is there already; replacing it needs
    /// [`DevCertOptions::force`] (`--force`).
    NodeExists {
        /// The node.
        node: String,
        /// The file that is there.
        path: PathBuf,
    },
    /// Half a CA: one of `ca.pem` and `ca.key` is there, the other is not.
    IncompleteCa {
        /// The file that is there.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
    /// The directory's CA cannot issue certificates (see [`DevCa::from_pem_files`]).
    BadCa {
        /// The CA certificate.
        cert: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A node name that cannot name its files (empty, a path, hidden, or `ca`), or given twice.
    BadNodeName(String),
    /// A file could not be read or written.
    Io {
        /// The file (or the directory).
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A certificate could not be generated.
    Generate(io::Error),
}

impl fmt::Display for DevCertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DevCertError::NodeExists { node, path } => write!(
                f,
                "{} exists already (node {node} has a certificate): refusing to replace it \
                 without --force (DevCertOptions::force)",
                path.display()
            ),
            DevCertError::IncompleteCa { present, missing } => write!(
                f,
                "{} is there but {} is missing: the CA needs both, its certificate and its key \
                 (restore the missing file, or remove both to make a new CA, which invalidates \
                 every certificate issued by the old one)",
                present.display(),
                missing.display()
            ),
            DevCertError::BadCa { cert, source } => write!(
                f,
                "the CA in {} cannot issue certificates: {source}",
                cert.display()
            ),
            DevCertError::BadNodeName(why) => write!(f, "{why}"),
            DevCertError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            DevCertError::Generate(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for DevCertError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DevCertError::BadCa { source, .. } | DevCertError::Io { source, .. } => Some(source),
            DevCertError::Generate(e) => Some(e),
            _ => None,
        }
    }
}

impl From<DevCertError> for io::Error {
    fn from(e: DevCertError) -> io::Error {
        let kind = match &e {
            DevCertError::NodeExists { .. } => io::ErrorKind::AlreadyExists,
            DevCertError::IncompleteCa { .. } => io::ErrorKind::NotFound,
            DevCertError::BadCa { source, .. } | DevCertError::Io { source, .. } => source.kind(),
            DevCertError::BadNodeName(_) => io::ErrorKind::InvalidInput,
            DevCertError::Generate(e) => e.kind(),
        };
        io::Error::new(kind, e)
    }
}

/// So that `?` takes a [`DevCertError`] in a function returning [`agentfabric::Result`], as it
/// takes the transport's other (`io::Error`) set-up errors.
impl From<DevCertError> for agentfabric::Error {
    fn from(e: DevCertError) -> agentfabric::Error {
        io::Error::from(e).into()
    }
}

/// [`write_dev_certs_with`] without `force`: an existing node's files are refused.
pub fn write_dev_certs(dir: &Path, nodes: &[&str]) -> Result<DevCertFiles, DevCertError> {
    write_dev_certs_with(dir, nodes, DevCertOptions::default())
}

/// Writes a certificate per node name to `dir` (created if needed), `NAME.pem` and `NAME.key`,
/// issued by the directory's CA (`ca.pem`, `ca.key`), which is made first if the directory has
/// none. The CA is never replaced: certificates issued by earlier runs keep verifying, and
/// every node of the directory trusts every other. Nothing is written when a node's files are
/// there already (unless `options.force`), when only half a CA is there, or when the CA cannot
/// be read. Keys are written with mode 0600. Load them with [`QuicConfig::from_pem_files`].
pub fn write_dev_certs_with(
    dir: &Path,
    nodes: &[&str],
    options: DevCertOptions,
) -> Result<DevCertFiles, DevCertError> {
    for (i, name) in nodes.iter().enumerate() {
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
            return Err(DevCertError::BadNodeName(format!(
                "bad node name {name:?} for a file name"
            )));
        }
        if *name == "ca" {
            return Err(DevCertError::BadNodeName(
                "node name \"ca\" would replace the CA's files (ca.pem, ca.key)".into(),
            ));
        }
        if nodes[..i].contains(name) {
            return Err(DevCertError::BadNodeName(format!(
                "node name {name:?} given twice"
            )));
        }
    }
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| DevCertError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let exists = |path: &Path| path.try_exists().map_err(io_err(path));
    let ca_cert = dir.join("ca.pem");
    let ca_key = dir.join("ca.key");
    let existing_ca = match (exists(&ca_cert)?, exists(&ca_key)?) {
        (true, true) => Some(DevCa::from_pem_files(&ca_cert, &ca_key).map_err(|source| {
            DevCertError::BadCa {
                cert: ca_cert.clone(),
                source,
            }
        })?),
        (false, false) => None,
        (true, false) => {
            return Err(DevCertError::IncompleteCa {
                present: ca_cert,
                missing: ca_key,
            })
        }
        (false, true) => {
            return Err(DevCertError::IncompleteCa {
                present: ca_key,
                missing: ca_cert,
            })
        }
    };
    let files: Vec<(String, PathBuf, PathBuf)> = nodes
        .iter()
        .map(|name| {
            (
                (*name).to_owned(),
                dir.join(format!("{name}.pem")),
                dir.join(format!("{name}.key")),
            )
        })
        .collect();
    if !options.force {
        for (name, cert, key) in &files {
            for path in [cert, key] {
                if exists(path)? {
                    return Err(DevCertError::NodeExists {
                        node: name.clone(),
                        path: path.clone(),
                    });
                }
            }
        }
    }
    let ca_created = existing_ca.is_none();
    let ca = match existing_ca {
        Some(ca) => ca,
        None => {
            let ca = DevCa::new("agentfabric dev CA").map_err(DevCertError::Generate)?;
            // `create_new`: a CA that appeared meanwhile is not replaced.
            write_file(&ca_key, ca.key.serialize_pem().as_bytes(), true, false)
                .map_err(io_err(&ca_key))?;
            write_file(&ca_cert, ca.cert_pem().as_bytes(), false, false)
                .map_err(io_err(&ca_cert))?;
            ca
        }
    };
    for (name, cert, key) in &files {
        let issued = ca.issue(name).map_err(DevCertError::Generate)?;
        write_file(cert, issued.cert_pem.as_bytes(), false, options.force).map_err(io_err(cert))?;
        write_file(key, issued.key_pem.as_bytes(), true, options.force).map_err(io_err(key))?;
    }
    Ok(DevCertFiles {
        ca_cert,
        ca_key,
        ca_created,
        nodes: files,
    })
}

/// Writes `data` to a new file at `path` (mode 0600 if `private`); with `replace`, an existing
/// file is truncated instead (and its mode set to 0600 if `private`).
fn write_file(path: &Path, data: &[u8], private: bool, replace: bool) -> io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true);
    if replace {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut file = opts.open(path)?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(data)
}
