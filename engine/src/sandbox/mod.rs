//! Defence in depth around QEMU, which runs guest code from untrusted jobs and whose TCG is
//! not a security boundary. Four layers, each independent of the others' failure:
//!
//! - **uid**: when the runner is root, QEMU runs as the unprivileged `runner-vm` user;
//! - **namespace**: bubblewrap gives QEMU a mount namespace in which only its VM directory is
//!   writable and only its image is visible (no config, keys, checkouts or other VMs), and
//!   fresh PID, IPC, network, UTS and cgroup namespaces;
//! - **cgroup**: a cgroup per VM caps memory and tasks and weighs CPU;
//! - **seccomp**: QEMU's own `-sandbox` (see `qemu::spec`), checked per QEMU binary.
//!
//! Plus, always: no core dumps, a bounded number of open files, an empty environment and a
//! session of its own (no controlling terminal). [`Containment::detect`] decides once per
//! process which layers this host offers and says why the others are off; a VM then gets a
//! [`Launch`] from [`Containment::prepare`].

pub mod bwrap;
pub mod cgroup;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::qemu::host::which;

/// The account QEMU runs as when the runner is root (created by scripts/setup-host).
pub const VM_USER: &str = "runner-vm";
/// Layers to switch off, comma-separated (`uid,namespace,cgroup` or `all`): for measuring
/// their cost and for hosts where one misbehaves. `runner serve` still refuses to run
/// without the layers its config requires.
pub const OFF_ENV: &str = "RUNNER_SANDBOX_OFF";
/// How long the bwrap probe may take (it runs `true` in a sandbox: milliseconds).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Open files QEMU may have: a few dozen in practice (disks, sockets, eventfds).
pub const MAX_OPEN_FILES: u64 = 4096;

/// One isolation layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Layer {
    User,
    Namespace,
    Cgroup,
    Seccomp,
}

impl Layer {
    pub const ALL: [Layer; 4] = [Layer::User, Layer::Namespace, Layer::Cgroup, Layer::Seccomp];

    pub fn name(self) -> &'static str {
        match self {
            Layer::User => "uid",
            Layer::Namespace => "namespace",
            Layer::Cgroup => "cgroup",
            Layer::Seccomp => "seccomp",
        }
    }
}

impl std::str::FromStr for Layer {
    type Err = String;
    fn from_str(s: &str) -> Result<Layer, String> {
        Layer::ALL
            .into_iter()
            .find(|l| l.name() == s)
            .ok_or_else(|| {
                format!("unknown sandbox layer '{s}' (known: uid, namespace, cgroup, seccomp)")
            })
    }
}

