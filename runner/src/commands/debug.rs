//! `runner debug DIR`: resumes a failed step's saved VM (`runner test --keep-failed`, see
//! `snapshot`) and opens a shell in the step's directory and environment, with the job's
//! processes and files as they were — or runs one command there (`--command`).
//!
//! The snapshot may come from another machine, so nothing in it is taken on trust: the
//! manifest is checked (`snapshot::load`), the image is looked up by its key in this
//! cache and must have the same root disk, QEMU must be the same version (a migration
//! stream loads only into the QEMU that wrote it), and the saved disk is re-based onto the
//! local image in a private copy of the state (`engine::vm::state::adopt`).
//!
//! `--pack FILE` resumes nothing: it packs the snapshot for another machine
//! (`snapshot_archive`) and prints the commands that resume it there, as markdown for a CI
//! job's summary (the GitHub Actions template appends them to `$GITHUB_STEP_SUMMARY`).

use std::path::Path;
use std::time::{Duration, Instant};

use engine::image::ImageStore;
use engine::qemu::host::AccelChoice;
use engine::qemu::spec::Accel;
use engine::vm::shell::{ShellSpec, WindowSize};
use engine::vm::{state, CommandEnd, DiskSource, GuestCommand, Vm, VmConfig};
use tokio::sync::watch;

use crate::cli::DebugArgs;
use crate::exit;
use crate::outcome::{chain, vm_error, Outcome};
use crate::report::console::Status;
use crate::run::execute::RunSettings;
use crate::run::platform;
use crate::snapshot::{self, Snapshot};
use crate::terminal;

/// The lock a `runner debug` holds on its private copy of a snapshot while it runs (see
/// [`sweep_abandoned`]).
const IN_USE: &str = "in-use.lock";
/// A copy without its lock is that young only while its `runner debug` is about to lock it.
const UNLOCKED_GRACE: Duration = Duration::from_secs(60);

/// How long a `--command` may run in the resumed VM.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// The size a session starts with when the terminal does not say.
const FALLBACK_SIZE: WindowSize = WindowSize { rows: 24, cols: 80 };

/// Why a snapshot cannot be resumed here: the one line to print, and the exit code.
struct Refusal {
    message: String,
    code: i32,
}

impl Refusal {
    fn new(code: i32, message: impl Into<String>) -> Self {
        Refusal {
            message: message.into(),
            code,
        }
    }
}

impl From<Outcome> for Refusal {
    fn from(o: Outcome) -> Self {
        let code = o.exit_code();
        let message = match o {
            Outcome::InfraError { message, .. } => message,
            other => other.label().to_string(),
        };
        Refusal { message, code }
    }
}

pub async fn run(args: DebugArgs, settings: RunSettings, status: Status) -> i32 {
    let started = Instant::now();
    let (snap, cfg, adopted) = match prepare(&args.dir, &settings).await {
        Ok(ready) => ready,
        Err(r) => {
            status.error(&r.message);
            return r.code;
        }
    };
    let spinner = status.spinner(&format!("{}: resuming the failed VM", snap.arch));
    let vm = Vm::resume(&cfg, &adopted.path().join("state")).await;
    spinner.finish_and_clear();
    let mut vm = match vm {
        Ok(vm) => vm,
        Err(e) => {
            let r = Refusal::from(vm_error(&e, false));
            status.error(&format!("cannot resume the failed VM: {}", r.message));
            return r.code;
        }
    };
    let m = &snap.manifest;
    status.line(&format!(
        "runner: resumed the failed VM of step '{}' (suite {}, {}) in {:.1} s, {:.1} s after start; {}",
        m.step,
        m.suite,
        snap.arch,
        vm.boot_time.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        if args.command.is_some() {
            "running the command"
        } else {
            "`exit` stops it"
        }
    ));
    let env: Vec<(String, String)> = m.env.clone().into_iter().collect();
    let code = match &args.command {
        Some(cmd) => command(&mut vm, cmd, &m.cwd, &env, &status).await,
        None => {
            let mut env = env;
            env.retain(|(k, _)| k != "TERM");
            env.push((
                "TERM".into(),
                std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into()),
            ));
            let spec = ShellSpec {
                cwd: m.cwd.clone(),
                env,
                size: terminal::size().unwrap_or(FALLBACK_SIZE),
            };
            // The session stops the VM.
            return super::shell::session(vm, &spec, &status).await;
        }
    };
    vm.kill().await;
    drop(adopted);
    code
}

