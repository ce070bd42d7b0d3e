//! `baton-worker`: the worker side of baton.
//!
//! This crate owns the **worker protocol**: the messages a worker and the
//! baton supervisor exchange over the worker channel (`BATON_CHANNEL_FD`, one
//! end of a `SOCK_SEQPACKET` Unix socketpair), and the framing that carries
//! them with file descriptors attached. The supervisor links this crate for
//! the very same types, so the two sides can never disagree on the wire
//! format.
//!
//! The major components are:
//!
//! * [`protocol`]: the versioned messages, their size bounds and the
//!   send/receive functions for one message with its descriptors.
//!
//! This crate never forks, execs or signals a process.
#![deny(missing_docs)]

pub mod protocol;
mod sys;
