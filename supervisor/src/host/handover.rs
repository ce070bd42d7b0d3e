//! The host's side of an upgrade of baton itself: the hand-over state it
//! writes (which descriptor is what: listeners, `--steer`'s second sockets,
//! each generation's channel and notify socket, the control socket) and the
//! workers it takes over again in the new supervisor. `host.rs` starts the
//! pre-flight and execs; this file never does either.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use super::OsHost;
use crate::spawn::SocketFile;
use crate::steer::Steer;
use crate::upgrade::{self, state::Table};

impl OsHost {
    /// Sets what an upgrade needs beyond the host's own descriptors.
    pub fn upgrade_context(&mut self, context: upgrade::Context) {
        self.upgrade = context;
    }

    /// Takes over generation `number`'s channel and notify socket from the
    /// supervisor before an upgrade, and reads them again.
    pub fn adopt_worker(
        &mut self,
        number: u64,
        channel: OwnedFd,
        notify: OwnedFd,
        carried: &upgrade::state::CarriedWorker,
    ) -> Result<(), String> {
        let channel = Arc::new(crate::sys::async_fd(channel).map_err(|e| e.to_string())?);
        let socket = notify.try_clone().map_err(|e| e.to_string())?;
        self.watch(
            number,
            channel,
            notify,
            std::os::unix::net::UnixDatagram::from(socket),
            carried.notify_uid,
            SocketFile::adopt(carried.notify_path.clone()),
        );
        Ok(())
    }

    /// The hand-over state: `table` and which descriptor is what.
    pub(super) fn handover(&self, table: Table) -> upgrade::state::Handover {
        use upgrade::state::{CarriedControl, CarriedWorker, Handover, HostFds, STATE_VERSION};
        let (path, listener, dir, lock) = self.upgrade.control.clone().unwrap_or_default();
        let mut workers: Vec<CarriedWorker> = self
            .workers
            .iter()
            .map(|(number, w)| CarriedWorker {
                generation: *number,
                channel: w.channel.get_ref().as_raw_fd(),
                notify: w.notify.as_raw_fd(),
                notify_path: w.notify_file.path().to_path_buf(),
                notify_uid: w.notify_uid,
            })
            .collect();
        workers.sort_by_key(|w| w.generation);
        Handover {
            version: STATE_VERSION,
            baton_version: env!("CARGO_PKG_VERSION").to_owned(),
            written_at_ns: upgrade::state::monotonic_ns(),
            table,
            host: HostFds {
                listeners: self
                    .listeners
                    .iter()
                    .map(|l| (l.name.clone(), l.fd.as_raw_fd()))
                    .collect(),
                workers,
                run_dir: self.launcher.run_dir().to_path_buf(),
                control: CarriedControl {
                    path,
                    listener,
                    dir,
                    lock,
                },
                metrics: self.upgrade.metrics,
                default_binary: self.upgrade.default_binary.clone(),
                steer: self.steer.as_ref().map(Steer::carry),
            },
        }
    }
}
