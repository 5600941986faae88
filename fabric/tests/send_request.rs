//! `Channel::send_request`: a request queued in its place among the channel's messages, its
//! response awaited afterwards.

use std::time::Duration;

use agentfabric::mem::MemNetwork;
use agentfabric::{Class, Error, Node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_request_keeps_its_place_and_gets_its_answer() {
    let net = MemNetwork::new();
    let server = Node::builder("server")
        .transport(net.transport())
        .build()
        .unwrap();
    let addr = server.listen("mem://server").await.unwrap();
    let client = Node::builder("client")
        .transport(net.transport())
        .build()
        .unwrap();
    let peer = client.connect(&addr).await.unwrap();
    let ch = peer.channel(Class::Coordination, 3).unwrap();
    ch.send("first").await.unwrap();
    let answer = ch.send_request("second").await.unwrap();
    let unanswered = ch.send_request("third").await.unwrap();
    ch.send("fourth").await.unwrap();

    let theirs = server
        .accept()
        .await
        .unwrap()
        .accept_channel()
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut requests = Vec::new();
    for _ in 0..4 {
        let m = theirs.recv().await.unwrap();
        got.push(String::from_utf8(m.body.to_vec()).unwrap());
        if m.request_id.is_some() {
            requests.push(m);
        }
    }
    assert_eq!(got, ["first", "second", "third", "fourth"]);
    theirs.respond(&requests[0], "answer").await.unwrap();
    let body = answer.wait(Duration::from_secs(5)).await.unwrap();
    assert_eq!(&body[..], b"answer");
    // The third is never answered: its deadline.
    let r = unanswered.wait(Duration::from_millis(50)).await;
    assert_eq!(r, Err(Error::DeadlineExceeded));
}
