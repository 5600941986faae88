//! The connection's start (PROTOCOL.md, "The socket" and `HELLO`): the private socket, the
//! handshake's answer and its refusals.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use agentfabric_sidecar::wire::{
    decode_to_client, ClientMsg, ErrorCode, FromClient, Header, SidecarMsg, HEADER_LEN, VERSION,
};
use agentfabric_sidecar::{Limits, SidecarConfig};
use support::{Client, TempDir, TestSidecar};

/// `HELLO_OK` reports who the kernel says we are (not what we claimed), the node, and the
/// limits the sidecar was configured with; `PING` is answered with `DONE` under the same id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_ok_reports_identity_and_limits() {
    // Limits unlike the defaults, so that a HELLO_OK built from constants would be caught.
    let limits = Limits {
        max_frame: (2 << 20) + 4096,
        max_ops: 77,
        send_window: 9,
        ..Limits::default()
    };
    let sc = TestSidecar::start_with("hello-node", limits).await;
    let mut c = sc.client("agent_1.x-y").await;
    match c.hello_ok.clone().expect("HELLO_OK") {
        SidecarMsg::HelloOk {
            version,
            node,
            endpoint,
            uid,
            pid,
            max_frame,
            max_ops,
            send_window,
        } => {
            assert_eq!(version, VERSION);
            assert_eq!(node, "hello-node");
            assert_eq!(endpoint, "agent_1.x-y");
            assert_eq!(uid, nix::unistd::getuid().as_raw(), "uid is the kernel's");
            assert_eq!(pid, std::process::id(), "pid is the kernel's");
            assert_eq!(max_frame, (2 << 20) + 4096);
            assert_eq!(max_ops, 77);
            assert_eq!(send_window, 9);
        }
        other => panic!("not HELLO_OK: {other:?}"),
    }
    // Replies carry the operation's id, whatever it is (not a counter of the sidecar's).
    for id in [1u64, 42, u64::MAX] {
        c.write(&FromClient {
            id,
            msg: ClientMsg::Ping,
        })
        .await
        .unwrap();
        assert_eq!(c.reply(id).await, SidecarMsg::Done);
    }
    drop(c);
    sc.stop().await;
}

/// A version range the sidecar does not speak is refused (fatally); a range that includes
/// version 1 gets version 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_negotiation() {
    let sc = TestSidecar::start("versions").await;
    for (min, max) in [(2u16, 3u16), (0, 0), (5, 1)] {
        let mut c = Client::connect(&sc.socket()).await;
        c.write(&FromClient {
            id: 0,
            msg: ClientMsg::Hello {
                min_version: min,
                max_version: max,
                endpoint: "v".into(),
            },
        })
        .await
        .unwrap();
        c.expect_fatal(ErrorCode::UnsupportedVersion).await;
    }
    let mut c = Client::connect(&sc.socket()).await;
    c.write(&FromClient {
        id: 0,
        msg: ClientMsg::Hello {
            min_version: 0,
            max_version: 9,
            endpoint: "v".into(),
        },
    })
    .await
    .unwrap();
    match c.read_frame().await.unwrap().unwrap().msg {
        SidecarMsg::HelloOk { version, .. } => assert_eq!(version, 1),
        other => panic!("not HELLO_OK: {other:?}"),
    }
    drop(c);
    sc.stop().await;
}

/// Endpoint names are unique per sidecar: the second claimant is refused fatally and its socket
/// ends, the holder keeps working, and once the holder leaves the name is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_taken() {
    let sc = TestSidecar::start("taken").await;
    let mut first = sc.client("worker").await;
    let mut second = Client::connect(&sc.socket()).await;
    second
        .write(&FromClient {
            id: 0,
            msg: ClientMsg::Hello {
                min_version: 1,
                max_version: 1,
                endpoint: "worker".into(),
            },
        })
        .await
        .unwrap();
    let m = second.expect_fatal(ErrorCode::EndpointTaken).await;
    assert!(m.contains("worker"), "the message names the endpoint: {m}");
    first.ping().await;
    // Another name is fine meanwhile; the holder's name is free once it is gone.
    let mut other = sc.client("worker2").await;
    other.ping().await;
    drop(first);
    let sock = sc.socket();
    support::eventually("the name is released", || {
        let sock = sock.clone();
        async move { Client::try_hello(&sock, "worker").await.is_ok() }
    })
    .await;
    sc.stop().await;
}

