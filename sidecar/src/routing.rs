//! The fabric side: every session's channels go to the endpoint they name, and notifications
//! to the client that owns the region.

use std::sync::Arc;

use agentfabric::{Channel, Peer};

use crate::hub::Hub;
use crate::link::{Intro, ENDPOINT_PREFIX, TAG_INTRO, TOOL_PREFIX};

/// Accepts sessions and routes their channels until the node closes.
pub async fn accept_sessions(hub: Arc<Hub>) {
    while let Ok(peer) = hub.node.accept().await {
        tokio::spawn(route_channels(hub.clone(), peer));
    }
}

/// Delivers notifications to the clients owning the regions, until the node closes.
pub async fn deliver_notifications(hub: Arc<Hub>) {
    while let Ok(n) = hub.node.notification().await {
        match hub.region_owner(n.region) {
            Some((owner, handle)) => owner.notify(handle, n),
            None => tracing::debug!(
                region = n.region,
                "notification for a region no client holds"
            ),
        }
    }
}

/// Routes the channels the far side opens on `peer`'s session, until it ends.
pub async fn route_channels(hub: Arc<Hub>, peer: Peer) {
    while let Ok(ch) = peer.accept_channel().await {
        let hub = hub.clone();
        // A slow introduction must not hold up the session's other channels.
        tokio::spawn(async move { route(&hub, ch).await });
    }
}

async fn route(hub: &Hub, ch: Channel) {
    let name = ch.name().unwrap_or("").to_owned();
    if let Some(ep) = name.strip_prefix(TOOL_PREFIX) {
        match hub.endpoint(ep) {
            // The name's server, not the client's: the channel outlives a client holding it.
            Some(_) => hub.tool_server(ep).serve_channel(ch).await,
            None => refuse(
                &ch,
                &format!("no endpoint {ep} on node {}", hub.node.name()),
            ),
        }
        return;
    }
    let Some(ep) = name.strip_prefix(ENDPOINT_PREFIX) else {
        refuse(
            &ch,
            "not a sidecar channel (names are ep:ENDPOINT or tool:ENDPOINT)",
        );
        return;
    };
    let Some(endpoint) = hub.endpoint(ep) else {
        refuse(
            &ch,
            &format!("no endpoint {ep} on node {}", hub.node.name()),
        );
        return;
    };
    // The opener's first request introduces it; nothing else is read before.
    let first = tokio::time::timeout(hub.limits.intro_deadline, ch.recv()).await;
    let msg = match first {
        Ok(Ok(m)) => m,
        Ok(Err(_)) => return,
        Err(_) => {
            refuse(&ch, "no introduction in time");
            return;
        }
    };
    let intro = match (msg.request_id, msg.body.split_first()) {
        (Some(_), Some((&TAG_INTRO, rest))) => Intro::decode(rest),
        _ => None,
    };
    let Some(intro) = intro else {
        refuse(&ch, "the channel did not open with an introduction");
        return;
    };
    let node = ch.peer().name().to_owned();
    match endpoint.incoming(ch.clone(), node, intro) {
        Ok(()) => {
            let _ = ch.respond(&msg, Vec::new()).await;
        }
        Err(why) => refuse(&ch, &why),
    }
}

fn refuse(ch: &Channel, why: &str) {
    if let Err(e) = ch.refuse(why) {
        tracing::debug!(error = %e, "refusing a channel");
    }
}
