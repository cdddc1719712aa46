//! Entry points of the fuzz targets in `fuzz/` (cargo-fuzz, its own
//! workspace). Each takes the fuzzer's bytes and panics on a finding; the
//! fuzz target is a one-line wrapper, and `tests/fuzz_regressions.rs`
//! replays every committed corpus and regression input through the same
//! function on stable. Built only with the `fuzzing` feature.
//!
//! The inputs are read with [`In`], which takes only little-endian integers
//! and byte strings from `arbitrary::Unstructured` (zeros once the input
//! runs out), so [`Out`] can write seed inputs field by field
//! (`seeds.rs`). Adding a target: a module here with `pub fn NAME(&[u8])`,
//! its seeds in `seeds.rs`, `fuzz/fuzz_targets/NAME.rs`, a `[[bin]]` in
//! `fuzz/Cargo.toml` and a line in `tests/fuzz_regressions.rs`.

mod ring;
pub mod seeds;
mod vhost_user;

pub use ring::ring;
pub use vhost_user::vhost_user;

use arbitrary::Unstructured;

/// Reads a fuzz input: integers little-endian, zero past the end.
pub(crate) struct In<'a>(Unstructured<'a>);

impl<'a> In<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        In(Unstructured::new(data))
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn u8(&mut self) -> u8 {
        self.0.arbitrary().unwrap_or_default()
    }
    pub fn u16(&mut self) -> u16 {
        self.0.arbitrary().unwrap_or_default()
    }
    pub fn u32(&mut self) -> u32 {
        self.0.arbitrary().unwrap_or_default()
    }
    pub fn u64(&mut self) -> u64 {
        self.0.arbitrary().unwrap_or_default()
    }
    /// Up to `n` bytes: fewer if the input ends first.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        self.0.bytes(n).unwrap_or_default()
    }
}

/// Writes an input [`In`] reads back field by field (seed corpora).
#[derive(Default)]
pub struct Out(pub Vec<u8>);

impl Out {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_writes_what_in_reads() {
        let mut o = Out::default();
        o.u8(1).u16(0x203).u32(0x4050607).u64(u64::MAX).bytes(b"xy");
        let mut i = In::new(&o.0);
        assert_eq!(
            (i.u8(), i.u16(), i.u32(), i.u64()),
            (1, 0x203, 0x4050607, u64::MAX)
        );
        assert_eq!(i.bytes(5), b"xy");
        assert!(i.is_empty());
        assert_eq!((i.u8(), i.u64()), (0, 0), "zeros past the end");
    }
}
