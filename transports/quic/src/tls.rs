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

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(ring_provider())
}

/// rustls's *ring* provider, assembled from the parts rustls and webpki export: the same cipher
/// suites, key exchange groups, signature algorithms, random source and key loading as
/// `rustls::crypto::ring::default_provider()`, which rustls 0.23.48 deprecated (*ring* has no
/// post-quantum key exchange) with no replacement in 0.23. Built this way it compiles without a
/// deprecation warning on every rustls 0.23 (a dependent crate may resolve a newer one than
/// this workspace's lock file); `ring_provider_is_rustls_ring_default` checks it against
/// rustls's own.
fn ring_provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::ring::{DEFAULT_CIPHER_SUITES, DEFAULT_KX_GROUPS};
    rustls::crypto::CryptoProvider {
        cipher_suites: DEFAULT_CIPHER_SUITES.to_vec(),
        kx_groups: DEFAULT_KX_GROUPS.to_vec(),
        signature_verification_algorithms: RING_SIGNATURE_ALGORITHMS,
        secure_random: &Ring,
        key_provider: &Ring,
    }
}

/// The random source and key loading of [`ring_provider`].
#[derive(Debug)]
struct Ring;

impl rustls::crypto::SecureRandom for Ring {
    fn fill(&self, buf: &mut [u8]) -> Result<(), rustls::crypto::GetRandomFailed> {
        use ring::rand::SecureRandom;
        ring::rand::SystemRandom::new()
            .fill(buf)
            .map_err(|_| rustls::crypto::GetRandomFailed)
    }
}

impl rustls::crypto::KeyProvider for Ring {
    fn load_private_key(
        &self,
        key: PrivateKeyDer<'static>,
    ) -> Result<Arc<dyn rustls::sign::SigningKey>, rustls::Error> {
        rustls::crypto::ring::sign::any_supported_type(&key)
    }
}

/// The signature algorithms of rustls's *ring* provider (webpki's *ring* implementations), in
/// the same order.
static RING_SIGNATURE_ALGORITHMS: rustls::crypto::WebPkiSupportedAlgorithms = {
    use rustls::SignatureScheme as S;
    use webpki::ring as alg;
    rustls::crypto::WebPkiSupportedAlgorithms {
        all: &[
            alg::ECDSA_P256_SHA256,
            alg::ECDSA_P256_SHA384,
            alg::ECDSA_P384_SHA256,
            alg::ECDSA_P384_SHA384,
            alg::ED25519,
            alg::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
            alg::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
            alg::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
            alg::RSA_PKCS1_2048_8192_SHA256,
            alg::RSA_PKCS1_2048_8192_SHA384,
            alg::RSA_PKCS1_2048_8192_SHA512,
            alg::RSA_PKCS1_2048_8192_SHA256_ABSENT_PARAMS,
            alg::RSA_PKCS1_2048_8192_SHA384_ABSENT_PARAMS,
            alg::RSA_PKCS1_2048_8192_SHA512_ABSENT_PARAMS,
        ],
        mapping: &[
            // For TLS 1.3 the scheme fixes the curve; the second entry serves TLS 1.2.
            (
                S::ECDSA_NISTP384_SHA384,
                &[alg::ECDSA_P384_SHA384, alg::ECDSA_P256_SHA384],
            ),
            (
                S::ECDSA_NISTP256_SHA256,
                &[alg::ECDSA_P256_SHA256, alg::ECDSA_P384_SHA256],
            ),
            (S::ED25519, &[alg::ED25519]),
            (
                S::RSA_PSS_SHA512,
                &[alg::RSA_PSS_2048_8192_SHA512_LEGACY_KEY],
            ),
            (
                S::RSA_PSS_SHA384,
                &[alg::RSA_PSS_2048_8192_SHA384_LEGACY_KEY],
            ),
            (
                S::RSA_PSS_SHA256,
                &[alg::RSA_PSS_2048_8192_SHA256_LEGACY_KEY],
            ),
            (S::RSA_PKCS1_SHA512, &[alg::RSA_PKCS1_2048_8192_SHA512]),
            (S::RSA_PKCS1_SHA384, &[alg::RSA_PKCS1_2048_8192_SHA384]),
            (S::RSA_PKCS1_SHA256, &[alg::RSA_PKCS1_2048_8192_SHA256]),
        ],
    }
};

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

#[cfg(test)]
mod tests {
    /// [`super::ring_provider`] is rustls's *ring* provider part for part (what can be
    /// compared: names, order, the FIPS flag), so the transport's TLS did not change with it.
    #[test]
    #[allow(deprecated)] // the reference: rustls's own, deprecated in rustls 0.23.48
    fn ring_provider_is_rustls_ring_default() {
        let ours = super::ring_provider();
        let theirs = rustls::crypto::ring::default_provider();
        let suites = |p: &rustls::crypto::CryptoProvider| {
            p.cipher_suites
                .iter()
                .map(|c| c.suite())
                .collect::<Vec<_>>()
        };
        assert_eq!(suites(&ours), suites(&theirs));
        let groups = |p: &rustls::crypto::CryptoProvider| {
            p.kx_groups.iter().map(|g| g.name()).collect::<Vec<_>>()
        };
        assert_eq!(groups(&ours), groups(&theirs));
        let (a, b) = (
            &ours.signature_verification_algorithms,
            &theirs.signature_verification_algorithms,
        );
        assert_eq!(format!("{:?}", a.all), format!("{:?}", b.all));
        let schemes = |m: &[(rustls::SignatureScheme, &[_])]| {
            m.iter()
                .map(|(s, algs)| format!("{s:?} {algs:?}"))
                .collect::<Vec<_>>()
        };
        assert_eq!(schemes(a.mapping), schemes(b.mapping));
        assert_eq!(ours.fips(), theirs.fips());
        let mut buf = [0u8; 32];
        ours.secure_random.fill(&mut buf).unwrap();
        assert_ne!(buf, [0u8; 32]);
    }
}
