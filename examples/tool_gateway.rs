//! A tool gateway: a fabric node that exposes HTTP/JSON APIs (any URL the operator configures)
//! as tools over QUIC with mutual TLS, so an agent calls an external REST API through the fabric
//! with deadlines, cancellation and at-most-once retries.
//!
//! ```sh
//! # The demo: a small HTTP service on loopback, the gateway in front of it, an agent calling it.
//! cargo run -p agentfabric-examples --example tool_gateway
//!
//! # For real: certificates (dev CA here; the operator's CA in production), a gateway, an agent.
//! cargo run -p agentfabric-examples --example tool_gateway -- certs /tmp/af-certs gateway agent
//! cargo run -p agentfabric-examples --example tool_gateway -- serve --certs /tmp/af-certs \
//!     --name gateway --listen quic://127.0.0.1:7443 \
//!     --tool weather=GET:http://127.0.0.1:8080/weather --tool translate=POST:http://127.0.0.1:8080/tr
//! cargo run -p agentfabric-examples --example tool_gateway -- call --certs /tmp/af-certs \
//!     --name agent --connect quic://127.0.0.1:7443 weather '{"city":"Oslo"}'
//! ```
//!
//! A call's arguments are the request body (POST/PUT) or the query string (GET, after `?`); the
//! answer is the response body of a 2xx status, and any other status is a tool failure that
//! carries the status and the body. The call's deadline bounds the HTTP exchange, and a cancelled
//! call closes the HTTP connection. The HTTP client is a minimal HTTP/1.1 one (plain `http://`,
//! `Content-Length` or chunked bodies, one connection per call), to keep the example free of
//! heavy dependencies.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentfabric::tools::{Call, ToolClient, ToolRequest, ToolServer};
use agentfabric::{Bytes, Node};
use agentfabric_quic::{QuicConfig, QuicTransport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP endpoint exposed as a tool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTool {
    /// Tool name.
    pub name: String,
    /// HTTP method (GET, POST, PUT, DELETE).
    pub method: String,
    /// `http://host:port/path` (plain HTTP; put a TLS proxy in front for https).
    pub url: String,
}

impl HttpTool {
    /// Parses `NAME=METHOD:URL`.
    pub fn parse(spec: &str) -> Result<HttpTool, String> {
        let (name, rest) = spec
            .split_once('=')
            .ok_or_else(|| format!("{spec:?}: expected NAME=METHOD:URL"))?;
        let (method, url) = rest
            .split_once(':')
            .ok_or_else(|| format!("{spec:?}: expected NAME=METHOD:URL"))?;
        let method = method.to_ascii_uppercase();
        if !matches!(method.as_str(), "GET" | "POST" | "PUT" | "DELETE") {
            return Err(format!("{spec:?}: unsupported method {method}"));
        }
        parse_url(url)?;
        Ok(HttpTool {
            name: name.to_owned(),
            method,
            url: url.to_owned(),
        })
    }
}

/// (host:port, path) of an `http://` URL.
fn parse_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?}: only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    let authority = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    Ok((authority, path.to_owned()))
}

/// An HTTP response: status and body.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Body (de-chunked).
    pub body: Vec<u8>,
}

/// One HTTP/1.1 exchange on a new connection (`Connection: close`).
pub async fn http_call(method: &str, url: &str, body: &[u8]) -> Result<HttpResponse, String> {
    let (authority, mut path) = parse_url(url)?;
    let send_body = matches!(method, "POST" | "PUT");
    if !send_body && !body.is_empty() {
        let q = std::str::from_utf8(body).map_err(|_| "GET arguments must be UTF-8")?;
        path.push(if path.contains('?') { '&' } else { '?' });
        path.push_str(q.trim_start_matches('?'));
    }
    let mut s = TcpStream::connect(&authority)
        .await
        .map_err(|e| format!("connect {authority}: {e}"))?;
    let _ = s.set_nodelay(true);
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\
         Accept: application/json\r\nUser-Agent: agentfabric-tool-gateway\r\n"
    );
    if send_body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    if send_body {
        s.write_all(body).await.map_err(|e| format!("write: {e}"))?;
    }
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .await
        .map_err(|e| format!("read: {e}"))?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Result<HttpResponse, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("malformed HTTP response: no end of headers")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "malformed HTTP headers")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("malformed status line {status_line:?}"))?;
    let mut length = None;
    let mut chunked = false;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "content-length" {
            length = v.parse::<usize>().ok();
        } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
            chunked = true;
        }
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n)
            .ok_or("HTTP body shorter than Content-Length")?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(HttpResponse { status, body })
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let i = b.windows(2).position(|w| w == b"\r\n").ok_or("bad chunk")?;
        let size = std::str::from_utf8(&b[..i])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .ok_or("bad chunk size")?;
        b = &b[i + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(b.get(..size).ok_or("truncated chunk")?);
        b = b.get(size + 2..).ok_or("truncated chunk")?;
    }
}

