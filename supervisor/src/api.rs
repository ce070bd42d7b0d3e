//! The control API: what `baton reload|status|stop` ask a running supervisor
//! and what it answers, as types both ends share.
//!
//! On the wire each request is one JSON line (`{"command":"reload",
//! "wait":true}`) and each answer one JSON line with `"ok"`. The event loop
//! builds a [`Reply`]; the client reads it back with [`Reply::parse`], which
//! knows from the request what kind of answer to expect, so neither end walks
//! JSON by hand. This module never does I/O: `control.rs` carries the lines.

use serde::{Deserialize, Serialize};

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    /// Start a reload; with `wait`, answer once it has succeeded or failed.
    Reload {
        /// Answer only when the reload is over.
        #[serde(default)]
        wait: bool,
    },
    /// Describe the generations and the last reload.
    Status,
    /// Drain every generation and exit; answered when done. Repeating it
    /// waits for the same drain; only `now` kills.
    Stop {
        /// Kill every worker now instead of letting them drain.
        #[serde(default)]
        now: bool,
    },
    /// Re-execute the supervisor in place from `binary` (default: the path
    /// baton was started from); with `wait`, answer once the new one runs.
    Upgrade {
        /// Answer only when the upgrade is over (the new supervisor answers).
        #[serde(default)]
        wait: bool,
        /// The binary to execute.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        binary: Option<std::path::PathBuf>,
    },
}

/// Where a generation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Started, not yet ready; the previous generation still serves.
    Starting,
    /// Ready and serving; the newest serving generation is "the" generation.
    Serving,
    /// Told to finish in-flight work and exit; killed at its deadline.
    Draining,
}

/// Every answer the supervisor gives.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `reload --wait`: how the reload ended.
    Reload(ReloadOutcome),
    /// `reload`: it was started or queued.
    Queued,
    /// `status`.
    Status(Box<Status>),
    /// `stop`: every generation has exited.
    Stopped,
    /// `upgrade --wait`: how the upgrade ended.
    Upgrade(LastUpgrade),
    /// The request was refused, or baton is going away.
    Refused(String),
}

/// How one reload ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloadOutcome {
    /// Whether the new generation serves.
    pub ok: bool,
    /// The generation the reload started.
    pub generation: u64,
    /// How long the reload took, from its trigger to its end.
    pub ms: u64,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What `baton status` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// baton's pid.
    pub pid: u32,
    /// The serving generation (the newest, while two serve); `None` only
    /// while a crashed worker is being restarted.
    pub generation: Option<u64>,
    /// Every generation baton has, oldest first.
    pub generations: Vec<GenerationStatus>,
    /// How the last reload (or crash restart) ended.
    pub last_reload: Option<LastReload>,
    /// Reloads so far.
    pub reloads: ReloadCounts,
    /// A reload waits to start after the one in progress.
    pub reload_queued: bool,
    /// The reload in progress.
    pub reloading: Option<Reloading>,
    /// A crashed worker's replacement, while it starts.
    pub restarting: Option<Restarting>,
    /// baton is stopping.
    pub stopping: bool,
    /// The listeners baton holds.
    pub listeners: Vec<ListenerStatus>,
    /// The kept values baton holds for a crash restart.
    pub kept: Option<KeptStatus>,
    /// The running baton's version.
    #[serde(default)]
    pub version: String,
    /// Upgrades of baton itself so far.
    #[serde(default)]
    pub upgrades: UpgradeCounts,
    /// How the last upgrade ended.
    #[serde(default)]
    pub last_upgrade: Option<LastUpgrade>,
    /// The upgrade asked for and not over yet.
    #[serde(default)]
    pub upgrading: Option<Upgrading>,
}

/// Upgrade counts in [`Status`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeCounts {
    /// Upgrades whose new supervisor runs.
    pub ok: u64,
    /// Upgrades that failed (the old supervisor ran on).
    pub failed: u64,
}

/// How an upgrade ended: in [`Status`], and the answer to `upgrade --wait`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastUpgrade {
    /// Whether the new supervisor runs.
    pub ok: bool,
    /// Why it failed.
    pub error: Option<String>,
    /// From the request to the new supervisor's first answer.
    pub ms: u64,
    /// The version of the baton that was upgraded.
    pub from: String,
    /// The version now running (after a failure: the one that runs on).
    pub to: String,
    /// The binary it executed (or tried to).
    pub binary: String,
}

