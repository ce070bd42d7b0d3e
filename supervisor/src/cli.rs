//! The command line: `baton run`, `reload`, `status`, `stop`, `upgrade`.
//!
//! [`Cli`] is the clap definition (its doc comments are the help texts);
//! [`execute`] runs one parsed command. Client commands talk to a running
//! baton over its control socket and print for people (or JSON with
//! `--json`). This module never touches a worker itself.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use nix::sys::signal::Signal;

use crate::api::{Reply, Request};
use crate::control;
use crate::listener::ListenSpec;
use crate::spawn::WorkerCommand;
use crate::supervisor::{Config, Readiness};
use crate::Error;

/// Zero-downtime reloads for any server binary.
///
/// baton holds your server's listening sockets for its whole life. On a
/// reload (SIGHUP or `baton reload`) it starts a new worker on the same
/// sockets, waits until it is ready, and only then tells the old one to finish
/// its in-flight requests and exit. No connection is refused or reset.
#[derive(Debug, Parser)]
#[command(name = "baton", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Bind the listeners and supervise COMMAND, reloading it on demand.
    ///
    /// Workers get the listeners at fds 3.. (LISTEN_FDS, LISTEN_PID,
    /// LISTEN_FDNAMES, as systemd passes them), their own NOTIFY_SOCKET and
    /// BATON_GENERATION. Example:
    ///
    ///   baton run --listen http=tcp://127.0.0.1:8080 -- ./my-server
    ///
    /// Signals: HUP reloads; TERM and INT drain every generation and exit 0
    /// (a second TERM or INT kills them at once); QUIT kills them at once.
    /// Exit status: 0 after a clean stop, 124 when --stop-timeout ran out,
    /// 1 when the first generation never served or baton could not start.
    Run(Box<RunArgs>),
    /// Start a new generation and retire the serving one once it is ready.
    Reload {
        /// Wait for the outcome: exit 0 once the new generation serves,
        /// non-zero with the reason if it failed.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Show the generations, their pids and states, and the last reload.
    Status {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Re-execute the supervisor in place from a new binary; workers keep
    /// running untouched (same pid, same sockets, same kept values).
    ///
    /// The new binary first checks the state it would get (a pre-flight
    /// child); only if it accepts does baton execute it. An upgrade asked
    /// for during a reload waits for it. SIGUSR2 to baton does the same
    /// from the path baton was started from.
    Upgrade {
        /// Wait for the outcome: exit 0 once the new supervisor answers,
        /// non-zero with the reason if the upgrade failed (the old
        /// supervisor then runs on).
        #[arg(long)]
        wait: bool,
        /// The binary to execute [default: the path baton was started from,
        /// resolved anew, so a package upgrade that replaced it is picked up]
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        #[command(flatten)]
        control: ControlArg,
    },
    /// The pre-flight of an upgrade (run by the old baton, not by people):
    /// read the state at --state-fd, check baton's own arguments, and say
    /// whether this binary can take over.
    #[command(hide = true)]
    UpgradeCheck {
        /// The descriptor of the hand-over state.
        #[arg(long, value_name = "FD")]
        state_fd: i32,
        /// The running baton's arguments (after `argv[0]`).
        #[arg(last = true, value_name = "ARGS")]
        args: Vec<OsString>,
    },
    /// Print a shell completion script: `source <(baton completions bash)`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print baton's man page (roff): `baton man | man -l -`.
    Man,
    /// Drain every generation, then make the supervisor exit.
    ///
    /// Safe to repeat: a second `baton stop` waits for the same drain. Only
    /// --now (or a second SIGTERM/SIGINT to baton) kills workers that are
    /// still finishing requests.
    Stop {
        /// Kill every worker now instead of letting them drain.
        #[arg(long)]
        now: bool,
        #[command(flatten)]
        control: ControlArg,
    },
}

/// `--control`, shared by every subcommand.
#[derive(Debug, Args)]
pub struct ControlArg {
    /// The control socket [default: $RUNTIME_DIRECTORY/baton.sock, else
    /// $XDG_RUNTIME_DIR/baton.sock, else /tmp/baton-$UID/baton.sock]
    #[arg(long, value_name = "PATH", env = "BATON_CONTROL")]
    pub control: Option<PathBuf>,
}

impl ControlArg {
    fn path(&self) -> PathBuf {
        self.control.clone().unwrap_or_else(control::default_path)
    }
}

/// The options of `baton run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// A listening socket to hold, as NAME=ADDR; repeatable. ADDR is
    /// tcp://HOST:PORT (an IPv6 HOST in brackets), udp://HOST:PORT, unix:PATH
    /// (stream), unix-dgram:PATH, or `systemd` to adopt the socket systemd
    /// passed under that name (FileDescriptorName=). Workers see them at
    /// fds 3.. in this order.
    #[arg(long = "listen", value_name = "NAME=ADDR")]
    pub listen: Vec<ListenSpec>,
    #[command(flatten)]
    pub control: ControlArg,
    /// How long a new generation may take to become ready.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_duration)]
    pub ready_timeout: Duration,
    /// How readiness is judged: `notify` (READY=1 on NOTIFY_SOCKET, or the
    /// SDK's ready()), or `after:DUR` for workers that never notify: ready
    /// once alive for DUR (or on READY=1, whichever is first).
    #[arg(long, value_name = "notify|after:DUR", default_value = "notify", value_parser = parse_readiness)]
    pub ready: Readiness,
    /// The signal that tells a plain worker to drain (finish in-flight
    /// requests, then exit). SDK workers are told over their channel.
    #[arg(long, value_name = "SIG", default_value = "TERM", value_parser = parse_signal)]
    pub drain_signal: Signal,
    /// How long a draining generation may take before it is killed.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// How many old generations may drain at once; further reloads wait
    /// for one to exit.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_draining: u16,
    /// Reload when files under PATH change (a file, or a directory watched
    /// recursively); repeatable. `.git/`, `target/` and editor scratch files
    /// are ignored.
    #[arg(long, value_name = "PATH")]
    pub watch: Vec<PathBuf>,
    /// With --watch: a burst of changes gives one reload once no change has
    /// come for this long.
    #[arg(long, value_name = "DUR", default_value = "300ms", value_parser = parse_duration)]
    pub debounce: Duration,
    /// A shell command run before every reload (and the first start), like
    /// "cargo build --release". If it fails, the serving generation stays and
    /// the failure, with the end of its output, shows in `baton status`.
    #[arg(long, value_name = "CMD")]
    pub build: Option<String>,
    /// Run workers (and --build) as this user, with its groups; baton binds
    /// the listeners first, so they may be privileged ports. Needs root.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// With --user: run workers with this primary group instead of the
    /// user's.
    #[arg(long, value_name = "GROUP", requires = "user")]
    pub group: Option<String>,
    /// The largest snapshot of kept values (SDK workers) baton accepts, like
    /// 64MiB; a larger one fails the reload and the old generation serves on.
    #[arg(long, value_name = "SIZE", default_value = "256MiB", value_parser = parse_size)]
    pub max_state: u64,
    /// How long a generation may stay frozen (not accepting, its kept values
    /// handed over) waiting for its successor to become ready; then the
    /// successor fails and the old generation thaws.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration)]
    pub freeze_timeout: Duration,
    /// How long a generation frozen for a hand-over (SDK workers) waits for
    /// its requests in flight to finish before it writes its kept values;
    /// a write of a request still running after that is refused (an HTTP
    /// 503), never acknowledged and lost. At most half of --freeze-timeout
    /// is used.
    #[arg(long, value_name = "DUR", default_value = "2s", value_parser = parse_duration)]
    pub freeze_grace: Duration,
    /// Bound every stop: once a stop (SIGTERM, SIGINT, `baton stop`) has
    /// taken this long, every worker left is killed and baton exits 124. Set
    /// it below the grace period of whatever stops baton (Kubernetes'
    /// terminationGracePeriodSeconds, systemd's TimeoutStopSec).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub stop_timeout: Option<Duration>,
    /// Serve Prometheus metrics on GET /metrics at ADDR, like
    /// tcp://127.0.0.1:9090.
    #[arg(long, value_name = "ADDR", value_parser = crate::metrics::parse_addr)]
    pub metrics: Option<std::net::SocketAddr>,
    /// Steer new connections away from a replaced generation before it is
    /// told to drain, for servers whose own shutdown closes connections it
    /// accepted but did not read yet. Each TCP listener gets a second
    /// socket on the same address (SO_REUSEPORT; a socket from systemd needs
    /// ReusePort=yes); generations alternate between the two, so a reload
    /// waits while two generations are alive. UDP and Unix listeners are
    /// shared as without it.
    #[arg(long)]
    pub steer: bool,
    /// With --steer: how long a replaced generation gets no new connections
    /// (it accepts and reads what it already has) before its drain signal.
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = parse_duration, requires = "steer")]
    pub steer_grace: Duration,
    /// The worker command and its arguments.
    #[arg(required = true, last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// Parses `250ms`, `30s`, `2m`, `1h 5m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 250ms, 30s or 2m ({e})"))
}

