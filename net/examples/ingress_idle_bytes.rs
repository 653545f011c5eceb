//! Measures the heap bytes one idle client connection's ingress stack holds, per kind of
//! listener: WebSocket, PROXY + WebSocket, TLS, and WebSocket over TLS.
//!
//!     cargo run -p shardmq-net --features ingress --example ingress_idle_bytes
//!
//! (Heap sizes do not depend on the build profile, so a debug build measures the same.)
//!
//! For each kind it opens 1,000 stacks, runs each through its handshakes and one MQTT
//! exchange each way (a CONNECT in, a CONNACK out, the wire bytes taken as the reactor takes
//! them), then counts the bytes still allocated (a counting global allocator) and divides.
//! What the kernel holds per socket and what the shard holds per connection are not counted
//! here.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::BytesMut;
use rustls::pki_types::ServerName;
use shardmq_net::ingress::names::NameFrom;
use shardmq_net::ingress::proxy::{
    PROXY_HEADER_LEN_MAX, ProxyAccept, ProxyListener, TrustedNetworks,
};
use shardmq_net::ingress::stack::{
    CLIENT_TLS_HANDSHAKE_LEN_MAX, IngressStack, StackConfig, TlsListener,
};
use shardmq_net::ingress::tls::{
    ClientCertificates, TlsSession, client_config, client_listener_config, roots_from_pem,
};
use shardmq_net::ingress::ws::WsListener;

struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new_size, Ordering::Relaxed);
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const CA: &[u8] = include_bytes!("../src/ingress/testdata/ca.pem");
const CERT: &[u8] = include_bytes!("../src/ingress/testdata/node.pem");
const KEY: &[u8] = include_bytes!("../src/ingress/testdata/node.key");
const COUNT: usize = 1000;
const CONNECT: &[u8] = b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04idle";

fn masked_binary(payload: &[u8]) -> Vec<u8> {
    let mask = [1, 2, 3, 4];
    let mut frame = vec![0x82, 0x80 | payload.len() as u8];
    frame.extend(mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

const UPGRADE: &[u8] = b"GET /mqtt HTTP/1.1\r\nHost: b\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n";

/// Drives one stack to idle: handshakes, CONNECT in, CONNACK out.
fn idle_stack(
    config: &StackConfig,
    tls_client: Option<&Arc<rustls::ClientConfig>>,
) -> IngressStack {
    let peer = Some("127.0.0.1:40000".parse().unwrap());
    let mut stack = IngressStack::new(config, peer).unwrap();
    let mut plain_in = Vec::new();
    if config.proxy.is_some() {
        plain_in.extend_from_slice(b"PROXY TCP4 192.0.2.7 127.0.0.1 51000 1883\r\n");
    }
    let mut app_in = Vec::new();
    if config.ws.is_some() {
        app_in.extend_from_slice(UPGRADE);
        app_in.extend(masked_binary(CONNECT));
    } else {
        app_in.extend_from_slice(CONNECT);
    }
    let mut app = BytesMut::new();
    match tls_client {
        None => {
            plain_in.extend(app_in);
            stack.receive(&plain_in, &mut app).unwrap();
            stack.take_wire();
        }
        Some(client_config) => {
            let name = ServerName::try_from("testcluster").unwrap();
            let mut client =
                TlsSession::client(client_config.clone(), name, CLIENT_TLS_HANDSHAKE_LEN_MAX)
                    .unwrap();
            let mut to_server = BytesMut::from(&plain_in[..]);
            client.send(b"", &mut to_server).unwrap();
            for _ in 0..10 {
                stack.receive(&to_server.split(), &mut app).unwrap();
                let wire = stack.take_wire().unwrap_or_default();
                client
                    .receive(&wire, &mut BytesMut::new(), &mut to_server)
                    .unwrap();
                if !client.is_handshaking() && stack.is_established() {
                    break;
                }
                if !client.is_handshaking() && !app_in.is_empty() {
                    client
                        .send(&std::mem::take(&mut app_in), &mut to_server)
                        .unwrap();
                }
            }
            if !app_in.is_empty() {
                client.send(&app_in, &mut to_server).unwrap();
                stack.receive(&to_server.split(), &mut app).unwrap();
            }
        }
    }
    assert!(stack.is_established(), "handshakes done");
    stack.send(b"\x20\x02\x00\x00").unwrap();
    stack.take_wire();
    stack
}

fn measure(kind: &str, config: &StackConfig, tls_client: Option<&Arc<rustls::ClientConfig>>) {
    let before = ALLOCATED.load(Ordering::Relaxed);
    let stacks: Vec<IngressStack> = (0..COUNT).map(|_| idle_stack(config, tls_client)).collect();
    let after = ALLOCATED.load(Ordering::Relaxed);
    let per = (after - before) / COUNT;
    println!(
        "{kind:<16} {per:>6} bytes per idle connection ({} of them the stack itself, {} on the heap; {COUNT} stacks)",
        std::mem::size_of::<IngressStack>(),
        per.saturating_sub(std::mem::size_of::<IngressStack>())
    );
    drop(stacks);
}

fn main() {
    let trusted = TrustedNetworks::parse(&["127.0.0.0/8".into()]).unwrap();
    let proxy = ProxyListener {
        accept: ProxyAccept::Any,
        trusted,
        header_len_max: PROXY_HEADER_LEN_MAX,
        name_from_ssl_cn: false,
    };
    let ws = WsListener {
        path: "/mqtt".into(),
        allowed_origins: Vec::new().into(),
    };
    let server = Arc::new(client_listener_config(CERT, KEY, ClientCertificates::None).unwrap());
    let tls = |alpn: &[u8]| {
        let mut server = (*server).clone();
        server.alpn_protocols = vec![alpn.to_vec()];
        TlsListener {
            server: Arc::new(server),
            name_from: NameFrom::None,
            handshake_len_max: CLIENT_TLS_HANDSHAKE_LEN_MAX,
        }
    };
    let client = Arc::new(client_config(roots_from_pem(CA).unwrap(), None).unwrap());
    let config = |proxy: Option<ProxyListener>,
                  tls: Option<TlsListener>,
                  ws: Option<WsListener>| StackConfig { proxy, tls, ws };
    measure("ws", &config(None, None, Some(ws.clone())), None);
    measure(
        "PROXY v1 + ws",
        &config(Some(proxy.clone()), None, Some(ws.clone())),
        None,
    );
    measure("PROXY v1 + tcp", &config(Some(proxy), None, None), None);
    measure(
        "tls",
        &config(None, Some(tls(b"mqtt")), None),
        Some(&client),
    );
    measure(
        "wss",
        &config(None, Some(tls(b"http/1.1")), Some(ws)),
        Some(&client),
    );
}
