//! Starting the sidecar: its fabric node (the transports its addresses name, plus the
//! in-process one for endpoints on this host), the routing, and the socket.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use agentfabric::{Node, Result as FabricResult};

use crate::config::{Limits, SidecarConfig};
use crate::hub::Hub;
use crate::routing::{accept_sessions, deliver_notifications, route_channels};
use crate::socket::{bind_private, peer_credentials};

/// `agentfabric sidecar`'s command line.
#[derive(Debug, clap::Args)]
pub struct SidecarArgs {
    /// This node's name: remote agents reach this host's endpoints as NAME/ENDPOINT.
    #[arg(long)]
    pub name: String,
    /// An address to listen on for other nodes (tcp://HOST:PORT, quic://HOST:PORT,
    /// verbs://HOST:PORT); repeat for several. Port 0 picks a free port (the ready line says
    /// which).
    #[arg(long = "listen", value_name = "URL")]
    pub listen: Vec<String>,
    /// The socket's private directory (created 0700; the socket is DIR/sidecar.sock).
    /// Default: $XDG_RUNTIME_DIR/agentfabric/NAME, else /tmp/agentfabric-UID/NAME.
    #[arg(long, value_name = "DIR")]
    pub socket_dir: Option<PathBuf>,
    /// Also let this uid connect (the sidecar's own uid always may); repeat for several.
    #[arg(long = "allow-uid", value_name = "UID")]
    pub allow_uid: Vec<u32>,
    /// QUIC: the CA certificate (PEM) that peers' certificates are checked against.
    #[arg(long, value_name = "PEM", requires_all = ["quic_cert", "quic_key"])]
    pub quic_ca: Option<PathBuf>,
    /// QUIC: this node's certificate chain (PEM).
    #[arg(long, value_name = "PEM", requires = "quic_ca")]
    pub quic_cert: Option<PathBuf>,
    /// QUIC: this node's private key (PEM).
    #[arg(long, value_name = "PEM", requires = "quic_ca")]
    pub quic_key: Option<PathBuf>,
    /// Add the verbs (RDMA) transport even without a verbs:// listen address.
    #[arg(long)]
    pub verbs: bool,
    /// Sends per channel a client may have unanswered.
    #[arg(long, default_value_t = Limits::default().send_window)]
    pub send_window: u32,
    /// Bytes of events queued to one client before its traffic waits.
    #[arg(long, default_value_t = Limits::default().queued_bytes)]
    pub client_queue_bytes: usize,
}

impl SidecarArgs {
    /// The configuration these arguments describe.
    pub fn config(&self) -> SidecarConfig {
        let limits = Limits {
            send_window: self.send_window.max(1),
            queued_bytes: self.client_queue_bytes.max(64 << 10),
            ..Limits::default()
        };
        SidecarConfig {
            node: self.name.clone(),
            listen: self.listen.clone(),
            socket_dir: self
                .socket_dir
                .clone()
                .unwrap_or_else(|| SidecarConfig::default_socket_dir(&self.name)),
            allow_uids: self.allow_uid.clone(),
            quic_pem: match (&self.quic_ca, &self.quic_cert, &self.quic_key) {
                (Some(a), Some(b), Some(c)) => Some((a.clone(), b.clone(), c.clone())),
                _ => None,
            },
            verbs: self.verbs || self.listen.iter().any(|u| u.starts_with("verbs://")),
            limits,
        }
    }
}

