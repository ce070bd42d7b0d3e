//! The `baton` binary: parses the command line, sets up logging, runs the
//! command on a single-threaded runtime, and turns an error into a message on
//! stderr and a non-zero exit code. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = baton::cli::Cli::parse();
    init_logging();
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
            eprintln!("baton: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr. Under systemd (JOURNAL_STREAM set) the journal adds
/// timestamps, so none are printed; in a terminal, colours and times help.
/// `BATON_LOG` filters (`debug`, `baton=trace`, ...), default `info`.
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("BATON_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    if journald {
        builder.without_time().with_ansi(false).init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}
