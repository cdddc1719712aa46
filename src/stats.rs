//! Per-queue-pair counters.
//!
//! The worker that owns a queue pair counts in plain integers
//! ([`QueueStats`], no atomics per frame) and copies them into a
//! [`SharedStats`], one relaxed atomic per counter, after each round that
//! moved frames or counted something else, and once a second with the
//! backend's own counters (reading those may be a syscall).
//! `vfrelay stats` and the metrics endpoint read that copy: no lock, no
//! command to the worker, nothing a worker waits on.
//!
//! Every counter is listed once, in [`counters!`]: its field, its
//! Prometheus name (and label, for families such as frame sizes) and help.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use serde_json::{Map, Value};

use crate::dataplane::ring::ChainError;

/// One counter's description, for the JSON output and the exposition.
pub struct Counter {
    /// The field (and JSON key).
    pub field: &'static str,
    /// Prometheus family, without the `vfrelay_` prefix and `_total`
    /// suffix; empty for a JSON-only sum of a labelled family.
    pub metric: &'static str,
    /// Label that tells this counter from the others of its family.
    pub label: Option<(&'static str, &'static str)>,
    pub help: &'static str,
}

macro_rules! counters {
    ($( $field:ident = $metric:literal $( { $lk:literal = $lv:literal } )? : $help:literal ),* $(,)?) => {
        /// Counters of one queue pair (RX and TX rings and its backend queue).
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct QueueStats {
            $( pub $field: u64, )*
        }

        /// How many counters a queue pair has.
        pub const N_COUNTERS: usize = [$( stringify!($field) ),*].len();

        /// Every counter, in field order.
        pub const COUNTERS: [Counter; N_COUNTERS] = [$(
            Counter {
                field: stringify!($field),
                metric: $metric,
                label: counters!(@label $( $lk, $lv )?),
                help: $help,
            },
        )*];

        impl QueueStats {
            pub fn values(&self) -> [u64; N_COUNTERS] {
                [$( self.$field ),*]
            }

            pub fn from_array(a: &[u64; N_COUNTERS]) -> QueueStats {
                let mut it = a.iter().copied();
                QueueStats { $( $field: it.next().unwrap_or(0), )* }
            }
        }
    };
    (@label) => { None };
    (@label $k:literal, $v:literal) => { Some(($k, $v)) };
}

