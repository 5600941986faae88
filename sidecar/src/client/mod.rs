//! One client connection, from `HELLO` to the socket's end: the handshake, the reading loop,
//! and the clean-up when the client goes (its channels closed, its calls cancelled, its
//! regions revoked and unmapped).

mod channels;
mod deadline;
mod dispatch;
mod regions;
mod sends;
mod state;
mod tools;

use std::future::Future;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentfabric::bulk::Notification;
use agentfabric::sync::lock;
use agentfabric::tools::{ToolRequest, ToolResult};
use agentfabric::Channel;
use tokio::net::UnixStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::endpoint::Endpoint;
use crate::errors::OpError;
use crate::hub::Hub;
use crate::link::{valid_endpoint, Intro};
use crate::reader::{FrameReader, ReadError};
use crate::socket::Credentials;
use crate::wire::{decode_from_client, ClientMsg, ErrorCode, SidecarMsg, HELLO_MAX_FRAME, VERSION};
use crate::writer::Outbound;
use state::Conn;

/// How long a new connection has to say `HELLO`.
const HELLO_DEADLINE: Duration = Duration::from_secs(10);

/// How long a refused connection is read before it is shut.
const LINGER: Duration = Duration::from_millis(500);

/// How long the writer may take to flush a fatal `ERROR` before the socket is shut.
const FLUSH_DEADLINE: Duration = Duration::from_secs(2);

/// Serves one client until it goes or breaks the protocol.
pub async fn serve(hub: Arc<Hub>, stream: UnixStream, creds: Credentials) {
    let fd = stream.as_raw_fd();
    let (rd, wr) = stream.into_split();
    let (out, writer) = Outbound::start(wr, hub.limits.queued_bytes);
    let mut reader = FrameReader::new(HELLO_MAX_FRAME);
    let conn = match hello(&hub, &out, &mut reader, rd.as_ref(), creds).await {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(uid = creds.uid, pid = creds.pid, error = %e.message, "client refused");
            let _ = out.reply(0, e.into_msg(), None);
            out.end();
            drop(out);
            // A client refused before its HELLO may still be writing it: read what it sends
            // for a moment, so that its write does not fail (EPIPE) before it reads the answer.
            let _ = tokio::time::timeout(LINGER, reader.next(rd.as_ref())).await;
            finish(writer, fd).await;
            return;
        }
    };
    tracing::info!(endpoint = %conn.endpoint, uid = creds.uid, pid = creds.pid, "client connected");
    let mut ops = JoinSet::new();
    let end = read_loop(&conn, &mut reader, rd.as_ref(), &mut ops).await;
    ops.abort_all();
    match &end {
        Ok(()) => tracing::info!(endpoint = %conn.endpoint, "client disconnected"),
        Err(e) => {
            tracing::warn!(endpoint = %conn.endpoint, pid = creds.pid, error = %e.message, "client disconnected for a protocol violation");
        }
    }
    if let Err(e) = end {
        let _ = conn.out.reply(0, e.into_msg(), None);
    }
    clean_up(&conn).await;
    out.end();
    drop(out);
    drop(conn);
    while ops.join_next().await.is_some() {}
    finish(writer, fd).await;
    drop(rd);
}

