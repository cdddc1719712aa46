//! `tap[,ifname=NAME]`: placeholder, replaced by the tap implementation.
use crate::{features, Backend, Error, Result};

/// Offloads a tap with IFF_VNET_HDR passes through.
pub const OFFLOAD_FEATURES: u64 = features::CSUM
    | features::GUEST_CSUM
    | features::GUEST_TSO4
    | features::GUEST_TSO6
    | features::GUEST_ECN
    | features::HOST_TSO4
    | features::HOST_TSO6
    | features::HOST_ECN;

pub fn open(_ifname: &str, _queue_pairs: usize) -> Result<Vec<Box<dyn Backend>>> {
    Err(Error::Other("tap backend not implemented yet".into()))
}
