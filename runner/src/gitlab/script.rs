//! A GitLab step's `script` lines as one bash script, in the manner of gitlab-runner's shell
//! executor: each line is echoed as `$ line` (green) before it runs, and the first line that
//! fails ends the step with its exit status (`set -eo pipefail`, plus an explicit check after
//! each line because `set -e` is ignored inside `if`, `&&` chains and functions).

use engine::shell::quote;

/// The whole bash script for `lines`.
pub fn step_script(lines: &[String]) -> String {
    let mut s = String::from("set -eo pipefail\nset +o noclobber\n");
    for line in lines {
        // The echo shows the first line of a multi-line command, like GitLab does, with a
        // note that there is more.
        let shown = match line.trim_end().split_once('\n') {
            Some((first, _)) => format!("{first} # collapsed multi-line command"),
            None => line.trim_end().to_string(),
        };
        s.push_str(&format!(
            "printf '%s\\n' {}\n",
            quote(&format!("\x1b[32;1m$ {shown}\x1b[0;m"))
        ));
        s.push_str(line);
        s.push_str(
            "\n_runner_rc=$?; if [ \"$_runner_rc\" -ne 0 ]; then exit \"$_runner_rc\"; fi\n",
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_echoed_then_run() {
        let s = step_script(&["echo 'hi'".into(), "make test".into()]);
        assert!(s.starts_with("set -eo pipefail\n"));
        let echo = s.find("$ echo '\\''hi'\\''").unwrap();
        let run = s.find("\necho 'hi'\n").unwrap();
        let second = s.find("$ make test").unwrap();
        assert!(echo < run && run < second, "{s}");
    }

    #[test]
    fn multi_line_commands_show_their_first_line() {
        let s = step_script(&["for i in 1 2; do\n  echo $i\ndone".into()]);
        assert!(s.contains("$ for i in 1 2; do # collapsed multi-line command"));
        assert!(s.contains("\nfor i in 1 2; do\n  echo $i\ndone\n"));
    }

    #[test]
    fn quoting_survives_bash() {
        // The echo of a hostile line must print it, not run it.
        let line = "echo '$(touch /tmp/pwned)' \"`id`\"; exit 0";
        let s = format!("printf '%s' {}", quote(line));
        let out = std::process::Command::new("bash")
            .args(["-c", &s])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), line);
    }
}
