//! Dataplane tests against a fake guest memory: whole frames through TX,
//! the loopback backend and RX, and malformed chains stopping one queue.
