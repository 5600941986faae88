//! TLS 1.3 configuration (rustls with the `ring` provider) made of certificates, a key and an
//! ALPN name, and reading those from PEM files. It knows nothing of the transport's settings
//! (`config.rs` hands it their TLS part), so the settings can use it.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The TLS part of the transport's settings (see `QuicConfig` for each field).
pub(crate) struct TlsParts<'a> {
    pub(crate) ca_cert: &'a [CertificateDer<'static>],
    pub(crate) cert_chain: &'a [CertificateDer<'static>],
    pub(crate) key: Option<&'a PrivateKeyDer<'static>>,
    pub(crate) alpn: &'a str,
    pub(crate) require_client_auth: bool,
}

pub(crate) fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// rustls's *ring* provider. rustls 0.23.48 deprecated `ring::default_provider` (*ring* has no
/// post-quantum key exchange) with no replacement within 0.23, so a crate that resolves a newer
/// 0.23 than this workspace's lock file would see a deprecation warning from this line: allowed
/// here, on this one call, rather than rebuilding the provider from its parts. Moving to a
/// provider with post-quantum key exchange (aws-lc-rs) is a choice of its own: it needs a C
/// toolchain with cmake at build time.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(cfg: &TlsParts<'_>) -> io::Result<Arc<rustls::RootCertStore>> {
    if cfg.ca_cert.is_empty() {
        return Err(invalid(
            "quic: no CA certificate configured (QuicConfig::ca_cert): peers cannot be \
             authenticated"
                .into(),
        ));
    }
    let mut store = rustls::RootCertStore::empty();
    for c in cfg.ca_cert {
        store
            .add(c.clone())
            .map_err(|e| invalid(format!("quic: bad CA certificate: {e}")))?;
    }
    Ok(Arc::new(store))
}

fn identity(cfg: &TlsParts<'_>) -> Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    match (cfg.key, cfg.cert_chain.is_empty()) {
        (Some(k), false) => Some((cfg.cert_chain.to_vec(), k.clone_key())),
        _ => None,
    }
}

/// The rustls server configuration: TLS 1.3 only, our ALPN, client certificates required (signed
/// by the configured CA) unless `require_client_auth` is off.
pub(crate) fn server_config(cfg: &TlsParts<'_>) -> io::Result<rustls::ServerConfig> {
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
pub(crate) fn client_config(cfg: &TlsParts<'_>) -> io::Result<rustls::ClientConfig> {
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