counters! {
    rx_frames = "rx_frames": "Frames delivered to the guest.",
    rx_bytes = "rx_bytes": "Bytes delivered to the guest (without the virtio-net header).",
    tx_frames = "tx_frames": "Frames taken from the guest and handed to the backend.",
    tx_bytes = "tx_bytes": "Bytes taken from the guest (without the virtio-net header).",
    rx_broadcast = "rx_broadcast_frames": "Broadcast frames delivered to the guest.",
    rx_multicast = "rx_multicast_frames": "Multicast (not broadcast) frames delivered to the guest.",
    tx_broadcast = "tx_broadcast_frames": "Broadcast frames from the guest.",
    tx_multicast = "tx_multicast_frames": "Multicast (not broadcast) frames from the guest.",
    rx_size_64 = "rx_size_frames" {"size" = "64"}: "Frames delivered to the guest, by size in bytes.",
    rx_size_65_127 = "rx_size_frames" {"size" = "65-127"}: "",
    rx_size_128_255 = "rx_size_frames" {"size" = "128-255"}: "",
    rx_size_256_511 = "rx_size_frames" {"size" = "256-511"}: "",
    rx_size_512_1023 = "rx_size_frames" {"size" = "512-1023"}: "",
    rx_size_1024_1518 = "rx_size_frames" {"size" = "1024-1518"}: "",
    rx_size_1519_max = "rx_size_frames" {"size" = "1519-max"}: "",
    tx_size_64 = "tx_size_frames" {"size" = "64"}: "Frames from the guest, by size in bytes.",
    tx_size_65_127 = "tx_size_frames" {"size" = "65-127"}: "",
    tx_size_128_255 = "tx_size_frames" {"size" = "128-255"}: "",
    tx_size_256_511 = "tx_size_frames" {"size" = "256-511"}: "",
    tx_size_512_1023 = "tx_size_frames" {"size" = "512-1023"}: "",
    tx_size_1024_1518 = "tx_size_frames" {"size" = "1024-1518"}: "",
    tx_size_1519_max = "tx_size_frames" {"size" = "1519-max"}: "",
    rx_dropped = "": "",
    rx_dropped_oversized = "rx_dropped_frames" {"cause" = "oversized"}:
        "Frames for the guest dropped, by cause: larger than its buffers can take (oversized), shorter than a virtio-net header (short), queued in the backend while no guest was attached (stale); switch ports: no RX buffer free (full) or RX ring not running (no_ring).",
    rx_dropped_short = "rx_dropped_frames" {"cause" = "short"}: "",
    rx_dropped_stale = "rx_dropped_frames" {"cause" = "stale"}: "",
    rx_dropped_full = "rx_dropped_frames" {"cause" = "full"}: "",
    rx_dropped_no_ring = "rx_dropped_frames" {"cause" = "no_ring"}: "",
    rx_no_buffer = "rx_no_buffer": "RX bursts that stopped with frames waiting in the backend because the guest had no RX buffers free (a busy-polling worker counts every round it finds none).",
    tx_backend_full = "tx_backend_full": "TX bursts that stopped because the backend had no room (counted every round while it lasts).",
    rx_errors = "rx_errors": "Backend receive errors.",
    tx_errors = "tx_errors": "Frames the backend refused with an error (dropped).",
    kicks = "kicks": "Guest kicks (notifications) received.",
    interrupts = "interrupts": "Interrupts sent to the guest.",
    interrupts_suppressed = "interrupts_suppressed": "Used-ring updates the guest asked not to be interrupted for (EVENT_IDX or NO_INTERRUPT).",
    dirty_pages_logged = "dirty_pages_logged": "Guest pages newly marked in the dirty log during migration.",
    dirty_pages_beyond_log = "dirty_pages_beyond_log": "Guest pages written during migration that lie past the end of the front end's dirty log (its migration will not copy them again; should stay 0).",
    chain_errors = "": "",
    chain_avail_index = "chain_errors" {"kind" = "avail_index"}:
        "Malformed rings or descriptor chains, by kind; each stops its queue.",
    chain_index_out_of_range = "chain_errors" {"kind" = "index_out_of_range"}: "",
    chain_too_long = "chain_errors" {"kind" = "too_long"}: "",
    chain_bad_address = "chain_errors" {"kind" = "bad_address"}: "",
    chain_write_only_in_read = "chain_errors" {"kind" = "write_only_in_read_chain"}: "",
    chain_read_only_in_write = "chain_errors" {"kind" = "read_only_in_write_chain"}: "",
    chain_nested_indirect = "chain_errors" {"kind" = "nested_indirect"}: "",
    chain_indirect_with_next = "chain_errors" {"kind" = "indirect_with_next"}: "",
    chain_indirect_length = "chain_errors" {"kind" = "indirect_length"}: "",
    chain_indirect_not_negotiated = "chain_errors" {"kind" = "indirect_not_negotiated"}: "",
    chain_oversized = "chain_errors" {"kind" = "oversized"}: "",
    chain_undersized = "chain_errors" {"kind" = "undersized"}: "",
    chain_too_many_segments = "chain_errors" {"kind" = "too_many_segments"}: "",
    chain_bad_ring = "chain_errors" {"kind" = "bad_ring"}: "",
    backend_rx_frames = "backend_rx_frames": "Frames the backend received from its device.",
    backend_rx_bytes = "backend_rx_bytes": "Bytes the backend received from its device.",
    backend_tx_frames = "backend_tx_frames": "Frames the backend sent to its device.",
    backend_tx_bytes = "backend_tx_bytes": "Bytes the backend sent to its device.",
    backend_rx_dropped = "backend_rx_dropped": "Frames the backend received but could not pass on.",
    backend_tx_dropped = "backend_tx_dropped": "Frames the backend could not send (malformed, refused by the kernel).",
    backend_tx_write_errors = "backend_tx_write_errors": "tap: writes the kernel refused with an error.",
    backend_fill_shortfall = "backend_fill_shortfall": "AF_XDP: frames that could not go back on the fill ring at once.",
    backend_completion_shortfall = "backend_completion_shortfall": "AF_XDP: frames TX could not send at once because every UMEM frame still awaited its completion (counted at each try).",
}