/// Lets the writer flush what is queued (a fatal `ERROR`), then shuts the socket so that a
/// client that does not read learns of the end too.
async fn finish(writer: tokio::task::JoinHandle<()>, fd: std::os::fd::RawFd) {
    let abort = writer.abort_handle();
    if tokio::time::timeout(FLUSH_DEADLINE, writer).await.is_err() {
        abort.abort();
    }
    // SAFETY: the read half still owns the descriptor (dropped after this); shutdown only
    // changes the socket's state.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// The handshake: credentials, `HELLO`, the endpoint's name.
async fn hello(
    hub: &Arc<Hub>,
    out: &Outbound,
    reader: &mut FrameReader,
    stream: &UnixStream,
    creds: Credentials,
) -> Result<Arc<Conn>, OpError> {
    if !hub.allowed_uids.contains(&creds.uid) {
        return Err(OpError::new(
            ErrorCode::PermissionDenied,
            format!("uid {} may not use this sidecar", creds.uid),
        ));
    }
    let malformed = |m: String| OpError::new(ErrorCode::Malformed, m);
    let (h, body) = match tokio::time::timeout(HELLO_DEADLINE, reader.next(stream)).await {
        Err(_) => return Err(malformed(format!("no HELLO within {HELLO_DEADLINE:?}"))),
        Ok(Err(ReadError::Wire(e))) => return Err(OpError::new(e.code(), e.to_string())),
        Ok(Err(e)) => return Err(malformed(format!("before HELLO: {e:?}"))),
        Ok(Ok(f)) => f,
    };
    let f = decode_from_client(&h, body).map_err(|e| OpError::new(e.code(), e.to_string()))?;
    let ClientMsg::Hello {
        min_version,
        max_version,
        endpoint,
    } = f.msg
    else {
        return Err(malformed("the first frame must be HELLO".into()));
    };
    if f.id != 0 {
        return Err(malformed("HELLO's id must be 0".into()));
    }
    if min_version > VERSION || max_version < VERSION {
        return Err(OpError::new(
            ErrorCode::UnsupportedVersion,
            format!("this sidecar speaks version {VERSION}, not {min_version}..={max_version}"),
        ));
    }
    if !valid_endpoint(&endpoint) {
        return Err(OpError::new(
            ErrorCode::InvalidArgument,
            format!("endpoint name {endpoint:?}: 1-32 bytes of A-Z a-z 0-9 . _ -"),
        ));
    }
    let limits = &hub.limits;
    let served = Arc::new(Mutex::default());
    let conn = Arc::new_cyclic(|me| Conn {
        me: me.clone(),
        hub: hub.clone(),
        endpoint: endpoint.clone(),
        out: out.clone(),
        ops: Arc::new(Semaphore::new(limits.max_ops as usize)),
        channels: Mutex::default(),
        regions: Mutex::default(),
        served: served.clone(),
        tool_calls: Mutex::default(),
        next_call: AtomicU64::new(1),
        calls: Mutex::default(),
        tool_clients: Mutex::default(),
        tool_channels: Mutex::default(),
        closed: AtomicBool::new(false),
    });
    if !hub.claim(&endpoint, conn.clone()) {
        return Err(OpError::new(
            ErrorCode::EndpointTaken,
            format!("endpoint {endpoint} is taken on node {}", hub.node.name()),
        ));
    }
    let ok = SidecarMsg::HelloOk {
        version: VERSION,
        node: hub.node.name().to_owned(),
        endpoint,
        uid: creds.uid,
        pid: creds.pid,
        max_frame: limits.max_frame,
        max_ops: limits.max_ops,
        send_window: limits.send_window,
    };
    let _ = out.reply(0, ok, None);
    reader.set_max_frame(limits.max_frame);
    Ok(conn)
}

/// Reads and runs operations until the client goes (`Ok`) or breaks the protocol (`Err`).
async fn read_loop(
    conn: &Arc<Conn>,
    reader: &mut FrameReader,
    stream: &UnixStream,
    ops: &mut JoinSet<()>,
) -> Result<(), OpError> {
    loop {
        while ops.try_join_next().is_some() {}
        let (h, body) = match reader.next(stream).await {
            Ok(f) => f,
            Err(ReadError::Eof) => return Ok(()),
            Err(ReadError::Io(e)) => {
                tracing::debug!(error = %e, "client socket failed");
                return Ok(());
            }
            Err(ReadError::Wire(e)) => return Err(OpError::new(e.code(), e.to_string())),
            Err(ReadError::Fds(m)) => return Err(OpError::new(ErrorCode::Malformed, m)),
        };
        let f = decode_from_client(&h, body).map_err(|e| OpError::new(e.code(), e.to_string()))?;
        if f.id == 0 {
            return Err(OpError::new(
                ErrorCode::Malformed,
                "an operation's id must not be 0",
            ));
        }
        // At most max_ops in flight: past that, the socket is not read until one is answered.
        let permit = conn
            .ops
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| OpError::new(ErrorCode::Internal, "operation limit closed"))?;
        dispatch::dispatch(conn, f.id, f.msg, permit, || reader.take_fd(), ops)?;
    }
}

/// The client is gone: its name, channels, calls and regions go with it.
async fn clean_up(conn: &Arc<Conn>) {
    conn.closed.store(true, Ordering::Release);
    conn.hub.release(&conn.endpoint);
    lock(&conn.served).clear();
    // Forwarded calls fail at their callers ("disconnected"); the client's own calls stop.
    lock(&conn.tool_calls).clear();
    lock(&conn.calls).clear();
    lock(&conn.tool_clients).clear();
    lock(&conn.tool_channels).clear();
    let chans: Vec<_> = lock(&conn.channels).map.drain().map(|(_, e)| e).collect();
    let regions: Vec<_> = lock(&conn.regions).map.drain().map(|(_, e)| e).collect();
    let why = format!("endpoint {} disconnected", conn.endpoint);
    for e in &chans {
        e.stop();
    }
    // Together, on tasks of their own: one slow peer does not hold up the others.
    let mut ends = JoinSet::new();
    for e in chans {
        let why = why.clone();
        ends.spawn(async move { channels::shut(&e, &why).await });
    }
    for e in regions {
        let conn = conn.clone();
        ends.spawn(async move { regions::release(&conn, &e).await });
    }
    while ends.join_next().await.is_some() {}
}

impl Endpoint for Conn {
    fn incoming(&self, ch: Channel, node: String, intro: Intro) -> Result<(), String> {
        let me = self.me.upgrade().ok_or("the endpoint disconnected")?;
        channels::incoming(&me, ch, node, intro)
    }

    fn serves(&self, tool: &str) -> bool {
        lock(&self.served).contains(tool)
    }

    fn call(&self, req: ToolRequest) -> Pin<Box<dyn Future<Output = ToolResult> + Send>> {
        Box::pin(tools::forward(self.me.clone(), req))
    }

    fn notify(&self, region: u32, n: Notification) {
        let msg = SidecarMsg::Notification {
            region,
            tag: n.tag,
            node: n.peer,
        };
        let out = self.out.clone();
        tokio::spawn(async move {
            let _ = out.event(0, msg).await;
        });
    }
}