/// `runner debug DIR --pack FILE [--fetch CMD]…`: packs the snapshot into FILE and prints
/// the markdown that says how to resume it.
pub fn pack(args: &DebugArgs) -> i32 {
    let Some(out) = &args.pack else {
        return exit::USAGE;
    };
    match pack_to(&args.dir, out, &args.fetch) {
        Ok(markdown) => {
            print!("{markdown}");
            0
        }
        Err(r) => {
            eprintln!("runner: {}", r.message);
            r.code
        }
    }
}

fn pack_to(dir: &Path, out: &Path, fetch: &[String]) -> Result<String, Refusal> {
    let snap = snapshot::load(dir).map_err(|e| Refusal::new(exit::CONFIG, e.to_string()))?;
    if !state::is_complete(dir) {
        return Err(Refusal::new(
            exit::CONFIG,
            format!(
                "{} has a manifest but no complete saved VM (ram.bin, disk.qcow2, meta.json)",
                dir.display()
            ),
        ));
    }
    let file_name = out
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| n.ends_with(".tar.gz") && n.len() > ".tar.gz".len())
        .ok_or_else(|| {
            Refusal::new(
                exit::USAGE,
                format!("--pack {}: name the archive NAME.tar.gz", out.display()),
            )
        })?;
    let io =
        |e: std::io::Error| Refusal::new(exit::IO, format!("cannot write {}: {e}", out.display()));
    // It holds the job's secrets: readable by us alone, like the snapshot itself.
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(out)
        .map_err(io)?;
    let file = crate::snapshot_archive::pack(dir, std::io::BufWriter::new(file))
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let into = file_name.trim_end_matches(".tar.gz");
    let m = &snap.manifest;
    let commands = crate::snapshot_archive::resume_commands(
        fetch,
        file_name,
        Some(into),
        snap.arch,
        snap.image.as_str(),
    );
    let code = |t: &str| t.replace('`', "'");
    Ok(format!(
        "### Failed VM saved: suite `{suite}` on {arch}, step `{step}`\n\n\
         `{file_name}`, {mib:.1} MiB. **Careful: {warning}.** Resume it where `runner` is installed:\n\n\
         ```sh\n{lines}\n```\n",
        suite = code(&m.suite),
        arch = snap.arch,
        step = code(&m.step),
        mib = size as f64 / f64::from(1 << 20),
        warning = crate::snapshot_archive::HOLDS_SECRETS,
        lines = commands.join("\n"),
    ))
}

/// The private copy of a snapshot that `runner debug` resumes (`<cache>/debug/resume-*`),
/// removed when dropped, and the lock that marks it in use until then.
struct Adopted {
    dir: tempfile::TempDir,
    _in_use: nix::fcntl::Flock<std::fs::File>,
}

