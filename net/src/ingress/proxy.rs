//! The PROXY protocol (v1 text and v2 binary, HAProxy's specification) in front of a client
//! listener: the header a load balancer sends before the client's own bytes, naming the
//! client's real address, parsed with the `ppp` crate.
//!
//! Owns: which versions a listener accepts ([`ProxyAccept`]), the networks allowed to send a
//! header ([`TrustedNetworks`]), the header's bound, and [`parse`]: bytes in, the header's
//! facts ([`ProxyHeader`]) and its length out, or "need more", or why the connection must end.
//! Never: touches a socket or a clock, or accepts a header from a peer outside
//! `proxy_trusted` (anyone could otherwise claim any address); it reads no TLV it does not
//! need, and a TLV it reads but cannot make sense of ends the connection rather than being
//! half-believed.
//! Invariants: [`parse`] looks at no more than the listener's header bound and reports
//! `NeedMore` only while fewer bytes than that have arrived, so a connection's header buffer
//! never exceeds the bound; a header's length is at most the input's.

use std::net::{IpAddr, SocketAddr};

use ppp::v2;

pub use crate::networks::TrustedNetworks;

/// The most bytes a PROXY header may take on a listener. A v2 header may declare up to
/// 16 + 65,535 bytes, but what load balancers send is far smaller: the addresses (at most 216
/// bytes, for Unix sockets), HAProxy's SSL TLVs (version, CN, cipher, algorithms: a few
/// hundred bytes) and an AWS VPC endpoint id (about 25). 4 KiB holds any of those with a wide
/// margin, and is what a stalled or hostile sender can make the broker hold.
pub const PROXY_HEADER_LEN_MAX: usize = 4096;

/// The longest v1 header, CRLF included (the specification's 107 bytes).
const V1_LEN_MAX: usize = 107;
/// A v2 header's fixed part: the 12-byte signature, version and command, family and
/// protocol, and the 2-byte length of what follows.
const V2_FIXED_LEN: usize = 16;

/// PP2_TYPE_SSL and its fields (HAProxy's specification, §2.2.5).
const PP2_TYPE_SSL: u8 = 0x20;
const PP2_SUBTYPE_SSL_CN: u8 = 0x22;
const PP2_CLIENT_SSL: u8 = 0x01;
const PP2_CLIENT_CERT_CONN: u8 = 0x02;
const PP2_CLIENT_CERT_SESS: u8 = 0x04;
/// AWS's TLV of the VPC endpoint a connection came through (Network Load Balancer with
/// PrivateLink), and its subtype.
const PP2_TYPE_AWS: u8 = 0xEA;
const PP2_SUBTYPE_AWS_VPCE_ID: u8 = 0x01;

/// Which header versions a listener takes (`proxy_protocol`); every one of them requires a
/// header on each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyAccept {
    V1,
    V2,
    /// Either, told apart by the first byte.
    Any,
}

impl ProxyAccept {
    /// From the configuration's word; None for "off" and anything unknown.
    pub fn parse(word: &str) -> Option<Self> {
        match word {
            "v1" => Some(Self::V1),
            "v2" => Some(Self::V2),
            "any" => Some(Self::Any),
            _ => None,
        }
    }
}

/// A PROXY listener's settings, shared read-only by its connections.
#[derive(Debug, Clone)]
pub struct ProxyListener {
    pub accept: ProxyAccept,
    pub trusted: TrustedNetworks,
    pub header_len_max: usize,
    /// Take the CN of HAProxy's SSL TLV as the certificate name (`tls_username_from = "cn"`
    /// on a listener without its own TLS), when the TLV says the certificate was verified.
    pub name_from_ssl_cn: bool,
}

/// What the load balancer's TLS layer said about the client (PP2_TYPE_SSL).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SslInfo {
    /// The client connected over TLS (PP2_CLIENT_SSL).
    pub tls: bool,
    /// It presented a certificate (on this connection or an earlier one of its TLS session).
    pub certificate: bool,
    /// The balancer verified that certificate (the TLV's `verify` field is 0).
    pub verified: bool,
    /// The certificate's subject CN (PP2_SUBTYPE_SSL_CN), when sent and valid UTF-8.
    pub common_name: Option<String>,
}

