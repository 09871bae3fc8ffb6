//! Small wrappers over the OS that every layer uses: the monotonic clock and fd readiness.

use anyhow::Result;

/// Monotonic clock in nanoseconds, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Registers an fd-owning value (ring buffer, pidfd) with tokio for readiness.
pub fn async_readable<T: std::os::fd::AsRawFd>(inner: T) -> Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: `inner` owns its fd, and the AsyncFd owns `inner`, so the fd outlives the registration.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("cannot poll fd: {}", e.into_parts().1))
}
