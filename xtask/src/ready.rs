//! Waiting for memtrace to be live: it runs with `--ready-fd 3` on a pipe, and xtask waits for
//! the `{"ready": true, ...}` line on the read end, never for the human text on stderr.

use std::{
    io::{BufRead as _, BufReader},
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
    process::{Child, Command},
    sync::mpsc,
};

use anyhow::{Result, bail};

/// Spawns `cmd`, a memtrace run, with `--ready-fd 3` appended; the receiver gets memtrace's
/// ready line, or disconnects when memtrace closed the descriptor without one (it failed).
pub fn spawn(cmd: &mut Command) -> Result<(Child, mpsc::Receiver<String>)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors. Close-on-exec keeps other children off the pipe.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe2: {}", std::io::Error::last_os_error());
    }
    // SAFETY: just created, owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let w = fds[1];
    cmd.args(["--ready-fd", "3"]);
    // SAFETY: dup2 and fcntl are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would leave close-on-exec set: clear it by hand then.
            let r = if w == 3 { libc::fcntl(w, libc::F_SETFD, 0) } else { libc::dup2(w, 3) };
            if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
        });
    }
    let child = cmd.spawn();
    // End-of-file must come when memtrace closes its copy.
    drop(write);
    let child = child?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        if BufReader::new(std::fs::File::from(read)).read_line(&mut line).is_ok_and(|n| n > 0) {
            let _ = tx.send(line);
        }
    });
    Ok((child, rx))
}

/// Blocks until the ready line; an error when memtrace failed or exited first.
pub fn wait(rx: &mpsc::Receiver<String>, child: &mut Child) -> Result<()> {
    match rx.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(_) => Ok(()),
        Err(mpsc::RecvTimeoutError::Disconnected) => bail!("memtrace stopped before it was ready ({})", child.wait()?),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            let _ = child.kill();
            bail!("memtrace was not ready within 60 s")
        }
    }
}
