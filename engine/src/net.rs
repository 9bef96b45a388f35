//! Guest network: the three modes a job may ask for, and what each means for one VM.
//!
//! - `none` (the default): no NIC at all; the guest has only `lo`.
//! - `proxy`: a virtio-net NIC on QEMU user networking with `restrict=on`, so the guest reaches
//!   nothing directly. One `guestfwd` rule turns every guest connection to
//!   [`PROXY_GUEST_ADDR`]:[`PROXY_GUEST_PORT`] into a run of the runner's relay
//!   (`RELAY… SOCKET`, stdin/stdout = the guest's connection), which joins it to the job's
//!   HTTP proxy listening on a UNIX socket on the host. A `guestfwd` to a character device
//!   (`…-unix:PATH`) would be simpler but carries every guest connection over one shared
//!   stream that never closes, which no HTTP proxy can take apart; the `cmd:` form runs one
//!   relay per connection. QEMU runs in its own network namespace (bwrap), so the proxy cannot
//!   be reached on a host TCP port; the socket lives in a directory bound into the sandbox.
//! - `full`: plain user networking with DNS (trusted projects only). QEMU then shares the
//!   host's network namespace.
//!
//! Saved VM states were taken without a NIC; a VM with another device set cannot resume from
//! them, so networked jobs always boot cold (see the README for the cost).

use std::ffi::OsString;
use std::path::PathBuf;

/// The guest's address on QEMU's user network (QEMU's default).
pub const GUEST_ADDR: &str = "10.0.2.15";
/// The user network's gateway (the host, as slirp presents it).
pub const GATEWAY_ADDR: &str = "10.0.2.2";
/// slirp's built-in DNS forwarder (`full` only).
pub const DNS_ADDR: &str = "10.0.2.3";
/// Where the guest finds the job's HTTP proxy in `proxy` mode: an address of the user
/// network that nothing else answers on, forwarded by `guestfwd`.
pub const PROXY_GUEST_ADDR: &str = "10.0.2.100";
pub const PROXY_GUEST_PORT: u16 = 3128;

/// How much network a job asks for, or an operator allows. Ordered: `None < Proxy < Full`,
/// so a ceiling check is a comparison.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NetworkMode {
    #[default]
    None,
    Proxy,
    Full,
}

impl NetworkMode {
    pub const ALL: [NetworkMode; 3] = [NetworkMode::None, NetworkMode::Proxy, NetworkMode::Full];

    pub fn name(self) -> &'static str {
        match self {
            NetworkMode::None => "none",
            NetworkMode::Proxy => "proxy",
            NetworkMode::Full => "full",
        }
    }
}

impl std::fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A network mode that is not one of the three.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown network '{0}'; give none, proxy or full")]
pub struct UnknownNetwork(pub String);

impl std::str::FromStr for NetworkMode {
    type Err = UnknownNetwork;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NetworkMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| UnknownNetwork(s.escape_debug().to_string()))
    }
}

/// The network of one VM as the engine builds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum VmNetwork {
    #[default]
    None,
    Proxy(ProxyRelay),
    Full,
}

/// How a guest connection reaches the job's proxy: QEMU runs `relay… socket` once per
/// connection, with the connection on stdin/stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyRelay {
    /// The relay program and its leading arguments (the runner's own binary and its
    /// hidden relay subcommand); the program is bound read-only into QEMU's sandbox.
    pub relay: Vec<OsString>,
    /// The proxy's UNIX socket; its directory is bound into QEMU's sandbox.
    pub socket: PathBuf,
}

impl VmNetwork {
    pub fn mode(&self) -> NetworkMode {
        match self {
            VmNetwork::None => NetworkMode::None,
            VmNetwork::Proxy(_) => NetworkMode::Proxy,
            VmNetwork::Full => NetworkMode::Full,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_print_and_order() {
        for m in NetworkMode::ALL {
            assert_eq!(m.name().parse::<NetworkMode>(), Ok(m));
        }
        assert!(NetworkMode::None < NetworkMode::Proxy && NetworkMode::Proxy < NetworkMode::Full);
        let e = "open\n".parse::<NetworkMode>().unwrap_err().to_string();
        assert_eq!(e, "unknown network 'open\\n'; give none, proxy or full");
    }
}
