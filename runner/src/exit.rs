//! Exit codes of the `runner` binary, all in one place (also listed in the README).
//!
//! In `runner test -- CMD` mode the command's own exit status is passed through, so codes
//! 0–255 can also come from the guest; the infrastructure codes below are chosen from the
//! range that shells and sysexits already reserve for "the tool failed, not the test".

/// Everything passed.
pub const SUCCESS: i32 = 0;
/// At least one step or test failed (suite mode).
pub const TEST_FAILED: i32 = 1;
/// Bad command line (clap's own code).
pub const USAGE: i32 = 2;
/// A bad input file: malformed `runner.toml`, image recipe, unknown architecture or image.
pub const CONFIG: i32 = 78;
/// The host lacks something: QEMU missing or too old, KVM demanded but unusable.
pub const HOST: i32 = 69;
/// The cached base image is corrupt (checksum mismatch) or could not be built (including a
/// builder tool such as mmdebstrap missing).
pub const IMAGE: i32 = 65;
/// The guest never booted: QEMU exited or the agent never answered.
pub const BOOT: i32 = 70;
/// The VM or its agent failed after boot (crash, protocol error).
pub const AGENT: i32 = 71;
/// Host I/O failed: disk full in the cache dir, unreadable workspace.
pub const IO: i32 = 74;
/// A step or command ran past its timeout (the VM was stopped), like GNU timeout.
pub const TIMED_OUT: i32 = 124;
/// The command does not exist in the guest (shell convention).
pub const COMMAND_NOT_FOUND: i32 = 127;
/// Interrupted by Ctrl-C / SIGTERM (128 + SIGINT).
pub const CANCELLED: i32 = 130;
