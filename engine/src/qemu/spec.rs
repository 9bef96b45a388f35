//! The typed description of one VM (`VmSpec`) and the pure functions that turn it into a QEMU
//! command line. Nothing here touches the system, so every argument is unit-tested.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::arch::Arch;
use crate::net::{ProxyRelay, VmNetwork, PROXY_GUEST_ADDR, PROXY_GUEST_PORT};

/// Name of the virtio-serial port the guest agent listens on (qemu-ga's default).
pub const AGENT_PORT_NAME: &str = "org.qemu.guest_agent.0";
/// Name of the virtio-serial port that carries the live output of guest commands.
pub const OUTPUT_PORT_NAME: &str = "org.runner.output.0";
/// Name of the virtio-serial port that carries the host's messages to the guest's
/// after-resume helper (`crate::vm::resume`): no agent call is needed to wake it.
pub const CONTROL_PORT_NAME: &str = "org.runner.control.0";

/// How guest instructions are executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation; only for a guest of the host's architecture.
    Kvm,
    /// QEMU's JIT, multi-threaded (one host thread per vCPU).
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The disk a VM boots from.
#[derive(Debug, Clone)]
pub struct RootDisk {
    pub path: PathBuf,
    /// `qcow2` for per-job overlays, `raw` while an image is being baked.
    pub format: &'static str,
}

/// The UNIX sockets through which the host talks to one VM.
#[derive(Debug, Clone)]
pub struct VmSockets {
    pub qmp: PathBuf,
    pub agent: PathBuf,
    pub output: PathBuf,
    pub control: PathBuf,
}

/// Everything needed to start one VM. The device set depends only on the image, the
/// architecture and the network mode (never on other job data), so that jobs can resume from
/// a VM state saved after boot: per-job data travels over the agent after boot. Networked
/// VMs never resume (`crate::net`).
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    pub arch: Arch,
    pub accel: Accel,
    pub cpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub root: RootDisk,
    pub sockets: VmSockets,
    /// Whether this QEMU build supports `-sandbox` (seccomp).
    pub sandbox: bool,
    /// `VmNetwork::None`: no NIC at all.
    pub network: VmNetwork,
}

/// The QEMU machine model (with its options) for an architecture.
pub fn machine(arch: Arch) -> &'static str {
    arch.info().machine
}

/// The CPU model: the host's CPU under KVM; under TCG the table's model (chosen to boot fast
/// and run the distribution's userland).
pub fn cpu_model(arch: Arch, accel: Accel) -> &'static str {
    match accel {
        Accel::Kvm => "host",
        Accel::Tcg => arch.info().cpu_tcg,
    }
}

/// A virtio device name on this architecture's bus (`virtio-blk` → `virtio-blk-ccw` on s390x).
fn virtio(arch: Arch, device: &str) -> String {
    format!("{device}-{}", arch.info().bus.suffix())
}

/// The `-accel` argument.
pub fn accel_arg(accel: Accel) -> &'static str {
    match accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg,thread=multi",
    }
}

/// The kernel command line. `panic=-1` with `-no-reboot` turns a guest panic (or the agent,
/// PID 1's child, dying) into QEMU exiting instead of a hang.
pub fn kernel_cmdline(arch: Arch) -> String {
    let mut line = format!(
        "console={} panic=-1 quiet loglevel=3 rdinit=/init",
        arch.console_device()
    );
    let extra = arch.info().kernel_args;
    if !extra.is_empty() {
        line.push(' ');
        line.push_str(extra);
    }
    line
}

fn push(argv: &mut Vec<OsString>, items: &[&str]) {
    argv.extend(items.iter().map(OsString::from));
}

fn push_kv(argv: &mut Vec<OsString>, flag: &str, value: String) {
    argv.push(flag.into());
    argv.push(value.into());
}

