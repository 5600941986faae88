//! The sidecar's Unix socket: a directory only its owner can enter, a socket only its owner can
//! open, and every connecting process identified by the kernel (`SO_PEERCRED`).

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

use tokio::net::{UnixListener, UnixStream};

/// Who is at the other end of a connection, as the kernel says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    /// The process's user id.
    pub uid: u32,
    /// The process id (of the process that connected).
    pub pid: u32,
}

/// Creates `dir` (0700, owned by us) if needed, removes a stale socket, and listens on
/// `dir/sidecar.sock` with mode 0600. Fails when the directory exists but is someone else's or
/// open to others: a socket there could be replaced by another user.
pub fn bind_private(dir: &Path) -> io::Result<UnixListener> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = fs::metadata(dir)?;
    let me = nix::unistd::getuid().as_raw();
    if meta.uid() != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "socket directory {} belongs to uid {}, not to this sidecar's uid {me}",
                dir.display(),
                meta.uid()
            ),
        ));
    }
    if meta.mode() & 0o077 != 0 {
        // Our own directory with loose permissions (made by hand, say): tighten it.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    let path = dir.join("sidecar.sock");
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(&path)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// The kernel's credentials of the process at the other end of `stream`.
pub fn peer_credentials(stream: &UnixStream) -> io::Result<Credentials> {
    let cred = stream.peer_cred()?;
    Ok(Credentials {
        uid: cred.uid(),
        pid: cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
    })
}