impl SslInfo {
    /// The CN only when the balancer verified the client's certificate.
    pub fn verified_common_name(&self) -> Option<&str> {
        (self.tls && self.certificate && self.verified)
            .then_some(self.common_name.as_deref())
            .flatten()
    }
}

/// What one header said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The client's address, for a PROXY command over TCP/IP; None for LOCAL (a balancer's
    /// own health check), v1 UNKNOWN, and v2 UNSPEC or Unix addresses: the connection then
    /// keeps the socket's peer.
    pub source: Option<SocketAddr>,
    /// A v2 LOCAL command.
    pub local: bool,
    /// The AWS VPC endpoint id, when the header carries one.
    pub vpc_endpoint: Option<String>,
    /// HAProxy's SSL TLV, when the header carries one.
    pub ssl: Option<SslInfo>,
}

/// What [`parse`] made of the bytes so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A header may still come: wait for more bytes.
    NeedMore,
    /// A header of this many bytes; what follows is the client's.
    Header(ProxyHeader, usize),
}

/// Why a connection on a PROXY listener is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyError {
    /// The connection did not start with a header of an accepted version.
    Missing(&'static str),
    /// The socket's peer may not send a header.
    Untrusted(Option<IpAddr>),
    /// The header is not one the specification allows.
    Malformed(String),
    /// The header would be longer than the listener's bound.
    TooLong { len_max: usize },
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProxyError::Missing(expected) => write!(
                f,
                "PROXY protocol: the connection does not start with a {expected} header"
            ),
            ProxyError::Untrusted(Some(ip)) => write!(
                f,
                "PROXY protocol: {ip} is not in `proxy_trusted` and may not send a header"
            ),
            ProxyError::Untrusted(None) => write!(
                f,
                "PROXY protocol: the socket's peer is unknown, so it cannot be trusted to send a header"
            ),
            ProxyError::Malformed(reason) => {
                write!(f, "PROXY protocol: malformed header: {reason}")
            }
            ProxyError::TooLong { len_max } => {
                write!(f, "PROXY protocol: header longer than {len_max} bytes")
            }
        }
    }
}

impl std::error::Error for ProxyError {}

/// Parses the header at the start of `input` (everything received so far on the connection).
pub fn parse(input: &[u8], accept: ProxyAccept, len_max: usize) -> Result<Parsed, ProxyError> {
    let Some(&first) = input.first() else {
        return Ok(Parsed::NeedMore);
    };
    let v1 = matches!(accept, ProxyAccept::V1 | ProxyAccept::Any);
    let v2 = matches!(accept, ProxyAccept::V2 | ProxyAccept::Any);
    if v1 && first == b'P' {
        return parse_v1(input, len_max);
    }
    if v2 && first == b'\r' {
        return parse_v2(input, len_max);
    }
    Err(ProxyError::Missing(match accept {
        ProxyAccept::V1 => "v1",
        ProxyAccept::V2 => "v2",
        ProxyAccept::Any => "v1 or v2",
    }))
}

fn parse_v1(input: &[u8], len_max: usize) -> Result<Parsed, ProxyError> {
    const PREFIX: &[u8] = b"PROXY ";
    let prefix_len = input.len().min(PREFIX.len());
    if input.get(..prefix_len) != PREFIX.get(..prefix_len) {
        return Err(ProxyError::Missing("v1"));
    }
    // Wait for the whole line: ppp reads a line cut inside an address as a bad address.
    let window = &input[..input.len().min(V1_LEN_MAX)];
    let Some(newline) = window.iter().position(|&b| b == b'\n') else {
        if input.len() >= V1_LEN_MAX.min(len_max) {
            return Err(ProxyError::TooLong {
                len_max: V1_LEN_MAX.min(len_max),
            });
        }
        return Ok(Parsed::NeedMore);
    };
    let len = newline + 1;
    if len > len_max {
        return Err(ProxyError::TooLong { len_max });
    }
    let header = ppp::v1::Header::try_from(&input[..len])
        .map_err(|e| ProxyError::Malformed(e.to_string()))?;
    let source = match header.addresses {
        ppp::v1::Addresses::Unknown => None,
        ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
    };
    Ok(Parsed::Header(
        ProxyHeader {
            source,
            ..ProxyHeader::default()
        },
        len,
    ))
}