/// The full argument vector (without the binary) for `spec`. Saved VM states only fit the
/// exact command line they were saved from: a change here must bump `vm::state::FORMAT`.
pub fn argv(spec: &VmSpec) -> Vec<OsString> {
    let mut a = Vec::new();
    push(&mut a, &["-nodefaults", "-no-user-config", "-no-reboot"]);
    push(&mut a, &["-display", "none"]);
    push_kv(&mut a, "-name", spec.name.clone());
    push_kv(&mut a, "-machine", machine(spec.arch).to_string());
    push_kv(&mut a, "-accel", accel_arg(spec.accel).to_string());
    push_kv(&mut a, "-cpu", cpu_model(spec.arch, spec.accel).to_string());
    push_kv(&mut a, "-smp", spec.cpus.to_string());
    push_kv(&mut a, "-m", format!("{}M", spec.memory_mib));
    if spec.sandbox {
        // `proxy` needs QEMU to start one relay per guest connection (see `crate::net`):
        // fork and exec, and slirp's child calls setsid(), which `elevateprivileges=deny`
        // (and `children`) kill. Privilege gains stay out all the same: bwrap sets
        // no_new_privs and QEMU runs unprivileged with no capabilities (`crate::sandbox`).
        let (privileges, spawn) = match spec.network {
            VmNetwork::Proxy(_) => ("allow", "allow"),
            VmNetwork::None | VmNetwork::Full => ("deny", "deny"),
        };
        push_kv(
            &mut a,
            "-sandbox",
            format!(
                "on,obsolete=deny,elevateprivileges={privileges},spawn={spawn},resourcecontrol=deny"
            ),
        );
    }
    // Boot: the image's kernel and initramfs, directly.
    a.push("-kernel".into());
    a.push(spec.kernel.clone().into());
    a.push("-initrd".into());
    a.push(spec.initrd.clone().into());
    push_kv(&mut a, "-append", kernel_cmdline(spec.arch));
    // The serial console goes to our stdout pipe, where a bounded reader keeps its tail.
    push(&mut a, &["-serial", "stdio"]);
    // Root disk. cache=unsafe: per-job overlays are thrown away, so flushes buy nothing;
    // QEMU still writes everything out on a clean quit (which the image bake relies on).
    let mut drive = OsString::from("if=none,id=root,discard=unmap,cache=unsafe,format=");
    drive.push(spec.root.format);
    drive.push(",file=");
    drive.push(escape_opt(&spec.root.path));
    a.push("-drive".into());
    a.push(drive);
    push_kv(
        &mut a,
        "-device",
        format!("{},drive=root", virtio(spec.arch, "virtio-blk")),
    );
    // Control plane: QMP, the agent port, the live-output port and the control port.
    a.push("-qmp".into());
    a.push(socket_chardev_path(
        "unix:",
        &spec.sockets.qmp,
        ",server=on,wait=off",
    ));
    push_kv(
        &mut a,
        "-device",
        format!("{},id=vser0", virtio(spec.arch, "virtio-serial")),
    );
    for (id, path, port) in [
        ("agent0", &spec.sockets.agent, AGENT_PORT_NAME),
        ("output0", &spec.sockets.output, OUTPUT_PORT_NAME),
        ("control0", &spec.sockets.control, CONTROL_PORT_NAME),
    ] {
        a.push("-chardev".into());
        a.push(socket_chardev_path(
            "socket,path=",
            path,
            &format!(",server=on,wait=off,id={id}"),
        ));
        push_kv(
            &mut a,
            "-device",
            format!("virtserialport,bus=vser0.0,chardev={id},name={port}"),
        );
    }
    push_network(&mut a, spec.arch, &spec.network);
    a
}

/// The NIC, if any: `-netdev user` (restricted, with the proxy's `guestfwd`, for `proxy`)
/// and a virtio-net device on the arch's bus.
fn push_network(a: &mut Vec<OsString>, arch: Arch, network: &VmNetwork) {
    let mut netdev = OsString::from("user,id=net0");
    match network {
        VmNetwork::None => return,
        VmNetwork::Full => {}
        VmNetwork::Proxy(relay) => {
            netdev.push(",restrict=on,guestfwd=tcp:");
            netdev.push(format!("{PROXY_GUEST_ADDR}:{PROXY_GUEST_PORT}-cmd:"));
            netdev.push(escape_opt(std::path::Path::new(&relay_command(relay))));
        }
    }
    a.push("-netdev".into());
    a.push(netdev);
    push_kv(
        a,
        "-device",
        format!("{},netdev=net0", virtio(arch, "virtio-net")),
    );
}

