//! SIGINT/SIGTERM handling: a dedicated thread waits for the signal, then
//! wakes the daemon's control loop (an eventfd it watches) so teardown runs
//! in order on the control thread.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);
/// eventfd written once on shutdown; polled next to the listener.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

/// Block SIGINT/SIGTERM in this thread (and so in every thread spawned from
/// it later) and start the thread that waits for them. Call first in main.
pub fn install() {
    // SAFETY: plain libc signal-mask calls on a local sigset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let fd = libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK);
        WAKE_FD.store(fd, Ordering::SeqCst);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut sig = 0;
                libc::sigwait(&set, &mut sig);
                log::info!("signal {sig} received, shutting down");
                request();
            })
            .expect("spawning signal thread");
    }
}

/// Ask everything to stop (also used by tests and fatal errors).
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local to an eventfd.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// The eventfd that becomes readable once shutdown was requested (-1
/// before [`install`]).
pub fn wake_fd() -> i32 {
    WAKE_FD.load(Ordering::SeqCst)
}
