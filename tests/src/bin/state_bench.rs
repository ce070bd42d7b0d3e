//! `state-bench`: what handing kept values to the next generation costs, for
//! 1 KiB, 1 MiB and 64 MiB of state, beside the plain Unix-socket copy of
//! the same bytes (see `baton_tests::state_cost`).
//!
//! ```text
//! cargo build --release --workspace
//! cargo run --release -p baton-tests --bin state-bench [-- --smoke]
//! ```

use std::process::ExitCode;

fn main() -> ExitCode {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let (sizes, rounds): (&[usize], usize) = if smoke {
        (&[1 << 10, 1 << 20], 2)
    } else {
        (&[1 << 10, 1 << 20, 64 << 20], 5)
    };
    match baton_tests::state_cost::measure(sizes, rounds) {
        Ok(rows) => {
            println!("{}", baton_tests::state_cost::table(&rows));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("state-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
