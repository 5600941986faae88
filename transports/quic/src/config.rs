//! The transport's settings ([`QuicConfig`], [`Congestion`]), its URL scheme and ALPN name, and
//! the quinn configurations made of them. Below the transport and the connections that read
//! them, above the TLS helpers they use.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::tls::{self, load_certs, load_key, TlsParts};

/// URL scheme of this transport: `quic://host:port`.
pub const SCHEME: &str = "quic";

/// ALPN protocol name: the fabric protocol and its wire version.
pub const ALPN: &str = "agentfabric/3";

/// QUIC congestion controller (quinn's implementations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// CUBIC (RFC 8312), the default: the usual choice on shared Internet paths.
    #[default]
    Cubic,
    /// NewReno (RFC 9002's reference controller).
    NewReno,
    /// BBR (experimental in quinn): model-based, tolerant of random loss.
    Bbr,
}

/// Settings of the QUIC transport.
pub struct QuicConfig {
    /// Trust roots: peers' certificates must chain to one of these.
    pub ca_cert: Vec<CertificateDer<'static>>,
    /// This node's certificate chain (leaf first). Required to listen; a client without one
    /// presents none (and is refused by servers that require client authentication).
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// This node's private key.
    pub key: Option<PrivateKeyDer<'static>>,
    /// ALPN protocol offered and accepted. Default [`ALPN`].
    pub alpn: String,
    /// Servers require a client certificate signed by `ca_cert`. Default `true`.
    pub require_client_auth: bool,
    /// Name the server's certificate must carry; default: the host part of the address.
    pub server_name: Option<String>,
    /// Congestion controller. Default CUBIC.
    pub congestion: Congestion,
    /// Streams the peer may open: the control stream, one shared stream per urgency, and one per
    /// flow (channel) up to this limit (further flows share their urgency's stream). Default 1024:
    /// quinn allocates state for each when a connection starts (70,000 would cost ~50 ms of
    /// handshake CPU in a debug build).
    pub max_streams: u32,
    /// Per-stream receive window. Default 16 MiB (above the largest per-channel fabric window,
    /// so QUIC flow control never binds before the fabric's credits).
    pub stream_window: u32,
    /// Per-connection receive window and send buffer. Default 64 MiB (above the fabric's largest
    /// congestion window).
    pub connection_window: u32,
    /// QUIC idle timeout. Default 10 s; the fabric's own keepalive (200 ms) keeps it from firing
    /// on a live session, and the fabric detects dead peers sooner (`peer_timeout`).
    pub idle_timeout: Duration,
    /// How long a closed connection waits for the peer to read its last frames. Default 2 s.
    pub linger: Duration,
    /// RTT assumed before the first measurement; it sets how soon a lost handshake packet is
    /// sent again. Default 50 ms (quinn's 333 ms would make one lost handshake packet cost about
    /// a second, the fabric's whole connect budget).
    pub initial_rtt: Duration,
    /// Longest time `connect` waits for the QUIC/TLS handshake. Default 5 s.
    pub connect_timeout: Duration,
    /// `SO_RCVBUF` and `SO_SNDBUF` of the UDP sockets (the kernel caps them at
    /// `net.core.rmem_max`/`wmem_max`). Default 4 MiB: one socket carries every connection of
    /// an endpoint, and the kernel's default (~200 KiB, about 90 datagrams) drops handshakes
    /// when a hundred peers connect at once.
    pub socket_buffer: usize,
}

impl Clone for QuicConfig {
    fn clone(&self) -> Self {
        QuicConfig {
            ca_cert: self.ca_cert.clone(),
            cert_chain: self.cert_chain.clone(),
            key: self.key.as_ref().map(|k| k.clone_key()),
            alpn: self.alpn.clone(),
            require_client_auth: self.require_client_auth,
            server_name: self.server_name.clone(),
            congestion: self.congestion,
            max_streams: self.max_streams,
            stream_window: self.stream_window,
            connection_window: self.connection_window,
            idle_timeout: self.idle_timeout,
            linger: self.linger,
            initial_rtt: self.initial_rtt,
            connect_timeout: self.connect_timeout,
            socket_buffer: self.socket_buffer,
        }
    }
}

