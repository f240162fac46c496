//! `SANDBOX_EGRESS_ALLOW`: which destinations a sandbox may open a tunnel
//! to, and the check of each address a name resolves to.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use super::addresses::{NonPublic, canonical, classify};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Exact(String),
    /// `*.example.com`: example.com's subdomains (not example.com itself).
    Subdomains(String),
    /// An address or a CIDR, named on purpose: the one way to a private
    /// destination.
    Network(IpNet),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    target: Target,
    /// `None`: 80 and 443.
    port: Option<u16>,
}

impl Rule {
    fn port_matches(&self, port: u16) -> bool {
        match self.port {
            Some(p) => p == port,
            None => port == 80 || port == 443,
        }
    }
}

/// The destinations sandboxes may reach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    rules: Vec<Rule>,
}

/// Why the proxy would not open a tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The address that was refused, when the name resolved.
    pub address: Option<IpAddr>,
    /// The rule that refused it, in words.
    pub rule: String,
}

/// `[v6]`, `[v6]:port`, `v6`, `host`, `host:port`, `cidr`, `cidr:port`.
fn split_port(entry: &str) -> Result<(&str, Option<u16>), String> {
    let parse_port = |port: &str| {
        port.parse::<u16>()
            .map_err(|_| format!("{entry:?}: the port must be a number"))
    };
    if let Some(rest) = entry.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{entry:?}: missing ']'"))?;
        return match after {
            "" => Ok((host, None)),
            _ => match after.strip_prefix(':') {
                Some(port) => Ok((host, Some(parse_port(port)?))),
                None => Err(format!("{entry:?} is not a host name")),
            },
        };
    }
    match entry.rsplit_once(':') {
        // A bare IPv6 address or network has colons of its own.
        Some((host, port)) if !host.contains(':') => Ok((host, Some(parse_port(port)?))),
        _ => Ok((entry, None)),
    }
}

impl EgressPolicy {
    /// Entries separated by commas or spaces: `host[:port]`, `*.domain`
    /// (a domain's subdomains), or an address or CIDR (`10.1.2.3:8080`,
    /// `10.20.0.0/16:443`, `[fd00::/8]:443`). Without a port, 80 and 443.
    pub fn parse(spec: &str) -> Result<EgressPolicy, String> {
        let mut rules = Vec::new();
        for entry in spec
            .split([',', ' ', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            let entry = entry.to_ascii_lowercase();
            if entry.contains("://") {
                return Err(format!(
                    "{entry:?} is not a host name: write host[:port], without a scheme or path"
                ));
            }
            let (host, port) = split_port(&entry)?;
            let target = if let Ok(ip) = host.parse::<IpAddr>() {
                Target::Network(IpNet::from(canonical(ip)))
            } else if host.contains('/') {
                let net = host
                    .parse::<IpNet>()
                    .map_err(|_| format!("{entry:?} is not a host name, address or CIDR"))?;
                if let IpNet::V6(v6) = net
                    && let Some(v4) = v6.addr().to_ipv4_mapped()
                {
                    let prefix = v6.prefix_len().saturating_sub(96);
                    Target::Network(IpNet::new(IpAddr::V4(v4), prefix).map_err(|e| e.to_string())?)
                } else {
                    Target::Network(net.trunc())
                }
            } else {
                let valid = !host.is_empty()
                    && host
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '*'));
                if !valid {
                    return Err(format!("{entry:?} is not a host name, address or CIDR"));
                }
                match host.strip_prefix("*.") {
                    Some(domain) if !domain.is_empty() && !domain.contains('*') => {
                        Target::Subdomains(domain.to_string())
                    }
                    None if !host.contains('*') => Target::Exact(host.to_string()),
                    _ => return Err(format!("{entry:?}: a wildcard is only `*.domain`")),
                }
            };
            if let Target::Network(net) = &target
                && let Some(NonPublic::Forbidden(why)) = classify(net.network())
            {
                return Err(format!(
                    "{entry:?}: {why} is never reachable from a sandbox"
                ));
            }
            rules.push(Rule { target, port });
        }
        Ok(EgressPolicy { rules })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    fn name_rule_matches(&self, host: &str, port: u16) -> bool {
        self.rules.iter().any(|rule| {
            rule.port_matches(port)
                && match &rule.target {
                    Target::Exact(name) => name == host,
                    Target::Subdomains(domain) => host
                        .strip_suffix(domain.as_str())
                        .is_some_and(|rest| rest.ends_with('.') && rest.len() > 1),
                    Target::Network(_) => false,
                }
        })
    }

