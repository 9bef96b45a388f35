//! The operator's host allowlist for the guest proxy: `host` (ports 80 and 443) or
//! `host:port` (that port only). Hosts are DNS names or IPv4 addresses, compared exactly
//! (case-insensitive, a trailing dot ignored): no wildcards, so what is open is what is
//! written.

use std::fmt;

/// Ports a rule without an explicit port allows: plain HTTP and HTTPS (CONNECT).
pub const DEFAULT_PORTS: [u16; 2] = [80, 443];

/// One allowed host, with an optional port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostRule {
    /// Lowercase, without a trailing dot.
    host: String,
    port: Option<u16>,
}

/// A rule that is not `host` or `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("allowed host '{0}' is not a host name or IPv4 address with an optional :port, like \"deb.debian.org\" or \"127.0.0.1:8080\"")]
pub struct BadHostRule(pub String);

impl std::str::FromStr for HostRule {
    type Err = BadHostRule;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadHostRule(s.escape_debug().to_string());
        let (host, port) = match s.rsplit_once(':') {
            Some((host, port)) => {
                let port: u16 = port.parse().map_err(|_| bad())?;
                if port == 0 {
                    return Err(bad());
                }
                (host, Some(port))
            }
            None => (s, None),
        };
        let host = normal_host(host).ok_or_else(bad)?;
        Ok(HostRule { host, port })
    }
}

impl fmt::Display for HostRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.host),
            None => f.write_str(&self.host),
        }
    }
}

impl HostRule {
    /// The rule for a URL's host (an image recipe's mirror): its host, any default port.
    pub fn for_url(url: &str) -> Option<HostRule> {
        let rest = url.split_once("://")?.1;
        let authority = rest.split(['/', '?', '#']).next()?;
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        host.parse().ok()
    }
}

/// Lowercase `host` without a trailing dot, if it is a DNS name (labels of letters, digits
/// and inner hyphens, ≤ 253 characters) or an IPv4 address.
fn normal_host(host: &str) -> Option<String> {
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    if host.is_empty() || host.len() > 253 {
        return None;
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    host.split('.').all(label_ok).then_some(host)
}

/// The hosts a job's proxy lets through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    rules: Vec<HostRule>,
}

impl Allowlist {
    pub fn new(rules: Vec<HostRule>) -> Allowlist {
        Allowlist { rules }
    }

    pub fn rules(&self) -> &[HostRule] {
        &self.rules
    }

    /// Whether a request for `host`:`port` may pass.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        let Some(host) = normal_host(host.trim_start_matches('[').trim_end_matches(']')) else {
            return false;
        };
        self.rules.iter().any(|r| {
            r.host == host
                && match r.port {
                    Some(p) => p == port,
                    None => DEFAULT_PORTS.contains(&port),
                }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(rules: &[&str]) -> Allowlist {
        Allowlist::new(rules.iter().map(|r| r.parse().unwrap()).collect())
    }

    #[test]
    fn rules_parse_or_are_refused() {
        // (text, parsed back) — None: refused
        #[rustfmt::skip]
        let cases = [
            ("deb.debian.org", Some("deb.debian.org")),
            ("Deb.Debian.ORG.", Some("deb.debian.org")),   // case and trailing dot ignored
            ("127.0.0.1:8080", Some("127.0.0.1:8080")),
            ("localhost:3000", Some("localhost:3000")),
            ("pypi.org:0", None),                          // no port 0
            ("pypi.org:99999", None),
            ("*.pypi.org", None),                          // no wildcards
            ("http://pypi.org", None),                     // a host, not a URL
            ("", None),
            ("a b", None),
            ("-x.org", None),
            ("[::1]:80", None),                            // IPv6 literals are not taken
        ];
        for (text, want) in cases {
            let got = text.parse::<HostRule>().ok().map(|r| r.to_string());
            assert_eq!(got.as_deref(), want, "{text:?}");
        }
    }

    #[test]
    fn a_rule_without_a_port_allows_http_and_https_only() {
        let l = list(&["deb.debian.org", "127.0.0.1:8080"]);
        // (host, port, allowed)
        let cases = [
            ("deb.debian.org", 80, true),
            ("DEB.debian.org.", 443, true),
            ("deb.debian.org", 22, false),
            ("security.debian.org", 80, false), // exact names only
            ("debian.org", 80, false),
            ("127.0.0.1", 8080, true),
            ("127.0.0.1", 80, false),   // an explicit port is the only one
            ("localhost", 8080, false), // names are not resolved to match addresses
            ("", 80, false),
        ];
        for (host, port, allowed) in cases {
            assert_eq!(l.allows(host, port), allowed, "{host}:{port}");
        }
        assert!(!Allowlist::default().allows("deb.debian.org", 80));
    }

    #[test]
    fn a_mirror_url_gives_its_host() {
        let rule = |u: &str| HostRule::for_url(u).map(|r| r.to_string());
        assert_eq!(
            rule("http://deb.debian.org/debian").as_deref(),
            Some("deb.debian.org")
        );
        assert_eq!(
            rule("https://m.example:8443/d").as_deref(),
            Some("m.example:8443")
        );
        assert_eq!(rule("deb.debian.org"), None);
    }
}
