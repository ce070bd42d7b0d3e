//! What workers say: sd_notify datagrams and worker-protocol messages.
//!
//! `READY=1` and the SDK's `ready()` make a generation ready; `STATUS=` is
//! shown by `status`; a worker's `STOPPING=1` is logged and never forwarded.
//! On the channel: `hello` gets the welcome with the listeners, the kept-value
//! messages go to `handoff.rs`. Malformed data fails a starting generation;
//! a serving one keeps serving and keeps its channel.

use std::os::fd::OwnedFd;

use baton_worker::protocol::{ProtocolError, WorkerMessage, PROTOCOL_VERSION};

use super::failure::Failure;
use super::Supervisor;
use crate::event::NotifyMessage;
use crate::generations::Phase;
use crate::host::Host;

impl<H: Host> Supervisor<H> {
    /// A datagram on generation `number`'s notify socket.
    pub(super) fn on_notify(&mut self, number: u64, message: NotifyMessage) {
        let Some(g) = self.generations.get_mut(number) else {
            return;
        };
        if let Some(status) = message.status {
            g.status = Some(status);
        }
        if message.stopping {
            // Never forwarded: STOPPING=1 to systemd would stop the unit.
            tracing::info!("generation {number} (pid {}) says it is stopping", g.pid);
        }
        if let Some(errno) = message.errno {
            tracing::warn!("generation {number} (pid {}) reports ERRNO={errno}", g.pid);
        }
        if message.ready {
            self.on_ready(number, "READY=1");
        }
    }

    /// A message (or a receive error) on generation `number`'s channel.
    pub(super) fn on_channel(
        &mut self,
        number: u64,
        message: Result<WorkerMessage, ProtocolError>,
        fds: Vec<OwnedFd>,
    ) {
        let Some(g) = self.generations.get_mut(number) else {
            return;
        };
        if let Ok(m) = &message {
            let carries_fds = matches!(
                m,
                WorkerMessage::Frozen { .. }
                    | WorkerMessage::Checkpoint { .. }
                    | WorkerMessage::PreCopied { .. }
            );
            if !carries_fds && !fds.is_empty() {
                self.protocol_error(number, format!("sent descriptors with {m:?}"));
                return;
            }
        }
        match message {
            Ok(WorkerMessage::Hello {
                protocol,
                pid,
                pre_copy,
            }) => {
                if g.speaks_protocol {
                    // A second welcome would hand it every listener again.
                    self.protocol_error(number, "said hello twice".into());
                    return;
                }
                if protocol != PROTOCOL_VERSION {
                    let reason = format!(
                        "speaks worker protocol version {protocol}; this baton speaks \
                         {PROTOCOL_VERSION} (update baton or baton-worker)"
                    );
                    self.protocol_error(number, reason);
                    return;
                }
                g.speaks_protocol = true;
                g.pre_copy = pre_copy;
                tracing::debug!("generation {number} (pid {pid}) speaks the worker protocol");
                if let Err(e) = self.host.welcome(number) {
                    self.protocol_error(number, format!("sending its listeners: {e}"));
                }
            }
            Ok(WorkerMessage::Ready) => self.on_ready(number, "ready()"),
            Ok(WorkerMessage::Status { text }) => g.status = Some(text),
            Ok(WorkerMessage::TakeState) => self.on_take_state(number),
            Ok(WorkerMessage::Prepare) => self.on_prepare(number),
            Ok(WorkerMessage::PreCopied {
                bytes,
                for_generation,
            }) => self.on_pre_copied(number, for_generation, bytes, fds),
            Ok(WorkerMessage::Frozen { bytes, base_bytes }) => {
                self.on_frozen(number, bytes, base_bytes, fds)
            }
            Ok(WorkerMessage::FreezeFailed { reason }) => self.on_freeze_failed(number, reason),
            Ok(WorkerMessage::Rejected { reason }) => self.on_rejected(number, reason),
            Ok(WorkerMessage::Checkpoint { bytes }) => self.on_checkpoint(number, bytes, fds),
            // A plain worker's copy closes when it exits; the exit is reaped.
            Err(ProtocolError::Closed) => {}
            Err(e) if e.is_transient() => self.on_lost(number, e),
            Err(e) => self.protocol_error(number, format!("{e}")),
        }
    }

    /// Malformed data fails a starting generation. A serving one keeps
    /// serving and keeps its channel: the bad message is dropped (packets
    /// keep their boundaries), and its kept values are still asked for.
    pub(super) fn protocol_error(&mut self, number: u64, reason: String) {
        let Some(g) = self.generations.get(number) else {
            return;
        };
        if g.phase == Phase::Starting {
            self.fail_starting(number, Failure::Protocol(reason));
        } else {
            tracing::error!("generation {number} (pid {}): {reason}; ignored", g.pid);
        }
    }
}