impl std::fmt::Display for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An unprivileged user and group to run QEMU as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmUser {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot create the cgroup of VM {vm}")]
    Cgroup {
        vm: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot hand {path} to the VM user")]
    Chown {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The layers every QEMU of this process gets (decided once, by [`Containment::detect`]).
/// `Default` is no layer at all (the image builder's own VMs, tests).
#[derive(Debug, Clone, Default)]
pub struct Containment {
    pub user: Option<VmUser>,
    pub bwrap: Option<PathBuf>,
    pub cgroups: Option<cgroup::Hierarchy>,
    /// The system paths the namespace shows (read once).
    system: Vec<bwrap::SystemMount>,
    /// The runner is root.
    root: bool,
    /// Each layer that is off, and why.
    pub off: Vec<(Layer, String)>,
}

/// What one QEMU may see: the paths beside the system's.
#[derive(Debug, Clone, Default)]
pub struct VmView {
    /// The VM directory (overlay, sockets), an image being baked.
    pub writable: Vec<PathBuf>,
    /// Kernel, initramfs, base image, saved state.
    pub read_only: Vec<PathBuf>,
    /// Pass /dev/kvm through.
    pub kvm: bool,
    /// Share the host's network namespace (guest network `full`); otherwise QEMU gets an
    /// empty one of its own.
    pub host_network: bool,
}

/// How to start one QEMU: the command (QEMU, or bwrap around it) and the cgroup it joins.
#[derive(Debug)]
pub struct Launch {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub cgroup: Option<cgroup::VmCgroup>,
}

impl Containment {
    /// What this host offers, minus what [`OFF_ENV`] switches off.
    pub async fn detect() -> Containment {
        let off_env = std::env::var(OFF_ENV).unwrap_or_default();
        let switched_off = |l: Layer| {
            off_env
                .split(',')
                .any(|w| w.trim() == "all" || w.trim() == l.name())
        };
        let root = nix::unistd::geteuid().is_root();
        let mut c = Containment {
            root,
            ..Containment::default()
        };
        let by_env = format!("switched off by {OFF_ENV}");

        // Namespace first: the uid layer depends on it.
        if switched_off(Layer::Namespace) {
            c.off.push((Layer::Namespace, by_env.clone()));
        } else {
            match which("bwrap") {
                None => c.off.push((
                    Layer::Namespace,
                    "bwrap not found; run scripts/setup-host (Debian package bubblewrap)".into(),
                )),
                Some(path) => {
                    c.system = bwrap::system_mounts();
                    match probe_bwrap(&path, &c.system, root).await {
                        Ok(()) => c.bwrap = Some(path),
                        Err(why) => c.off.push((Layer::Namespace, why)),
                    }
                }
            }
        }

        if switched_off(Layer::User) {
            c.off.push((Layer::User, by_env.clone()));
        } else if !root {
            c.off.push((
                Layer::User,
                "the runner is not root: QEMU runs as the invoking user".into(),
            ));
        } else if c.bwrap.is_none() {
            // The user switch happens inside the sandbox, and the VM user could not reach
            // files under root's home (the cache) without it.
            c.off
                .push((Layer::User, "needs the namespace layer".into()));
        } else if !Path::new(bwrap::SETPRIV).is_file() {
            c.off.push((
                Layer::User,
                format!("{} not found (util-linux)", bwrap::SETPRIV),
            ));
        } else {
            match nix::unistd::User::from_name(VM_USER) {
                Ok(Some(u)) => {
                    c.user = Some(VmUser {
                        uid: u.uid.as_raw(),
                        gid: u.gid.as_raw(),
                    })
                }
                _ => c.off.push((
                    Layer::User,
                    format!("no user {VM_USER}; run scripts/setup-host"),
                )),
            }
        }

        if switched_off(Layer::Cgroup) {
            c.off.push((Layer::Cgroup, by_env));
        } else {
            match cgroup::Hierarchy::detect() {
                Ok(h) => c.cgroups = Some(h),
                Err(why) => c.off.push((Layer::Cgroup, why)),
            }
        }
        c
    }

    /// The runner is root (bwrap needs no user namespace; the VM user is switched to inside).
    pub fn privileged(&self) -> bool {
        self.root
    }

    /// Whether `layer` is on (seccomp is a property of each QEMU binary: always false here).
    pub fn is_on(&self, layer: Layer) -> bool {
        match layer {
            Layer::User => self.user.is_some(),
            Layer::Namespace => self.bwrap.is_some(),
            Layer::Cgroup => self.cgroups.is_some(),
            Layer::Seccomp => false,
        }
    }

    /// Why `layer` is off, if it is.
    pub fn why_off(&self, layer: Layer) -> Option<&str> {
        self.off
            .iter()
            .find(|(l, _)| *l == layer)
            .map(|(_, why)| why.as_str())
    }

    /// One line about the layers that are off and could be on, for commands run by hand
    /// (`None` when there is nothing to say). A non-root runner cannot switch users: that
    /// is expected, not news.
    pub fn note(&self) -> Option<String> {
        let parts: Vec<String> = self
            .off
            .iter()
            .filter(|(l, _)| self.root || *l != Layer::User)
            .map(|(l, why)| format!("{l} off ({why})"))
            .collect();
        (!parts.is_empty()).then(|| format!("sandbox: {}", parts.join("; ")))
    }

    /// Prepares the launch of QEMU `binary` with `args` for VM `vm_id` (whose cgroup is
    /// created now, with limits for `memory_mib` and `cpus`).
    pub fn prepare(
        &self,
        vm_id: &str,
        binary: &Path,
        args: Vec<OsString>,
        view: &VmView,
        limits: cgroup::Limits,
    ) -> Result<Launch, SandboxError> {
        let cgroup = match &self.cgroups {
            Some(h) => Some(
                h.create(vm_id, &limits)
                    .map_err(|source| SandboxError::Cgroup {
                        vm: vm_id.into(),
                        source,
                    })?,
            ),
            None => None,
        };
        let Some(bwrap_path) = &self.bwrap else {
            return Ok(Launch {
                program: binary.into(),
                args,
                cgroup,
            });
        };
        let kvm = Path::new("/dev/kvm");
        let sandbox = bwrap::Sandbox {
            system: self.system.clone(),
            writable: view.writable.clone(),
            read_only: view.read_only.clone(),
            devices: if view.kvm { vec![kvm.into()] } else { vec![] },
            user: self.user,
            groups: match (view.kvm, self.user) {
                (true, Some(_)) => {
                    use std::os::unix::fs::MetadataExt;
                    kvm.metadata().map(|m| vec![m.gid()]).unwrap_or_default()
                }
                _ => vec![],
            },
            privileged: self.root,
            host_network: view.host_network,
        };
        let mut full = bwrap::command(&sandbox, bwrap_path, binary, &args);
        let program = PathBuf::from(full.remove(0));
        Ok(Launch {
            program,
            args: full,
            cgroup,
        })
    }
}

/// Makes `path` the VM user's (the VM directory and the overlay in it), when there is one.
pub fn hand_over(path: &Path, user: Option<VmUser>) -> Result<(), SandboxError> {
    let Some(u) = user else { return Ok(()) };
    std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid)).map_err(|source| SandboxError::Chown {
        path: path.into(),
        source,
    })
}

/// The resource limits every QEMU gets, whatever else is available: no core dumps (a core
/// of QEMU holds guest memory), and a bound on open files. Called between fork and exec.
pub fn apply_rlimits() -> std::io::Result<()> {
    use nix::sys::resource::{setrlimit, Resource};
    setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
    setrlimit(Resource::RLIMIT_NOFILE, MAX_OPEN_FILES, MAX_OPEN_FILES)?;
    Ok(())
}

/// Whether bwrap can build a sandbox here (as root it needs nothing; otherwise it needs
/// unprivileged user namespaces, which some hosts forbid).
async fn probe_bwrap(
    bwrap: &Path,
    system: &[bwrap::SystemMount],
    root: bool,
) -> Result<(), String> {
    let sandbox = bwrap::Sandbox {
        system: system.to_vec(),
        writable: vec![],
        read_only: vec![],
        devices: vec![],
        user: None,
        groups: vec![],
        privileged: root,
        host_network: false,
    };
    let truth = which("true").unwrap_or_else(|| "/usr/bin/true".into());
    let mut argv = bwrap::command(&sandbox, bwrap, &truth, &[]);
    let program = argv.remove(0);
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(argv);
    let run = crate::child::output_in_group(&mut cmd);
    match tokio::time::timeout(PROBE_TIMEOUT, run).await {
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let err = String::from_utf8_lossy(&out.stderr);
            let first = err.lines().next().unwrap_or("").trim();
            let hint = if root {
                ""
            } else {
                " (unprivileged user namespaces disabled? see kernel.unprivileged_userns_clone / user.max_user_namespaces)"
            };
            Err(format!("bwrap cannot create a sandbox: {first}{hint}"))
        }
        Ok(Err(e)) => Err(format!("cannot run bwrap: {e}")),
        Err(_) => Err(format!("bwrap did not finish within {PROBE_TIMEOUT:?}")),
    }
}

