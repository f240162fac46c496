//! Which addresses are public: the classification the proxy applies to
//! every address a name resolves to, before it connects.
//!
//! Written here rather than taken from `std` because `Ipv4Addr::is_global`
//! and `Ipv6Addr::is_global` are unstable, and because the proxy must also
//! see through the IPv6 forms that embed an IPv4 address (mapped,
//! compatible, NAT64, 6to4) and say *why* an address is refused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why an address is not a public destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonPublic {
    /// Never reachable from a sandbox, even when named explicitly: the
    /// server's own host (loopback, "this network"), cloud metadata
    /// (link-local), and addresses that are not one host (multicast,
    /// broadcast, unspecified).
    Forbidden(&'static str),
    /// Reachable only when the operator names it by address or CIDR.
    Internal(&'static str),
}

impl NonPublic {
    pub fn reason(self) -> &'static str {
        match self {
            NonPublic::Forbidden(reason) | NonPublic::Internal(reason) => reason,
        }
    }
}

/// `None` for a public unicast address; otherwise why it is not one. IPv6
/// forms that carry an IPv4 address are judged by that address too.
pub fn classify(ip: IpAddr) -> Option<NonPublic> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) is the IPv4 address itself on a
/// dual-stack socket: rules and classification treat it as such.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

fn in_v4(ip: Ipv4Addr, network: [u8; 4], prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(network)) & mask
}

fn in_v6(ip: Ipv6Addr, network: [u16; 8], prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - prefix)
    };
    u128::from(ip) & mask == u128::from(Ipv6Addr::from(network)) & mask
}

fn classify_v4(ip: Ipv4Addr) -> Option<NonPublic> {
    use NonPublic::{Forbidden, Internal};
    const TABLE: &[([u8; 4], u32, NonPublic)] = &[
        // Linux connects 0.0.0.0 to the local host.
        ([0, 0, 0, 0], 8, Forbidden("\"this network\" (0.0.0.0/8)")),
        ([127, 0, 0, 0], 8, Forbidden("loopback (127.0.0.0/8)")),
        (
            [169, 254, 0, 0],
            16,
            Forbidden("link-local, where cloud metadata lives (169.254.0.0/16)"),
        ),
        ([224, 0, 0, 0], 4, Forbidden("multicast (224.0.0.0/4)")),
        (
            [255, 255, 255, 255],
            32,
            Forbidden("broadcast (255.255.255.255)"),
        ),
        ([10, 0, 0, 0], 8, Internal("private (RFC 1918, 10.0.0.0/8)")),
        (
            [172, 16, 0, 0],
            12,
            Internal("private (RFC 1918, 172.16.0.0/12)"),
        ),
        (
            [192, 168, 0, 0],
            16,
            Internal("private (RFC 1918, 192.168.0.0/16)"),
        ),
        (
            [100, 64, 0, 0],
            10,
            Internal("shared address space (CGNAT, RFC 6598, 100.64.0.0/10)"),
        ),
        (
            [192, 0, 0, 0],
            24,
            Internal("IETF protocol assignments (RFC 6890, 192.0.0.0/24)"),
        ),
        (
            [192, 0, 2, 0],
            24,
            Internal("documentation (RFC 5737, 192.0.2.0/24)"),
        ),
        (
            [198, 51, 100, 0],
            24,
            Internal("documentation (RFC 5737, 198.51.100.0/24)"),
        ),
        (
            [203, 0, 113, 0],
            24,
            Internal("documentation (RFC 5737, 203.0.113.0/24)"),
        ),
        (
            [198, 18, 0, 0],
            15,
            Internal("benchmarking (RFC 2544, 198.18.0.0/15)"),
        ),
        (
            [192, 88, 99, 0],
            24,
            Internal("6to4 relay anycast (deprecated, RFC 7526, 192.88.99.0/24)"),
        ),
        ([240, 0, 0, 0], 4, Internal("reserved (240.0.0.0/4)")),
    ];
    TABLE
        .iter()
        .find(|(network, prefix, _)| in_v4(ip, *network, *prefix))
        .map(|(_, _, why)| *why)
}

/// An IPv6 address carrying an IPv4 one is no more public than that
/// address: what it reaches is decided by whoever translates it.
fn through_embedded(embedded: Ipv4Addr, form: NonPublic) -> Option<NonPublic> {
    match classify_v4(embedded) {
        None => None,
        Some(NonPublic::Forbidden(_)) => Some(NonPublic::Forbidden(form.reason())),
        Some(NonPublic::Internal(_)) => Some(form),
    }
}

