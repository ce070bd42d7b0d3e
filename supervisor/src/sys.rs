//! The supervisor's only unsafe code: starting a worker process.
//!
//! [`spawn`] forks and execs a worker with its descriptors in place: the given
//! ones at 3, 4, 5 … with close-on-exec cleared, `/dev/null` on stdin, every
//! other descriptor closed, every signal at its default disposition and none
//! blocked, `LISTEN_PID` set to the worker's own pid, its own process group,
//! and `PR_SET_PDEATHSIG` so it drains (or dies) with the supervisor.
//!
//! Between `fork` and `execve` the child runs only async-signal-safe calls on
//! memory prepared before the fork: no allocation, no locks, no logging. The
//! child searches `PATH` itself (as `execvp` does), so the supervisor touches
//! no file system to start a worker. An exec failure travels back over a
//! close-on-exec pipe, the way `std::process::Command` reports it, but the
//! supervisor never waits for that report: [`ExecReport`] is read once the
//! child has exited, by which time it is complete.
//!
//! This module never decides *what* to start or *when*; `spawn.rs` does.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::unistd::Pid;

use crate::exec_report::{ExecReport, SpawnFailure, Step};

/// Room for the decimal digits of any pid.
const PID_DIGITS: usize = 20;
/// One more than the highest signal number Linux has (`_NSIG - 1` is 64).
const SIGNALS: libc::c_int = 65;

/// Everything `execve` needs, prepared before the fork.
pub struct ExecPlan {
    /// The paths to try in order (one, or each `PATH` entry joined with the
    /// program's name).
    candidates: Vec<CString>,
    argv: Vec<CString>,
    /// `KEY=VALUE\0` entries; the one at `listen_pid` has room for the pid.
    env: Vec<Vec<u8>>,
    listen_pid: Option<usize>,
    credentials: Option<Credentials>,
    /// The signal the child gets when the supervisor dies.
    death_signal: libc::c_int,
}

/// The user a child runs as, resolved before the fork.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The user id to switch to.
    pub uid: libc::uid_t,
    /// The primary group id.
    pub gid: libc::gid_t,
    /// The supplementary groups.
    pub groups: Vec<libc::gid_t>,
}

impl ExecPlan {
    /// A plan to exec the first of `candidates` that exists, with `argv` and
    /// `env` (`KEY=VALUE` strings).
    pub fn new(candidates: Vec<CString>, argv: Vec<CString>, env: Vec<CString>) -> ExecPlan {
        ExecPlan {
            candidates,
            argv,
            env: env.into_iter().map(CString::into_bytes_with_nul).collect(),
            listen_pid: None,
            credentials: None,
            death_signal: libc::SIGKILL,
        }
    }

    /// Adds `LISTEN_PID`, set in the child to the child's own pid.
    pub fn with_listen_pid(mut self) -> ExecPlan {
        let mut slot = b"LISTEN_PID=".to_vec();
        slot.resize(slot.len() + PID_DIGITS + 1, 0);
        self.env.push(slot);
        self.listen_pid = Some(self.env.len() - 1);
        self
    }

    /// The signal the child gets when the supervisor dies (SIGKILL unless
    /// set): a worker's drain signal lets it finish its requests.
    pub fn with_death_signal(mut self, signal: nix::sys::signal::Signal) -> ExecPlan {
        self.death_signal = signal as libc::c_int;
        self
    }

    /// Runs the child as another user (baton must be root).
    pub fn with_credentials(mut self, credentials: Option<Credentials>) -> ExecPlan {
        self.credentials = credentials;
        self
    }
}

/// Forks and execs `plan` with `fds` at 3, 4, 5 …, `stdin` at 0, and
/// `output` (if given, else baton's own) at 1 and 2.
///
/// Returns at once with the child's pid and its [`ExecReport`]; only a
/// failed fork is reported here.
pub fn spawn(
    plan: &ExecPlan,
    fds: &[BorrowedFd<'_>],
    stdin: BorrowedFd<'_>,
    output: Option<BorrowedFd<'_>>,
) -> Result<(Pid, ExecReport), SpawnFailure> {
    let fail = |step: Step, error: io::Error| SpawnFailure {
        step: step.describe(),
        error,
    };
    // Everything the child touches is built here, before the fork.
    let mut env = plan.env.clone();
    let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr().cast()).collect();
    env_ptrs.push(std::ptr::null());
    let slot_ptr: *mut u8 = match plan.listen_pid {
        Some(i) => env[i].as_mut_ptr(),
        None => std::ptr::null_mut(),
    };
    let mut argv_ptrs: Vec<*const libc::c_char> = plan.argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let candidates: Vec<*const libc::c_char> = plan.candidates.iter().map(|c| c.as_ptr()).collect();
    let sources: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let mut moved: Vec<RawFd> = vec![-1; sources.len()];
    let (err_read, err_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
            .map_err(|e| fail(Step::Fork, e.into()))?;
    let child = ChildContext {
        candidates: &candidates,
        argv: argv_ptrs.as_ptr(),
        env: env_ptrs.as_ptr(),
        listen_pid_slot: slot_ptr,
        sources: &sources,
        moved: moved.as_mut_ptr(),
        stdin: stdin.as_raw_fd(),
        output: output.map_or(-1, |fd| fd.as_raw_fd()),
        credentials: plan.credentials.as_ref(),
        death_signal: plan.death_signal,
        report: err_write.as_raw_fd(),
        parent: nix::unistd::getpid().as_raw(),
    };

    // SAFETY: fork has no memory-safety preconditions of its own; the child
    // branch below calls only async-signal-safe functions on memory that was
    // prepared before the fork, and never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(fail(Step::Fork, io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: we are the freshly forked child; `child` points at memory
        // that stays valid (the parent's copy is ours after the fork).
        unsafe { child.exec() }
    }
    drop(err_write);
    Ok((Pid::from_raw(pid), ExecReport::new(err_read)))
}