/// The first frame must be `HELLO` (with id 0), and only the first; each violation is a fatal
/// `MALFORMED`. A bad endpoint name is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_must_come_first_and_once() {
    let sc = TestSidecar::start("first").await;

    let mut c = Client::connect(&sc.socket()).await;
    c.write(&FromClient {
        id: 1,
        msg: ClientMsg::Ping,
    })
    .await
    .unwrap();
    c.expect_fatal(ErrorCode::Malformed).await;

    let mut c = Client::connect(&sc.socket()).await;
    c.write(&FromClient {
        id: 7,
        msg: ClientMsg::Hello {
            min_version: 1,
            max_version: 1,
            endpoint: "x".into(),
        },
    })
    .await
    .unwrap();
    c.expect_fatal(ErrorCode::Malformed).await;

    let mut c = sc.client("twice").await;
    c.write(&FromClient {
        id: 3,
        msg: ClientMsg::Hello {
            min_version: 1,
            max_version: 1,
            endpoint: "twice".into(),
        },
    })
    .await
    .unwrap();
    c.expect_fatal(ErrorCode::Malformed).await;

    for bad in ["", "a/b", "sp ace", &"x".repeat(33), "é"] {
        match Client::try_hello(&sc.socket(), bad).await {
            Err((ErrorCode::InvalidArgument, _)) => {}
            Err(e) => panic!("HELLO as {bad:?}: {e:?}"),
            Ok(_) => panic!("HELLO as {bad:?} was accepted"),
        }
    }
    // 32 bytes of every allowed character class is a valid name.
    let ok = format!("{}.-_09", "Azy".repeat(9));
    assert_eq!(ok.len(), 32);
    sc.client(&ok).await.ping().await;
    sc.stop().await;
}

/// The socket's directory is 0700 and the socket 0600, both ours; a directory we made with
/// loose permissions is tightened rather than used as is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_private() {
    let sc = TestSidecar::start("modes").await;
    let sock = sc.socket();
    let dir = sock.parent().unwrap().to_owned();
    let dm = std::fs::metadata(&dir).unwrap();
    assert_eq!(dm.mode() & 0o777, 0o700, "socket directory mode");
    assert_eq!(dm.uid(), nix::unistd::getuid().as_raw());
    let sm = std::fs::symlink_metadata(&sock).unwrap();
    assert_eq!(sm.mode() & 0o777, 0o600, "socket mode");
    sc.stop().await;

    let tmp = TempDir::new("loose");
    let dir = tmp.path().join("sock");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = SidecarConfig {
        node: "loose".into(),
        listen: Vec::new(),
        socket_dir: dir.clone(),
        allow_uids: Vec::new(),
        quic_pem: None,
        verbs: false,
        limits: Limits::default(),
    };
    let sc = TestSidecar::start_config(config, tmp).await;
    let dm = std::fs::metadata(&dir).unwrap();
    assert_eq!(dm.mode() & 0o777, 0o700, "a loose directory is tightened");
    sc.client("c").await.ping().await;
    sc.stop().await;
}

/// The uid `nobody` usually has; any uid other than ours would do.
const OTHER_UID: u32 = 65534;