/// The command slirp runs for each guest connection to the proxy. libslirp splits it with
/// `g_shell_parse_argv` (shell quoting, no shell) and runs it directly.
fn relay_command(relay: &ProxyRelay) -> String {
    let words: Vec<String> = relay
        .relay
        .iter()
        .map(|w| crate::shell::quote(&w.to_string_lossy()))
        .chain([crate::shell::quote(&relay.socket.to_string_lossy())])
        .collect();
    words.join(" ")
}

fn socket_chardev_path(prefix: &str, path: &std::path::Path, suffix: &str) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(escape_opt(path));
    s.push(suffix);
    s
}

/// QEMU option values separate fields with ','; a literal comma is written ",,".
fn escape_opt(path: &std::path::Path) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let bytes = path.as_os_str().as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    for &b in bytes {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(arch: Arch, accel: Accel) -> VmSpec {
        VmSpec {
            name: "runner-vm-test".into(),
            arch,
            accel,
            cpus: 2,
            memory_mib: 1024,
            kernel: "/img/kernel".into(),
            initrd: "/img/initrd".into(),
            root: RootDisk {
                path: "/vm/a,b/overlay.qcow2".into(),
                format: "qcow2",
            },
            sockets: VmSockets {
                qmp: "/vm/qmp.sock".into(),
                agent: "/vm/agent.sock".into(),
                output: "/vm/output.sock".into(),
                control: "/vm/control.sock".into(),
            },
            sandbox: true,
            network: VmNetwork::None,
        }
    }

    fn joined(spec: &VmSpec) -> String {
        argv(spec)
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn value_of(spec: &VmSpec, flag: &str) -> String {
        let a = argv(spec);
        let i = a.iter().position(|s| s == flag).expect(flag);
        a[i + 1].to_string_lossy().into_owned()
    }

    #[test]
    fn machine_cpu_and_console_per_arch() {
        // (arch, accel, machine, cpu, console)
        let cases = [
            (
                Arch::Riscv64,
                Accel::Tcg,
                "virt",
                "rv64,sstc=off",
                "console=ttyS0",
            ),
            (
                Arch::Aarch64,
                Accel::Tcg,
                "virt",
                "max,pauth-impdef=on",
                "console=ttyAMA0",
            ),
            (Arch::X86_64, Accel::Tcg, "q35", "max", "console=ttyS0"),
            (Arch::X86_64, Accel::Kvm, "q35", "host", "console=ttyS0"),
            (
                Arch::Armhf,
                Accel::Tcg,
                "virt",
                "cortex-a15",
                "console=ttyAMA0",
            ),
            (
                Arch::S390x,
                Accel::Tcg,
                "s390-ccw-virtio",
                "max",
                "console=ttysclp0",
            ),
            (Arch::Mipsel, Accel::Tcg, "malta", "24Kf", "console=ttyS0"),
        ];
        for (arch, accel, machine, cpu, console) in cases {
            let s = spec(arch, accel);
            assert_eq!(value_of(&s, "-machine"), machine, "{arch}");
            assert_eq!(value_of(&s, "-cpu"), cpu, "{arch}");
            assert!(value_of(&s, "-append").contains(console), "{arch}");
        }
    }

    #[test]
    fn tcg_is_multi_threaded_and_kvm_is_kvm() {
        assert_eq!(
            value_of(&spec(Arch::Riscv64, Accel::Tcg), "-accel"),
            "tcg,thread=multi"
        );
        assert_eq!(value_of(&spec(Arch::X86_64, Accel::Kvm), "-accel"), "kvm");
    }

    #[test]
    fn hardening_flags_are_always_present() {
        let s = joined(&spec(Arch::Riscv64, Accel::Tcg));
        for flag in [
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display none",
        ] {
            assert!(s.contains(flag), "missing {flag}: {s}");
        }
        assert!(s.contains("panic=-1"), "{s}");
        assert!(s.contains("-sandbox on,"), "{s}");
        let mut no_sandbox = spec(Arch::Riscv64, Accel::Tcg);
        no_sandbox.sandbox = false;
        assert!(!joined(&no_sandbox).contains("-sandbox"));
    }

    #[test]
    fn no_network_device_unless_the_spec_has_a_network() {
        let s = joined(&spec(Arch::X86_64, Accel::Tcg));
        assert!(!s.contains("-netdev") && !s.contains("virtio-net"), "{s}");
    }

    #[test]
    fn proxy_network_is_restricted_with_one_forward_to_the_relay() {
        let mut s = spec(Arch::S390x, Accel::Tcg);
        s.network = VmNetwork::Proxy(ProxyRelay {
            relay: vec!["/opt/run ner".into(), "proxy-relay".into()],
            socket: "/tmp/p,x/proxy.sock".into(),
        });
        assert_eq!(
            value_of(&s, "-netdev"),
            "user,id=net0,restrict=on,guestfwd=tcp:10.0.2.100:3128-cmd:\
             '/opt/run ner' 'proxy-relay' '/tmp/p,,x/proxy.sock'"
        );
        assert_eq!(
            value_of(&s, "-device").as_str(),
            "virtio-blk-ccw,drive=root"
        );
        let all = joined(&s);
        assert!(all.contains("-device virtio-net-ccw,netdev=net0"), "{all}");
        // QEMU must be allowed to start the relay; otherwise spawning stays denied.
        assert!(all.contains("elevateprivileges=allow,spawn=allow"), "{all}");
        let none = joined(&spec(Arch::S390x, Accel::Tcg));
        assert!(none.contains("elevateprivileges=deny,spawn=deny"), "{none}");
    }

    #[test]
    fn full_network_is_plain_user_networking() {
        let mut s = spec(Arch::Riscv64, Accel::Tcg);
        s.network = VmNetwork::Full;
        assert_eq!(value_of(&s, "-netdev"), "user,id=net0");
        let all = joined(&s);
        assert!(all.contains("-device virtio-net-pci,netdev=net0"), "{all}");
        assert!(all.contains("spawn=deny"), "{all}");
    }

    #[test]
    fn virtio_devices_follow_the_bus() {
        let ccw = joined(&spec(Arch::S390x, Accel::Tcg));
        assert!(ccw.contains("virtio-blk-ccw,drive=root"), "{ccw}");
        assert!(ccw.contains("virtio-serial-ccw,id=vser0"), "{ccw}");
        assert!(!ccw.contains("-pci"), "{ccw}");
        let pci = joined(&spec(Arch::Ppc64el, Accel::Tcg));
        assert!(pci.contains("virtio-blk-pci,drive=root"), "{pci}");
        assert!(pci.contains("virtio-serial-pci,id=vser0"), "{pci}");
    }

    #[test]
    fn machine_specific_kernel_arguments_are_appended() {
        assert!(kernel_cmdline(Arch::Mips64el).ends_with(" nokaslr"));
        assert!(!kernel_cmdline(Arch::Riscv64).contains("nokaslr"));
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let drive = value_of(&spec(Arch::Riscv64, Accel::Tcg), "-drive");
        assert!(drive.ends_with("file=/vm/a,,b/overlay.qcow2"), "{drive}");
        assert!(drive.contains("format=qcow2"), "{drive}");
    }

    #[test]
    fn agent_and_output_ports_share_one_bus() {
        let s = joined(&spec(Arch::Aarch64, Accel::Tcg));
        assert!(
            s.contains("socket,path=/vm/agent.sock,server=on,wait=off,id=agent0"),
            "{s}"
        );
        assert!(s.contains("virtserialport,bus=vser0.0,chardev=agent0,name=org.qemu.guest_agent.0"));
        assert!(s.contains("virtserialport,bus=vser0.0,chardev=output0,name=org.runner.output.0"));
        assert!(s.contains("socket,path=/vm/control.sock,server=on,wait=off,id=control0"));
        assert!(s.contains("virtserialport,bus=vser0.0,chardev=control0,name=org.runner.control.0"));
        assert!(
            s.contains("-qmp unix:/vm/qmp.sock,server=on,wait=off"),
            "{s}"
        );
    }
}
