//! The state of one virtqueue, owned by the dataplane (the worker serving
//! its queue pair). Frontends never touch it directly: they change it with
//! a worker command applied between bursts (see [`super::worker`]).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use log::debug;
use vmm_sys_util::eventfd::EventFd;

use super::ring::{ChainError, RingAddrs};
use super::RingCtl;

/// How a frontend interrupts the guest and reports a stopped queue when it
/// has no per-ring eventfd for it (VDUSE injects interrupts by ioctl).
pub trait Notifier: Send + Sync {
    fn signal(&self, vq: u16);
    /// The queue was stopped for a guest error.
    fn broken(&self, _vq: u16, _err: &ChainError) {}
}

/// One virtqueue as the worker sees it.
#[derive(Default)]
pub struct Vring {
    /// Virtqueue index within the device (2*pair for RX, 2*pair+1 for TX).
    pub index: u16,
    /// Guest-physical (or IOVA) ring addresses; None until the front end
    /// configured and started the ring.
    pub addrs: Option<RingAddrs>,
    /// Started by the front end (vhost-user: kick received, VDUSE: DRIVER_OK
    /// with the queue ready).
    pub started: bool,
    /// SET_VRING_ENABLE state (always true where the transport has none).
    pub enabled: bool,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
    /// Where used-ring writes are logged (VHOST_VRING_F_LOG), if anywhere.
    pub log_addr: Option<u64>,
    /// Guest kicks (watched by an event-mode worker).
    pub kick: Option<EventFd>,
    /// Guest interrupt eventfd (vhost-user SET_VRING_CALL).
    pub call: Option<EventFd>,
    /// Error eventfd (vhost-user SET_VRING_ERR), written when the queue stops.
    pub err: Option<EventFd>,
    /// Fallback interrupt path (VDUSE).
    pub notifier: Option<Arc<dyn Notifier>>,
}

impl Vring {
    pub fn new(index: u16) -> Self {
        Vring {
            index,
            ..Default::default()
        }
    }

    /// Forget everything the front end set (disconnect, device reset).
    pub fn reset(&mut self) {
        *self = Vring {
            index: self.index,
            notifier: self.notifier.take(),
            ..Default::default()
        };
    }

    pub fn kick_fd(&self) -> Option<RawFd> {
        self.kick.as_ref().map(|k| k.as_raw_fd())
    }
}

impl RingCtl for Vring {
    fn active(&self) -> bool {
        self.started && self.enabled && self.addrs.is_some()
    }
    fn addrs(&self) -> RingAddrs {
        self.addrs.unwrap_or(RingAddrs {
            desc: 0,
            avail: 0,
            used: 0,
            size: 0,
        })
    }
    fn next_avail(&self) -> u16 {
        self.next_avail
    }
    fn set_next_avail(&mut self, v: u16) {
        self.next_avail = v;
    }
    fn next_used(&self) -> u16 {
        self.next_used
    }
    fn set_next_used(&mut self, v: u16) {
        self.next_used = v;
    }
    fn event_idx(&self) -> bool {
        self.event_idx
    }
    fn signal(&self) {
        if let Some(c) = &self.call {
            if let Err(e) = c.write(1) {
                debug!("vring {}: signalling guest: {e}", self.index);
            }
        } else if let Some(n) = &self.notifier {
            n.signal(self.index);
        }
    }
    fn broken(&mut self, err: &ChainError) {
        if let Some(e) = &self.err {
            let _ = e.write(1);
        }
        if let Some(n) = &self.notifier {
            n.broken(self.index, err);
        }
    }
    fn log_addr(&self) -> Option<u64> {
        self.log_addr
    }
}
