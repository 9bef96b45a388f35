//! Guest network for one run, off unless asked for and allowed.
//!
//! A suite (`network` in runner.toml), a GitLab job (`RUNNER_NETWORK`) or `runner test
//! --network` asks for `none`, `proxy` or `full` ([`NetworkMode`]); the operator's ceiling
//! bounds it: `network` in a `[[runners]]` entry or in `[github]` (default `none`), and for
//! `runner test` the user's own `--network` (default `none`: a repository's runner.toml
//! cannot open the network on the user's machine by itself). A plan over its ceiling is
//! refused before anything starts, naming the limit.
//!
//! `proxy` runs [`proxy::Proxy`] for the job (allowlist: the operator's `allowed_hosts`,
//! default the image recipe's Debian mirror host), reached from the guest through
//! [`relay`]; [`guest`] brings the interface up and sets the proxy variables and apt's
//! proxy.

pub mod allow;
pub mod guest;
pub mod proxy;
pub mod relay;

pub use allow::{Allowlist, HostRule};
pub use engine::net::NetworkMode;

use engine::net::{ProxyRelay, VmNetwork};

/// The hidden subcommand QEMU runs per guest connection to the proxy (see [`relay`]).
pub const RELAY_SUBCOMMAND: &str = "proxy-relay";

/// The network a plan gets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkPlan {
    pub mode: NetworkMode,
    /// For `proxy`: the hosts it lets through; `None`: the image recipe's mirror host.
    pub allow: Option<Allowlist>,
}

/// A job's network while its VM runs: what the VM gets and the proxy serving it, which stops
/// when this is dropped.
#[derive(Debug)]
pub struct JobNetwork {
    pub vm: VmNetwork,
    // Before `_dir`: the proxy removes its socket, then the directory goes.
    proxy: Option<proxy::Proxy>,
    _dir: Option<tempfile::TempDir>,
}

