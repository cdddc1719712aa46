//! Per-queue-pair counters. Owned by the queue's thread (plain integers, no
//! atomics on the hot path); read when the queue is idle or stopped.

use std::fmt;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct QueueStats {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames dropped on the way to the guest (did not fit its buffers).
    pub rx_dropped: u64,
    pub rx_errors: u64,
    /// Frames taken from the guest and handed to the backend.
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_errors: u64,
    /// Malformed descriptor chains or rings (each stops a queue).
    pub chain_errors: u64,
}

impl fmt::Display for QueueStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rx_frames={} rx_bytes={} rx_dropped={} rx_errors={} tx_frames={} tx_bytes={} tx_errors={} chain_errors={}",
            self.rx_frames,
            self.rx_bytes,
            self.rx_dropped,
            self.rx_errors,
            self.tx_frames,
            self.tx_bytes,
            self.tx_errors,
            self.chain_errors
        )
    }
}
