//! Turns each operation a client sends into its handler: the cheap ones inline on the reading
//! task, the ones that wait (on the network, a deadline, a registration) as tasks of their own,
//! each answered with exactly one reply.

use std::future::Future;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use agentfabric::sync::lock;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use super::state::Conn;
use super::{channels, regions, sends, tools};
use crate::errors::OpError;
use crate::wire::{ClientMsg, ErrorCode, SidecarMsg};
use crate::writer::OpPermit;

/// Runs operation `id`. `Err` is a protocol violation that ends the connection.
pub fn dispatch(
    conn: &Arc<Conn>,
    id: u64,
    msg: ClientMsg,
    permit: OpPermit,
    fd: impl FnOnce() -> Option<OwnedFd>,
    ops: &mut JoinSet<()>,
) -> Result<(), OpError> {
    let c = conn.clone();
    match msg {
        ClientMsg::Hello { .. } => {
            return Err(OpError::new(
                ErrorCode::Malformed,
                "HELLO after the first frame",
            ))
        }
        ClientMsg::Ping => conn.answer(id, Ok(SidecarMsg::Done), permit),
        ClientMsg::Send { channel, body } => sends::send(conn, id, channel, body, permit)?,
        ClientMsg::Flush { channel } => sends::flush(conn, id, channel, permit),
        ClientMsg::Open {
            class,
            priority,
            url,
            endpoint,
            label,
        } => spawn(ops, conn, id, permit, async move {
            channels::open(c, class, priority, url, endpoint, label).await
        }),
        ClientMsg::Close { channel, reason } => {
            spawn(ops, conn, id, permit, channels::close(c, channel, reason))
        }
        ClientMsg::Request {
            channel,
            deadline_ms,
            body,
        } => sends::request(conn, id, channel, deadline_ms, body, permit),
        ClientMsg::Respond {
            channel,
            request,
            body,
        } => spawn(
            ops,
            conn,
            id,
            permit,
            channels::respond(c, channel, request, Ok(body)),
        ),
        ClientMsg::RespondError {
            channel,
            request,
            reason,
        } => spawn(
            ops,
            conn,
            id,
            permit,
            channels::respond(c, channel, request, Err(reason)),
        ),
        ClientMsg::Serve { tool } => conn.answer(id, tools::serve(conn, tool, true), permit),
        ClientMsg::Unserve { tool } => conn.answer(id, tools::serve(conn, tool, false), permit),
        ClientMsg::Call {
            deadline_ms,
            hedged,
            retries,
            tool,
            targets,
            key,
            args,
        } => {
            let call = tools::CallArgs {
                deadline_ms,
                hedged,
                retries,
                tool,
                targets,
                key,
                args,
            };
            if let Err(e) = tools::check(&call) {
                conn.answer(id, Err(e), permit);
                return Ok(());
            }
            let (tx, rx) = oneshot::channel();
            {
                let mut calls = lock(&conn.calls);
                if calls.contains_key(&id) {
                    drop(calls);
                    conn.answer(
                        id,
                        Err(OpError::new(
                            ErrorCode::InvalidArgument,
                            format!("a call with id {id} is already in flight"),
                        )),
                        permit,
                    );
                    return Ok(());
                }
                calls.insert(id, tx);
            }
            spawn(ops, conn, id, permit, async move {
                let r = tools::call(c.clone(), call, rx).await;
                lock(&c.calls).remove(&id);
                r
            })
        }
        ClientMsg::Cancel { call } => {
            if let Some(tx) = lock(&conn.calls).remove(&call) {
                let _ = tx.send(());
            }
            conn.answer(id, Ok(SidecarMsg::Done), permit);
        }
        ClientMsg::ToolReply { call, ok, body } => {
            conn.answer(id, Ok(tools::reply(conn, call, ok, body)), permit)
        }
        ClientMsg::RegionAdd { len } => {
            let fd = fd();
            spawn(ops, conn, id, permit, regions::add(c, fd, len))
        }
        ClientMsg::RegionDrop { region } => {
            spawn(ops, conn, id, permit, regions::drop_region(c, region))
        }
        ClientMsg::Write(t) => spawn(ops, conn, id, permit, regions::transfer(c, t, true)),
        ClientMsg::Read(t) => spawn(ops, conn, id, permit, regions::transfer(c, t, false)),
    }
    Ok(())
}

/// Runs `op` as a task of the connection and answers it.
fn spawn(
    ops: &mut JoinSet<()>,
    conn: &Arc<Conn>,
    id: u64,
    permit: OpPermit,
    op: impl Future<Output = Result<SidecarMsg, OpError>> + Send + 'static,
) {
    let conn = conn.clone();
    ops.spawn(async move {
        let r = op.await;
        conn.answer(id, r, permit);
    });
}