/// Parses `--max-state`: `512KiB`, `64MiB`, `1GiB`, `1000000` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 64MiB"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (use KiB, MiB or GiB)"
            ))
        }
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn parse_readiness(s: &str) -> Result<Readiness, String> {
    match s.split_once(':') {
        None if s == "notify" => Ok(Readiness::Notify),
        Some(("after", d)) => parse_duration(d).map(Readiness::After),
        _ => Err(format!(
            "{s:?}: expected `notify` or `after:DURATION` (like after:500ms)"
        )),
    }
}

/// Parses `TERM`, `SIGTERM`, `term`, `15`.
pub fn parse_signal(s: &str) -> Result<Signal, String> {
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| format!("{n} is not a signal number"));
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<Signal>()
        .map_err(|_| format!("{s:?} is not a signal name (like TERM, INT, QUIT, USR1)"))
}

/// Runs one command; returns the process exit code.
pub async fn execute(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Run(args) => {
            let args = *args;
            let command = WorkerCommand {
                program: args.command[0].clone(),
                argv: args.command.clone(),
            };
            crate::run::run(Config {
                listeners: args.listen,
                command,
                control: args.control.path(),
                ready_timeout: args.ready_timeout,
                readiness: args.ready,
                drain_signal: args.drain_signal,
                drain_timeout: args.drain_timeout,
                max_draining: usize::from(args.max_draining),
                watch: args.watch,
                debounce: args.debounce,
                build: args.build,
                user: args.user,
                group: args.group,
                max_state: args.max_state,
                freeze_timeout: args.freeze_timeout,
                freeze_grace: args.freeze_grace,
                stop_timeout: args.stop_timeout,
                metrics: args.metrics,
                steer_grace: args.steer.then_some(args.steer_grace),
            })
            .await
        }
        Command::Reload { wait, control } => {
            match ask(&control, &Request::Reload { wait }).await? {
                Reply::Reload(outcome) if outcome.ok => {
                    println!(
                        "generation {} is serving (reload took {}ms)",
                        outcome.generation, outcome.ms
                    );
                    Ok(())
                }
                Reply::Reload(outcome) => Err(Error::ReloadFailed(
                    outcome.error.unwrap_or_else(|| "no reason given".into()),
                )),
                _ => {
                    println!("reload requested");
                    Ok(())
                }
            }
        }
        Command::Status { json, control } => {
            if let Reply::Status(status) = ask(&control, &Request::Status).await? {
                if json {
                    println!("{}", Reply::Status(status).to_json());
                } else {
                    print!("{}", crate::status_text::describe(&status));
                }
            }
            Ok(())
        }
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "baton", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => {
            let man = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command());
            let mut page = Vec::new();
            man.render(&mut page).map_err(|e| Error::Io {
                context: "rendering the man page".into(),
                source: e,
            })?;
            use std::io::Write;
            std::io::stdout().write_all(&page).map_err(|e| Error::Io {
                context: "writing the man page".into(),
                source: e,
            })
        }
        Command::Stop { now, control } => {
            ask(&control, &Request::Stop { now }).await?;
            println!("baton stopped");
            Ok(())
        }
        Command::Upgrade {
            wait,
            binary,
            control,
        } => {
            let binary = crate::upgrade::client_binary(binary);
            match ask(&control, &Request::Upgrade { wait, binary }).await? {
                Reply::Upgrade(u) if u.ok => {
                    println!(
                        "baton {} runs in place of {} (upgrade took {}ms)",
                        u.to, u.from, u.ms
                    );
                    Ok(())
                }
                Reply::Upgrade(u) => Err(Error::UpgradeFailed(
                    u.error.unwrap_or_else(|| "no reason given".into()),
                )),
                _ => {
                    println!("upgrade requested");
                    Ok(())
                }
            }
        }
        Command::UpgradeCheck { state_fd, args } => {
            let accepted = crate::upgrade::preflight::check(state_fd, &args)
                .map_err(|e| Error::Upgrade(format!("this baton cannot take over: {e}")))?;
            println!("{accepted}");
            Ok(())
        }
    }
}

/// Sends a request; a refusal becomes an error.
async fn ask(control: &ControlArg, request: &Request) -> Result<Reply, Error> {
    match control::request(&control.path(), request).await? {
        Reply::Refused(reason) => Err(Error::Refused(reason)),
        answer => Ok(answer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5TB").is_err());
    }
}
