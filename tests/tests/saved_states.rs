//! Saved VM states on riscv64, whose saves QEMU 10.0 can break (timers that never fire
//! after a resume): a save is resumed and checked before any job may use it, a bad one is
//! never published, and the states that are published resume job after job.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e::{assert_nothing_left, runner_with_cache, workspace_root, Run};

/// How often the saboteur looks for a new staged state. A staged state is checked (resumed
/// in a fresh QEMU) at once, which takes far longer than this: the break lands before it.
const SABOTAGE_POLL: Duration = Duration::from_millis(1);

fn riscv64(cache: &Path, cmd: &[&str]) -> Run {
    let mut args = vec!["test", "--arch", "riscv64", "--"];
    args.extend_from_slice(cmd);
    runner_with_cache(&workspace_root(), &args, cache)
}

/// Breaks saved states while they are staged, as a bad save would be: the first `limit`
/// staging directories (`.saving-*`) that become complete (meta.json is written last) get
/// their RAM image cut short, before the runner's check resumes them. Lives until dropped;
/// [`Saboteur::stop`] says which it broke.
struct Saboteur {
    done: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<BTreeSet<String>>,
}

impl Saboteur {
    fn start(states: PathBuf, limit: usize) -> Saboteur {
        let done = Arc::new(AtomicBool::new(false));
        let stop = done.clone();
        let thread = std::thread::spawn(move || {
            let mut broken = BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                for e in std::fs::read_dir(&states).into_iter().flatten().flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let staged = e.path();
                    if !name.starts_with(".saving-")
                        || broken.contains(&name)
                        || broken.len() >= limit
                        || !staged.join("meta.json").is_file()
                    {
                        continue;
                    }
                    let ram = staged.join("ram.bin");
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&ram, std::fs::Permissions::from_mode(0o600))
                        .and_then(|_| std::fs::OpenOptions::new().write(true).open(&ram))
                        .and_then(|f| f.set_len(4096))
                        .unwrap_or_else(|e| panic!("cannot break {}: {e}", ram.display()));
                    broken.insert(name);
                }
                std::thread::sleep(SABOTAGE_POLL);
            }
            broken
        });
        Saboteur { done, thread }
    }

    /// Stops looking; the staging directories broken.
    fn stop(self) -> BTreeSet<String> {
        self.done.store(true, Ordering::Relaxed);
        self.thread.join().expect("saboteur")
    }
}

