//! Server-side request forgery guard. Subscriber URLs are customer input: the relay
//! resolves each host itself, rejects every non-public address, and hands the HTTP
//! client only the addresses it checked, so a DNS answer cannot change between the
//! check and the connection.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// The error of a target address that is not public.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("target address {0} is not a public address")]
pub struct NonPublicAddress(pub IpAddr);

/// Returns true for addresses a subscriber URL may point at: globally routable unicast.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    let blocked = ip.is_unspecified()        // 0.0.0.0
        || a == 0                            // 0.0.0.0/8, "this network"
        || ip.is_loopback()                  // 127.0.0.0/8
        || ip.is_private()                   // 10/8, 172.16/12, 192.168/16
        || ip.is_link_local()                // 169.254/16, including cloud metadata 169.254.169.254
        || (a == 100 && (64..128).contains(&b)) // 100.64/10, carrier-grade NAT
        || (a == 192 && b == 0 && c == 0)    // 192.0.0/24, IETF protocol assignments
        || (a == 192 && b == 0 && c == 2)    // 192.0.2/24, documentation
        || (a == 198 && (18..20).contains(&b)) // 198.18/15, benchmarking
        || (a == 198 && b == 51 && c == 100) // 198.51.100/24, documentation
        || (a == 203 && b == 0 && c == 113)  // 203.0.113/24, documentation
        || ip.is_multicast()                 // 224/4
        || a >= 240; // 240/4 reserved, and the broadcast address
    !blocked
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    // Addresses that embed an IPv4 address are judged by it: IPv4-mapped (::ffff:0:0/96),
    // NAT64 (64:ff9b::/96) and 6to4 (2002::/16).
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let segments = ip.segments();
    if segments[0] == 0x0064 && segments[1] == 0xff9b && segments[2..6] == [0, 0, 0, 0] {
        return is_public_v4(Ipv4Addr::new((segments[6] >> 8) as u8, segments[6] as u8, (segments[7] >> 8) as u8, segments[7] as u8));
    }
    if segments[0] == 0x2002 {
        return is_public_v4(Ipv4Addr::new((segments[1] >> 8) as u8, segments[1] as u8, (segments[2] >> 8) as u8, segments[2] as u8));
    }
    let blocked = ip.is_unspecified()               // ::
        || ip.is_loopback()                         // ::1
        || segments[0..6] == [0, 0, 0, 0, 0, 0]     // ::/96, IPv4-compatible (deprecated)
        || (segments[0] & 0xfe00) == 0xfc00         // fc00::/7 unique local, including fd00:ec2::254 metadata
        || (segments[0] & 0xffc0) == 0xfe80         // fe80::/10 link-local
        || (segments[0] & 0xffc0) == 0xfec0         // fec0::/10 site-local (deprecated)
        || (segments[0] & 0xff00) == 0xff00         // ff00::/8 multicast
        || (segments[0] == 0x2001 && segments[1] == 0x0db8) // 2001:db8::/32 documentation
        || (segments[0] == 0x2001 && segments[1] == 0)      // 2001::/32 Teredo
        || segments[0] == 0x0100 && segments[1..4] == [0, 0, 0]; // 100::/64 discard
    !blocked
}

/// Checks an address literal taken from a URL; the resolver never sees literals.
pub fn check_literal(ip: IpAddr, allow_private: bool) -> Result<(), NonPublicAddress> {
    if allow_private || is_public(ip) { Ok(()) } else { Err(NonPublicAddress(ip)) }
}

/// A resolver for the HTTP client that drops nothing silently: it fails the lookup
/// when any resolved address is non-public, so a host with one private record cannot
/// be used to reach the internal network by chance of ordering.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    pub allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        let lookup: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(async move {
            // Port 0 is a placeholder: the client puts the URL's port in.
            let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if addresses.is_empty() {
                return Err(format!("no address found for {host}").into());
            }
            if !allow_private {
                if let Some(refused) = addresses.iter().find(|a| !is_public(a.ip())) {
                    return Err(Box::new(NonPublicAddress(refused.ip())) as Box<dyn std::error::Error + Send + Sync>);
                }
            }
            Ok(Box::new(addresses.into_iter()) as Addrs)
        });
        lookup
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn non_public_addresses_rejected() {
        for text in [
            "127.0.0.1",
            "127.255.0.9",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.254",
            "224.0.0.1",
            "255.255.255.255",
            "198.18.0.1",
            "192.0.2.10",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
            "fd00:ec2::254",
            "fc00::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
        ] {
            assert!(!is_public(ip(text)), "{text} must be rejected");
        }
    }

    #[test]
    fn public_addresses_allowed() {
        for text in ["93.184.216.34", "8.8.8.8", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "::ffff:93.184.216.34", "64:ff9b::808:808"] {
            assert!(is_public(ip(text)), "{text} must be allowed");
        }
    }

    #[test]
    fn literal_check_honours_opt_out() {
        assert!(check_literal(ip("127.0.0.1"), false).is_err());
        assert!(check_literal(ip("127.0.0.1"), true).is_ok());
    }

    #[tokio::test]
    async fn resolver_rejects_localhost() {
        let resolver = GuardedResolver { allow_private: false };
        let result = resolver.resolve("localhost".parse().unwrap()).await;
        assert!(result.is_err(), "localhost resolves to loopback and must be rejected");
        let allowed = GuardedResolver { allow_private: true };
        assert!(allowed.resolve("localhost".parse().unwrap()).await.is_ok());
    }
}
