//! `af-xdp,ifname=NAME[,queue=Q][,mode=...]`: placeholder, replaced by the
//! AF_XDP implementation.
use crate::{Backend, Error, Result, XdpMode};

pub fn open(
    _ifname: &str,
    _queue: u32,
    _mode: XdpMode,
    _queue_pairs: usize,
) -> Result<Vec<Box<dyn Backend>>> {
    Err(Error::Other("af-xdp backend not implemented yet".into()))
}