impl Adopted {
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Removes the copies that killed `runner debug`s left in `<cache>/debug`: those whose lock
/// nobody holds (or, older than [`UNLOCKED_GRACE`], that have none). Returns how many.
pub(crate) fn sweep_abandoned(store: &ImageStore) -> usize {
    let Ok(entries) = std::fs::read_dir(store.root().join("debug")) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let dir = e.path();
        if !e.file_name().to_string_lossy().starts_with("resume-") || !dir.is_dir() {
            continue;
        }
        let abandoned = match std::fs::File::open(dir.join(IN_USE)) {
            // Held while this is tried: its `runner debug` is alive. Released with the
            // file when it goes out of scope here.
            Ok(f) => {
                nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok()
            }
            Err(_) => e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > UNLOCKED_GRACE),
        };
        if abandoned && std::fs::remove_dir_all(&dir).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Checks the snapshot in `dir` against this host and makes its private resumable copy:
/// the snapshot, the VM to start, and the directory holding the copy (removed on drop).
async fn prepare(
    dir: &Path,
    settings: &RunSettings,
) -> Result<(Snapshot, VmConfig, Adopted), Refusal> {
    let snap = snapshot::load(dir).map_err(|e| Refusal::new(exit::CONFIG, e.to_string()))?;
    let m = &snap.manifest;
    if !state::is_complete(dir) {
        return Err(Refusal::new(
            exit::CONFIG,
            format!(
                "{} has a manifest but no complete saved VM (ram.bin, disk.qcow2, meta.json)",
                dir.display()
            ),
        ));
    }
    if m.state_format != state::FORMAT {
        return Err(Refusal::new(
            exit::CONFIG,
            format!(
                "{} was saved by another runner version (state format {}, this one reads {}); use the runner version that made it",
                dir.display(),
                m.state_format,
                state::FORMAT
            ),
        ));
    }
    let store = &settings.store;
    let image = local_image(store, &snap).await?;
    let choice = match snap.accel {
        Accel::Kvm => AccelChoice::Kvm,
        Accel::Tcg => AccelChoice::Tcg,
    };
    let platform = platform::resolve(snap.arch, choice, store).await?;
    if platform.qemu.version != m.qemu_version {
        return Err(Refusal::new(
            exit::HOST,
            format!(
                "the snapshot was saved by QEMU {}, but this host has QEMU {} ({}); a saved VM resumes only in the QEMU version that saved it",
                m.qemu_version,
                platform.qemu.version,
                platform.qemu.path.display()
            ),
        ));
    }
    let work_root = store.root().join("debug");
    std::fs::create_dir_all(&work_root)
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&work_root, std::fs::Permissions::from_mode(0o700))
        })
        .map_err(|e| {
            Refusal::new(
                exit::IO,
                format!("cannot create {}: {e}", work_root.display()),
            )
        })?;
    let work = tempfile::Builder::new()
        .prefix("resume-")
        .tempdir_in(&work_root)
        .map_err(|e| {
            Refusal::new(
                exit::IO,
                format!("cannot create a directory in {}: {e}", work_root.display()),
            )
        })?;
    let in_use = std::fs::File::create(work.path().join(IN_USE))
        .map_err(|e| e.to_string())
        .and_then(|f| {
            nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
                .map_err(|(_, e)| e.to_string())
        })
        .map_err(|e| {
            Refusal::new(
                exit::IO,
                format!("cannot lock {}: {e}", work.path().join(IN_USE).display()),
            )
        })?;
    let work = Adopted {
        dir: work,
        _in_use: in_use,
    };
    state::adopt(dir, &image.rootfs, &work.path().join("state"))
        .await
        .map_err(|e| {
            Refusal::new(
                exit::CONFIG,
                format!(
                    "cannot use the saved VM in {}: {}",
                    dir.display(),
                    chain(&e)
                ),
            )
        })?;
    let cfg = VmConfig {
        arch: snap.arch,
        accel: snap.accel,
        qemu_binary: platform.qemu.path.clone(),
        sandbox: platform.qemu.sandbox,
        cpus: m.cpus,
        memory_mib: m.memory_mib,
        kernel: image.kernel.clone(),
        initrd: image.initrd.clone(),
        disk: DiskSource::Overlay(image.rootfs.clone()),
        state_dir: settings.vms_dir.clone().unwrap_or_else(|| store.vms_dir()),
        boot_timeout: settings.boot_timeout,
        saved_state: None,
        containment: settings.containment.clone(),
        // Snapshots are only taken of VMs without a network (see run::execute).
        network: engine::net::VmNetwork::None,
    };
    Ok((snap, cfg, work))
}