/// An upgrade in progress, in [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upgrading {
    /// Where it stands: `queued` (behind a reload or a crash restart),
    /// `preflight` (the new binary checks the state), `exec`.
    pub step: String,
    /// The binary.
    pub binary: String,
    /// How long it has been going.
    pub ms: u64,
}

/// One generation in [`Status`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationStatus {
    /// Its number.
    pub generation: u64,
    /// Where it is in its life.
    pub state: Phase,
    /// Its worker processes.
    pub pids: Vec<i32>,
    /// How long ago it started.
    pub age_ms: u64,
    /// It speaks the SDK's worker protocol.
    pub sdk: bool,
    /// It is frozen for a successor (not accepting).
    pub frozen: bool,
    /// The last `STATUS=` it reported.
    pub status: Option<String>,
}

/// The last reload in [`Status`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastReload {
    /// The generation it started.
    pub generation: u64,
    /// Whether that generation serves.
    pub ok: bool,
    /// Why it failed.
    pub error: Option<String>,
    /// How long it took.
    pub ms: u64,
    /// For a hand-over of kept values: how long no generation accepted.
    pub accept_pause_ms: Option<f64>,
}

/// Reload counts in [`Status`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadCounts {
    /// Reloads whose generation served.
    pub ok: u64,
    /// Reloads that failed.
    pub failed: u64,
}

/// The reload in progress, in [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reloading {
    /// The generation it starts.
    pub generation: u64,
    /// Where it stands.
    pub step: Step,
    /// How long it has been going.
    pub ms: u64,
}

/// Where a reload stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// `--build` runs.
    Building,
    /// The new generation runs and is not ready yet.
    Starting,
    /// The serving generation is frozen and writing its kept values for the
    /// new one (nobody accepts meanwhile).
    AwaitingSnapshot,
    /// The new generation said ready while its kept values were still on
    /// their way; it serves once they are sent.
    ReadyPending,
    /// The new generation has its kept values and is not ready yet (its
    /// predecessor stays frozen until it is).
    StartingWithState,
}

/// A crash restart in progress, in [`Status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restarting {
    /// The generation that replaces the crashed one.
    pub generation: u64,
    /// How long it has been starting.
    pub ms: u64,
}

/// A listener in [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerStatus {
    /// Its name.
    pub name: String,
    /// What it is bound to (port 0 resolved).
    pub address: String,
}

/// The kept values baton holds, in [`Status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptStatus {
    /// The generation they came from.
    pub generation: u64,
    /// Their size.
    pub bytes: u64,
}

/// The JSON envelope: `"ok"` beside the answer's own fields.
#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    ok: bool,
    #[serde(flatten)]
    body: T,
}

#[derive(Serialize, Deserialize)]
struct Flag {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    queued: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    stopped: bool,
}

#[derive(Serialize, Deserialize)]
struct Refusal {
    error: String,
}

