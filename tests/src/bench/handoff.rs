//! The state handoff cost: not measured yet. This is the marked place for
//! it.
//!
//! What belongs here (issue 5): a reload of an SDK worker that keeps a
//! value of 1 KiB, 1 MiB and 64 MiB (the SDK's `keep`), timed from the
//! reload request to the new generation serving, beside a raw copy of the
//! same bytes over a Unix stream socket between two processes, as a ratio
//! of medians over the bench's rounds. It needs a worker that keeps a value
//! of a size the bench chooses, which comes with the SDK's `keep`.

/// Measures the state handoff cost and prints it; for now, says that it is
/// not measured.
pub fn measure_and_print() {
    // TODO(issue 5, SDK `keep`): for each size in [1 KiB, 1 MiB, 64 MiB]:
    // start baton with a worker that keeps `size` bytes, time
    // `reload --wait` over the rounds, time a raw Unix-socket copy of the
    // same bytes, print both and their ratio (median, min, max).
    println!("state handoff: not measured yet (needs the SDK's keep)");
}
