//! One module per subcommand; each returns the process exit code.

pub mod debug;
pub mod doctor;
pub mod images;
pub mod matrix;
pub mod serve;
pub mod shell;
pub mod test;

use engine::image::ImageStore;

/// Removes what earlier runs left in the cache (VM directories of dead runners, unfinished
/// image builds, stale saved states, copies left by killed `runner debug`s); returns how many. Every VM-running command calls it
/// at start.
pub(crate) fn sweep_leftovers(store: &ImageStore) -> usize {
    engine::vm::sweep_abandoned(&store.vms_dir())
        + engine::image::store::sweep_leftovers(store)
        + engine::vm::state::prune(&store.states_dir())
        + debug::sweep_abandoned(store)
}

/// The line telling the user about `sweep_leftovers`' work, if there was any.
pub(crate) fn swept_line(swept: usize) -> Option<String> {
    (swept > 0).then(|| {
        format!(
            "runner: removed {swept} leftovers of earlier runs (VM directories, unfinished builds, stale saved states)"
        )
    })
}

/// Resolves on the first Ctrl-C or SIGTERM.
pub(crate) async fn interrupted() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