impl std::fmt::Debug for QuicConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicConfig")
            .field("ca_certs", &self.ca_cert.len())
            .field("cert_chain", &self.cert_chain.len())
            .field("key", &self.key.as_ref().map(|_| "…"))
            .field("alpn", &self.alpn)
            .field("require_client_auth", &self.require_client_auth)
            .field("server_name", &self.server_name)
            .field("congestion", &self.congestion)
            .finish_non_exhaustive()
    }
}

impl QuicConfig {
    /// Mutual TLS with trust roots `ca_cert` and this node's `cert_chain` and `key`; every other
    /// setting at its default.
    pub fn new(
        ca_cert: Vec<CertificateDer<'static>>,
        cert_chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> QuicConfig {
        QuicConfig {
            ca_cert,
            cert_chain,
            key: Some(key),
            alpn: ALPN.to_owned(),
            require_client_auth: true,
            server_name: None,
            congestion: Congestion::default(),
            max_streams: 1024,
            stream_window: 16 << 20,
            connection_window: 64 << 20,
            idle_timeout: Duration::from_secs(10),
            linger: Duration::from_secs(2),
            initial_rtt: Duration::from_millis(50),
            connect_timeout: Duration::from_secs(5),
            socket_buffer: 4 << 20,
        }
    }

    /// Reads the CA certificate, this node's certificate chain and its key from PEM files (as
    /// written by [`write_dev_certs`](crate::write_dev_certs) or issued by the operator's CA).
    pub fn from_pem_files(
        ca: &std::path::Path,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> io::Result<QuicConfig> {
        Ok(QuicConfig::new(
            load_certs(ca)?,
            load_certs(cert)?,
            load_key(key)?,
        ))
    }

    /// The TLS settings, as [`tls`] takes them.
    fn tls_parts(&self) -> TlsParts<'_> {
        TlsParts {
            ca_cert: &self.ca_cert,
            cert_chain: &self.cert_chain,
            key: self.key.as_ref(),
            alpn: &self.alpn,
            require_client_auth: self.require_client_auth,
        }
    }

    fn transport_config(&self) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        t.max_concurrent_uni_streams(self.max_streams.into())
            .max_concurrent_bidi_streams(0u32.into())
            .stream_receive_window(self.stream_window.into())
            .receive_window(self.connection_window.into())
            .send_window(u64::from(self.connection_window))
            .datagram_receive_buffer_size(None)
            .initial_rtt(self.initial_rtt)
            .max_idle_timeout(quinn::IdleTimeout::try_from(self.idle_timeout).ok());
        match self.congestion {
            Congestion::Cubic => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
            }
            Congestion::NewReno => t.congestion_controller_factory(Arc::new(
                quinn::congestion::NewRenoConfig::default(),
            )),
            Congestion::Bbr => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
            }
        };
        t
    }

    /// The quinn server configuration this transport listens with.
    pub fn quinn_server_config(&self) -> io::Result<quinn::ServerConfig> {
        let tls = tls::server_config(&self.tls_parts())?;
        let crypto = QuicServerConfig::try_from(tls)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("quic: {e}")))?;
        let mut sc = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        sc.transport_config(Arc::new(self.transport_config()));
        Ok(sc)
    }

    /// The quinn client configuration this transport connects with.
    pub fn quinn_client_config(&self) -> io::Result<quinn::ClientConfig> {
        let tls = tls::client_config(&self.tls_parts())?;
        let crypto = QuicClientConfig::try_from(tls)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("quic: {e}")))?;
        let mut cc = quinn::ClientConfig::new(Arc::new(crypto));
        cc.transport_config(Arc::new(self.transport_config()));
        Ok(cc)
    }
}