fn parse_v2(input: &[u8], len_max: usize) -> Result<Parsed, ProxyError> {
    // The declared length is known after 16 bytes: refuse a header past the bound then,
    // before waiting for it.
    if let Some(declared) = input.get(14..16) {
        let declared = usize::from(u16::from_be_bytes([declared[0], declared[1]]));
        if V2_FIXED_LEN.saturating_add(declared) > len_max {
            return Err(ProxyError::TooLong { len_max });
        }
    }
    let header = match v2::Header::try_from(input) {
        Ok(header) => header,
        Err(v2::ParseError::Incomplete(_) | v2::ParseError::Partial(..)) => {
            return Ok(Parsed::NeedMore);
        }
        Err(v2::ParseError::Prefix) => return Err(ProxyError::Missing("v2")),
        Err(error) => return Err(ProxyError::Malformed(error.to_string())),
    };
    let len = header.len();
    let local = header.command == v2::Command::Local;
    // LOCAL: the balancer speaks for itself; whatever addresses it sends are ignored.
    let source = match (local, header.addresses) {
        (false, v2::Addresses::IPv4(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        (false, v2::Addresses::IPv6(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        _ => None,
    };
    let mut facts = ProxyHeader {
        source,
        local,
        ..ProxyHeader::default()
    };
    for tlv in header.tlvs() {
        let tlv = tlv.map_err(|e| ProxyError::Malformed(e.to_string()))?;
        match tlv.kind {
            PP2_TYPE_SSL => facts.ssl = Some(ssl_info(&tlv.value)?),
            PP2_TYPE_AWS => {
                if let Some((&PP2_SUBTYPE_AWS_VPCE_ID, id)) = tlv.value.split_first() {
                    let id = std::str::from_utf8(id).map_err(|_| {
                        ProxyError::Malformed("the AWS VPC endpoint id is not UTF-8".into())
                    })?;
                    facts.vpc_endpoint = Some(id.to_string());
                }
            }
            _ => {}
        }
    }
    Ok(Parsed::Header(facts, len))
}

/// PP2_TYPE_SSL's value: `client` (1 byte), `verify` (4 bytes, 0 when the certificate was
/// verified), then sub-TLVs in the same type-length-value form.
fn ssl_info(value: &[u8]) -> Result<SslInfo, ProxyError> {
    let (Some(&client), Some(verify), Some(rest)) =
        (value.first(), value.get(1..5), value.get(5..))
    else {
        return Err(ProxyError::Malformed(
            "the SSL TLV is shorter than its 5 fixed bytes".into(),
        ));
    };
    let mut info = SslInfo {
        tls: client & PP2_CLIENT_SSL != 0,
        certificate: client & (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS) != 0,
        verified: verify == [0, 0, 0, 0],
        common_name: None,
    };
    for sub in v2::TypeLengthValues::from(rest) {
        let sub = sub.map_err(|e| ProxyError::Malformed(format!("in the SSL TLV: {e}")))?;
        if sub.kind == PP2_SUBTYPE_SSL_CN {
            let name = std::str::from_utf8(&sub.value)
                .map_err(|_| ProxyError::Malformed("the SSL TLV's CN is not UTF-8".into()))?;
            info.common_name = Some(name.to_string());
        }
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2_header(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut header = v2::PROTOCOL_PREFIX.to_vec();
        header.push(0x20 | command);
        header.push(family);
        let len = u16::try_from(addresses.len() + tlvs.len()).unwrap();
        header.extend(len.to_be_bytes());
        header.extend(addresses);
        header.extend(tlvs);
        header
    }

    fn ipv4_addresses() -> Vec<u8> {
        // 192.0.2.7:51000 -> 10.1.2.3:1883
        let mut a = vec![192, 0, 2, 7, 10, 1, 2, 3];
        a.extend(51000u16.to_be_bytes());
        a.extend(1883u16.to_be_bytes());
        a
    }

    fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
        let mut t = vec![kind];
        t.extend(u16::try_from(value.len()).unwrap().to_be_bytes());
        t.extend(value);
        t
    }

    fn ssl_tlv(client: u8, verify: u32, cn: &[u8]) -> Vec<u8> {
        let mut value = vec![client];
        value.extend(verify.to_be_bytes());
        value.extend(tlv(0x21, b"TLSv1.3"));
        value.extend(tlv(PP2_SUBTYPE_SSL_CN, cn));
        tlv(PP2_TYPE_SSL, &value)
    }

    fn header_of(input: &[u8], accept: ProxyAccept) -> (ProxyHeader, usize) {
        match parse(input, accept, PROXY_HEADER_LEN_MAX).unwrap() {
            Parsed::Header(header, len) => (header, len),
            Parsed::NeedMore => panic!("no header yet"),
        }
    }

    #[test]
    fn v1_headers_name_the_client_and_wait_for_their_line() {
        let line = b"PROXY TCP4 192.0.2.7 10.1.2.3 51000 1883\r\n";
        let mut input = line.to_vec();
        input.extend(b"\x10\x0c");
        let (header, len) = header_of(&input, ProxyAccept::V1);
        assert_eq!(len, line.len());
        assert_eq!(header.source, Some("192.0.2.7:51000".parse().unwrap()));
        // Every prefix of the line waits, including one cut inside an address.
        for cut in 0..line.len() {
            assert_eq!(
                parse(&line[..cut], ProxyAccept::Any, PROXY_HEADER_LEN_MAX),
                Ok(Parsed::NeedMore),
                "cut at {cut}"
            );
        }
        let (header, _) = header_of(
            b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 1883\r\n",
            ProxyAccept::Any,
        );
        assert_eq!(header.source, Some("[2001:db8::1]:4000".parse().unwrap()));
        let (header, _) = header_of(b"PROXY UNKNOWN\r\n", ProxyAccept::V1);
        assert_eq!(header.source, None);
    }

    #[test]
    fn v1_garbage_and_endless_lines_are_refused() {
        let refused = |input: &[u8]| parse(input, ProxyAccept::V1, PROXY_HEADER_LEN_MAX);
        assert_eq!(
            refused(b"\x10\x0c\x00\x04MQTT"),
            Err(ProxyError::Missing("v1"))
        );
        assert_eq!(refused(b"PROXZ"), Err(ProxyError::Missing("v1")));
        assert!(matches!(
            refused(b"PROXY TCP4 1.2.3.999 10.1.2.3 1 2\r\n"),
            Err(ProxyError::Malformed(_))
        ));
        assert!(matches!(
            refused(b"PROXY TCP4 1.2.3.4 10.1.2.3 1 2\n"),
            Err(ProxyError::Malformed(_))
        ));
        let endless = [b"PROXY ".as_slice(), &[b'1'; 200]].concat();
        assert!(matches!(refused(&endless), Err(ProxyError::TooLong { .. })));
        // A v2 header on a v1 listener is not a header.
        let v2 = v2_header(1, 0x11, &ipv4_addresses(), &[]);
        assert_eq!(refused(&v2), Err(ProxyError::Missing("v1")));
    }

    #[test]
    fn v2_proxy_and_local_commands() {
        let mut input = v2_header(1, 0x11, &ipv4_addresses(), &[]);
        let header_len = input.len();
        input.extend(b"\x10\x0c");
        let (header, len) = header_of(&input, ProxyAccept::V2);
        assert_eq!(len, header_len);
        assert_eq!(header.source, Some("192.0.2.7:51000".parse().unwrap()));
        assert!(!header.local);
        for cut in 0..header_len {
            assert_eq!(
                parse(&input[..cut], ProxyAccept::Any, PROXY_HEADER_LEN_MAX),
                Ok(Parsed::NeedMore),
                "cut at {cut}"
            );
        }
        // LOCAL, with or without addresses: no source, the socket's peer stays.
        let (header, len) = header_of(&v2_header(0, 0x00, &[], &[]), ProxyAccept::V2);
        assert_eq!((header.source, header.local, len), (None, true, 16));
        let (header, _) = header_of(
            &v2_header(0, 0x11, &ipv4_addresses(), &[]),
            ProxyAccept::Any,
        );
        assert_eq!((header.source, header.local), (None, true));
        // IPv6.
        let mut addresses = vec![0x20, 0x01, 0x0d, 0xb8];
        addresses.extend([0; 11]);
        addresses.push(9);
        addresses.extend([0; 16]);
        addresses.extend(7000u16.to_be_bytes());
        addresses.extend(1883u16.to_be_bytes());
        let (header, _) = header_of(&v2_header(1, 0x21, &addresses, &[]), ProxyAccept::V2);
        assert_eq!(header.source, Some("[2001:db8::9]:7000".parse().unwrap()));
    }

    #[test]
    fn v2_tlvs_give_the_vpc_endpoint_and_the_verified_cn() {
        let mut tlvs = tlv(PP2_TYPE_AWS, b"\x01vpce-0123456789abcdef0");
        tlvs.extend(ssl_tlv(0x07, 0, b"device-1"));
        tlvs.extend(tlv(0x04, &[0; 3])); // NOOP
        let (header, _) = header_of(
            &v2_header(1, 0x11, &ipv4_addresses(), &tlvs),
            ProxyAccept::V2,
        );
        assert_eq!(
            header.vpc_endpoint.as_deref(),
            Some("vpce-0123456789abcdef0")
        );
        let ssl = header.ssl.unwrap();
        assert_eq!(ssl.verified_common_name(), Some("device-1"));
        // Not verified (verify != 0), or no certificate: no name.
        let (header, _) = header_of(
            &v2_header(1, 0x11, &ipv4_addresses(), &ssl_tlv(0x07, 1, b"device-1")),
            ProxyAccept::V2,
        );
        assert_eq!(header.ssl.unwrap().verified_common_name(), None);
        let (header, _) = header_of(
            &v2_header(1, 0x11, &ipv4_addresses(), &ssl_tlv(0x01, 0, b"device-1")),
            ProxyAccept::V2,
        );
        assert_eq!(header.ssl.unwrap().verified_common_name(), None);
    }

    #[test]
    fn v2_malformed_and_oversized_headers_are_refused() {
        let check = |input: &[u8]| parse(input, ProxyAccept::V2, PROXY_HEADER_LEN_MAX);
        // Bad version, command, family.
        let mut bad = v2_header(1, 0x11, &ipv4_addresses(), &[]);
        bad[12] = 0x31;
        assert!(matches!(check(&bad), Err(ProxyError::Malformed(_))));
        bad[12] = 0x2f;
        assert!(matches!(check(&bad), Err(ProxyError::Malformed(_))));
        // Addresses longer than the declared length.
        assert!(matches!(
            check(&v2_header(1, 0x11, &[1, 2, 3], &[])),
            Err(ProxyError::Malformed(_))
        ));
        // A TLV running past the header; an SSL TLV too short; a sub-TLV cut.
        let cut_tlv = [PP2_TYPE_SSL, 0, 9, 1];
        assert!(matches!(
            check(&v2_header(1, 0x11, &ipv4_addresses(), &cut_tlv)),
            Err(ProxyError::Malformed(_))
        ));
        assert!(matches!(
            check(&v2_header(
                1,
                0x11,
                &ipv4_addresses(),
                &tlv(PP2_TYPE_SSL, &[1, 0])
            )),
            Err(ProxyError::Malformed(_))
        ));
        assert!(matches!(
            check(&v2_header(
                1,
                0x11,
                &ipv4_addresses(),
                &tlv(
                    PP2_TYPE_SSL,
                    &[1, 0, 0, 0, 0, PP2_SUBTYPE_SSL_CN, 0, 5, b'a']
                )
            )),
            Err(ProxyError::Malformed(_))
        ));
        // Declared past the bound: refused at 16 bytes, before the rest arrives.
        let mut huge = v2::PROTOCOL_PREFIX.to_vec();
        huge.extend([0x21, 0x11, 0xff, 0xff]);
        assert_eq!(
            check(&huge),
            Err(ProxyError::TooLong {
                len_max: PROXY_HEADER_LEN_MAX
            })
        );
        // MQTT where a header should be.
        assert_eq!(
            check(b"\x10\x0c\x00\x04MQTT"),
            Err(ProxyError::Missing("v2"))
        );
        assert_eq!(check(b"\r\n\r\nGET"), Err(ProxyError::Missing("v2")));
    }
}