/// Which of `required` are off, with why (seccomp from `qemu_has_sandbox`), for `runner
/// serve`'s refusal.
pub fn missing(
    containment: &Containment,
    required: &[Layer],
    qemu_has_sandbox: bool,
) -> Vec<(Layer, String)> {
    required
        .iter()
        .filter_map(|&l| {
            let on = match l {
                Layer::Seccomp => qemu_has_sandbox,
                other => containment.is_on(other),
            };
            (!on).then(|| {
                let why = match l {
                    Layer::Seccomp => "this QEMU was built without -sandbox (seccomp)".into(),
                    other => containment
                        .why_off(other)
                        .unwrap_or("not available")
                        .to_string(),
                };
                (l, why)
            })
        })
        .collect()
}

/// The layers `runner serve` requires unless its config says otherwise: everything that
/// keeps a compromised QEMU from the service's secrets — the uid switch (when root, the only
/// case where it is possible), the namespace and seccomp. The cgroup limits resource abuse,
/// not access, and is used whenever the host offers it.
pub fn default_required(root: bool) -> Vec<Layer> {
    if root {
        vec![Layer::User, Layer::Namespace, Layer::Seccomp]
    } else {
        vec![Layer::Namespace, Layer::Seccomp]
    }
}

/// Whether this process runs as root.
pub fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names_round_trip() {
        for l in Layer::ALL {
            assert_eq!(l.name().parse::<Layer>().unwrap(), l);
        }
        let err = "selinux".parse::<Layer>().unwrap_err();
        assert!(
            err.contains("selinux") && err.contains("namespace"),
            "{err}"
        );
    }

    #[test]
    fn missing_layers_say_why() {
        let c = Containment {
            off: vec![(Layer::User, "no user runner-vm".into())],
            bwrap: Some("/usr/bin/bwrap".into()),
            root: true,
            ..Containment::default()
        };
        let m = missing(&c, &default_required(true), false);
        assert_eq!(
            m,
            vec![
                (Layer::User, "no user runner-vm".to_string()),
                (
                    Layer::Seccomp,
                    "this QEMU was built without -sandbox (seccomp)".to_string()
                )
            ]
        );
        assert!(missing(&c, &[Layer::Namespace], false).is_empty());
        assert!(missing(&c, &[], false).is_empty());
    }

    #[test]
    fn the_note_leaves_out_what_a_normal_user_cannot_have() {
        let mut c = Containment {
            off: vec![
                (Layer::User, "the runner is not root".into()),
                (Layer::Cgroup, "needs root".into()),
            ],
            ..Containment::default()
        };
        assert_eq!(c.note().unwrap(), "sandbox: cgroup off (needs root)");
        c.off.pop();
        assert_eq!(c.note(), None);
        c.root = true;
        assert!(c.note().unwrap().contains("uid off"));
    }

    #[test]
    fn without_layers_qemu_is_started_as_it_is() {
        let c = Containment::default();
        let l = c
            .prepare(
                "vm-x",
                Path::new("/usr/bin/qemu-system-riscv64"),
                vec!["-m".into(), "1G".into()],
                &VmView::default(),
                cgroup::limits(1024, 1, true, None),
            )
            .unwrap();
        assert_eq!(l.program, PathBuf::from("/usr/bin/qemu-system-riscv64"));
        assert_eq!(l.args, vec![OsString::from("-m"), "1G".into()]);
        assert!(l.cgroup.is_none());
    }
}
