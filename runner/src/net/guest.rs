//! The guest's side of its network: bring the virtio-net interface up after boot (static
//! address on QEMU's user network; the images have no DHCP client but busybox's `ip`), and
//! the environment every step gets (`http_proxy` and friends in `proxy` mode; apt's proxy is
//! written to `/etc/apt/apt.conf.d` by the same script).

use engine::net::{
    NetworkMode, DNS_ADDR, GATEWAY_ADDR, GUEST_ADDR, PROXY_GUEST_ADDR, PROXY_GUEST_PORT,
};
use engine::vm::{CommandEnd, Vm};

use crate::outcome::{infra, InfraKind, Outcome};
use crate::run::transfer::housekeeping;

/// The proxy's URL as the guest sees it.
pub fn proxy_url() -> String {
    format!("http://{PROXY_GUEST_ADDR}:{PROXY_GUEST_PORT}")
}

/// Where apt reads its proxy from (a file of the runner's own; the image has none).
pub const APT_PROXY_CONF: &str = "/etc/apt/apt.conf.d/90runner-proxy";

/// Variables every step of a `proxy` job gets, in both spellings (tools differ).
pub fn env(mode: NetworkMode) -> Vec<(String, String)> {
    if mode != NetworkMode::Proxy {
        return Vec::new();
    }
    let url = proxy_url();
    let no_proxy = "localhost,127.0.0.1,::1".to_string();
    vec![
        ("http_proxy".into(), url.clone()),
        ("https_proxy".into(), url.clone()),
        ("HTTP_PROXY".into(), url.clone()),
        ("HTTPS_PROXY".into(), url),
        ("no_proxy".into(), no_proxy.clone()),
        ("NO_PROXY".into(), no_proxy),
    ]
}

/// The host's IPv4 name servers that a `full` guest can reach through slirp's NAT (not
/// loopback ones), from resolv.conf's text.
pub fn reachable_name_servers(resolv_conf: &str) -> Vec<std::net::Ipv4Addr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<std::net::Ipv4Addr>().ok())
        .filter(|a| !a.is_loopback() && !a.is_unspecified())
        .take(3)
        .collect()
}

/// The script that configures the NIC: load the driver (a module on Debian's kernels),
/// wait for the interface (bounded), give it the guest address; `full` adds the default
/// route and name servers, `proxy` only apt's proxy (the proxy address is on the link).
/// `full` uses the host's own name servers when it has reachable ones: slirp's forwarder
/// (`10.0.2.3`) did not answer from inside QEMU's sandbox on the development host (cause
/// not found), and is the fallback.
pub fn bring_up_script(mode: NetworkMode, name_servers: &[std::net::Ipv4Addr]) -> Option<String> {
    let tail = match mode {
        NetworkMode::None => return None,
        NetworkMode::Proxy => format!(
            "mkdir -p /etc/apt/apt.conf.d\n\
             printf 'Acquire::http::Proxy \"%s\";\\nAcquire::https::Proxy \"%s\";\\n' {url} {url} > {APT_PROXY_CONF}\n",
            url = proxy_url()
        ),
        NetworkMode::Full => {
            let servers: Vec<String> = if name_servers.is_empty() {
                vec![DNS_ADDR.to_string()]
            } else {
                name_servers.iter().map(ToString::to_string).collect()
            };
            let lines: String = servers.iter().map(|s| format!("nameserver {s}\\n")).collect();
            format!(
                "busybox ip route add default via {GATEWAY_ADDR}\n\
                 rm -f /etc/resolv.conf\n\
                 printf '{lines}' > /etc/resolv.conf\n"
            )
        }
    };
    Some(format!(
        "set -e\n\
         modprobe virtio_net 2>/dev/null || true\n\
         dev=; i=0\n\
         while [ -z \"$dev\" ] && [ $i -lt 100 ]; do\n\
           for d in /sys/class/net/*; do n=${{d##*/}}; [ \"$n\" = lo ] || dev=$n; done\n\
           [ -n \"$dev\" ] || {{ i=$((i+1)); sleep 0.1; }}\n\
         done\n\
         [ -n \"$dev\" ] || {{ echo 'no network interface appeared within 10 s'; exit 1; }}\n\
         busybox ip link set lo up\n\
         busybox ip link set \"$dev\" up\n\
         busybox ip addr add {GUEST_ADDR}/24 dev \"$dev\"\n\
         {tail}"
    ))
}

/// Configures the guest's network for `mode` (nothing for `none`).
pub(crate) async fn bring_up(vm: &mut Vm, mode: NetworkMode) -> Result<(), Outcome> {
    let host_servers = match mode {
        NetworkMode::Full => std::fs::read("/etc/resolv.conf")
            .map(|b| reachable_name_servers(&String::from_utf8_lossy(&b[..b.len().min(64 * 1024)])))
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    let Some(script) = bring_up_script(mode, &host_servers) else {
        return Ok(());
    };
    match housekeeping(vm, &script).await? {
        (CommandEnd::Exited(0), _) => Ok(()),
        (end, out) => Err(infra(
            InfraKind::Agent,
            format!(
                "bringing up the guest network ({mode}) failed ({end:?}): {}",
                out.trim()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_networked_modes_get_a_script_and_only_proxy_gets_proxy_variables() {
        assert!(bring_up_script(NetworkMode::None, &[]).is_none());
        let proxy = bring_up_script(NetworkMode::Proxy, &[]).unwrap();
        assert!(proxy.contains("Acquire::http::Proxy") && !proxy.contains("route add"));
        let full = bring_up_script(NetworkMode::Full, &[]).unwrap();
        assert!(full.contains("route add default via 10.0.2.2") && full.contains("10.0.2.3"));
        let host = reachable_name_servers(
            "# x\nnameserver 127.0.0.53\nnameserver 10.1.2.3\nnameserver ::1\n",
        );
        assert_eq!(host, ["10.1.2.3".parse::<std::net::Ipv4Addr>().unwrap()]);
        let full = bring_up_script(NetworkMode::Full, &host).unwrap();
        assert!(
            full.contains("printf 'nameserver 10.1.2.3\\n'") && !full.contains("10.0.2.3"),
            "{full}"
        );
        assert!(env(NetworkMode::None).is_empty() && env(NetworkMode::Full).is_empty());
        assert!(env(NetworkMode::Proxy).contains(&(
            "https_proxy".to_string(),
            "http://10.0.2.100:3128".to_string()
        )));
    }
}