/// Why a job's network could not be set up (a host problem, not the job's).
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("cannot start the job's network proxy")]
    Proxy(#[source] std::io::Error),
    #[error("cannot give the job's network proxy to the VM user")]
    HandOver(#[source] engine::sandbox::SandboxError),
}

impl JobNetwork {
    /// Sets up `plan`'s network: for `proxy`, starts the job's proxy (its allowlist: the
    /// plan's, else the host of `mirror`, the image recipe's Debian mirror). `vm_user`: the
    /// user QEMU runs as, when not the runner's (the proxy's directory becomes theirs).
    pub fn start(
        plan: &NetworkPlan,
        mirror: Option<&str>,
        vm_user: Option<engine::sandbox::VmUser>,
    ) -> Result<JobNetwork, NetworkError> {
        let plain = |vm| JobNetwork {
            vm,
            proxy: None,
            _dir: None,
        };
        match plan.mode {
            NetworkMode::None => Ok(plain(VmNetwork::None)),
            NetworkMode::Full => Ok(plain(VmNetwork::Full)),
            NetworkMode::Proxy => {
                let allow = plan.allow.clone().unwrap_or_else(|| {
                    Allowlist::new(mirror.and_then(HostRule::for_url).into_iter().collect())
                });
                let dir = tempfile::Builder::new()
                    .prefix("runner-proxy-")
                    .tempdir()
                    .map_err(NetworkError::Proxy)?;
                let socket = dir.path().join("proxy.sock");
                let proxy = proxy::Proxy::start(&socket, allow, proxy::Bounds::default())
                    .map_err(NetworkError::Proxy)?;
                // QEMU (and so the relay) may run as the VM user: the private (0700)
                // directory and the socket become theirs; no other local user gets in.
                for path in [dir.path(), socket.as_path()] {
                    engine::sandbox::hand_over(path, vm_user).map_err(NetworkError::HandOver)?;
                }
                let exe = std::env::current_exe().map_err(NetworkError::Proxy)?;
                Ok(JobNetwork {
                    vm: VmNetwork::Proxy(ProxyRelay {
                        relay: vec![exe.into(), RELAY_SUBCOMMAND.into()],
                        socket,
                    }),
                    proxy: Some(proxy),
                    _dir: Some(dir),
                })
            }
        }
    }

    /// The proxy's denials, when the job has a proxy.
    pub fn denials(&self) -> Option<proxy::Denials> {
        self.proxy.as_ref().map(proxy::Proxy::denials)
    }
}

/// One log line per host the proxy denied since the last take.
pub fn denial_notes(denials: &proxy::Denials) -> Vec<String> {
    denials
        .take()
        .into_iter()
        .map(|d| format!("network: the proxy denied {d} (not in this runner's allowlist)"))
        .collect()
}

/// Parses a serve config's `network` value.
pub fn de_network<'de, D: serde::Deserializer<'de>>(d: D) -> Result<NetworkMode, D::Error> {
    let text = <String as serde::Deserialize>::deserialize(d)?;
    text.parse().map_err(serde::de::Error::custom)
}

/// Parses a serve config's `allowed_hosts` list (`None` stays `None`: the default).
pub fn de_allowed_hosts<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Allowlist>, D::Error> {
    let list = <Option<Vec<String>> as serde::Deserialize>::deserialize(d)?;
    list.map(|l| {
        l.iter()
            .map(|h| h.parse::<HostRule>())
            .collect::<Result<Vec<_>, _>>()
            .map(Allowlist::new)
    })
    .transpose()
    .map_err(serde::de::Error::custom)
}

/// A run asking for more network than its ceiling allows. One line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} asks for network = \"{asked}\", over the limit {limit} = \"{ceiling}\"; {fix}")]
pub struct OverNetwork {
    /// "suite 'unit'".
    pub what: String,
    pub asked: NetworkMode,
    /// Where the ceiling is set ("--network", "network of this runner").
    pub limit: &'static str,
    pub ceiling: NetworkMode,
    pub fix: &'static str,
}

/// Checks `asked` against `ceiling`.
pub fn check(
    what: &str,
    asked: NetworkMode,
    ceiling: NetworkMode,
    limit: &'static str,
    fix: &'static str,
) -> Result<(), OverNetwork> {
    if asked <= ceiling {
        return Ok(());
    }
    Err(OverNetwork {
        what: what.to_string(),
        asked,
        limit,
        ceiling,
        fix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mode_over_the_ceiling_is_refused_naming_the_limit() {
        // (asked, ceiling, allowed)
        let cases = [
            (NetworkMode::None, NetworkMode::None, true),
            (NetworkMode::Proxy, NetworkMode::None, false),
            (NetworkMode::Proxy, NetworkMode::Proxy, true),
            (NetworkMode::Full, NetworkMode::Proxy, false),
            (NetworkMode::Proxy, NetworkMode::Full, true),
        ];
        for (asked, ceiling, allowed) in cases {
            let r = check("suite 'x'", asked, ceiling, "--network", "pass --network");
            assert_eq!(r.is_ok(), allowed, "{asked} under {ceiling}");
        }
        let e = check(
            "suite 'x'",
            NetworkMode::Full,
            NetworkMode::None,
            "--network",
            "pass --network full",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "suite 'x' asks for network = \"full\", over the limit --network = \"none\"; pass --network full"
        );
    }

    #[tokio::test]
    async fn a_proxy_without_an_allowlist_allows_the_recipes_mirror_host() {
        let plan = NetworkPlan {
            mode: NetworkMode::Proxy,
            allow: None,
        };
        let net = JobNetwork::start(&plan, Some("http://deb.debian.org/debian"), None).unwrap();
        let proxy = net.proxy.as_ref().unwrap();
        assert_eq!(proxy.allowlist().rules().len(), 1);
        assert!(proxy.allowlist().allows("deb.debian.org", 80));
        let VmNetwork::Proxy(relay) = &net.vm else {
            panic!("{:?}", net.vm)
        };
        assert_eq!(relay.socket, proxy.socket());
        assert_eq!(relay.relay[1], RELAY_SUBCOMMAND);
        let dir = relay.socket.parent().unwrap().to_path_buf();
        drop(net);
        assert!(!dir.exists(), "the socket's directory goes with the job");
        // `none` and `full` start nothing.
        for mode in [NetworkMode::None, NetworkMode::Full] {
            let net = JobNetwork::start(&NetworkPlan { mode, allow: None }, None, None).unwrap();
            assert!(net.proxy.is_none() && net.vm.mode() == mode);
        }
    }
}
