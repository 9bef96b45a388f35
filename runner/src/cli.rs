//! The command line, as clap parses it (raw values; validation happens in the commands).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "runner",
    version,
    about = "Run test suites inside emulated CPU architectures (QEMU)"
)]
pub struct Cli {
    /// Where images and VM directories live [env: RUNNER_CACHE_DIR] [default: ~/.cache/runner]
    #[arg(long, global = true, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// No progress bars or status lines, only guest output and errors.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command, or the suites of runner.toml, in a fresh VM.
    Test(TestArgs),
    /// Build, list and verify base images.
    #[command(subcommand)]
    Images(ImagesCommand),
    /// Check this host: every architecture (machine, image, saved states) with its QEMU, KVM,
    /// the image cache.
    Doctor {
        /// Print only the architecture table, as JSON (for scripts), and check nothing.
        #[arg(long)]
        json: bool,
    },
    /// Run suites × architectures × images in parallel and report what regressed.
    Matrix(MatrixArgs),
    /// Run as a service: a GitLab runner and/or a GitHub App, jobs in fresh VMs.
    Serve(ServeArgs),
    /// Open an interactive shell in a fresh VM (exit the shell to stop it).
    Shell(ShellArgs),
    /// Resume a failed step's saved VM (`runner test --keep-failed`) and open a shell in it
    /// (or pack it for another machine: `--pack`).
    Debug(DebugArgs),
    /// Internal: what QEMU runs for each guest connection to a job's network proxy.
    #[command(name = "proxy-relay", hide = true)]
    ProxyRelay {
        /// The job proxy's UNIX socket.
        socket: std::path::PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct DebugArgs {
    /// The snapshot directory (e.g. runner-out/SUITE-ARCH/failed-vm).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Run this shell command in the failed step's directory and environment instead of an
    /// interactive shell, print its output and exit with its status (for scripts and tests).
    #[arg(long, short = 'c', value_name = "CMD")]
    pub command: Option<String>,
    /// Do not resume: pack the snapshot into FILE (a .tar.gz) and print, as markdown, the
    /// commands that resume it on another machine (for a CI job's summary page).
    #[arg(long, value_name = "FILE", conflicts_with = "command")]
    pub pack: Option<PathBuf>,
    /// With --pack: a command that brings FILE to the reader's machine, printed first
    /// (repeatable; e.g. `gh run download RUN_ID -n ARTIFACT`).
    #[arg(long, value_name = "CMD", requires = "pack")]
    pub fetch: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ShellArgs {
    /// Guest architecture (`runner doctor` lists them).
    #[arg(long)]
    pub arch: String,
    /// Base image (recipe name) [default: the architecture's own].
    #[arg(long)]
    pub image: Option<String>,
    /// Copy this directory into the guest at /workspace and start the shell there.
    #[arg(long, value_name = "DIR")]
    pub workspace: Option<PathBuf>,
    /// vCPUs (default 2).
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Guest memory (e.g. 512M, 2G; default 1G).
    #[arg(long)]
    pub memory: Option<String>,
    /// Accelerator.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// Always boot the kernel; do not resume from (or save) a VM state saved after boot.
    #[arg(long)]
    pub cold_boot: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The service's config file (TOML; see the README).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    /// Accelerator for every job's VM.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccelArg {
    /// KVM when the guest is the host's architecture and KVM really works; TCG otherwise.
    Auto,
    /// KVM or fail.
    Kvm,
    /// Always TCG (QEMU's JIT).
    Tcg,
}

#[derive(Debug, Args)]
pub struct TestArgs {
    /// Guest architecture(s), comma-separated or repeated: riscv64, aarch64, x86_64, armhf,
    /// ppc64el, s390x, i386, mips64el, mipsel (`runner doctor` shows each one's machine).
    /// Default: `[defaults] arch` of runner.toml.
    #[arg(long, value_delimiter = ',')]
    pub arch: Vec<String>,
    /// Base image (recipe name). Default: runner.toml's, else the architecture's own
    /// (debian-13; debian-12 for i386, mips64el, mipsel, ppc64el, s390x); "" means that too.
    #[arg(long)]
    pub image: Option<String>,
    /// Write a JUnit XML report here.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Append a markdown summary per suite × arch (counts, failing and slowest tests, VM
    /// facts) to FILE, e.g. "$GITHUB_STEP_SUMMARY" in GitHub Actions.
    #[arg(long, value_name = "FILE")]
    pub summary: Option<PathBuf>,
    /// Timeout for the command, or for each suite (e.g. 90s, 10m). Overrides runner.toml.
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,
    /// Accelerator.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// Suite file [default: ./runner.toml].
    #[arg(long, short = 'f', value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Run only these suites (repeatable).
    #[arg(long = "suite", short = 's', value_name = "NAME")]
    pub suites: Vec<String>,
    /// vCPUs per VM. Overrides runner.toml (default 2).
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Guest memory (e.g. 512M, 2G). Overrides runner.toml (default 1G).
    #[arg(long)]
    pub memory: Option<String>,
    /// Where declared artifacts are copied back to [default: ./runner-out].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// With `-- CMD`: copy this directory into the guest at /workspace first.
    #[arg(long, value_name = "DIR")]
    pub workspace: Option<PathBuf>,
    /// Always boot the kernel; do not resume from (or save) a VM state saved after boot.
    #[arg(long)]
    pub cold_boot: bool,
    /// Run the steps in a VM (`system`) or under qemu-user on this host's kernel (`user`:
    /// no boot, no guest kernel; README, "User mode") [default: each suite's `mode`, else system]
    #[arg(long, value_enum)]
    pub mode: Option<crate::suite::Mode>,
    /// When a step fails, save its VM (memory, devices, disk) into OUT/SUITE-ARCH/failed-vm
    /// for `runner debug`. The snapshot holds everything the job had, secrets included.
    /// `RUNNER_KEEP_FAILED=true` does the same (the variable GitLab jobs use; the GitHub
    /// workflow template sets it from its `keep-failed` input).
    #[arg(long, env = "RUNNER_KEEP_FAILED")]
    pub keep_failed: bool,
    /// Guest network: none, proxy (HTTP(S) through an allowlisting proxy) or full. The
    /// network `-- CMD` gets, and the most a runner.toml suite may ask for [default: none].
    #[arg(long, value_name = "MODE")]
    pub network: Option<String>,
    /// With `--network proxy`: a host the proxy lets through, `host` (ports 80 and 443) or
    /// `host:port` (repeatable). Default: the image recipe's Debian mirror host.
    #[arg(long = "allow-host", value_name = "HOST[:PORT]")]
    pub allow_hosts: Vec<String>,
    /// The command to run in the guest instead of runner.toml's suites.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct MatrixArgs {
    #[command(subcommand)]
    pub command: Option<MatrixCommand>,
    /// Matrix file (e.g. nightly.toml). Without one: every suite of ./runner.toml.
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Run only part K of N of the cells (e.g. 1/2), split by their durations in --history;
    /// merge the shards' --out directories with `runner matrix merge`.
    #[arg(long, value_name = "K/N")]
    pub shard: Option<String>,
    /// Architectures, replacing the matrix file's (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    pub arch: Vec<String>,
    /// Cells run at once [default: picked with --cpus to fill the host's cores (README,
    /// "Nightly matrix"), capped by memory].
    #[arg(long, short = 'j')]
    pub jobs: Option<usize>,
    /// vCPUs per cell, replacing the matrix file's `cpus` [default: that, else runner.toml's,
    /// else picked with --jobs to fill the host's cores].
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Where the reports go.
    #[arg(long, value_name = "DIR", default_value = "matrix-report")]
    pub out: PathBuf,
    /// Keep each run's results here and compare with the previous run.
    #[arg(long, value_name = "DIR")]
    pub history: Option<PathBuf>,
    /// Runs kept in the history [default: the matrix file's, else 30].
    #[arg(long, value_name = "N")]
    pub keep: Option<usize>,
    /// Re-runs of a failing cell [default: the matrix file's, else 1].
    #[arg(long, value_name = "N")]
    pub retries: Option<u32>,
    /// What makes the exit status non-zero [default: the matrix file's, else regression].
    #[arg(long, value_enum)]
    pub fail_on: Option<crate::matrix::spec::FailOn>,
    /// Stop every other cell at the first cell that fails (after its retries).
    #[arg(long)]
    pub fail_fast: bool,
    /// Accelerator.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// Always boot the kernel; do not resume from (or save) a VM state saved after boot.
    #[arg(long)]
    pub cold_boot: bool,
}

#[derive(Debug, Subcommand)]
pub enum MatrixCommand {
    /// Put the shards of one matrix run (`--shard K/N`) back together: the four reports and
    /// the history entry an unsharded run would have written.
    Merge(MergeArgs),
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Where the merged reports go.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Compare with the previous run kept here, and keep this one.
    #[arg(long, value_name = "DIR")]
    pub history: Option<PathBuf>,
    /// The --out directory of every shard.
    #[arg(value_name = "SHARD_DIR", required = true)]
    pub shards: Vec<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum ImagesCommand {
    /// Build (or verify the cached copy of) an image for an architecture.
    Build {
        /// Guest architecture(s), comma-separated or repeated.
        #[arg(long, value_delimiter = ',', required = true)]
        arch: Vec<String>,
        /// Recipe name: images/NAME.toml in this directory, else a built-in one.
        /// Default (or ""): each architecture's own (debian-13, or debian-12 where trixie lacks it).
        recipe: Option<String>,
        /// Debian mirror to use instead of the recipe's.
        #[arg(long, env = "RUNNER_DEBIAN_MIRROR")]
        mirror: Option<String>,
        /// Rebuild even if a valid cached image exists.
        #[arg(long)]
        force: bool,
        /// Accelerator for the one-time bake boot.
        #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
        accel: AccelArg,
    },
    /// Print an image's cache key (NAME-ARCH-HASH, its directory under images/), one line
    /// per architecture: it changes exactly when the image would be rebuilt (for CI caches).
    Key {
        /// Guest architecture(s), comma-separated or repeated.
        #[arg(long, value_delimiter = ',', required = true)]
        arch: Vec<String>,
        /// Recipe name: images/NAME.toml in this directory, else a built-in one.
        /// Default (or ""): each architecture's own (debian-13, or debian-12 where trixie lacks it).
        recipe: Option<String>,
    },
    /// List cached images and whether they are intact.
    List,
    /// Hash every artifact of every cached image against its manifest.
    Verify,
}

impl From<AccelArg> for engine::qemu::host::AccelChoice {
    fn from(a: AccelArg) -> Self {
        match a {
            AccelArg::Auto => Self::Auto,
            AccelArg::Kvm => Self::Kvm,
            AccelArg::Tcg => Self::Tcg,
        }
    }
}
