//! Files between host and guest during a suite run: the workspace archive goes in, the
//! declared JUnit reports and artifacts come back — all bounded, since the guest decides
//! what is in them.

use std::path::PathBuf;
use std::time::Duration;

use engine::agent::AgentError;
use engine::user::{UserError, UserMachine};
use engine::vm::{CommandEnd, Vm, VmError};
use tokio::sync::mpsc;

use crate::events::GuestReport;
use crate::outcome::{chain, infra, vm_error};
use crate::outcome::{InfraKind, Outcome};
use crate::run::plan::{GuestFile, SuitePlan, WorkspacePlan, GUEST_WORKSPACE};
use crate::run::workspace;
use engine::shell::quote;

/// Largest guest JUnit file we read back.
const MAX_GUEST_REPORT: usize = 16 << 20;
/// How many guest JUnit files we read back, and how many bytes in all.
const MAX_GUEST_REPORTS: usize = 200;
const MAX_GUEST_REPORTS_TOTAL: usize = 64 << 20;
/// Timeout for the runner's own short commands in the guest (unpack, list files).
const HOUSEKEEPING_TIMEOUT: Duration = Duration::from_secs(120);
/// Where the workspace archive is staged in the guest.
const GUEST_WORKSPACE_TAR: &str = "/tmp/runner-workspace.tar";
const GUEST_ARTIFACTS_TAR: &str = "/tmp/runner-artifacts.tar";

/// What moving files in and out needs from the machine a suite runs on: a VM (over its
/// agent) or a user-mode job (through its sandbox). Both read the job's files as the job
/// sees them, never by following its paths on the host.
pub(crate) trait Machine {
    async fn write_file(&mut self, path: &str, data: &[u8]) -> Result<(), VmError>;
    /// Writes what arrives on `chunks` to `path` until the sender closes the channel; drops
    /// `chunks` when it fails, so the producer stops.
    async fn write_stream(
        &mut self,
        path: &str,
        chunks: mpsc::Receiver<Vec<u8>>,
    ) -> Result<(), VmError>;
    /// Refuses more than `max_bytes` with an error that [`guests_doing`] recognises.
    async fn read_file(&mut self, path: &str, max_bytes: usize) -> Result<Vec<u8>, VmError>;
    async fn run_script(
        &mut self,
        script: &str,
        env: &[(String, String)],
        timeout: Duration,
        keep: usize,
    ) -> Result<(CommandEnd, String), VmError>;
}

impl Machine for Vm {
    async fn write_file(&mut self, path: &str, data: &[u8]) -> Result<(), VmError> {
        Vm::write_file(self, path, data).await
    }
    async fn write_stream(
        &mut self,
        path: &str,
        chunks: mpsc::Receiver<Vec<u8>>,
    ) -> Result<(), VmError> {
        Vm::write_stream(self, path, chunks).await.map(drop)
    }
    async fn read_file(&mut self, path: &str, max_bytes: usize) -> Result<Vec<u8>, VmError> {
        Vm::read_file(self, path, max_bytes).await
    }
    async fn run_script(
        &mut self,
        script: &str,
        env: &[(String, String)],
        timeout: Duration,
        keep: usize,
    ) -> Result<(CommandEnd, String), VmError> {
        Vm::run_script(self, script, env, timeout, keep).await
    }
}

impl Machine for UserMachine {
    async fn write_file(&mut self, path: &str, data: &[u8]) -> Result<(), VmError> {
        Ok(UserMachine::write_file(self, path, data).await?)
    }
    async fn write_stream(
        &mut self,
        path: &str,
        chunks: mpsc::Receiver<Vec<u8>>,
    ) -> Result<(), VmError> {
        Ok(UserMachine::write_stream(self, path, chunks).await?)
    }
    async fn read_file(&mut self, path: &str, max_bytes: usize) -> Result<Vec<u8>, VmError> {
        Ok(UserMachine::read_file(self, path, max_bytes).await?)
    }
    async fn run_script(
        &mut self,
        script: &str,
        env: &[(String, String)],
        timeout: Duration,
        keep: usize,
    ) -> Result<(CommandEnd, String), VmError> {
        Ok(UserMachine::run_script(self, script, env, timeout, keep).await?)
    }
}

