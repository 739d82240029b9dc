//! Behind a reverse proxy every TCP peer is the proxy: the device's address
//! comes from the header the proxy adds, believed only from the proxies the
//! operator names (`--trusted-proxy`). Anyone else can write that header.
//!
//! The client is the right-most hop that is not a trusted proxy: each trusted
//! proxy appends the address it received the request from, so hops to the
//! right of the first untrusted one were written by trusted proxies, and hops
//! to its left by whoever the client was.

use std::net::IpAddr;
use std::str::FromStr;

use axum::http::HeaderMap;

/// An address block, `192.0.2.0/24` or `2001:db8::/32` (a lone address: all its bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, address: IpAddr) -> bool {
        let address = canonical(address);
        match (self.network, address) {
            (IpAddr::V4(network), IpAddr::V4(address)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                network.to_bits() & mask == address.to_bits() & mask
            }
            (IpAddr::V6(network), IpAddr::V6(address)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                network.to_bits() & mask == address.to_bits() & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (address, prefix) = text.split_once('/').unwrap_or((text, ""));
        let network: IpAddr = address.parse().map_err(|_| {
            format!("{text:?} is not an address block (e.g. 127.0.0.1/32, 10.0.0.0/8, ::1/128)")
        })?;
        let network = canonical(network);
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            "" => bits,
            prefix => prefix
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= bits)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {bits}"))?,
        };
        Ok(Self { network, prefix })
    }
}

/// An IPv4 peer on a dual-stack socket is its IPv4 address.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

/// Which header carries the hops a trusted proxy appends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientHeader {
    /// `X-Forwarded-For: client, proxy1, ...` (nginx's
    /// `$proxy_add_x_forwarded_for`, Caddy's default).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for=proxy1`.
    Forwarded,
}

impl FromStr for ClientHeader {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name.to_ascii_lowercase().as_str() {
            "x-forwarded-for" => Ok(Self::XForwardedFor),
            "forwarded" => Ok(Self::Forwarded),
            _ => Err(format!("{name:?}: x-forwarded-for or forwarded")),
        }
    }
}

/// The reverse proxies whose word on the client's address is taken.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    pub proxies: Vec<Cidr>,
    pub header: ClientHeader,
}

impl TrustedProxies {
    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.proxies.iter().any(|proxy| proxy.contains(peer))
    }

    /// The device behind a request from `peer`: `peer` itself unless it is a
    /// trusted proxy; then the right-most hop of the header that is not one.
    /// A hop that is no address (`unknown`, an obfuscated name) ends the walk at
    /// the proxy that wrote it: its requests count as that proxy's own.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = canonical(peer);
        if !self.trusts(client) {
            return client;
        }
        let hops = self.hops(headers);
        for hop in hops.iter().rev() {
            let Some(hop) = hop else {
                return client;
            };
            client = canonical(*hop);
            if !self.trusts(client) {
                return client;
            }
        }
        client
    }

    /// The header's hops, left to right, over all its lines (`None`: not an address).
    fn hops(&self, headers: &HeaderMap) -> Vec<Option<IpAddr>> {
        let name = match self.header {
            ClientHeader::XForwardedFor => "x-forwarded-for",
            ClientHeader::Forwarded => "forwarded",
        };
        let mut hops = Vec::new();
        for line in headers.get_all(name) {
            let Ok(line) = line.to_str() else {
                hops.push(None);
                continue;
            };
            for element in line.split(',') {
                hops.push(match self.header {
                    ClientHeader::XForwardedFor => parse_address(element.trim()),
                    ClientHeader::Forwarded => element
                        .split(';')
                        .find_map(|pair| {
                            let (key, value) = pair.trim().split_once('=')?;
                            key.eq_ignore_ascii_case("for").then_some(value)
                        })
                        .and_then(|value| parse_address(value.trim().trim_matches('"'))),
                });
            }
        }
        hops
    }
}

/// `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1` or `[2001:db8::1]:4711`.
fn parse_address(text: &str) -> Option<IpAddr> {
    if let Ok(address) = text.parse() {
        return Some(address);
    }
    if let Some(rest) = text.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    let (host, port) = text.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn headers(name: &'static str, lines: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append(name, line.parse().unwrap());
        }
        headers
    }

    fn proxies(blocks: &[&str], header: ClientHeader) -> TrustedProxies {
        TrustedProxies {
            proxies: blocks.iter().map(|b| b.parse().unwrap()).collect(),
            header,
        }
    }

    #[test]
    fn address_blocks() {
        let block: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(block.contains(ip("10.1.255.3")));
        assert!(!block.contains(ip("10.2.0.1")));
        assert!(
            block.contains(ip("::ffff:10.1.0.9")),
            "IPv4 on a dual-stack socket"
        );
        let lone: Cidr = "::1".parse().unwrap();
        assert!(lone.contains(ip("::1")) && !lone.contains(ip("::2")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.9")) && !all.contains(ip("2001:db8::1")));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")) && !v6.contains(ip("2001:db9::1")));
        for bad in ["10.0.0.0/33", "fe80::/129", "example.org", "10.0.0.0/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_client_is_the_right_most_untrusted_hop_and_only_a_trusted_peer_is_believed() {
        let trusted = proxies(&["127.0.0.1", "10.0.0.0/8"], ClientHeader::XForwardedFor);
        // A client that wrote a header of its own: the proxy appended the real
        // address after it, and that is the one taken.
        let spoofed = headers("x-forwarded-for", &["6.6.6.6, 203.0.113.7"]);
        assert_eq!(trusted.client(ip("127.0.0.1"), &spoofed), ip("203.0.113.7"));
        // Two proxies in a row, the header over two lines.
        let chain = headers("x-forwarded-for", &["198.51.100.2", "10.0.0.5"]);
        assert_eq!(trusted.client(ip("127.0.0.1"), &chain), ip("198.51.100.2"));
        // From anyone else, the header is theirs to write and is ignored.
        assert_eq!(trusted.client(ip("192.0.2.9"), &spoofed), ip("192.0.2.9"));
        // No header: the proxy itself. An unreadable hop: the proxy that wrote it.
        assert_eq!(
            trusted.client(ip("127.0.0.1"), &HeaderMap::new()),
            ip("127.0.0.1")
        );
        let unknown = headers("x-forwarded-for", &["203.0.113.7, unknown"]);
        assert_eq!(trusted.client(ip("127.0.0.1"), &unknown), ip("127.0.0.1"));
        // Ports and brackets, as some proxies write them.
        let ported = headers("x-forwarded-for", &["[2001:db8::7]:4711"]);
        assert_eq!(trusted.client(ip("127.0.0.1"), &ported), ip("2001:db8::7"));
    }

    #[test]
    fn forwarded_is_read_only_where_it_is_the_header_named() {
        let forwarded = headers(
            "forwarded",
            &["for=192.0.2.60;proto=https, for=\"[2001:db8:cafe::17]:4711\";by=10.0.0.1"],
        );
        let by_forwarded = proxies(&["127.0.0.1"], ClientHeader::Forwarded);
        assert_eq!(
            by_forwarded.client(ip("127.0.0.1"), &forwarded),
            ip("2001:db8:cafe::17")
        );
        // The proxy appends to X-Forwarded-For: a Forwarded header the client
        // sent is passed on untouched and must not be believed.
        let by_xff = proxies(&["127.0.0.1"], ClientHeader::XForwardedFor);
        assert_eq!(by_xff.client(ip("127.0.0.1"), &forwarded), ip("127.0.0.1"));
    }
}
