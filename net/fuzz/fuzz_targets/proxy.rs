//! Fuzzes the PROXY protocol layer a client reaches before anything else on a PROXY listener:
//! `proxy::parse` on arbitrary bytes, and a stack with only that layer fed the same bytes in
//! chunks.
//!
//! The first byte chooses the accepted versions (v1, v2, any), whether the balancer's CN is
//! read, and the chunk size. Nothing may panic; a header's length never exceeds its input;
//! `parse` never asks for more bytes past the bound; the stack never holds more than the
//! bound, and once established it passes every later byte through unchanged.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use shardmq_net::ingress::proxy::{
    self, PROXY_HEADER_LEN_MAX, Parsed, ProxyAccept, ProxyListener, TrustedNetworks,
};
use shardmq_net::ingress::stack::{IngressStack, StackConfig};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    let accept = match selector % 3 {
        0 => ProxyAccept::V1,
        1 => ProxyAccept::V2,
        _ => ProxyAccept::Any,
    };
    let len_max = if selector & 0x80 != 0 { 64 } else { PROXY_HEADER_LEN_MAX };
    match proxy::parse(input, accept, len_max) {
        Ok(Parsed::Header(_, len)) => assert!(len <= input.len() && len <= len_max),
        Ok(Parsed::NeedMore) => assert!(input.len() < len_max),
        Err(_) => {}
    }
    let config = StackConfig {
        proxy: Some(ProxyListener {
            accept,
            trusted: TrustedNetworks::parse(&["127.0.0.0/8".into()]).unwrap(),
            header_len_max: len_max,
            name_from_ssl_cn: selector & 0x40 != 0,
        }),
        tls: None,
        ws: None,
    };
    let mut stack = IngressStack::new(&config, Some("127.0.0.1:40000".parse().unwrap())).unwrap();
    let chunk = usize::from(selector >> 2 & 0x0f) + 1;
    let mut app = BytesMut::new();
    for piece in input.chunks(chunk) {
        let was_established = stack.is_established();
        let before = app.len();
        match stack.receive(piece, &mut app) {
            Ok(_) if was_established => assert_eq!(&app[before..], piece),
            Ok(_) => {}
            Err(_) => return,
        }
        assert!(stack.buffered_len() <= len_max);
        assert!(stack.take_wire().is_none(), "the PROXY layer never answers");
    }
});