/// The detail of an error reading a file that is the guest's doing (missing, unreadable,
/// too large): a test failure, not the runner's.
fn guests_doing(e: &VmError) -> Option<&str> {
    match e {
        VmError::Agent(AgentError::Protocol { detail, .. })
        | VmError::Agent(AgentError::Command { desc: detail, .. })
        | VmError::User(UserError::Command { desc: detail, .. }) => Some(detail),
        _ => None,
    }
}

/// A short command of the runner's own in the guest; its output is returned, not shown.
pub(crate) async fn housekeeping<M: Machine>(
    vm: &mut M,
    script: &str,
) -> Result<(CommandEnd, String), Outcome> {
    let env = [
        (
            "PATH".to_string(),
            "/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        ),
        ("LANG".into(), "C.UTF-8".into()),
    ];
    vm.run_script(script, &env, HOUSEKEEPING_TIMEOUT, 256 * 1024)
        .await
        .map_err(|e| vm_error(&e, true))
}

/// The outcome of a workspace that cannot go in: unreadable is the host's I/O, too large or
/// a bad exclude is the configuration's.
pub(crate) fn workspace_failed(e: &workspace::WorkspaceError) -> Outcome {
    let kind = if matches!(e, workspace::WorkspaceError::Read { .. }) {
        InfraKind::Io
    } else {
        InfraKind::Config
    };
    infra(kind, chain(e))
}

/// Streams the workspace into the guest (packed on a blocking thread while the guest file
/// is written, never held whole) and unpacks it there — only when the packer sent all of it:
/// a workspace that outgrew its cap on the way, or could not be read, leaves at most a
/// truncated archive in `/tmp` that nothing unpacks.
pub(crate) async fn copy_in<M: Machine>(vm: &mut M, ws: &WorkspacePlan) -> Result<(), Outcome> {
    let (chunks, packer) = workspace::stream(ws);
    let written = vm.write_stream(GUEST_WORKSPACE_TAR, chunks).await;
    // The receiver is gone by now: a packer not done stops at its next chunk.
    let packed = packer.finish().await;
    written.map_err(|e| vm_error(&e, true))?;
    packed.map_err(|e| workspace_failed(&e))?;
    let script = format!("mkdir -p {GUEST_WORKSPACE} && tar -xf {GUEST_WORKSPACE_TAR} -C {GUEST_WORKSPACE} --no-same-owner && rm -f {GUEST_WORKSPACE_TAR}");
    match housekeeping(vm, &script).await? {
        (CommandEnd::Exited(0), _) => Ok(()),
        (end, out) => Err(infra(
            InfraKind::Agent,
            format!(
                "unpacking the workspace in the guest failed ({end:?}): {}",
                out.trim()
            ),
        )),
    }
}

/// Lists guest files matching `patterns` (relative to the workspace), one per line.
async fn list_guest_files<M: Machine>(
    vm: &mut M,
    patterns: &[String],
) -> Result<Vec<String>, Outcome> {
    if patterns.is_empty() {
        return Ok(Vec::new());
    }
    // Patterns are validated (relative, no `..`); quote everything but the glob characters.
    let globs: Vec<String> = patterns.iter().map(|p| shell_glob(p)).collect();
    let script = format!("cd {GUEST_WORKSPACE} || exit 0; for f in {}; do [ -f \"$f\" ] && printf '%s\\n' \"$f\"; done; exit 0", globs.join(" "));
    let (end, out) = housekeeping(vm, &script).await?;
    if end != CommandEnd::Exited(0) {
        return Err(infra(
            InfraKind::Agent,
            format!("listing result files in the guest failed ({end:?})"),
        ));
    }
    // Overlapping patterns list a file more than once; keep the first.
    let mut seen = std::collections::HashSet::new();
    Ok(out
        .lines()
        .filter(|l| !l.is_empty() && seen.insert(*l))
        .map(str::to_string)
        .collect())
}

/// Quotes a glob for sh, leaving `*`, `?` and `[...]` active: glob and plain path characters
/// stay bare (so a range such as `[0-9]` keeps working), every other run is [`quote`]d.
fn shell_glob(pattern: &str) -> String {
    let bare = |c: char| "*?[]/._-".contains(c) || c.is_ascii_alphanumeric();
    let mut s = String::new();
    let mut literal = String::new();
    for c in pattern.chars() {
        if bare(c) {
            if !literal.is_empty() {
                s.push_str(&quote(&std::mem::take(&mut literal)));
            }
            s.push(c);
        } else {
            literal.push(c);
        }
    }
    if !literal.is_empty() || s.is_empty() {
        s.push_str(&quote(&literal));
    }
    s
}

/// Brings back the suite's declared JUnit reports (into `reports`) and artifacts (unpacked
/// into the plan's output directory, paths into `artifacts`), and says how that went.
pub(crate) async fn collect_results<M: Machine>(
    plan: &SuitePlan,
    vm: &mut M,
    reports: &mut Vec<GuestReport>,
    artifacts: &mut Vec<PathBuf>,
) -> Outcome {
    let mut outcome = Outcome::Passed;
    match list_guest_files(vm, &plan.junit).await {
        Ok(files) => {
            for path in files {
                // Bounded in number and in total, not just per file.
                let total: usize = reports.iter().map(|r| r.xml.len()).sum();
                if reports.len() >= MAX_GUEST_REPORTS || total >= MAX_GUEST_REPORTS_TOTAL {
                    reports.push(GuestReport {
                        path,
                        xml: format!("<!-- not read: more than {MAX_GUEST_REPORTS} reports or {} MiB in all -->", MAX_GUEST_REPORTS_TOTAL >> 20),
                    });
                    break;
                }
                let guest_path = format!("{GUEST_WORKSPACE}/{path}");
                let limit = MAX_GUEST_REPORT.min(MAX_GUEST_REPORTS_TOTAL - total);
                match vm.read_file(&guest_path, limit).await {
                    Ok(bytes) => reports.push(GuestReport {
                        path,
                        xml: String::from_utf8_lossy(&bytes).into_owned(),
                    }),
                    // An unreadable or oversized report is the guest's doing: a test failure.
                    Err(e) => match guests_doing(&e) {
                        Some(detail) => reports.push(GuestReport {
                            path: path.clone(),
                            xml: format!("<!-- {detail} -->"),
                        }),
                        None => return vm_error(&e, true),
                    },
                }
            }
        }
        Err(o) => return o,
    }
    // Failing tests inside the guest's reports (or reports that are not JUnit) fail the suite,
    // even when every step exited 0.
    if reports
        .iter()
        .any(crate::report::junit::guest_report_failed)
    {
        outcome = Outcome::Failed {
            exit_code: None,
            signal: None,
        };
    }
    let files = match list_guest_files(vm, &plan.artifacts).await {
        Ok(f) => f,
        Err(o) => return o,
    };
    if !files.is_empty() || plan.untracked.is_some() {
        let list = files.iter().map(|f| quote(f)).collect::<Vec<_>>().join(" ");
        let script = match &plan.untracked {
            None => format!("cd {GUEST_WORKSPACE} && tar -cf {GUEST_ARTIFACTS_TAR} -- {list}"),
            Some(tracked) => untracked_script(tracked, &list, plan.max_artifacts),
        };
        match housekeeping(vm, &script).await {
            Ok((CommandEnd::Exited(0), out)) => {
                if let Some(size) = out
                    .lines()
                    .find_map(|l| l.strip_prefix(UNTRACKED_OVER))
                    .and_then(|n| n.trim().parse::<u64>().ok())
                {
                    if let Err(e) = std::fs::write(untracked_note(&plan.out_dir), size.to_string())
                    {
                        tracing::warn!("cannot note the untracked files' size: {e}");
                    }
                }
                match vm
                    .read_file(
                        GUEST_ARTIFACTS_TAR,
                        usize::try_from(plan.max_artifacts).unwrap_or(usize::MAX),
                    )
                    .await
                {
                    Ok(bytes) => {
                        match workspace::unpack_off_runtime(bytes, plan.out_dir.clone()).await {
                            Ok(mut paths) => {
                                // A file both untracked and matched by a glob is in the
                                // archive twice.
                                let mut seen = std::collections::HashSet::new();
                                paths.retain(|p| seen.insert(p.clone()));
                                *artifacts = paths
                            }
                            Err(e) => outcome = infra(InfraKind::Io, chain(&e)),
                        }
                    }
                    // Too large is the guest's doing (a failure); a broken agent is ours.
                    Err(VmError::Agent(AgentError::Protocol { .. }))
                    | Err(VmError::User(UserError::Command { .. })) => {
                        outcome = Outcome::Failed {
                            exit_code: None,
                            signal: None,
                        }
                    }
                    Err(e) => outcome = vm_error(&e, true),
                }
            }
            // tar failing on the guest's own files (unreadable, vanished) is a test failure.
            Ok(_) => {
                outcome = Outcome::Failed {
                    exit_code: None,
                    signal: None,
                }
            }
            Err(o) => return o,
        }
    }
    outcome
}

/// The line the untracked script prints when the untracked files were left out.
const UNTRACKED_OVER: &str = "runner-untracked-over ";
/// The guest's list of untracked files (NUL-separated, for tar).
const GUEST_UNTRACKED_LIST: &str = "/tmp/runner-untracked.list";

/// Where the host notes that the untracked files were left out (their archive's size in
/// bytes): beside `out_dir`, never inside it, so no file of the job can be taken for it.
pub fn untracked_note(out_dir: &std::path::Path) -> PathBuf {
    let mut name = out_dir.file_name().unwrap_or_default().to_os_string();
    name.push(".untracked-over");
    out_dir.with_file_name(name)
}

/// The guest script that archives the files `list` names plus every workspace file outside
/// `.git` that the file `tracked` (one path a line) does not name; when that archive is over
/// `max` bytes, it is made again without those untracked files and the script says so
/// ([`UNTRACKED_OVER`]): over the limit, the untracked files are dropped, not the job.
/// (A tracked name with a newline cannot be a pattern here: such a file comes back, and the
/// host, which knows the tracked set, leaves it out.)
fn untracked_script(tracked: &str, list: &str, max: u64) -> String {
    let tracked = quote(tracked);
    let tar = format!("tar -cf {GUEST_ARTIFACTS_TAR}");
    format!(
        "cd {GUEST_WORKSPACE} || exit 1\n\
         find . -path ./.git -prune -o -type f -printf '%P\\0' | {{ grep -zvxF -f {tracked} || true; }} > {GUEST_UNTRACKED_LIST} || exit 1\n\
         {tar} --null --verbatim-files-from -T {GUEST_UNTRACKED_LIST} -- {list} || exit 1\n\
         size=$(stat -c %s {GUEST_ARTIFACTS_TAR}) || exit 1\n\
         if [ \"$size\" -gt {max} ]; then\n\
           printf '%s%s\\n' '{UNTRACKED_OVER}' \"$size\"\n\
           {tar} -T /dev/null -- {list} || exit 1\n\
         fi\n"
    )
}

/// Everything a plan puts into a machine before its first step: the workspace (if any),
/// then the plan's files.
pub(crate) async fn put_in<M: Machine>(vm: &mut M, plan: &SuitePlan) -> Result<(), Outcome> {
    if let Some(ws) = &plan.workspace {
        copy_in(vm, ws).await?;
    }
    write_files(vm, &plan.files).await
}

/// Writes the plan's files into the guest (parent directories first).
pub(crate) async fn write_files<M: Machine>(
    vm: &mut M,
    files: &[GuestFile],
) -> Result<(), Outcome> {
    if files.is_empty() {
        return Ok(());
    }
    let parents: Vec<String> = files
        .iter()
        .filter_map(|f| std::path::Path::new(&f.path).parent())
        .map(|p| engine::shell::quote(&p.display().to_string()))
        .collect();
    let env = [("PATH".to_string(), "/usr/bin:/bin".to_string())];
    let script = format!("umask 077; mkdir -p {}", parents.join(" "));
    match vm
        .run_script(&script, &env, Duration::from_secs(30), 4096)
        .await
    {
        Ok((CommandEnd::Exited(0), _)) => {}
        Ok((end, out)) => {
            return Err(infra(
                InfraKind::Agent,
                format!(
                    "creating directories in the guest failed ({end:?}): {}",
                    out.trim()
                ),
            ))
        }
        Err(e) => return Err(vm_error(&e, true)),
    }
    for f in files {
        vm.write_file(&f.path, &f.contents)
            .await
            .map_err(|e| vm_error(&e, true))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A machine whose file writes go nowhere (counted), and that records its scripts.
    struct CountingMachine {
        received: u64,
        /// Run after the first chunk arrives (the workspace changing under the stream).
        after_first_chunk: Option<Box<dyn FnOnce()>>,
        /// Fail the write after this many chunks (the VM dying), if set.
        die_after: Option<usize>,
        scripts: Vec<String>,
    }

    impl CountingMachine {
        fn new() -> Self {
            CountingMachine {
                received: 0,
                after_first_chunk: None,
                die_after: None,
                scripts: Vec::new(),
            }
        }
    }

    impl Machine for CountingMachine {
        async fn write_file(&mut self, _: &str, data: &[u8]) -> Result<(), VmError> {
            self.received += data.len() as u64;
            Ok(())
        }
        async fn write_stream(
            &mut self,
            _: &str,
            mut chunks: mpsc::Receiver<Vec<u8>>,
        ) -> Result<(), VmError> {
            let mut n = 0;
            while let Some(chunk) = chunks.recv().await {
                self.received += chunk.len() as u64;
                n += 1;
                if let Some(grow) = self.after_first_chunk.take() {
                    grow();
                }
                if self.die_after == Some(n) {
                    return Err(VmError::Died {
                        status: "killed".into(),
                        clean_exit: false,
                        stderr: String::new(),
                    });
                }
            }
            Ok(())
        }
        async fn read_file(&mut self, path: &str, _: usize) -> Result<Vec<u8>, VmError> {
            panic!("read {path}")
        }
        async fn run_script(
            &mut self,
            script: &str,
            _: &[(String, String)],
            _: Duration,
            _: usize,
        ) -> Result<(CommandEnd, String), VmError> {
            self.scripts.push(script.to_string());
            Ok((CommandEnd::Exited(0), String::new()))
        }
    }

    /// 16 files of 64 KiB (`a-00`…) and a small one sent after them (`z-grows`).
    fn workspace_with_a_late_file() -> (tempfile::TempDir, WorkspacePlan) {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..16 {
            std::fs::write(dir.path().join(format!("a-{i:02}")), vec![7u8; 64 << 10]).unwrap();
        }
        std::fs::write(dir.path().join("z-grows"), b"small").unwrap();
        let root = dir.path().to_path_buf();
        let size = workspace::measure(&root, &[], u64::MAX).unwrap();
        let plan = WorkspacePlan {
            root,
            exclude: Vec::new(),
            // Room for 100 KiB more, not for a MiB.
            max_size: size + (100 << 10),
        };
        (dir, plan)
    }

    #[tokio::test]
    async fn a_workspace_streams_in_and_is_unpacked_once_whole() {
        let (_dir, plan) = workspace_with_a_late_file();
        let mut vm = CountingMachine::new();
        copy_in(&mut vm, &plan).await.unwrap();
        assert!(vm.received > 16 * (64 << 10), "{}", vm.received);
        assert_eq!(vm.scripts.len(), 1);
        assert!(vm.scripts[0].contains("tar -xf"), "{}", vm.scripts[0]);
    }

    #[tokio::test]
    async fn a_workspace_that_outgrows_its_cap_while_streaming_is_never_unpacked() {
        let (_dir, plan) = workspace_with_a_late_file();
        // The cap held before boot; the last file grows by a MiB once the stream has begun.
        workspace::measure(&plan.root, &[], plan.max_size).unwrap();
        let mut vm = CountingMachine::new();
        let late = plan.root.join("z-grows");
        vm.after_first_chunk = Some(Box::new(move || {
            std::fs::write(late, vec![1u8; 1 << 20]).unwrap()
        }));
        let outcome = copy_in(&mut vm, &plan).await.unwrap_err();
        match &outcome {
            Outcome::InfraError { kind, message, .. } => {
                assert_eq!(*kind, InfraKind::Config);
                assert!(
                    message.contains("larger than") && message.contains("max_size"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(vm.scripts.is_empty(), "{:?} ran", vm.scripts);
        // The end of the archive (and most of the big file) never went in.
        assert!(vm.received < plan.max_size, "{}", vm.received);
    }

    #[tokio::test]
    async fn a_vm_dying_mid_stream_is_the_vms_error_and_stops_the_packer() {
        let (_dir, plan) = workspace_with_a_late_file();
        let mut vm = CountingMachine::new();
        vm.die_after = Some(2);
        let outcome = tokio::time::timeout(Duration::from_secs(10), copy_in(&mut vm, &plan))
            .await
            .expect("copy_in waits for its packer, which must stop")
            .unwrap_err();
        assert!(outcome.to_string().contains("stopped"), "{outcome}");
        assert!(vm.scripts.is_empty(), "{:?} ran", vm.scripts);
        assert_eq!(vm.received, 2 * workspace::CHUNK as u64);
    }

    /// Runs [`untracked_script`] with sh on the host, in `ws` instead of the guest's
    /// workspace; returns its output and the names in the archive.
    fn run_untracked(
        ws: &std::path::Path,
        tracked: &str,
        list: &str,
        max: u64,
    ) -> (String, Vec<String>) {
        let tmp = ws.parent().unwrap();
        let tar = tmp.join("out.tar");
        let script = untracked_script(&tmp.join("tracked").display().to_string(), list, max)
            .replace(GUEST_WORKSPACE, &ws.display().to_string())
            .replace(GUEST_ARTIFACTS_TAR, &tar.display().to_string())
            .replace(
                GUEST_UNTRACKED_LIST,
                &tmp.join("list").display().to_string(),
            );
        std::fs::write(tmp.join("tracked"), tracked).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let names = std::process::Command::new("tar")
            .arg("-tf")
            .arg(&tar)
            .output()
            .unwrap();
        let mut names: Vec<String> = String::from_utf8_lossy(&names.stdout)
            .lines()
            .map(String::from)
            .collect();
        names.sort();
        (String::from_utf8_lossy(&out.stdout).into_owned(), names)
    }

    #[test]
    fn untracked_files_come_back_outside_git_and_are_dropped_over_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        for (name, body) in [
            ("src/lib.rs", "tracked"),
            ("build/out.o", "untracked and ignored"),
            ("new file.txt", "untracked"),
            (".git/index", "never"),
            ("report.xml", "tracked, asked for by a glob"),
        ] {
            let p = ws.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
        let tracked = "src/lib.rs\nreport.xml\n";
        let (out, names) = run_untracked(&ws, tracked, "report.xml", 1 << 20);
        assert_eq!(out, "");
        assert_eq!(names, ["build/out.o", "new file.txt", "report.xml"]);
        // Over the cap: only the globs' files, and the line that says so.
        let (out, names) = run_untracked(&ws, tracked, "report.xml", 100);
        assert!(out.starts_with(UNTRACKED_OVER), "{out}");
        assert_eq!(names, ["report.xml"]);
        // Nothing else asked for: an empty archive, not an error.
        let (_, names) = run_untracked(&ws, tracked, "", 100);
        assert!(names.is_empty());
        assert_eq!(
            untracked_note(std::path::Path::new("/w/artifacts")),
            std::path::Path::new("/w/artifacts.untracked-over")
        );
    }

    #[test]
    fn globs_stay_globs_and_the_rest_is_quoted() {
        // (pattern, shell word)
        #[rustfmt::skip]
        let cases = [
            ("build/junit/*.xml", "build/junit/*.xml"), // plain path and glob: bare
            ("a b;$(x)", "a' 'b';$('x')'"),             // the rest is quoted, run by run
            ("r[0-9]?.xml", "r[0-9]?.xml"),             // a range stays a range
            ("it's/*", "it''\\'''s/*"),                // a quote is quoted too
            ("", "''"),                                 // still one word
        ];
        for (pattern, want) in cases {
            assert_eq!(shell_glob(pattern), want, "{pattern:?}");
        }
    }

    #[test]
    fn a_glob_matches_what_sh_would() {
        // A newline or non-ASCII in a pattern stays literal (a backslash before a newline
        // would be a line continuation and drop it), and the glob still expands.
        let dir = tempfile::tempdir().unwrap();
        for name in ["a\nb.xml", "grüße 1.xml", "r7.xml", "x.txt"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        for (pattern, want) in [
            ("a\nb*", "a\nb.xml"),
            ("grüße *.xml", "grüße 1.xml"),
            ("r[0-9].*", "r7.xml"),
        ] {
            let out = std::process::Command::new("sh")
                .current_dir(dir.path())
                .arg("-c")
                .arg(format!("printf %s {}", shell_glob(pattern)))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8(out.stdout).unwrap(), want, "{pattern:?}");
        }
    }
}
