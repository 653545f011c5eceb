//! Networks given as CIDR strings (`proxy_trusted`), and whether an address is inside one:
//! pure code, shared by the PROXY protocol layer (who may send a header) and the reactor
//! (whose connections' per-address admission waits for the header's address).
//!
//! Never: allocates after parsing, or matches an IPv4 address against an IPv6 network (an
//! IPv4-mapped IPv6 address counts as its IPv4 address).

use std::net::IpAddr;

/// One network of `proxy_trusted`: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Network {
    address: IpAddr,
    prefix_bits: u8,
}

impl Network {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.address, ip) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => {
                prefix_equal(&network.octets(), &ip.octets(), self.prefix_bits)
            }
            (IpAddr::V6(network), IpAddr::V6(ip)) => {
                prefix_equal(&network.octets(), &ip.octets(), self.prefix_bits)
            }
            _ => false,
        }
    }
}

/// Whether the first `bits` bits of `a` and `b` agree (`bits` at most their length in bits).
fn prefix_equal(a: &[u8], b: &[u8], bits: u8) -> bool {
    let whole = usize::from(bits / 8);
    let rest = bits % 8;
    if a.get(..whole) != b.get(..whole) {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    match (a.get(whole), b.get(whole)) {
        (Some(x), Some(y)) => x & mask == y & mask,
        _ => false,
    }
}

/// The networks allowed to send a PROXY header (`proxy_trusted`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedNetworks {
    networks: Vec<Network>,
}

impl TrustedNetworks {
    /// From CIDR strings (`10.0.0.0/8`, `::1/128`; a bare address is one host). The error
    /// names the entry.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let networks =
            entries
                .iter()
                .map(|entry| {
                    let (address, bits) = match entry.split_once('/') {
                        Some((address, bits)) => (address, Some(bits)),
                        None => (entry.as_str(), None),
                    };
                    let address: IpAddr = address
                        .parse()
                        .map_err(|e| format!("{entry:?} is not a network: {e}"))?;
                    let width = if address.is_ipv4() { 32 } else { 128 };
                    let prefix_bits =
                        match bits {
                            None => width,
                            Some(bits) => {
                                bits.parse::<u8>().ok().filter(|&b| b <= width).ok_or_else(
                                    || format!("{entry:?}: the prefix length must be 0 to {width}"),
                                )?
                            }
                        };
                    Ok(Network {
                        address,
                        prefix_bits,
                    })
                })
                .collect::<Result<_, String>>()?;
        Ok(Self { networks })
    }

    /// Whether `ip` (an IPv4-mapped IPv6 address counts as its IPv4 address) is inside one
    /// of the networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.networks.iter().any(|network| network.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_networks_match_by_prefix() {
        let trusted = TrustedNetworks::parse(&[
            "10.0.0.0/8".into(),
            "192.0.2.7".into(),
            "2001:db8::/32".into(),
            "172.16.0.0/12".into(),
        ])
        .unwrap();
        for ip in [
            "10.200.1.1",
            "192.0.2.7",
            "2001:db8:1::5",
            "172.31.255.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(trusted.contains(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "11.0.0.1",
            "192.0.2.8",
            "2001:db9::1",
            "172.32.0.1",
            "127.0.0.1",
        ] {
            assert!(!trusted.contains(ip.parse().unwrap()), "{ip}");
        }
        assert!(
            TrustedNetworks::parse(&["0.0.0.0/0".into()])
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        for bad in ["10.0.0.0/33", "nowhere", "10.0.0.0/x", "::/129"] {
            assert!(TrustedNetworks::parse(&[bad.into()]).is_err(), "{bad}");
        }
    }
}