fn classify_v6(ip: Ipv6Addr) -> Option<NonPublic> {
    use NonPublic::{Forbidden, Internal};
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    let low32 = Ipv4Addr::from((u128::from(ip) & 0xffff_ffff) as u32);
    if ip.is_unspecified() {
        return Some(Forbidden("unspecified (::)"));
    }
    if ip.is_loopback() {
        return Some(Forbidden("loopback (::1)"));
    }
    if in_v6(ip, [0; 8], 96) {
        // ::a.b.c.d: deprecated (RFC 4291), never a real destination.
        return Some(
            through_embedded(
                low32,
                Internal("IPv4-compatible IPv6 form of a non-public address"),
            )
            .unwrap_or(Internal("IPv4-compatible IPv6 (deprecated, RFC 4291)")),
        );
    }
    if in_v6(ip, [0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96) {
        return through_embedded(
            low32,
            Internal("NAT64 form (64:ff9b::/96) of a non-public IPv4 address"),
        );
    }
    if in_v6(ip, [0x2002, 0, 0, 0, 0, 0, 0, 0], 16) {
        let embedded = Ipv4Addr::from(((u128::from(ip) >> 80) & 0xffff_ffff) as u32);
        return through_embedded(
            embedded,
            Internal("6to4 form (2002::/16) of a non-public IPv4 address"),
        );
    }
    const TABLE: &[([u16; 8], u32, NonPublic)] = &[
        (
            [0xfe80, 0, 0, 0, 0, 0, 0, 0],
            10,
            Forbidden("link-local (fe80::/10)"),
        ),
        (
            [0xff00, 0, 0, 0, 0, 0, 0, 0],
            8,
            Forbidden("multicast (ff00::/8)"),
        ),
        (
            [0x64, 0xff9b, 1, 0, 0, 0, 0, 0],
            48,
            Internal("local-use NAT64 (RFC 8215, 64:ff9b:1::/48)"),
        ),
        (
            [0xfc00, 0, 0, 0, 0, 0, 0, 0],
            7,
            Internal("unique local (RFC 4193, fc00::/7)"),
        ),
        (
            [0xfec0, 0, 0, 0, 0, 0, 0, 0],
            10,
            Internal("site-local (deprecated, fec0::/10)"),
        ),
        (
            [0x2001, 0, 0, 0, 0, 0, 0, 0],
            32,
            Internal("Teredo (RFC 4380, 2001::/32)"),
        ),
        (
            [0x2001, 2, 0, 0, 0, 0, 0, 0],
            48,
            Internal("benchmarking (RFC 5180, 2001:2::/48)"),
        ),
        (
            [0x2001, 0, 0, 0, 0, 0, 0, 0],
            23,
            Internal("IETF protocol assignments (RFC 2928, 2001::/23)"),
        ),
        (
            [0x2001, 0xdb8, 0, 0, 0, 0, 0, 0],
            32,
            Internal("documentation (RFC 3849, 2001:db8::/32)"),
        ),
        (
            [0x3fff, 0, 0, 0, 0, 0, 0, 0],
            20,
            Internal("documentation (RFC 9637, 3fff::/20)"),
        ),
    ];
    if let Some((_, _, why)) = TABLE
        .iter()
        .find(|(network, prefix, _)| in_v6(ip, *network, *prefix))
    {
        return Some(*why);
    }
    // Only 2000::/3 is allocated as global unicast.
    if !in_v6(ip, [0x2000, 0, 0, 0, 0, 0, 0, 0], 3) {
        return Some(Internal("reserved IPv6 (outside global unicast 2000::/3)"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(ip: &str) -> Option<NonPublic> {
        classify(ip.parse().unwrap())
    }

    #[test]
    fn public_addresses_pass() {
        for ip in [
            "93.184.216.34",
            "1.1.1.1",
            "8.8.8.8",
            "172.15.255.255",
            "172.32.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "198.17.255.255",
            "198.20.0.1",
            "2606:2800:220:1:248:1893:25c8:1946",
            "2a00:1450:4001:80b::200e",
            "::ffff:93.184.216.34",
            "64:ff9b::93.184.216.34",
            "2002:5db8:d822::1",
        ] {
            assert_eq!(class(ip), None, "{ip}");
        }
    }

    #[test]
    fn the_servers_own_host_and_metadata_are_never_reachable() {
        for ip in [
            "127.0.0.1",
            "127.255.0.9",
            "0.0.0.0",
            "0.1.2.3",
            "169.254.169.254",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "::127.0.0.1",
            "2002:7f00:1::",
        ] {
            assert!(
                matches!(class(ip), Some(NonPublic::Forbidden(_))),
                "{ip}: {:?}",
                class(ip)
            );
        }
    }

    #[test]
    fn internal_ranges_and_their_ipv6_forms_are_not_public() {
        for ip in [
            "10.0.0.5",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.254",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "198.18.0.1",
            "198.19.255.255",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "192.0.0.8",
            "192.88.99.1",
            "240.0.0.1",
            "fc00::1",
            "fd12:3456::1",
            "fec0::1",
            "2001:db8::1",
            "3fff::1",
            "2001::1",
            "2001:2::1",
            "64:ff9b:1::a00:5",
            "100::1",
            "5f00::1",
            "::ffff:10.0.0.5",
            "::ffff:192.168.1.1",
            "::ffff:100.64.0.1",
            "::10.0.0.5",
            "::93.184.216.34",
            "64:ff9b::10.0.0.5",
            "64:ff9b::c0a8:101",
            "2002:0a00:0005::1",
            "2002:c0a8:0101::1",
        ] {
            assert!(
                matches!(class(ip), Some(NonPublic::Internal(_))),
                "{ip}: {:?}",
                class(ip)
            );
        }
    }

    #[test]
    fn mapped_addresses_are_their_ipv4_address() {
        assert_eq!(
            canonical("::ffff:10.1.2.3".parse().unwrap()),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            canonical("fd00::1".parse().unwrap()),
            "fd00::1".parse::<IpAddr>().unwrap()
        );
    }
}