impl QueueStats {
    /// A frame of `len` bytes (Ethernet header onwards) delivered to the
    /// guest; `dst`: its destination MAC.
    #[inline]
    pub fn count_rx(&mut self, len: usize, dst: Option<&[u8]>) {
        self.rx_frames += 1;
        self.rx_bytes += len as u64;
        match len {
            0..=64 => self.rx_size_64 += 1,
            65..=127 => self.rx_size_65_127 += 1,
            128..=255 => self.rx_size_128_255 += 1,
            256..=511 => self.rx_size_256_511 += 1,
            512..=1023 => self.rx_size_512_1023 += 1,
            1024..=1518 => self.rx_size_1024_1518 += 1,
            _ => self.rx_size_1519_max += 1,
        }
        match dest_kind(dst) {
            Dest::Broadcast => self.rx_broadcast += 1,
            Dest::Multicast => self.rx_multicast += 1,
            Dest::Unicast => {}
        }
    }

    /// A frame of `len` bytes taken from the guest; `dst`: its first six
    /// bytes, if it has them in its first buffer.
    #[inline]
    pub fn count_tx(&mut self, len: usize, dst: Option<&[u8]>) {
        self.tx_frames += 1;
        self.tx_bytes += len as u64;
        match len {
            0..=64 => self.tx_size_64 += 1,
            65..=127 => self.tx_size_65_127 += 1,
            128..=255 => self.tx_size_128_255 += 1,
            256..=511 => self.tx_size_256_511 += 1,
            512..=1023 => self.tx_size_512_1023 += 1,
            1024..=1518 => self.tx_size_1024_1518 += 1,
            _ => self.tx_size_1519_max += 1,
        }
        match dest_kind(dst) {
            Dest::Broadcast => self.tx_broadcast += 1,
            Dest::Multicast => self.tx_multicast += 1,
            Dest::Unicast => {}
        }
    }

    /// A ring stopped for `e`.
    pub fn count_chain_error(&mut self, e: &ChainError) {
        self.chain_errors += 1;
        *match e {
            ChainError::AvailIndex { .. } => &mut self.chain_avail_index,
            ChainError::IndexOutOfRange { .. } => &mut self.chain_index_out_of_range,
            ChainError::TooLong { .. } => &mut self.chain_too_long,
            ChainError::BadAddress { .. } => &mut self.chain_bad_address,
            ChainError::WriteOnlyInReadChain => &mut self.chain_write_only_in_read,
            ChainError::ReadOnlyInWriteChain => &mut self.chain_read_only_in_write,
            ChainError::NestedIndirect => &mut self.chain_nested_indirect,
            ChainError::IndirectWithNext => &mut self.chain_indirect_with_next,
            ChainError::IndirectLength { .. } => &mut self.chain_indirect_length,
            ChainError::IndirectNotNegotiated => &mut self.chain_indirect_not_negotiated,
            ChainError::Oversized { .. } => &mut self.chain_oversized,
            ChainError::Undersized { .. } => &mut self.chain_undersized,
            ChainError::TooManySegments => &mut self.chain_too_many_segments,
            ChainError::BadRing { .. } => &mut self.chain_bad_ring,
        } += 1;
    }

    /// Take the backend's own counters in.
    pub fn set_backend(&mut self, b: &vfrelay_backends::BackendStats) {
        self.backend_rx_frames = b.rx_frames;
        self.backend_rx_bytes = b.rx_bytes;
        self.backend_tx_frames = b.tx_frames;
        self.backend_tx_bytes = b.tx_bytes;
        self.backend_rx_dropped = b.rx_dropped;
        self.backend_tx_dropped = b.tx_dropped;
        self.backend_tx_write_errors = b.tx_write_errors;
        self.backend_fill_shortfall = b.fill_shortfall;
        self.backend_completion_shortfall = b.completion_shortfall;
    }

