//! Test support for baton's integration tests and benchmarks: tools that
//! drive the real binaries from outside, the way a client or an operator
//! would. `load` is the HTTP/1.1 load client that counts every request in
//! exactly one bin (see `docs/design.md`, "What counts as a failed request"),
//! and `hyper_load` keeps the same bins for HTTP/2 (h2c) and HTTPS;
//! `harness` starts the real `baton` binary in a temporary directory per
//! test and drives it over its control socket; `http` sends the one-off
//! `GET`s a test reads a single answer from; `state_cost` measures what
//! handing kept state to the next generation costs; `lossy` runs servers
//! whose own drain loses requests (for `--steer`); `rig` boots a real
//! systemd in a container (`tests/systemd-rig/`) for the tests that run the
//! shipped units. Nothing here links the supervisor; the SDK only for its
//! protocol constants.

pub mod bench;
pub mod harness;
pub mod http;
pub mod hyper_load;
pub mod load;
pub mod lossy;
pub mod rig;
pub mod state_cost;
mod sys;
