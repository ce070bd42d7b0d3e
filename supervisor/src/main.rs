//! The `baton` binary: parses the command line, sets up logging, runs the
//! command on a single-threaded runtime, and turns an error into a message on
//! stderr and a non-zero exit code. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = baton::cli::Cli::parse();
    baton::logging::init();
    // One thread: the supervisor is one event loop, and workers are forked
    // from this thread, which lives as long as baton (PR_SET_PDEATHSIG fires
    // when the forking *thread* exits).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("baton: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(baton::cli::execute(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Every error message already carries its causes.
            eprintln!("{}baton: {e}", baton::logging::error_prefix());
            ExitCode::FAILURE
        }
    }
}