    /// Sum of two queue pairs' counters (a port's total).
    pub fn add(&self, other: &QueueStats) -> QueueStats {
        let (a, b) = (self.values(), other.values());
        QueueStats::from_array(&std::array::from_fn(|i| a[i] + b[i]))
    }

    /// One JSON object, every counter by its field name.
    pub fn json(&self) -> Map<String, Value> {
        COUNTERS
            .iter()
            .zip(self.values())
            .map(|(c, v)| (c.field.to_string(), Value::from(v)))
            .collect()
    }
}

enum Dest {
    Unicast,
    Multicast,
    Broadcast,
}

#[inline]
fn dest_kind(dst: Option<&[u8]>) -> Dest {
    match dst {
        Some(d) if d.len() >= 6 && d[0] & 1 != 0 => {
            if d[..6] == [0xff; 6] {
                Dest::Broadcast
            } else {
                Dest::Multicast
            }
        }
        _ => Dest::Unicast,
    }
}

/// The copy of a queue pair's counters that others read.
pub struct SharedStats {
    values: [AtomicU64; N_COUNTERS],
    /// Counters a second writer publishes for the same queue pair, added
    /// in by [`Self::snapshot`]: a switch port's RX ring is counted by the
    /// senders that deliver into it, on any worker.
    also: OnceLock<Arc<SharedStats>>,
}

impl Default for SharedStats {
    fn default() -> Self {
        SharedStats {
            values: std::array::from_fn(|_| AtomicU64::new(0)),
            also: OnceLock::new(),
        }
    }
}

impl SharedStats {
    /// Worker side: publish the current counters. Relaxed stores: a
    /// reader may see one counter a round newer than another, never a
    /// torn value.
    pub fn publish(&self, s: &QueueStats) {
        for (a, v) in self.values.iter().zip(s.values()) {
            a.store(v, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> QueueStats {
        let own = QueueStats::from_array(&std::array::from_fn(|i| {
            self.values[i].load(Ordering::Relaxed)
        }));
        match self.also.get() {
            Some(o) => own.add(&o.snapshot()),
            None => own,
        }
    }

    /// Add `other`'s counters to every snapshot from now on (once).
    pub fn also_count(&self, other: Arc<SharedStats>) {
        let _ = self.also.set(other);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_casts_and_kinds_are_counted_where_they_belong() {
        let mut s = QueueStats::default();
        let mut f = vec![0u8; 1518];
        f[0] = 0x02;
        for len in [60, 64, 65, 127, 128, 1518, 1519] {
            f.resize(len, 0);
            s.count_rx(f.len(), f.get(..6));
        }
        assert_eq!(
            (
                s.rx_size_64,
                s.rx_size_65_127,
                s.rx_size_128_255,
                s.rx_size_1024_1518
            ),
            (2, 2, 1, 1)
        );
        assert_eq!(s.rx_size_1519_max, 1);
        assert_eq!((s.rx_frames, s.rx_broadcast, s.rx_multicast), (7, 0, 0));
        s.count_tx(64, Some(&[0xff; 6]));
        s.count_tx(64, Some(&[0x01, 0, 0x5e, 0, 0, 1]));
        s.count_tx(64, Some(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xfe]));
        s.count_tx(64, None);
        assert_eq!((s.tx_frames, s.tx_broadcast, s.tx_multicast), (4, 1, 2));
        s.count_chain_error(&ChainError::NestedIndirect);
        assert_eq!((s.chain_errors, s.chain_nested_indirect), (1, 1));
    }

    #[test]
    fn shared_copy_and_json_carry_every_counter() {
        let mut s = QueueStats::default();
        let a: [u64; N_COUNTERS] = std::array::from_fn(|i| i as u64 + 1);
        s = QueueStats::from_array(&a).add(&s);
        let shared = SharedStats::default();
        shared.publish(&s);
        assert_eq!(shared.snapshot(), s);
        let j = s.json();
        assert_eq!(j.len(), N_COUNTERS);
        assert_eq!(j["rx_frames"], 1);
        // Families: every labelled counter but the first has no help of
        // its own; JSON-only sums have no metric.
        for c in &COUNTERS {
            assert!(
                c.metric.is_empty() || !c.help.is_empty() || c.label.is_some(),
                "{}",
                c.field
            );
        }
    }
}