/// The entries of the states directory: published states and markers.
fn published(states: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(states)
        .expect("states dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn notes(r: &Run) -> Vec<&str> {
    r.stderr
        .lines()
        .filter(|l| l.starts_with("runner: "))
        .collect()
}

#[test]
fn a_save_that_fails_its_check_is_never_published() {
    let cache = e2e::private_cache_with_own_states();
    let states = cache.path().join("states");
    std::fs::create_dir_all(&states).unwrap();
    // 1. The first save is broken while staged: its check catches it, the VM is saved
    //    again, and the second save (checked too) is the one published.
    let saboteur = Saboteur::start(states.clone(), 1);
    let first = riscv64(cache.path(), &["true"]);
    let broken = saboteur.stop();
    assert_eq!(first.code, 0, "{first}");
    assert_eq!(broken.len(), 1, "no save was staged: {first}");
    assert_eq!(
        e2e::vm_start_kind(&first.stderr),
        Some("cold boot, state saved for later jobs"),
        "{first}"
    );
    // The broken save's note; a later save may fail its check too (each says so), but one
    // was published, so the run ended well.
    let notes_1 = notes(&first);
    assert!(
        notes_1
            .first()
            .is_some_and(|n| n
                .contains("saving the VM state, attempt 1 of 4: the saved state failed its check")),
        "{first}"
    );
    assert!(
        notes_1
            .iter()
            .all(|n| n.contains("saving the VM state, attempt ")),
        "{first}"
    );
    let names = published(&states);
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(!names[0].starts_with('.'), "{names:?}");
    // 2. The next job resumes what was published: nothing broken reached it.
    let next = riscv64(cache.path(), &["sh", "-c", "sleep 0.2; echo slept"]);
    assert_eq!(next.code, 0, "{next}");
    assert_eq!(next.stdout.trim(), "slept", "{next}");
    assert_eq!(
        e2e::vm_start_kind(&next.stderr),
        Some(e2e::RESUMED),
        "{next}"
    );
    assert!(notes(&next).is_empty(), "{next}");
    assert_nothing_left(cache.path());
}

#[test]
fn a_vm_whose_saves_all_fail_is_not_saved_again_by_every_job() {
    let cache = e2e::private_cache_with_own_states();
    let states = cache.path().join("states");
    std::fs::create_dir_all(&states).unwrap();
    // 1. Every save is broken: after 4 attempts nothing is published, one note says so.
    let saboteur = Saboteur::start(states.clone(), usize::MAX);
    let first = riscv64(cache.path(), &["true"]);
    let broken = saboteur.stop();
    assert_eq!(first.code, 0, "{first}");
    assert_eq!(broken.len(), 4, "{first}");
    let notes_1 = notes(&first);
    for attempt in 1..=4 {
        let tag = format!("attempt {attempt} of 4: the saved state failed its check");
        assert!(notes_1.iter().any(|n| n.contains(&tag)), "{tag}: {first}");
    }
    assert!(
        notes_1.iter().any(
            |n| n.contains("no saved state for this VM: its last 4 saves failed")
                && n.ends_with("booted cold instead")
        ),
        "{first}"
    );
    assert_eq!(
        e2e::vm_start_kind(&first.stderr),
        Some("cold boot"),
        "{first}"
    );
    let names = published(&states);
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].ends_with(".unsaveable"), "{names:?}");
    // 2. The next job boots cold with one note and does not try to save (it stages nothing).
    let saboteur = Saboteur::start(states.clone(), usize::MAX);
    let next = riscv64(cache.path(), &["echo", "ran"]);
    let staged = saboteur.stop();
    assert_eq!(next.code, 0, "{next}");
    assert_eq!(next.stdout.trim(), "ran", "{next}");
    assert!(staged.is_empty(), "the next job saved again: {next}");
    assert_eq!(
        e2e::vm_start_kind(&next.stderr),
        Some("cold boot"),
        "{next}"
    );
    let notes_2 = notes(&next);
    assert_eq!(notes_2.len(), 1, "{next}");
    assert!(
        notes_2[0].contains("no saved state for this VM: its last 4 saves failed")
            && notes_2[0].contains("saving is tried again in"),
        "{next}"
    );
    assert_nothing_left(cache.path());
}

#[test]
fn riscv64_jobs_after_the_first_all_resume() {
    // Regression (issue 12): most riscv64 saves resumed with a hart whose timer never fired,
    // and each job that met one booted cold. Five jobs after the saving one must all resume
    // and sleep on every CPU.
    let cache = e2e::private_cache_with_own_states();
    let first = riscv64(cache.path(), &["true"]);
    assert_eq!(first.code, 0, "{first}");
    assert_eq!(
        e2e::vm_start_kind(&first.stderr),
        Some("cold boot, state saved for later jobs"),
        "{first}"
    );
    let sleep_everywhere = "for c in $(seq 0 $(($(nproc --all) - 1))); do \
                            taskset -c $c sleep 0.1 || exit 1; done; echo slept";
    for job in 2..=6 {
        let r = riscv64(cache.path(), &["sh", "-c", sleep_everywhere]);
        assert_eq!(r.code, 0, "job {job}: {r}");
        assert_eq!(r.stdout.trim(), "slept", "job {job}: {r}");
        assert_eq!(
            e2e::vm_start_kind(&r.stderr),
            Some(e2e::RESUMED),
            "job {job}: {r}"
        );
    }
    assert_nothing_left(cache.path());
}
