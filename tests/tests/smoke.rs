use agentfabric::{Class, Node};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_mem_and_tcp() {
    for url in ["mem://s", "tcp://127.0.0.1:0"] {
        let net = agentfabric::mem::MemNetwork::new();
        let server = Node::builder("server")
            .transport(net.transport())
            .transport(agentfabric_tcp::TcpTransport::new())
            .build()
            .unwrap();
        let addr = server.listen(url).await.unwrap();
        let client = Node::builder("client")
            .transport(net.transport())
            .transport(agentfabric_tcp::TcpTransport::new())
            .build()
            .unwrap();
        let peer = client.connect(&addr).await.unwrap();
        let ch = peer.channel(Class::Coordination, 3).unwrap();
        ch.send("hello").await.unwrap();
        let sp = server.accept().await.unwrap();
        assert_eq!(sp.name(), "client");
        let sc = sp.accept_channel().await.unwrap();
        let m = sc.recv().await.unwrap();
        assert_eq!(&m.body[..], b"hello");
        assert_eq!(m.request_id, None);
        assert_eq!(
            sc.respond(&m, "no").await,
            Err(agentfabric::Error::NotARequest)
        );
        let h = tokio::spawn(async move {
            loop {
                let m = sc.recv().await.unwrap();
                sc.respond(&m, m.body.clone()).await.unwrap();
            }
        });
        for i in 0..100u32 {
            let r = ch
                .request(i.to_le_bytes().to_vec(), Duration::from_secs(1))
                .await
                .unwrap();
            assert_eq!(&r[..], &i.to_le_bytes());
        }
        let big = vec![7u8; 5 << 20];
        let bulk = peer.channel(Class::Bulk, 0).unwrap();
        bulk.send(big.clone()).await.unwrap();
        let sb = sp.accept_channel().await.unwrap();
        let got = sb.recv().await.unwrap();
        assert_eq!(got.body.len(), big.len());
        println!("{url}: {:?}", peer.stats());
        h.abort();
    }
}