/// A tool server whose tools are the given HTTP endpoints.
pub fn gateway(tools: &[HttpTool]) -> ToolServer {
    let mut server = ToolServer::new();
    for t in tools {
        let t = t.clone();
        server.register(&t.name.clone(), move |req: ToolRequest| {
            let t = t.clone();
            async move {
                // The tool server drops this future when the call is cancelled or its deadline
                // passes (the caller then gets `DeadlineExceeded`), which closes the connection.
                let r = http_call(&t.method, &t.url, &req.args).await?;
                if (200..300).contains(&r.status) {
                    Ok(Bytes::from(r.body))
                } else {
                    Err(format!(
                        "HTTP {} from {} {}: {}",
                        r.status,
                        t.method,
                        t.url,
                        String::from_utf8_lossy(&r.body)
                    ))
                }
            }
        });
    }
    server
}

/// A QUIC transport for node `name` from the certificates in `dir` (`ca.pem`, `NAME.pem`,
/// `NAME.key`, as `certs` writes them).
pub fn quic_from_dir(dir: &Path, name: &str) -> std::io::Result<QuicTransport> {
    let cfg = QuicConfig::from_pem_files(
        &dir.join("ca.pem"),
        &dir.join(format!("{name}.pem")),
        &dir.join(format!("{name}.key")),
    )?;
    QuicTransport::new(cfg)
}

/// Starts a gateway node named `name` on `listen`; returns the node and its address.
pub async fn start_gateway(
    certs: &Path,
    name: &str,
    listen: &str,
    tools: &[HttpTool],
) -> Result<(Node, String), Box<dyn std::error::Error>> {
    let node = Node::builder(name)
        .transport(quic_from_dir(certs, name)?)
        .build()?;
    let addr = node.listen(listen).await?;
    tokio::spawn(gateway(tools).serve(node.clone()));
    Ok((node, addr))
}

/// Connects an agent node named `name` to the gateway at `addr`.
pub async fn agent(
    certs: &Path,
    name: &str,
    addr: &str,
) -> Result<(Node, ToolClient), Box<dyn std::error::Error>> {
    let node = Node::builder(name)
        .transport(quic_from_dir(certs, name)?)
        .build()?;
    let peer = node.connect(addr).await?;
    let client = ToolClient::new(&peer)?;
    Ok((node, client))
}

/// A tiny HTTP/1.1 service on 127.0.0.1 for the demo and the tests: `GET /weather?city=X`
/// answers JSON, `POST /echo` echoes the body, `GET /slow` answers after 2 s, anything else
/// is a 404. Serves `max` connections, then stops.
pub async fn demo_http_service(max: usize) -> std::io::Result<std::net::SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        for _ in 0..max {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                // Read the head, then the body by Content-Length.
                let (head_end, len) = loop {
                    let Ok(n) = s.read(&mut tmp).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                    if let Some(e) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..e]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        break (e + 4, len);
                    }
                };
                while buf.len() < head_end + len {
                    let Ok(n) = s.read(&mut tmp).await else {
                        return;
                    };
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                }
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let target = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let body = &buf[head_end..];
                let (status, out) = if let Some(q) = target.strip_prefix("/weather?city=") {
                    (
                        200,
                        format!("{{\"city\":\"{q}\",\"sky\":\"clear\",\"celsius\":21}}"),
                    )
                } else if target == "/echo" {
                    (200, String::from_utf8_lossy(body).to_string())
                } else if target == "/slow" {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    (200, "{\"slow\":true}".to_owned())
                } else {
                    (404, "{\"error\":\"no such endpoint\"}".to_owned())
                };
                let reason = if status == 200 { "OK" } else { "Not Found" };
                let resp = format!(
                    "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{out}",
                    out.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(addr)
}