    fn network_rule_matches(&self, ip: IpAddr, port: u16) -> bool {
        let ip = canonical(ip);
        self.rules.iter().any(|rule| {
            rule.port_matches(port)
                && matches!(&rule.target, Target::Network(net) if net.contains(&ip))
        })
    }

    /// Whether a tunnel to `host:port` may be attempted at all: a name an
    /// entry matches, or an address inside an address or CIDR entry. What
    /// the name resolves to is judged afterwards, by [`EgressPolicy::check`].
    pub fn allows(&self, host: &str, port: u16) -> bool {
        let host = normalize(host);
        match host.parse::<IpAddr>() {
            Ok(ip) => self.network_rule_matches(ip, port),
            Err(_) => self.name_rule_matches(&host, port),
        }
    }

    /// Judges every address `host` resolved to. A name reaches only public
    /// addresses, whatever entry matched it; an address that is not public
    /// is reached only through an entry naming it (address or CIDR), and
    /// the server's own host, metadata and multicast never. One refused
    /// address refuses the whole answer: a name that leads somewhere
    /// internal is not followed to its other addresses either.
    pub fn check(&self, host: &str, port: u16, addresses: &[SocketAddr]) -> Result<(), Refused> {
        let host = normalize(host);
        let named = host.parse::<IpAddr>().is_err() && self.name_rule_matches(&host, port);
        for address in addresses {
            let ip = canonical(address.ip());
            let verdict = match classify(ip) {
                Some(NonPublic::Forbidden(why)) => Some(why.to_string()),
                _ if self.network_rule_matches(ip, port) => None,
                Some(NonPublic::Internal(why)) => Some(format!(
                    "{why}: reachable only when SANDBOX_EGRESS_ALLOW names its address or CIDR"
                )),
                None if named => None,
                None => Some("not in SANDBOX_EGRESS_ALLOW".to_string()),
            };
            if let Some(rule) = verdict {
                return Err(Refused {
                    address: Some(ip),
                    rule,
                });
            }
        }
        Ok(())
    }
}

