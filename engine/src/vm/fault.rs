//! What a guest did to itself while a job's command ran: powered off, panicked, killed its
//! agent, or left the agent unable to answer.
//!
//! Once a job's command has started, the job owns the guest (it runs as root) and can do all
//! of these; whichever it was, it is the job's failure, never the infrastructure's. A VM that
//! never boots is a different matter: that error comes from `Vm::boot` before any job ran.

use std::fmt;

use super::VmError;

/// The longest console line quoted in a message.
const QUOTE_MAX_CHARS: usize = 160;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestFault {
    /// The agent (PID 1's only child) died, so init exited and the kernel stopped.
    AgentKilled,
    /// The kernel panicked (the quoted console line says why).
    KernelPanic(String),
    /// QEMU exited cleanly without a panic on the console: poweroff or reboot (`-no-reboot`).
    PoweredOff,
    /// QEMU exited with a failure status.
    QemuStopped(String),
    /// The agent stopped answering or its connection broke while QEMU runs on.
    AgentUnresponsive(String),
}

impl GuestFault {
    /// The fault behind `e`, an error from running a job's command, given the tail of the
    /// guest console; `None` when `e` is not about the guest (a host-side error).
    pub fn during_job(e: &VmError, console: &str) -> Option<GuestFault> {
        match e {
            VmError::Died {
                clean_exit: true, ..
            } => Some(if console.contains("Attempted to kill init") {
                GuestFault::AgentKilled
            } else if let Some(line) = console.lines().find(|l| l.contains("Kernel panic")) {
                GuestFault::KernelPanic(quote(line))
            } else {
                GuestFault::PoweredOff
            }),
            VmError::Died { status, .. } => Some(GuestFault::QemuStopped(status.clone())),
            VmError::Agent(a) => Some(GuestFault::AgentUnresponsive(a.to_string())),
            _ => None,
        }
    }
}

/// `line` without the console's timestamp, bounded and printable.
fn quote(line: &str) -> String {
    let line = match line.find("] ") {
        Some(i) if line.trim_start().starts_with('[') => &line[i + 2..],
        _ => line,
    };
    line.trim()
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(QUOTE_MAX_CHARS)
        .collect()
}

impl fmt::Display for GuestFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestFault::AgentKilled => f.write_str(
                "the guest agent (qemu-ga) was killed during this step; the guest stopped with it",
            ),
            GuestFault::KernelPanic(line) => {
                write!(f, "the guest kernel panicked during this step: {line}")
            }
            GuestFault::PoweredOff => {
                f.write_str("the guest powered off or rebooted during this step")
            }
            GuestFault::QemuStopped(status) => {
                write!(f, "the VM stopped during this step ({status})")
            }
            GuestFault::AgentUnresponsive(why) => write!(
                f,
                "the guest agent stopped answering during this step ({why}); \
                 did the step stop or starve it?"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::AgentError;

    fn died(clean_exit: bool) -> VmError {
        VmError::Died {
            status: if clean_exit {
                "exit status: 0".into()
            } else {
                "signal: 11 (SIGSEGV)".into()
            },
            clean_exit,
            stderr: String::new(),
        }
    }

    #[test]
    fn faults_are_told_apart_by_the_console() {
        // (error, console tail, fault)
        let cases = [
            // tini exits when qemu-ga dies; the kernel then panics about init
            (
                died(true),
                "[   12.3] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009",
                Some(GuestFault::AgentKilled),
            ),
            // echo c > /proc/sysrq-trigger
            (
                died(true),
                "[    9.1] sysrq: Trigger a crash\n[    9.1] Kernel panic - not syncing: sysrq triggered crash\n",
                Some(GuestFault::KernelPanic(
                    "Kernel panic - not syncing: sysrq triggered crash".into(),
                )),
            ),
            // a clean exit with nothing on the console
            (died(true), "", Some(GuestFault::PoweredOff)),
            (
                died(false),
                "",
                Some(GuestFault::QemuStopped("signal: 11 (SIGSEGV)".into())),
            ),
            (
                VmError::Agent(AgentError::Timeout {
                    command: "guest-exec-status".into(),
                    timeout: std::time::Duration::from_secs(30),
                }),
                "",
                Some(GuestFault::AgentUnresponsive(String::new())),
            ),
            // not about the guest
            (
                VmError::Socket {
                    path: "/x".into(),
                },
                "",
                None,
            ),
        ];
        for (e, console, want) in cases {
            let got = GuestFault::during_job(&e, console);
            match (&got, &want) {
                // The agent's own words are checked elsewhere; here only the kind.
                (
                    Some(GuestFault::AgentUnresponsive(_)),
                    Some(GuestFault::AgentUnresponsive(_)),
                ) => {}
                _ => assert_eq!(got, want, "{e:?} / {console:?}"),
            }
        }
    }

    #[test]
    fn quoted_console_lines_are_bounded_and_printable() {
        let long = format!("[ 1.0] Kernel panic - {}\x1b[31m", "x".repeat(500));
        let q = quote(&long);
        assert!(q.starts_with("Kernel panic"), "{q}");
        assert_eq!(q.chars().count(), QUOTE_MAX_CHARS);
        assert!(!quote("a\x1bb").contains('\x1b'));
    }
}
