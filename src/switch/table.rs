//! The MAC table of one switch: (VLAN, MAC) -> port, learned from the
//! source addresses senders see, aged out after [`AGE_SECS`].
//!
//! Senders on any worker read and learn at once, with no lock between
//! them: the table is a fixed array of 4-way buckets, each guarded by a
//! sequence counter (a seqlock). Readers never write; a writer (a new or
//! moved MAC, or a MAC seen in a new second) takes only its bucket's
//! counter. A MAC seen again within the same second costs no write, so the
//! buckets of busy MACs stay shared in every core's cache.

use std::hint::spin_loop;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// Seconds a MAC stays learned without being seen (Linux bridge and OVS
/// default to 300).
pub const AGE_SECS: u32 = 300;

const WAYS: usize = 4;
const BUCKETS: usize = 1024;
/// Marks a used key (a key of all zeros is an empty way).
const VALID: u64 = 1 << 63;

/// The port number that means "the uplink".
pub const UPLINK: u16 = u16::MAX;

#[derive(Default)]
struct Bucket {
    seq: AtomicU32,
    /// VALID | vlan << 48 | mac, or 0.
    key: [AtomicU64; WAYS],
    /// port | seen (seconds) << 16.
    val: [AtomicU64; WAYS],
}

/// One learned address, as `switch list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learned {
    pub vlan: u16,
    pub mac: [u8; 6],
    pub port: u16,
    /// Seconds since it was last seen.
    pub age: u32,
}

pub struct MacTable {
    buckets: Box<[Bucket]>,
}

impl Default for MacTable {
    fn default() -> Self {
        MacTable {
            buckets: (0..BUCKETS).map(|_| Bucket::default()).collect(),
        }
    }
}

fn key(vlan: u16, mac: &[u8; 6]) -> u64 {
    let mut m = [0u8; 8];
    m[2..].copy_from_slice(mac);
    VALID | (u64::from(vlan & 0xfff) << 48) | u64::from_be_bytes(m)
}

fn split(key: u64) -> (u16, [u8; 6]) {
    let b = key.to_be_bytes();
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&b[2..]);
    (((key >> 48) & 0xfff) as u16, mac)
}

fn port_of(val: u64) -> u16 {
    val as u16
}

fn seen_of(val: u64) -> u32 {
    (val >> 16) as u32
}

fn fresh(val: u64, now: u32) -> bool {
    now.wrapping_sub(seen_of(val)) <= AGE_SECS
}