/// Connects to `sock` from a child process running as `uid`, says `HELLO`, and returns the
/// first frame the sidecar answers. Only root can change its uid, so only root runs this.
///
/// The child is forked from a threaded process, so it may only make async-signal-safe calls:
/// everything it needs (the address, the frame) is prepared before the fork, and it only makes
/// raw system calls until it exits; `alarm` bounds it.
fn hello_as(uid: u32, sock: &Path) -> SidecarMsg {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain data; zeroed is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let path = sock.as_os_str().as_bytes();
    assert!(path.len() < addr.sun_path.len());
    for (d, s) in addr.sun_path.iter_mut().zip(path) {
        *d = *s as libc::c_char;
    }
    let mut frame = bytes::BytesMut::new();
    FromClient {
        id: 0,
        msg: ClientMsg::Hello {
            min_version: 1,
            max_version: 1,
            endpoint: "stranger".into(),
        },
    }
    .encode(&mut frame);
    let mut pipe = [0; 2];
    // SAFETY: plain system calls; in the child only async-signal-safe ones, then _exit.
    unsafe {
        assert_eq!(libc::pipe(pipe.as_mut_ptr()), 0);
        let pid = libc::fork();
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            libc::close(pipe[0]);
            libc::alarm(10);
            if libc::syscall(libc::SYS_setgid, uid) != 0
                || libc::syscall(libc::SYS_setuid, uid) != 0
            {
                libc::_exit(2);
            }
            let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if s < 0 || libc::connect(s, std::ptr::addr_of!(addr).cast(), len) != 0 {
                libc::_exit(3);
            }
            // A refused uid is answered at once, without waiting for HELLO, and the socket is
            // shut: the write may then fail (EPIPE), which is no failure of the test.
            libc::write(s, frame.as_ptr().cast(), frame.len());
            // Relay the answer until a whole frame has passed (or the socket ends).
            let mut buf = [0u8; 4096];
            let mut got = 0usize;
            loop {
                let n = libc::read(s, buf.as_mut_ptr().add(got).cast(), buf.len() - got);
                if n <= 0 {
                    break;
                }
                got += n as usize;
                if got >= 4 {
                    let need = 4 + u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                    if got >= need || got == buf.len() {
                        break;
                    }
                }
            }
            libc::write(pipe[1], buf.as_ptr().cast(), got);
            libc::_exit(0);
        }
        libc::close(pipe[1]);
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = libc::read(pipe[0], buf.as_mut_ptr().cast(), buf.len());
            if n <= 0 {
                break;
            }
            out.extend_from_slice(&buf[..n as usize]);
        }
        libc::close(pipe[0]);
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the child as uid {uid} failed (status {status:#x}: 2 setuid, 3 connect)"
        );
        assert!(out.len() >= HEADER_LEN, "no answer: {out:?}");
        let h = Header::parse(out[..HEADER_LEN].try_into().unwrap(), u32::MAX).unwrap();
        let body = bytes::Bytes::copy_from_slice(&out[HEADER_LEN..HEADER_LEN + h.body_len()]);
        decode_to_client(&h, body).unwrap().msg
    }
}

/// Lets other users reach the socket: the sidecar's directory and socket are private by
/// design, so a test for the uid check has to open them up by hand.
fn open_up(sock: &Path, top: &Path) {
    for dir in [top, sock.parent().unwrap()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    std::fs::set_permissions(sock, std::fs::Permissions::from_mode(0o666)).unwrap();
}

/// A client whose uid (as the kernel reports it) is not allowed gets a fatal
/// `PERMISSION_DENIED`, even when the file system lets it reach the socket; a uid added to the
/// allowed list gets `HELLO_OK`, which reports that uid. Needs root (to run as another uid);
/// passes trivially otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_uids_are_refused_unless_allowed() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: only root can connect as another uid");
        return;
    }
    let sc = TestSidecar::start("uids").await;
    open_up(&sc.socket(), sc.dir.path());
    let sock = sc.socket();
    let answer = tokio::task::spawn_blocking(move || hello_as(OTHER_UID, &sock))
        .await
        .unwrap();
    match answer {
        SidecarMsg::Error { code, message } => {
            assert_eq!(code, ErrorCode::PermissionDenied, "{message}");
            assert!(message.contains(&OTHER_UID.to_string()), "{message}");
        }
        other => panic!("uid {OTHER_UID} was not refused: {other:?}"),
    }
    // We are still welcome.
    sc.client("owner").await.ping().await;
    sc.stop().await;

    let tmp = TempDir::new("allowed");
    let config = SidecarConfig {
        node: "allowed".into(),
        listen: Vec::new(),
        socket_dir: tmp.path().join("sock"),
        allow_uids: vec![OTHER_UID],
        quic_pem: None,
        verbs: false,
        limits: Limits::default(),
    };
    let sc = TestSidecar::start_config(config, tmp).await;
    open_up(&sc.socket(), sc.dir.path());
    let sock = sc.socket();
    let answer = tokio::task::spawn_blocking(move || hello_as(OTHER_UID, &sock))
        .await
        .unwrap();
    match answer {
        SidecarMsg::HelloOk { uid, endpoint, .. } => {
            assert_eq!(uid, OTHER_UID, "HELLO_OK reports the kernel's uid");
            assert_eq!(endpoint, "stranger");
        }
        other => panic!("an allowed uid was refused: {other:?}"),
    }
    sc.stop().await;
}