/// Raw pointers into memory prepared by the parent before the fork.
struct ChildContext<'a> {
    candidates: &'a [*const libc::c_char],
    argv: *const *const libc::c_char,
    env: *const *const libc::c_char,
    listen_pid_slot: *mut u8,
    sources: &'a [RawFd],
    moved: *mut RawFd,
    stdin: RawFd,
    /// Where stdout and stderr go; -1 keeps baton's.
    output: RawFd,
    credentials: Option<&'a Credentials>,
    death_signal: libc::c_int,
    report: RawFd,
    parent: libc::pid_t,
}

impl ChildContext<'_> {
    /// Runs in the child between fork and exec.
    ///
    /// # Safety
    ///
    /// Call only in a freshly forked child. Every pointer must be valid.
    unsafe fn exec(&self) -> ! {
        let n = self.sources.len() as libc::c_int;
        // The lowest descriptor that is not a target: 3 + number of fds.
        let high = 3 + n;
        // SAFETY: each call below is async-signal-safe (POSIX or Linux
        // documented) and works on descriptors and memory prepared before the
        // fork; `moved` has room for one entry per source.
        unsafe {
            // Own process group: a terminal's ^C reaches the supervisor only,
            // which then drains the workers in order.
            libc::setpgid(0, 0);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            // An ignored signal stays ignored across exec: the Rust runtime
            // ignores SIGPIPE, and whoever started baton may have ignored
            // more (nohup's SIGHUP, a shell's SIGQUIT). Handlers reset at
            // exec by themselves; setting every signal to its default covers
            // both. The raw system call, because glibc refuses to touch its
            // own two (32, 33), which a shell upstream may have ignored; an
            // all-zero kernel sigaction is SIG_DFL, no flags, empty mask on
            // every architecture. SIGKILL and SIGSTOP refuse, harmlessly.
            let default = [0u64; 4];
            for sig in 1..SIGNALS {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    default.as_ptr(),
                    std::ptr::null::<u64>(),
                    8usize,
                );
            }

            // Move every source above the target range first, so no source is
            // clobbered by an earlier dup2 and no dup2(fd, fd) leaves
            // close-on-exec set.
            for (i, &src) in self.sources.iter().enumerate() {
                let fd = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, high);
                if fd < 0 {
                    self.fail(Step::ArrangeDescriptors);
                }
                *self.moved.add(i) = fd;
            }
            let stdin = libc::fcntl(self.stdin, libc::F_DUPFD_CLOEXEC, high);
            let report = libc::fcntl(self.report, libc::F_DUPFD_CLOEXEC, high);
            let output = if self.output >= 0 {
                libc::fcntl(self.output, libc::F_DUPFD_CLOEXEC, high)
            } else {
                high
            };
            if stdin < 0 || report < 0 || output < 0 {
                self.fail(Step::ArrangeDescriptors);
            }
            for i in 0..self.sources.len() {
                // dup2 onto a different descriptor clears close-on-exec.
                if libc::dup2(*self.moved.add(i), 3 + i as libc::c_int) < 0 {
                    self.fail_on(report, Step::ArrangeDescriptors);
                }
            }
            if libc::dup2(stdin, 0) < 0 {
                self.fail_on(report, Step::ArrangeDescriptors);
            }
            if self.output >= 0 && (libc::dup2(output, 1) < 0 || libc::dup2(output, 2) < 0) {
                self.fail_on(report, Step::ArrangeDescriptors);
            }
            // Close everything above the targets except the report pipe (which
            // is close-on-exec and closes itself at exec).
            close_from_to(high, report - 1);
            close_from_to(report + 1, libc::c_int::MAX);

            if let Some(c) = self.credentials {
                // Groups first: after setuid we may no longer change them.
                if libc::setgroups(c.groups.len(), c.groups.as_ptr()) != 0
                    || libc::setgid(c.gid) != 0
                    || libc::setuid(c.uid) != 0
                {
                    self.fail_on(report, Step::SwitchUser);
                }
            }
            // After the user switch: changing credentials clears the
            // parent-death signal.
            if libc::prctl(libc::PR_SET_PDEATHSIG, self.death_signal, 0, 0, 0) != 0 {
                self.fail_on(report, Step::ParentDeathSignal);
            }
            // The supervisor may have died before the prctl took effect.
            if libc::getppid() != self.parent {
                self.fail_on(report, Step::SupervisorGone);
            }

            if !self.listen_pid_slot.is_null() {
                let mut pid = libc::getpid() as u64;
                let mut digits = [0u8; PID_DIGITS];
                let mut len = 0;
                loop {
                    digits[len] = b'0' + (pid % 10) as u8;
                    len += 1;
                    pid /= 10;
                    if pid == 0 {
                        break;
                    }
                }
                let value = self.listen_pid_slot.add(b"LISTEN_PID=".len());
                for i in 0..len {
                    *value.add(i) = digits[len - 1 - i];
                }
            }

            // As execvp does: try each candidate; a missing one (or one in a
            // missing directory) sends us on, a denied one is remembered in
            // case nothing else is found, anything else is the answer.
            let mut denied = false;
            for &path in self.candidates {
                libc::execve(path, self.argv, self.env);
                match *libc::__errno_location() {
                    libc::ENOENT | libc::ENOTDIR | libc::ELOOP | libc::ENAMETOOLONG => {}
                    libc::EACCES => denied = true,
                    _ => self.fail_on(report, Step::Exec),
                }
            }
            if denied {
                *libc::__errno_location() = libc::EACCES;
            }
            self.fail_on(report, Step::Exec)
        }
    }

    /// Reports `step` and errno on the original pipe and exits.
    unsafe fn fail(&self, step: Step) -> ! {
        // SAFETY: forwarded; same preconditions as `exec`.
        unsafe { self.fail_on(self.report, step) }
    }

    /// Reports `step` and errno on `report` and exits.
    unsafe fn fail_on(&self, report: RawFd, step: Step) -> ! {
        // SAFETY: errno, write and _exit are async-signal-safe; the buffer is
        // on this stack.
        unsafe {
            let errno = *libc::__errno_location();
            let mut buf = [0u8; 8];
            buf[..4].copy_from_slice(&(step as u32).to_ne_bytes());
            buf[4..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(report, buf.as_ptr().cast(), buf.len());
            libc::_exit(127)
        }
    }
}