impl MacTable {
    fn bucket(&self, k: u64) -> &Bucket {
        // Fibonacci hashing: the top bits of the product mix every input bit.
        let h = k.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - BUCKETS.trailing_zeros());
        &self.buckets[h as usize]
    }

    /// Read `b` consistently: `f` sees one version of the bucket.
    fn read<R>(b: &Bucket, mut f: impl FnMut(&Bucket) -> R) -> R {
        loop {
            let s1 = b.seq.load(Ordering::Acquire);
            if s1 & 1 == 0 {
                let r = f(b);
                // Orders the data loads before the second look at `seq`.
                fence(Ordering::Acquire);
                if b.seq.load(Ordering::Relaxed) == s1 {
                    return r;
                }
            }
            spin_loop();
        }
    }

    /// Change `b` with readers kept out (they retry) and other writers
    /// waiting.
    fn write<R>(b: &Bucket, f: impl FnOnce(&Bucket) -> R) -> R {
        let s = loop {
            let s = b.seq.load(Ordering::Relaxed);
            if s & 1 == 0
                && b.seq
                    .compare_exchange_weak(s, s + 1, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                break s;
            }
            spin_loop();
        };
        // A reader that sees any store below sees `seq` odd afterwards.
        fence(Ordering::Release);
        let r = f(b);
        b.seq.store(s + 2, Ordering::Release);
        r
    }

    /// Where `mac` on `vlan` was last seen, if within [`AGE_SECS`] of `now`.
    pub fn lookup(&self, vlan: u16, mac: &[u8; 6], now: u32) -> Option<u16> {
        let k = key(vlan, mac);
        let b = self.bucket(k);
        let val = Self::read(b, |b| {
            (0..WAYS)
                .find(|&w| b.key[w].load(Ordering::Relaxed) == k)
                .map(|w| b.val[w].load(Ordering::Relaxed))
        })?;
        fresh(val, now).then_some(port_of(val))
    }

    /// `mac` on `vlan` was seen on `port` at `now`. A MAC that moved is
    /// relearned at once; one seen again on the same port within the same
    /// second is not written.
    pub fn learn(&self, vlan: u16, mac: &[u8; 6], port: u16, now: u32) {
        let k = key(vlan, mac);
        let want = u64::from(port) | (u64::from(now) << 16);
        let b = self.bucket(k);
        let current = Self::read(b, |b| {
            (0..WAYS)
                .find(|&w| b.key[w].load(Ordering::Relaxed) == k)
                .map(|w| b.val[w].load(Ordering::Relaxed))
        });
        if current == Some(want) {
            return;
        }
        Self::write(b, |b| {
            let ways = 0..WAYS;
            let w = ways
                .clone()
                .find(|&w| b.key[w].load(Ordering::Relaxed) == k)
                .or_else(|| {
                    ways.clone()
                        .find(|&w| b.key[w].load(Ordering::Relaxed) == 0)
                })
                .unwrap_or_else(|| {
                    // Full: replace the way seen longest ago.
                    ways.max_by_key(|&w| {
                        now.wrapping_sub(seen_of(b.val[w].load(Ordering::Relaxed)))
                    })
                    .unwrap_or(0)
                });
            b.key[w].store(k, Ordering::Relaxed);
            b.val[w].store(want, Ordering::Relaxed);
        });
    }

    /// Forget every address learned on `port` (it left the switch).
    pub fn forget_port(&self, port: u16) {
        for b in self.buckets.iter() {
            let has = Self::read(b, |b| {
                (0..WAYS).any(|w| {
                    b.key[w].load(Ordering::Relaxed) != 0
                        && port_of(b.val[w].load(Ordering::Relaxed)) == port
                })
            });
            if has {
                Self::write(b, |b| {
                    for w in 0..WAYS {
                        if port_of(b.val[w].load(Ordering::Relaxed)) == port {
                            b.key[w].store(0, Ordering::Relaxed);
                            b.val[w].store(0, Ordering::Relaxed);
                        }
                    }
                });
            }
        }
    }

    /// Every address still fresh at `now`.
    pub fn entries(&self, now: u32) -> Vec<Learned> {
        let mut out = Vec::new();
        for b in self.buckets.iter() {
            let ways: [(u64, u64); WAYS] = Self::read(b, |b| {
                std::array::from_fn(|w| {
                    (
                        b.key[w].load(Ordering::Relaxed),
                        b.val[w].load(Ordering::Relaxed),
                    )
                })
            });
            for (k, v) in ways {
                if k != 0 && fresh(v, now) {
                    let (vlan, mac) = split(k);
                    out.push(Learned {
                        vlan,
                        mac,
                        port: port_of(v),
                        age: now.wrapping_sub(seen_of(v)),
                    });
                }
            }
        }
        out.sort_by_key(|l| (l.port, l.vlan, l.mac));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
    const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];

    #[test]
    fn learns_moves_ages_and_forgets() {
        let t = MacTable::default();
        assert_eq!(t.lookup(0, &A, 10), None);
        t.learn(0, &A, 3, 10);
        assert_eq!(t.lookup(0, &A, 10), Some(3));
        // VLANs are separate address spaces.
        assert_eq!(t.lookup(10, &A, 10), None);
        t.learn(10, &A, 4, 10);
        assert_eq!(t.lookup(10, &A, 11), Some(4));
        assert_eq!(t.lookup(0, &A, 11), Some(3));
        // A MAC that moves (a migrated guest's RARP) is relearned at once.
        t.learn(0, &A, UPLINK, 12);
        assert_eq!(t.lookup(0, &A, 12), Some(UPLINK));
        // Aging: fresh up to AGE_SECS after it was last seen.
        assert_eq!(t.lookup(0, &A, 12 + AGE_SECS), Some(UPLINK));
        assert_eq!(t.lookup(0, &A, 13 + AGE_SECS), None);
        // Seen again: fresh again.
        t.learn(0, &A, UPLINK, 13 + AGE_SECS);
        assert_eq!(t.lookup(0, &A, 13 + AGE_SECS), Some(UPLINK));
        t.learn(0, &B, 3, 20);
        t.forget_port(UPLINK);
        assert_eq!(t.lookup(0, &A, 20), None);
        assert_eq!(t.lookup(0, &B, 20), Some(3));
        assert_eq!(
            t.entries(20),
            vec![
                Learned {
                    vlan: 0,
                    mac: B,
                    port: 3,
                    age: 0
                },
                Learned {
                    vlan: 10,
                    mac: A,
                    port: 4,
                    age: 10
                }
            ]
        );
    }

    #[test]
    fn a_full_bucket_replaces_its_oldest_entry() {
        let t = MacTable::default();
        // More MACs than the table has ways in all: every one learned last
        // is found; the table never refuses to learn.
        let macs: Vec<[u8; 6]> = (0..(BUCKETS * WAYS * 2) as u32)
            .map(|i| {
                let b = i.to_be_bytes();
                [2, 0, b[0], b[1], b[2], b[3]]
            })
            .collect();
        for (i, m) in macs.iter().enumerate() {
            t.learn(0, m, (i % 7) as u16, i as u32 / 1000);
        }
        let last = macs.last().unwrap();
        assert_eq!(t.lookup(0, last, 16), Some(((macs.len() - 1) % 7) as u16));
        assert!(t.entries(16).len() <= BUCKETS * WAYS);
    }

    #[test]
    fn readers_never_see_a_torn_entry() {
        // Writers flip MACs between ports whose numbers encode the MAC;
        // a reader must only ever find the port that belongs to its MAC.
        let t = std::sync::Arc::new(MacTable::default());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let macs: Vec<[u8; 6]> = (0..64u8).map(|i| [2, 0, 0, 0, 0, i]).collect();
        let writer = {
            let (t, stop, macs) = (t.clone(), stop.clone(), macs.clone());
            std::thread::spawn(move || {
                let mut flip = 0;
                while !stop.load(Ordering::Relaxed) {
                    for m in &macs {
                        t.learn(0, m, u16::from(m[5]) * 2 + flip, 0);
                    }
                    flip ^= 1;
                }
            })
        };
        for _ in 0..20_000 {
            for m in &macs {
                if let Some(p) = t.lookup(0, m, 0) {
                    assert_eq!(p / 2, u16::from(m[5]), "MAC {m:?} found on port {p}");
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
    }
}