impl Reply {
    /// The answer as one JSON line's content.
    pub fn to_json(&self) -> String {
        let line = match self {
            Reply::Reload(outcome) => serde_json::to_string(outcome),
            Reply::Queued => serde_json::to_string(&Envelope {
                ok: true,
                body: Flag {
                    queued: true,
                    stopped: false,
                },
            }),
            Reply::Status(status) => serde_json::to_string(&Envelope {
                ok: true,
                body: status,
            }),
            Reply::Stopped => serde_json::to_string(&Envelope {
                ok: true,
                body: Flag {
                    queued: false,
                    stopped: true,
                },
            }),
            Reply::Upgrade(outcome) => serde_json::to_string(outcome),
            Reply::Refused(error) => serde_json::to_string(&Envelope {
                ok: false,
                body: Refusal {
                    error: error.clone(),
                },
            }),
        };
        // These types always serialize; the fallback keeps the line valid.
        line.unwrap_or_else(|e| format!(r#"{{"ok":false,"error":"encoding the answer: {e}"}}"#))
    }

    /// Reads the answer to `request` from its JSON line.
    pub fn parse(request: &Request, line: &str) -> Result<Reply, serde_json::Error> {
        #[derive(Deserialize)]
        struct Head {
            ok: bool,
            generation: Option<serde_json::Value>,
            binary: Option<serde_json::Value>,
        }
        let head: Head = serde_json::from_str(line)?;
        let outcome = match request {
            Request::Reload { wait: true } => head.generation.is_some(),
            Request::Upgrade { wait: true, .. } => head.binary.is_some(),
            _ => false,
        };
        let refused = !head.ok && !outcome;
        if refused {
            let Envelope { body, .. } = serde_json::from_str::<Envelope<Refusal>>(line)?;
            return Ok(Reply::Refused(body.error));
        }
        Ok(match request {
            Request::Reload { wait: true } => Reply::Reload(serde_json::from_str(line)?),
            Request::Reload { wait: false } => Reply::Queued,
            Request::Status => {
                let Envelope { body, .. } = serde_json::from_str::<Envelope<Status>>(line)?;
                Reply::Status(Box::new(body))
            }
            Request::Stop { .. } => Reply::Stopped,
            Request::Upgrade { wait: true, .. } => Reply::Upgrade(serde_json::from_str(line)?),
            Request::Upgrade { wait: false, .. } => Reply::Queued,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_answer_reads_back_as_itself() {
        let status = Status {
            pid: 7,
            generation: Some(2),
            generations: vec![GenerationStatus {
                generation: 2,
                state: Phase::Serving,
                pids: vec![99],
                age_ms: 5,
                sdk: true,
                frozen: false,
                status: Some("fine".into()),
            }],
            last_reload: Some(LastReload {
                generation: 2,
                ok: true,
                error: None,
                ms: 3,
                accept_pause_ms: Some(1.5),
            }),
            reloads: ReloadCounts { ok: 1, failed: 0 },
            reload_queued: false,
            reloading: Some(Reloading {
                generation: 3,
                step: Step::AwaitingSnapshot,
                ms: 1,
            }),
            restarting: None,
            stopping: false,
            listeners: vec![ListenerStatus {
                name: "http".into(),
                address: "127.0.0.1:80".into(),
            }],
            kept: Some(KeptStatus {
                generation: 2,
                bytes: 10,
            }),
            version: "0.1.0".into(),
            upgrades: UpgradeCounts { ok: 2, failed: 1 },
            last_upgrade: None,
            upgrading: Some(Upgrading {
                step: "preflight".into(),
                binary: "/usr/bin/baton".into(),
                ms: 4,
            }),
        };
        let upgraded = LastUpgrade {
            ok: false,
            error: Some("it crashed".into()),
            ms: 12,
            from: "0.1.0".into(),
            to: "0.1.0".into(),
            binary: "/bin/false".into(),
        };
        let upgrade = Request::Upgrade {
            wait: true,
            binary: None,
        };
        let failed = ReloadOutcome {
            ok: false,
            generation: 3,
            ms: 9,
            error: Some("it crashed".into()),
        };
        let cases = [
            (Request::Status, Reply::Status(Box::new(status))),
            (Request::Reload { wait: true }, Reply::Reload(failed)),
            (Request::Reload { wait: false }, Reply::Queued),
            (Request::Stop { now: false }, Reply::Stopped),
            (upgrade.clone(), Reply::Upgrade(upgraded)),
            (upgrade, Reply::Refused("baton is stopping".into())),
            (Request::Status, Reply::Refused("baton is stopping".into())),
            (
                Request::Reload { wait: true },
                Reply::Refused("baton is stopping".into()),
            ),
        ];
        for (request, reply) in cases {
            let line = reply.to_json();
            assert_eq!(Reply::parse(&request, &line).expect(&line), reply, "{line}");
        }
    }

    #[test]
    fn the_wire_format_is_the_documented_one() {
        let line = Reply::Reload(ReloadOutcome {
            ok: true,
            generation: 2,
            ms: 1,
            error: None,
        })
        .to_json();
        assert_eq!(line, r#"{"ok":true,"generation":2,"ms":1}"#);
        assert_eq!(Reply::Queued.to_json(), r#"{"ok":true,"queued":true}"#);
        assert_eq!(
            Reply::Refused("no".into()).to_json(),
            r#"{"ok":false,"error":"no"}"#
        );
        assert_eq!(
            serde_json::to_string(&Step::AwaitingSnapshot).expect("json"),
            r#""awaiting_snapshot""#
        );
    }
}
