//! The host terminal during an interactive session (`runner shell`, `runner debug`): raw
//! mode, so that every key (Ctrl-C included) goes to the guest's own terminal, and its size.
//!
//! Raw mode is always undone: when the guard drops (normal end, error, the VM dying), from a
//! panic hook, and by the caller on SIGTERM/SIGHUP. Only a SIGKILL of `runner` itself leaves
//! the terminal raw; `reset` (or `stty sane`) fixes it.

use std::io::{IsTerminal, Read, Write};
use std::sync::{Mutex, Once};

use engine::vm::shell::{ShellInput, WindowSize};
use rustix::termios::{self, OptionalActions, Termios};
use tokio::sync::mpsc;

/// The modes to restore, while raw mode is on.
static SAVED: Mutex<Option<Termios>> = Mutex::new(None);
static PANIC_HOOK: Once = Once::new();
/// Keystroke chunks queued towards the session.
const INPUT_QUEUE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum TerminalError {
    #[error("an interactive shell needs a terminal: standard input and output must be one")]
    NotATerminal,
    #[error("cannot set the terminal's modes")]
    Modes(#[source] std::io::Error),
}

/// Raw mode on standard input until dropped.
#[derive(Debug)]
pub struct RawMode(());

impl RawMode {
    pub fn enter() -> Result<RawMode, TerminalError> {
        if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
            return Err(TerminalError::NotATerminal);
        }
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(&stdin).map_err(|e| TerminalError::Modes(e.into()))?;
        let mut raw = saved.clone();
        raw.make_raw();
        PANIC_HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore();
                previous(info);
            }));
        });
        *SAVED.lock().unwrap_or_else(|p| p.into_inner()) = Some(saved);
        termios::tcsetattr(&stdin, OptionalActions::Drain, &raw)
            .map_err(|e| TerminalError::Modes(e.into()))?;
        Ok(RawMode(()))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}

/// Puts the terminal's modes back as they were before raw mode (nothing if it is not on).
pub fn restore() {
    let saved = SAVED.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(saved) = saved {
        let _ = std::io::stdout().flush();
        let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Now, &saved);
    }
}

/// The terminal's size, when it has one.
pub fn size() -> Option<WindowSize> {
    let ws = termios::tcgetwinsize(std::io::stdout()).ok()?;
    (ws.ws_row > 0 && ws.ws_col > 0).then_some(WindowSize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// The session's input: keystrokes from standard input, and the new size on every SIGWINCH.
/// The keyboard is read by a thread of its own (a blocking read cannot be cancelled; the
/// thread ends with the process). The channel closes when standard input does.
pub fn input() -> std::io::Result<mpsc::Receiver<ShellInput>> {
    let (tx, rx) = mpsc::channel(INPUT_QUEUE);
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
    let resizes = tx.clone();
    let watcher = tokio::spawn(async move {
        while winch.recv().await.is_some() {
            if let Some(size) = size() {
                if resizes.send(ShellInput::Resize(size)).await.is_err() {
                    return;
                }
            }
        }
    });
    std::thread::Builder::new()
        .name("keyboard".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 4096];
            loop {
                match stdin.read(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx
                            .blocking_send(ShellInput::Keys(buf[..n].to_vec()))
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
            // No more keys: the session's input closes once the size watcher is gone too.
            watcher.abort();
        })?;
    Ok(rx)
}