/// The image the snapshot was saved on, from this cache: the same key and the same root
/// disk, or the one-line reason not and how to get it.
async fn local_image(
    store: &ImageStore,
    snap: &Snapshot,
) -> Result<engine::image::BaseImage, Refusal> {
    let m = &snap.manifest;
    let get_it = format!(
        "build it with `runner images build --arch {} {}` using the runner version (and recipe) that made the snapshot",
        snap.arch, m.image
    );
    let dir = store.images_dir().join(&m.image_key);
    if !dir.is_dir() {
        return Err(Refusal::new(
            exit::IMAGE,
            format!(
                "the snapshot needs image {}, which is not in {}; {get_it}",
                m.image_key,
                store.images_dir().display()
            ),
        ));
    }
    let opened = tokio::task::spawn_blocking(move || {
        engine::image::store::load(&dir).and_then(|image| {
            engine::image::store::verify(&image, false)?;
            Ok(image)
        })
    })
    .await
    .map_err(|e| Refusal::new(exit::IMAGE, e.to_string()))?;
    let image = opened.map_err(|e| {
        Refusal::new(
            exit::IMAGE,
            format!("image {} is damaged ({}); {get_it}", m.image_key, chain(&e)),
        )
    })?;
    let local = image
        .manifest
        .artifacts
        .get("rootfs.qcow2")
        .map(|a| a.sha256.as_str())
        .unwrap_or_default();
    if local != m.rootfs_sha256 {
        return Err(Refusal::new(
            exit::IMAGE,
            format!(
                "image {} here has another root disk than the snapshot's (sha256 {:.12} here, {:.12} in the snapshot): it was built separately; copy the image directory from the machine that saved the snapshot",
                m.image_key, local, m.rootfs_sha256
            ),
        ));
    }
    Ok(image)
}

/// Runs `cmd` (a shell script) where the failed step ran, with its output on standard
/// output, and gives its exit status (Ctrl-C stops it).
async fn command(
    vm: &mut Vm,
    cmd: &str,
    cwd: &str,
    env: &[(String, String)],
    status: &Status,
) -> i32 {
    let (stop_tx, mut stop) = watch::channel(false);
    let watcher = tokio::spawn(async move {
        super::interrupted().await;
        let _ = stop_tx.send(true);
    });
    let mut stdout = std::io::stdout();
    let mut show = |bytes: &[u8]| {
        use std::io::Write;
        let _ = stdout.write_all(bytes);
        let _ = stdout.flush();
    };
    let script = GuestCommand::Script(cmd.to_string());
    let ended = vm
        .run_stoppable(&script, cwd, env, COMMAND_TIMEOUT, &mut stop, &mut show)
        .await;
    watcher.abort();
    match ended {
        Ok(CommandEnd::Exited(code)) => code,
        Ok(CommandEnd::Signaled(sig)) => 128 + sig,
        Ok(CommandEnd::NotFound) => exit::COMMAND_NOT_FOUND,
        Ok(CommandEnd::Stopped) => exit::CANCELLED,
        Ok(CommandEnd::TimedOut) => {
            status.error(&format!(
                "the command did not end within {}",
                humantime::format_duration(COMMAND_TIMEOUT)
            ));
            exit::TIMED_OUT
        }
        Err(e) => Refusal::from(vm_error(&e, true)).code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_copies_nobody_holds_are_swept() {
        let root = tempfile::tempdir().unwrap();
        let store = ImageStore::new(root.path());
        let debug = root.path().join("debug");
        let copy = |name: &str, lock: bool| {
            let d = debug.join(name);
            std::fs::create_dir_all(d.join("state")).unwrap();
            if lock {
                std::fs::write(d.join(IN_USE), "").unwrap();
            }
            d
        };
        let alive = copy("resume-alive", true);
        let held = nix::fcntl::Flock::lock(
            std::fs::File::open(alive.join(IN_USE)).unwrap(),
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        )
        .unwrap();
        let killed = copy("resume-killed", true);
        // Not locked yet: a `runner debug` that has just made it.
        let starting = copy("resume-starting", false);
        let other = copy("other", true);
        assert_eq!(sweep_abandoned(&store), 1);
        assert!(alive.exists() && starting.exists() && other.exists());
        assert!(!killed.exists());
        drop(held);
        assert_eq!(sweep_abandoned(&store), 1);
        assert!(!alive.exists());
    }
}
