//! The sidecar's shared state: its fabric node, the endpoints of its connected clients, the
//! sessions to other nodes (shared by every client), and who owns each registered region.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use agentfabric::sync::lock;
use agentfabric::tools::ToolServer;
use agentfabric::{Node, Peer};

use crate::config::Limits;
use crate::endpoint::Endpoint;
use crate::errors::OpError;
use crate::wire::ErrorCode;

/// Endpoint names whose tool servers are kept.
const MAX_TOOL_SERVERS: usize = 4096;

/// Addresses a sidecar keeps sessions to (clients choose them: bounded).
const MAX_PEERS: usize = 4096;

/// Who holds a region: the client's endpoint and its handle for the region.
type RegionOwner = (Weak<dyn Endpoint>, u32);

/// State every client connection shares.
pub struct Hub {
    /// The fabric node.
    pub node: Node,
    /// Per-client limits.
    pub limits: Limits,
    /// Uids allowed to connect (the sidecar's own among them).
    pub allowed_uids: Vec<u32>,
    /// The node's in-process address, for endpoints on this host.
    self_url: String,
    endpoints: Mutex<HashMap<String, Arc<dyn Endpoint>>>,
    /// Sessions by the address a client gave (`""`: this node itself), each behind its own
    /// lock: a connect to an unreachable address holds up only the clients asking for it.
    peers: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Peer>>>>>,
    /// Region id → its owner and the owner's handle, for notifications.
    regions: Mutex<HashMap<u64, RegionOwner>>,
    /// One tool server per endpoint name, kept across its clients' reconnections: a caller's
    /// tool channel reaches whichever client holds the name at each call, and idempotency keys
    /// outlive a serving client's restart.
    tool_servers: Mutex<HashMap<String, ToolServer>>,
    /// This hub, for the tool servers' handlers.
    me: Weak<Hub>,
    /// Called with every session this sidecar opens, so that channels the far side opens on it
    /// are routed too.
    on_peer: Box<dyn Fn(Peer) + Send + Sync>,
}

impl Hub {
    /// A hub over `node`, whose in-process address is `self_url`; `on_peer` sees every session
    /// the hub opens.
    pub fn new(
        me: Weak<Hub>,
        node: Node,
        limits: Limits,
        allowed_uids: Vec<u32>,
        self_url: String,
        on_peer: Box<dyn Fn(Peer) + Send + Sync>,
    ) -> Hub {
        Hub {
            tool_servers: Mutex::default(),
            me,
            node,
            limits,
            allowed_uids,
            self_url,
            endpoints: Mutex::default(),
            peers: Mutex::default(),
            regions: Mutex::default(),
            on_peer,
        }
    }

    /// Claims `name` for `ep`; `false` when another client holds it.
    pub fn claim(&self, name: &str, ep: Arc<dyn Endpoint>) -> bool {
        let mut eps = lock(&self.endpoints);
        if eps.contains_key(name) {
            return false;
        }
        eps.insert(name.to_owned(), ep);
        true
    }

    /// Gives `name` up.
    pub fn release(&self, name: &str) {
        lock(&self.endpoints).remove(name);
    }

    /// The endpoint called `name`, if a client holds it.
    pub fn endpoint(&self, name: &str) -> Option<Arc<dyn Endpoint>> {
        lock(&self.endpoints).get(name).cloned()
    }

    /// The session to the node at `url` (`""`: this node, in-process), opened on first use and
    /// again when the last one died.
    pub async fn peer(&self, url: &str) -> Result<Peer, OpError> {
        if url.starts_with("mem:") {
            return Err(OpError::new(
                ErrorCode::ConnectFailed,
                "mem:// is the sidecar's own; use the empty url for this node",
            ));
        }
        let slot = {
            let mut peers = lock(&self.peers);
            if peers.len() >= MAX_PEERS && !peers.contains_key(url) {
                // Forget the addresses whose sessions died, before refusing a new one.
                peers.retain(|_, s| {
                    s.try_lock()
                        .map_or(true, |p| p.as_ref().is_some_and(|p| p.error().is_none()))
                });
                if peers.len() >= MAX_PEERS {
                    return Err(OpError::new(
                        ErrorCode::Limit,
                        format!("this sidecar holds sessions to {MAX_PEERS} addresses"),
                    ));
                }
            }
            peers.entry(url.to_owned()).or_default().clone()
        };
        let mut slot = slot.lock().await;
        if let Some(p) = slot.as_ref() {
            if p.error().is_none() {
                return Ok(p.clone());
            }
        }
        let target = if url.is_empty() { &self.self_url } else { url };
        let p = self.node.connect(target).await.map_err(|e| {
            let mut e = OpError::from(e);
            e.message = format!("{target}: {}", e.message);
            e
        })?;
        (self.on_peer)(p.clone());
        *slot = Some(p.clone());
        Ok(p)
    }

    /// The tool server of endpoint `name`: it serves what the client holding the name serves
    /// at the time of each call.
    pub fn tool_server(&self, name: &str) -> ToolServer {
        let mut servers = lock(&self.tool_servers);
        if let Some(s) = servers.get(name) {
            return s.clone();
        }
        if servers.len() >= MAX_TOOL_SERVERS {
            // Names no client holds now go first (their keys with them).
            servers.retain(|n, _| self.endpoint(n).is_some());
        }
        let (hub, n) = (self.me.clone(), name.to_owned());
        let (hub2, n2) = (hub.clone(), n.clone());
        let mut server = ToolServer::new();
        server.register_dynamic(
            move |tool| {
                hub.upgrade()
                    .and_then(|h| h.endpoint(&n))
                    .is_some_and(|e| e.serves(tool))
            },
            move |req| {
                let e = hub2.upgrade().and_then(|h| h.endpoint(&n2));
                async move {
                    match e {
                        Some(e) => e.call(req).await,
                        None => Err("the endpoint disconnected".into()),
                    }
                }
            },
        );
        servers.insert(name.to_owned(), server.clone());
        server
    }

    /// Records that region `id` of the node is `owner`'s region `handle`.
    pub fn own_region(&self, id: u64, owner: Weak<dyn Endpoint>, handle: u32) {
        lock(&self.regions).insert(id, (owner, handle));
    }

    /// Forgets region `id`.
    pub fn disown_region(&self, id: u64) {
        lock(&self.regions).remove(&id);
    }

    /// The owner of region `id` and its handle there.
    pub fn region_owner(&self, id: u64) -> Option<(Arc<dyn Endpoint>, u32)> {
        let regions = lock(&self.regions);
        let (owner, handle) = regions.get(&id)?;
        Some((owner.upgrade()?, *handle))
    }
}
