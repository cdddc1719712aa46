//! SIGINT/SIGTERM handling: a dedicated thread waits for the signal, then
//! wakes whatever the main thread is blocked on (accept wait, connection,
//! reconnect sleep) so teardown runs in order on the main thread.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vhost_user_backend::ShutdownHandle;

static REQUESTED: AtomicBool = AtomicBool::new(false);
/// eventfd written once on shutdown; polled next to the listener.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
static HANDLE: Mutex<Option<ShutdownHandle>> = Mutex::new(None);

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
    if let Some(h) = HANDLE.lock().unwrap().as_ref() {
        h.shutdown();
    }
}

pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// The live connection, so a signal can end it.
pub fn set_handle(h: Option<ShutdownHandle>) {
    let mut g = HANDLE.lock().unwrap();
    *g = h;
    if requested() {
        if let Some(h) = g.as_ref() {
            h.shutdown();
        }
    }
}

/// Wait until `fd` is readable (true) or shutdown was requested (false).
pub fn wait_readable(fd: i32) -> bool {
    loop {
        if requested() {
            return false;
        }
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: WAKE_FD.load(Ordering::SeqCst),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of 2 pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        if requested() {
            return false;
        }
        if n > 0 && fds[0].revents != 0 {
            return true;
        }
    }
}

/// Sleep up to `d`; true if shutdown was requested meanwhile.
pub fn sleep(d: Duration) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if requested() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
    }
    requested()
}