fn normalize(host: &str) -> String {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

impl std::fmt::Display for EgressPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let entries: Vec<String> = self
            .rules
            .iter()
            .map(|rule| {
                let (target, bracket) = match &rule.target {
                    Target::Exact(name) => (name.clone(), false),
                    Target::Subdomains(domain) => (format!("*.{domain}"), false),
                    Target::Network(net) if net.prefix_len() == net.max_prefix_len() => {
                        (net.addr().to_string(), net.addr().is_ipv6())
                    }
                    Target::Network(net) => (net.to_string(), net.addr().is_ipv6()),
                };
                match (rule.port, bracket) {
                    (Some(port), true) => format!("[{target}]:{port}"),
                    (Some(port), false) => format!("{target}:{port}"),
                    (None, _) => target,
                }
            })
            .collect();
        f.write_str(&entries.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ip: &str, port: u16) -> Vec<SocketAddr> {
        vec![SocketAddr::new(ip.parse().unwrap(), port)]
    }

    #[test]
    fn entries_match_names_and_ports() {
        let policy = EgressPolicy::parse("api.github.com, *.pypi.org 10.1.2.3:8080").unwrap();
        assert!(policy.allows("api.github.com", 443));
        assert!(policy.allows("API.GitHub.com", 80));
        assert!(policy.allows("api.github.com.", 443));
        assert!(!policy.allows("api.github.com", 22));
        assert!(!policy.allows("github.com", 443));
        assert!(policy.allows("files.pypi.org", 443));
        assert!(!policy.allows("pypi.org", 443));
        assert!(!policy.allows("evilpypi.org", 443));
        assert!(policy.allows("10.1.2.3", 8080));
        assert!(policy.allows("::ffff:10.1.2.3", 8080));
        assert!(!policy.allows("10.1.2.3", 443));
        assert!(EgressPolicy::parse("").unwrap().is_empty());
    }

    #[test]
    fn bad_entries_are_refused_with_the_entry() {
        for (spec, expected) in [
            ("host:port", "port must be a number"),
            ("http://x/", "is not a host name"),
            ("10.0.0.0/33", "is not a host name, address or CIDR"),
            ("a*.example.com", "wildcard"),
            ("*.", "wildcard"),
            ("127.0.0.1:8080", "loopback"),
            ("169.254.169.254", "metadata"),
            ("[::1]:80", "loopback"),
            ("[fd00::1", "missing ']'"),
        ] {
            let error = EgressPolicy::parse(spec).unwrap_err();
            assert!(error.contains(expected), "{spec}: {error}");
        }
    }

    #[test]
    fn cidrs_and_ipv6_entries_parse_and_print_back() {
        let spec = "10.20.0.0/16:443,[fd00::/8]:8443,fd00::1,[2001:db8::5]:80,192.168.1.9,example.com:8080";
        let policy = EgressPolicy::parse(spec).unwrap();
        assert_eq!(policy.to_string(), spec);
        assert!(policy.allows("10.20.7.1", 443));
        assert!(!policy.allows("10.21.0.1", 443));
        assert!(policy.allows("fd12::9", 8443));
        assert!(policy.allows("[fd00::1]", 80));
        // A host bits CIDR is its network.
        let policy = EgressPolicy::parse("10.20.3.4/16:443").unwrap();
        assert_eq!(policy.to_string(), "10.20.0.0/16:443");
    }

    #[test]
    fn a_name_reaches_only_public_addresses() {
        let policy = EgressPolicy::parse("*.example.com, api.example.org").unwrap();
        assert_eq!(
            policy.check("cdn.example.com", 443, &at("93.184.216.34", 443)),
            Ok(())
        );
        for ip in [
            "10.0.0.5",
            "172.20.0.2",
            "192.168.0.1",
            "100.64.1.1",
            "198.18.0.1",
            "fd00::5",
            "::ffff:10.0.0.5",
            "64:ff9b::a00:5",
            "127.0.0.1",
            "169.254.169.254",
        ] {
            let refused = policy
                .check("internal.example.com", 443, &at(ip, 443))
                .unwrap_err();
            assert_eq!(
                refused.address,
                Some(canonical(ip.parse().unwrap())),
                "{ip}"
            );
        }
        let refused = policy
            .check("internal.example.com", 443, &at("10.0.0.5", 443))
            .unwrap_err();
        assert!(refused.rule.contains("RFC 1918"), "{}", refused.rule);
        // Every address of the answer is judged.
        let mixed = [at("93.184.216.34", 443), at("10.0.0.5", 443)].concat();
        assert!(policy.check("api.example.org", 443, &mixed).is_err());
    }

    #[test]
    fn an_internal_address_is_reached_only_by_naming_it() {
        let policy =
            EgressPolicy::parse("*.corp.example, 10.1.2.3:8080, 10.20.0.0/16:443").unwrap();
        assert_eq!(
            policy.check("10.1.2.3", 8080, &at("10.1.2.3", 8080)),
            Ok(())
        );
        assert_eq!(
            policy.check("::ffff:10.1.2.3", 8080, &at("::ffff:10.1.2.3", 8080)),
            Ok(())
        );
        assert_eq!(
            policy.check("10.20.9.9", 443, &at("10.20.9.9", 443)),
            Ok(())
        );
        // A name that resolves to an address named on purpose reaches it.
        assert_eq!(
            policy.check("gateway.corp.example", 443, &at("10.20.0.7", 443)),
            Ok(())
        );
        // The wildcard alone leads nowhere internal.
        assert!(
            policy
                .check("db.corp.example", 443, &at("10.30.0.7", 443))
                .is_err()
        );
        // A named address on another port is not named.
        assert!(policy.check("10.1.2.3", 22, &at("10.1.2.3", 22)).is_err());
    }
}
