//! Hostile suite files against `runner test` itself: the same parse-time bounds that
//! `runner serve` relies on refuse them with one line and exit 78, before anything starts.
//! (The service's own refusals are tested in github.rs and gitlab.rs against the fakes.)

use e2e::runner_with_cache;

/// Exit code for a bad input file (runner/src/exit.rs).
const CONFIG: i32 = 78;

#[test]
fn absurd_durations_in_runner_toml_are_refused_on_their_line() {
    let cache = e2e::private_cache();
    // (runner.toml, line:column, part of the message)
    let cases = [
        // Once overflowed `Instant + Duration` and panicked the run.
        ("[[suite]]\nname = \"a\"\ntimeout = \"100y\"\n[[suite.step]]\nname = \"t\"\nrun = \"true\"\n", "runner.toml:3:11", "suite 'a' timeout '100y' is longer than 7 days"),
        ("[defaults]\nstep_timeout = \"8days\"\n[[suite]]\nname = \"a\"\n[[suite.step]]\nname = \"t\"\nrun = \"true\"\n", "runner.toml:2:16", "defaults.step_timeout '8days' is longer than 7 days"),
    ];
    for (text, at, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("runner.toml"), text).unwrap();
        let r = runner_with_cache(dir.path(), &["test", "--arch", "riscv64"], cache.path());
        assert_eq!(r.code, CONFIG, "{r}");
        let errors: Vec<&str> = r.stderr.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(errors.len(), 1, "{r}");
        assert!(errors[0].contains(at) && errors[0].contains(want), "{r}");
    }
    e2e::assert_nothing_left(cache.path());
}