/// Closes every descriptor in `first..=last`.
///
/// # Safety
///
/// Closes descriptors other code may own: only for a child about to exec.
unsafe fn close_from_to(first: libc::c_int, last: libc::c_int) {
    if first > last {
        return;
    }
    // SAFETY: close_range is a plain syscall on integers.
    let done = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            last as libc::c_uint,
            0 as libc::c_uint,
        )
    };
    if done == 0 {
        return;
    }
    // Kernels before 5.9: close one by one, up to a sane bound.
    let last = last.min(65_535);
    for fd in first..=last {
        // SAFETY: close on any integer is safe; EBADF is ignored.
        unsafe { libc::close(fd) };
    }
}

/// Takes ownership of descriptors the kernel just installed in this process
/// through `SCM_RIGHTS` (on a notify socket, where they are closed at once).
pub fn own_received(fds: &[RawFd]) -> Vec<OwnedFd> {
    use std::os::fd::FromRawFd;
    fds.iter()
        // SAFETY: the kernel installed these descriptors in this process as
        // part of the datagram just received; nothing else refers to them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect()
}

/// Registers an owned descriptor with the tokio reactor.
pub fn async_fd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and
    // is not reused for as long as it is registered.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(|e| e.into())
}

/// Takes ownership of the `count` descriptors systemd passed at 3.. and
/// makes them close-on-exec (systemd hands them over inheritable).
pub fn adopt_activated(count: usize) -> Vec<OwnedFd> {
    use std::os::fd::FromRawFd;
    (0..count)
        .map(|i| 3 + i as RawFd)
        .filter(|&fd| {
            // SAFETY: F_GETFD only asks whether the descriptor is open.
            unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
        })
        .map(|fd| {
            // SAFETY: systemd's protocol gives these descriptors to this
            // process (LISTEN_PID matched) and nothing else in baton has
            // touched them; we become their only owner.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            let _ = nix::fcntl::fcntl(
                &owned,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            );
            owned
        })
        .collect()
}

/// Takes ownership of descriptor `fd`, which an upgrade's hand-over state
/// names (the supervisor before the exec cleared its close-on-exec flag for
/// this process), and makes it close-on-exec again. Refuses a descriptor
/// that is not open.
pub fn adopt_carried(fd: RawFd) -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    if fd < 3 {
        return Err(io::Error::other(format!("descriptor {fd} is not baton's")));
    }
    // SAFETY: F_GETFD only asks whether the descriptor is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the hand-over state gives this open descriptor to this
    // process, and `Handover::check` refused a state naming one twice, so
    // nothing else in baton owns it; we become its only owner.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    nix::fcntl::fcntl(
        &owned,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    Ok(owned)
}

/// Sets or clears close-on-exec on descriptor `fd` (an upgrade clears it
/// on exactly the descriptors that cross the exec).
pub fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    let flag = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: F_SETFD works on an integer and touches no memory; a closed
    // descriptor gives EBADF.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flag) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