fn usage() -> ! {
    eprintln!(
        "usage: tool_gateway                      (demo)\n       \
         tool_gateway certs DIR NAME...\n       \
         tool_gateway serve --certs DIR --name NAME --listen quic://HOST:PORT --tool NAME=METHOD:URL...\n       \
         tool_gateway call --certs DIR --name NAME --connect quic://HOST:PORT TOOL [ARGS] [--deadline-ms N]"
    );
    std::process::exit(2)
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn positional(args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if args[i].starts_with("--") {
            i += 2;
        } else {
            out.push(args[i].clone());
            i += 1;
        }
    }
    out
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => demo().await,
        Some("certs") => {
            let dir = args.get(1).unwrap_or_else(|| usage());
            let names: Vec<&str> = args[2..].iter().map(String::as_str).collect();
            let files = agentfabric_quic::write_dev_certs(Path::new(dir), &names)?;
            println!(
                "wrote {} and {} node certificate(s)",
                files.ca_cert.display(),
                names.len()
            );
            Ok(())
        }
        Some("serve") => {
            let rest = &args[1..];
            let certs = PathBuf::from(flag(rest, "--certs").unwrap_or_else(|| usage()));
            let name = flag(rest, "--name").unwrap_or_else(|| "gateway".into());
            let listen = flag(rest, "--listen").unwrap_or_else(|| "quic://127.0.0.1:7443".into());
            let mut tools = Vec::new();
            for (i, a) in rest.iter().enumerate() {
                if a == "--tool" {
                    tools.push(HttpTool::parse(rest.get(i + 1).unwrap_or_else(|| usage()))?);
                }
            }
            let (_node, addr) = start_gateway(&certs, &name, &listen, &tools).await?;
            println!("gateway {name} on {addr} with {} tool(s)", tools.len());
            std::future::pending::<()>().await;
            Ok(())
        }
        Some("call") => {
            let rest = &args[1..];
            let certs = PathBuf::from(flag(rest, "--certs").unwrap_or_else(|| usage()));
            let name = flag(rest, "--name").unwrap_or_else(|| "agent".into());
            let addr = flag(rest, "--connect").unwrap_or_else(|| usage());
            let ms: u64 = flag(rest, "--deadline-ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(5000);
            let pos = positional(rest);
            let tool = pos.first().unwrap_or_else(|| usage());
            let call_args = pos.get(1).cloned().unwrap_or_default();
            let (_node, client) = agent(&certs, &name, &addr).await?;
            let out = client
                .call_with(Call::new(tool, call_args, Duration::from_millis(ms)).retries(2))
                .await?;
            println!("{}", String::from_utf8_lossy(&out));
            Ok(())
        }
        Some(_) => usage(),
    }
}

