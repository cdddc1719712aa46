//! vfrelay: a software vDPA dataplane. Serves virtio-net rings to a guest
//! and relays every packet to a host-side backend.
//!
//! A library so that the `vfrelay` command and the fuzz targets (`fuzz/`)
//! share one build of the code. Only what the command line needs is public;
//! the dataplane stays private to the crate.

pub mod daemon;
mod dataplane;
mod frontend;
pub use frontend::vduse::Attach;
pub mod net;
pub mod shutdown;
mod stats;
mod switch;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
