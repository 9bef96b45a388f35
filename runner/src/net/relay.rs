//! `runner proxy-relay SOCKET` (hidden): what QEMU runs for each guest connection to the
//! proxy address (see `engine::net`). slirp hands the connection over as a socket on
//! stdin/stdout/stderr; this joins it to the job proxy's UNIX socket and exits when both
//! directions are done. It prints nothing: its stderr is the guest's connection too.

use std::os::fd::AsFd;
use std::path::Path;

/// Relays fd 0 (a socket, as slirp passes it) to `socket`. Any error ends the relay, which
/// the guest sees as a closed connection.
pub async fn run(socket: &Path) -> std::io::Result<()> {
    let fd = std::io::stdin().as_fd().try_clone_to_owned()?;
    let guest = std::os::unix::net::UnixStream::from(fd);
    guest.set_nonblocking(true)?;
    let mut guest = tokio::net::UnixStream::from_std(guest)?;
    let mut proxy = tokio::net::UnixStream::connect(socket).await?;
    tokio::io::copy_bidirectional(&mut guest, &mut proxy).await?;
    Ok(())
}
