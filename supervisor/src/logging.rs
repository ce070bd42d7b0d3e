//! Logging to stderr, shaped for where it lands.
//!
//! Under systemd (`JOURNAL_STREAM` set, so stderr is the journal) each line
//! starts with a syslog priority prefix (`<3>` error … `<7>` debug), which
//! journald turns into the entry's priority, and carries no timestamp of its
//! own (the journal has one). In a terminal: time, level, colours.
//! `BATON_LOG` filters (`debug`, `baton=trace`, …); the default is `info`.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Call once, first thing.
pub fn init() {
    let filter = EnvFilter::try_from_env("BATON_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.with_ansi(false).event_format(Journald).init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

/// `<priority>message`, one line per event, for journald.
struct Journald;

impl<S, N> FormatEvent<S, N> for Journald
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        write!(writer, "<{priority}>")?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// What goes before baton's final error line: the journal's error priority
/// under systemd, nothing in a terminal.
pub fn error_prefix() -> &'static str {
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        "<3>"
    } else {
        ""
    }
}
