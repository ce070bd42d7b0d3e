//! The `baton` binary: parses the command line, sets up logging, runs the
//! command on a single-threaded runtime, and turns an error into a message on
//! stderr and a non-zero exit code. Everything else lives in the library.
//! It never waits for stderr longer than `STDERR_GRACE` at exit.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// How long baton waits at exit for its last lines to reach stderr.
const STDERR_GRACE: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let cli = baton::cli::Cli::parse();
    if let Err(e) = baton::logging::init() {
        // Nothing runs yet: writing straight to stderr can stop nothing.
        eprintln!("baton: starting the stderr writer thread: {e}");
        return ExitCode::FAILURE;
    }
    let code = run(cli);
    // Exit whatever stderr does: a blocked one loses the last lines.
    baton::logging::flush(STDERR_GRACE);
    code
}

fn run(cli: baton::cli::Cli) -> ExitCode {
    // One thread: the supervisor is one event loop, and workers are forked
    // from this thread, which lives as long as baton (PR_SET_PDEATHSIG fires
    // when the forking *thread* exits).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            baton::logging::line(&format!("baton: starting the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(baton::cli::execute(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Every error message already carries its causes.
            let prefix = baton::logging::error_prefix();
            baton::logging::line(&format!("{prefix}baton: {e}"));
            ExitCode::from(e.exit_code())
        }
    }
}