async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    let http = demo_http_service(100).await?;
    let dir = std::env::temp_dir().join(format!("af-tool-gateway-{}", std::process::id()));
    agentfabric_quic::write_dev_certs(&dir, &["gateway", "agent"])?;
    let tools = [
        HttpTool::parse(&format!("weather=GET:http://{http}/weather"))?,
        HttpTool::parse(&format!("echo=POST:http://{http}/echo"))?,
        HttpTool::parse(&format!("slow=GET:http://{http}/slow"))?,
    ];
    let (_gw, addr) = start_gateway(&dir, "gateway", "quic://127.0.0.1:0", &tools).await?;
    println!(
        "HTTP service on http://{http}; gateway on {addr} (mutual TLS, dev CA in {})",
        dir.display()
    );
    let (_agent, client) = agent(&dir, "agent", &addr).await?;
    let d = Duration::from_secs(2);
    let t = Instant::now();
    let w = client.call("weather", "city=Oslo", d).await?;
    println!(
        "weather(city=Oslo) -> {} ({:?})",
        String::from_utf8_lossy(&w),
        t.elapsed()
    );
    let e = client.call("echo", r#"{"hello":"fabric"}"#, d).await?;
    println!("echo -> {}", String::from_utf8_lossy(&e));
    let t = Instant::now();
    let slow = client.call("slow", "", Duration::from_millis(200)).await;
    println!(
        "slow with a 200 ms deadline -> {slow:?} after {:?}",
        t.elapsed()
    );
    let missing = client.call("nope", "", d).await;
    println!("unknown tool -> {missing:?}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentfabric::tools::ToolError;

    #[test]
    fn parses_tools_and_responses() {
        let t = HttpTool::parse("w=get:http://127.0.0.1:8080/weather").unwrap();
        assert_eq!(
            (t.method.as_str(), t.url.as_str()),
            ("GET", "http://127.0.0.1:8080/weather")
        );
        assert!(HttpTool::parse("w=GET:https://x/y").is_err());
        assert!(HttpTool::parse("nonsense").is_err());
        let r = parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap();
        assert_eq!((r.status, &r.body[..]), (200, &b"abcde"[..]));
        let r =
            parse_response(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nnoEXTRA").unwrap();
        assert_eq!((r.status, &r.body[..]), (404, &b"no"[..]));
    }

    /// The gateway against a real HTTP server on loopback, over QUIC with mutual TLS.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gateway_calls_a_real_http_service_over_quic() {
        let http = demo_http_service(50).await.unwrap();
        let dir = std::env::temp_dir().join(format!("af-gw-test-{}", std::process::id()));
        agentfabric_quic::write_dev_certs(&dir, &["gateway", "agent"]).unwrap();
        let tools = [
            HttpTool::parse(&format!("weather=GET:http://{http}/weather")).unwrap(),
            HttpTool::parse(&format!("echo=POST:http://{http}/echo")).unwrap(),
            HttpTool::parse(&format!("slow=GET:http://{http}/slow")).unwrap(),
            HttpTool::parse(&format!("missing=GET:http://{http}/missing")).unwrap(),
        ];
        let (_gw, addr) = start_gateway(&dir, "gateway", "quic://127.0.0.1:0", &tools)
            .await
            .unwrap();
        assert!(addr.starts_with("quic://"));
        let (_agent, client) = agent(&dir, "agent", &addr).await.unwrap();
        let d = Duration::from_secs(5);
        let w = client.call("weather", "city=Oslo", d).await.unwrap();
        assert_eq!(&w[..], br#"{"city":"Oslo","sky":"clear","celsius":21}"#);
        let body = r#"{"q":"translate me","to":"fr"}"#;
        let e = client.call("echo", body, d).await.unwrap();
        assert_eq!(&e[..], body.as_bytes());
        // An HTTP error status is a tool failure that says what happened.
        match client.call("missing", "", d).await.unwrap_err() {
            ToolError::Failed(why) => assert!(why.contains("HTTP 404"), "{why}"),
            other => panic!("unexpected {other:?}"),
        }
        // The deadline bounds the HTTP exchange.
        let t = Instant::now();
        assert_eq!(
            client
                .call("slow", "", Duration::from_millis(150))
                .await
                .unwrap_err(),
            ToolError::DeadlineExceeded
        );
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(matches!(
            client.call("nope", "", d).await.unwrap_err(),
            ToolError::UnknownTool(_)
        ));
        // An agent whose certificate is not from the gateway's CA is refused.
        let other = std::env::temp_dir().join(format!("af-gw-other-{}", std::process::id()));
        agentfabric_quic::write_dev_certs(&other, &["agent"]).unwrap();
        std::fs::copy(dir.join("ca.pem"), other.join("ca.pem")).unwrap();
        let Err(err) = agent(&other, "agent", &addr).await else {
            panic!("an agent with a certificate from another CA was accepted")
        };
        // (Each development CA has a name of its own, so the peer's chain has an unknown issuer.)
        let text = err.to_string();
        assert!(
            text.contains("refused the TLS handshake") && text.contains("invalid peer certificate"),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&other).unwrap();
    }
}
