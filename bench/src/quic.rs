//! QUIC in the bench: node transports with development certificates made in memory (mutual TLS,
//! as deployed), and the `pingpong` workload against a raw quinn echo measured in the same run.
//!
//! The baseline is the plainest quinn program with the same TLS configuration (TLS 1.3, mutual
//! TLS, the fabric's ALPN, the same transport settings): one unidirectional stream each way (as
//! the fabric's transport uses); the client writes `size` bytes and reads `size` bytes back, the
//! echo task reads them and writes them back. The fabric and the baseline are measured in
//! alternating slices by the common pingpong workload (`pingpong.rs`).

use agentfabric::{Config, Node};
use agentfabric_quic::{quinn, DevCa, QuicConfig, QuicTransport};

use crate::error::BenchResult;

fn dev_ca() -> BenchResult<&'static DevCa> {
    static CA: std::sync::OnceLock<DevCa> = std::sync::OnceLock::new();
    if let Some(ca) = CA.get() {
        return Ok(ca);
    }
    let ca = DevCa::new("agentfabric bench CA")?;
    Ok(CA.get_or_init(|| ca))
}

/// The QUIC settings of a bench node named `name` (a certificate from an in-memory dev CA).
pub fn config(name: &str) -> BenchResult<QuicConfig> {
    Ok(dev_ca()?.node_config(name)?)
}

/// A node named `name` on QUIC with `cfg`.
pub fn node(name: String, cfg: &Config) -> BenchResult<Node> {
    let t = QuicTransport::new(config(&name)?)?;
    Ok(Node::builder(name)
        .transport(t)
        .config(cfg.clone())
        .build()?)
}

/// (server, client, listen URL) for [`FabricPair::new`](crate::pair::FabricPair::new).
pub fn nodes(cfg: &Config, tag: &str) -> BenchResult<(Node, Node, String)> {
    Ok((
        node(format!("bench-{tag}-server"), cfg)?,
        node(format!("bench-{tag}-client"), cfg)?,
        "quic://127.0.0.1:0".to_owned(),
    ))
}

/// A raw quinn ping-pong of `size`-byte messages on one bidirectional stream. Dropping it stops
/// the echo task.
pub struct RawQuinn {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    payload: Vec<u8>,
    buf: Vec<u8>,
    server: tokio::task::JoinHandle<()>,
    _endpoints: (quinn::Endpoint, quinn::Endpoint),
    _conn: quinn::Connection,
}

impl Drop for RawQuinn {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl RawQuinn {
    /// Sets up both endpoints on loopback and the echo task.
    pub async fn new(size: usize) -> BenchResult<RawQuinn> {
        let server_ep = quinn::Endpoint::server(
            config("raw-server")?.quinn_server_config()?,
            "127.0.0.1:0".parse()?,
        )?;
        let addr = server_ep.local_addr()?;
        let mut client_ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        client_ep.set_default_client_config(config("raw-client")?.quinn_client_config()?);
        // One unidirectional stream each way, as the fabric's QUIC transport uses (and as its
        // settings allow: no bidirectional streams).
        let accept = {
            let ep = server_ep.clone();
            tokio::spawn(async move {
                let conn = ep.accept().await.ok_or("no connection")?.await?;
                let recv = conn.accept_uni().await?;
                let send = conn.open_uni().await?;
                BenchResult::Ok((conn, send, recv))
            })
        };
        let conn = client_ep.connect(addr, "127.0.0.1")?.await?;
        let mut send = conn.open_uni().await?;
        // A stream is announced to the peer by its first bytes: make one round trip here.
        let payload = vec![0xa5u8; size];
        send.write_all(&payload).await?;
        let (sconn, mut ssend, mut srecv) = accept.await??;
        let server = tokio::spawn(async move {
            let _conn = sconn;
            let mut buf = vec![0u8; size];
            while srecv.read_exact(&mut buf).await.is_ok() {
                if ssend.write_all(&buf).await.is_err() {
                    return;
                }
            }
        });
        let recv = conn.accept_uni().await?;
        let mut me = RawQuinn {
            send,
            recv,
            payload,
            buf: vec![0u8; size],
            server,
            _endpoints: (server_ep, client_ep),
            _conn: conn,
        };
        me.recv.read_exact(&mut me.buf).await?;
        Ok(me)
    }

    /// One round trip.
    pub async fn round_trip(&mut self) -> BenchResult<()> {
        self.send.write_all(&self.payload).await?;
        self.recv.read_exact(&mut self.buf).await?;
        Ok(())
    }
}
