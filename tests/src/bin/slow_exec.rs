//! `slow_exec`: a stand-in for a binary that takes a while to start, for
//! the upgrade tests' "in the middle of an exec". It sleeps
//! `$SLOW_EXEC_MS` milliseconds, then executes `$SLOW_EXEC_TARGET` with its
//! own arguments, keeping every descriptor and the signal mask exactly as
//! they are (a shell or Python would unblock signals and die of the SIGHUP
//! that baton keeps pending across its exec; `std::process::Command::exec`
//! would reset the mask).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;

fn main() {
    let ms: u64 = std::env::var("SLOW_EXEC_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let Some(target) = std::env::var_os("SLOW_EXEC_TARGET") else {
        eprintln!("slow_exec: SLOW_EXEC_TARGET is not set");
        std::process::exit(2);
    };
    std::thread::sleep(std::time::Duration::from_millis(ms));
    let c = |b: &[u8]| CString::new(b).expect("no NUL in an argument");
    let path = c(target.as_bytes());
    let argv: Vec<CString> = std::iter::once(path.clone())
        .chain(std::env::args_os().skip(1).map(|a| c(a.as_bytes())))
        .collect();
    let err = nix::unistd::execv(&path, &argv).err();
    eprintln!("slow_exec: executing {}: {err:?}", target.to_string_lossy());
    std::process::exit(127);
}