/// Runs `agentfabric sidecar` until SIGINT or SIGTERM; the exit code says how it ended.
pub fn main(args: SidecarArgs) -> ExitCode {
    let config = args.config();
    let rt = match agentfabric::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentfabric sidecar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentfabric sidecar: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the sidecar `config` describes until SIGINT or SIGTERM. Prints one line of JSON on
/// standard output once it serves: `{"node", "socket", "listen": [...]}`.
pub async fn run(config: SidecarConfig) -> Result<(), String> {
    let sidecar = Sidecar::start(config).await?;
    let ready = serde_json::json!({
        "node": sidecar.node(),
        "socket": sidecar.socket().to_string_lossy(),
        "listen": sidecar.listening(),
    });
    {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{ready}");
        let _ = stdout.flush();
    }
    tracing::info!(node = %sidecar.node(), socket = %sidecar.socket().display(), "sidecar ready");
    stop_signal().await;
    sidecar.stop().await;
    Ok(())
}

/// A running sidecar (the process's, or one a test started in its own runtime).
pub struct Sidecar {
    hub: Arc<Hub>,
    config: SidecarConfig,
    listening: Vec<String>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Sidecar {
    /// Builds the node, listens on the configured addresses and the socket, and serves clients
    /// on tasks of the current runtime until [`Sidecar::stop`].
    pub async fn start(config: SidecarConfig) -> Result<Sidecar, String> {
        let node = build_node(&config).map_err(|e| format!("cannot build the node: {e}"))?;
        let self_url = node
            .listen(&format!("mem://{}", config.node))
            .await
            .map_err(|e| format!("cannot listen in-process: {e}"))?;
        let mut listening = Vec::new();
        for url in &config.listen {
            let at = node
                .listen(url)
                .await
                .map_err(|e| format!("cannot listen on {url}: {e}"))?;
            listening.push(at);
        }
        let listener = bind_private(&config.socket_dir).map_err(|e| {
            format!(
                "cannot make the socket in {}: {e}",
                config.socket_dir.display()
            )
        })?;
        let mut allowed = vec![nix::unistd::getuid().as_raw()];
        allowed.extend(&config.allow_uids);
        let hub = Arc::new_cyclic(|me: &std::sync::Weak<Hub>| {
            let weak = me.clone();
            let me = me.clone();
            Hub::new(
                weak,
                node.clone(),
                config.limits.clone(),
                allowed,
                self_url,
                Box::new(move |peer| {
                    if let Some(hub) = me.upgrade() {
                        tokio::spawn(route_channels(hub, peer));
                    }
                }),
            )
        });
        let tasks = vec![
            tokio::spawn(accept_sessions(hub.clone())),
            tokio::spawn(deliver_notifications(hub.clone())),
            tokio::spawn(serve_socket(hub.clone(), listener)),
        ];
        Ok(Sidecar {
            hub,
            config,
            listening,
            tasks,
        })
    }

    /// The node's name.
    pub fn node(&self) -> &str {
        &self.config.node
    }

    /// The socket clients connect to.
    pub fn socket(&self) -> PathBuf {
        self.config.socket_path()
    }

    /// The addresses the node listens on for other nodes (ports resolved).
    pub fn listening(&self) -> &[String] {
        &self.listening
    }

    /// Stops serving: the node's sessions are closed and the socket removed. Connected
    /// clients see their socket end once their connections' tasks notice.
    pub async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        self.hub.node.close("the sidecar is stopping").await;
        let _ = std::fs::remove_file(self.config.socket_path());
    }
}

/// Accepts clients on the socket; each is served on a task of its own.
async fn serve_socket(hub: Arc<Hub>, listener: tokio::net::UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => match peer_credentials(&stream) {
                Ok(creds) => {
                    tokio::spawn(crate::client::serve(hub.clone(), stream, creds));
                }
                Err(e) => tracing::warn!(error = %e, "no credentials for a connection"),
            },
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// The node with the transports `config` asks for, and the in-process one.
fn build_node(config: &SidecarConfig) -> FabricResult<Node> {
    let mut b = Node::builder(config.node.clone())
        .transport(agentfabric::mem::MemNetwork::new().transport())
        .transport(agentfabric_tcp::TcpTransport::new());
    if let Some((ca, cert, key)) = &config.quic_pem {
        let q = agentfabric_quic::QuicConfig::from_pem_files(ca, cert, key)?;
        b = b.transport(agentfabric_quic::QuicTransport::new(q)?);
    }
    if config.verbs {
        b = add_verbs(b)?;
    }
    b.build()
}

#[cfg(feature = "verbs")]
fn add_verbs(b: agentfabric::NodeBuilder) -> FabricResult<agentfabric::NodeBuilder> {
    Ok(b.transport(agentfabric_verbs::VerbsTransport::new()))
}

#[cfg(not(feature = "verbs"))]
fn add_verbs(_: agentfabric::NodeBuilder) -> FabricResult<agentfabric::NodeBuilder> {
    Err(agentfabric::Error::Config(
        "this build has no verbs transport (build with the `verbs` feature)".into(),
    ))
}
