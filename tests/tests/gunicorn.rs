//! A server nobody on the project wrote: gunicorn, the Python WSGI server,
//! which takes systemd's `LISTEN_FDS` and says `READY=1` on its own. Reloads
//! under load must lose nothing, exactly as with our own workers.
//!
//! gunicorn comes from PyPI; `.ci/run` installs it into `target/ci-venv`.
//! Without it this test says so and does nothing: the rest of the suite
//! needs only the standard library's Python.

use std::path::PathBuf;

use baton_tests::harness::{self, Baton, Load};

/// gunicorn from `.ci/run`'s virtualenv, else from `PATH`.
fn gunicorn() -> Option<PathBuf> {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ci-venv/bin/gunicorn");
    if venv.exists() {
        return Some(venv);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("gunicorn"))
        .find(|candidate| candidate.exists())
}

const APP: &str = r#"
import json, os, time

def app(environ, start_response):
    if environ["PATH_INFO"] == "/slow":
        ms = int(environ.get("QUERY_STRING", "ms=0").split("=")[1])
        time.sleep(ms / 1000)
    body = json.dumps({
        "generation": int(os.environ.get("BATON_GENERATION", "0")),
        "pid": os.getpid(),
    }).encode()
    start_response("200 OK", [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
    ])
    return [body]
"#;

#[test]
fn gunicorn_reloads_under_load_with_nothing_lost() {
    let found = gunicorn();
    if !harness::prerequisite(
        "gunicorn (.ci/run installs it; or pip install gunicorn)",
        found.is_some(),
    ) {
        return;
    }
    let Some(gunicorn) = found else { return };
    let builder = Baton::builder();
    std::fs::write(builder.dir().join("app.py"), APP).expect("writing the WSGI app");
    let chdir = builder.dir().to_path_buf();
    let baton = builder
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .worker([
            gunicorn.as_os_str(),
            "--workers".as_ref(),
            "2".as_ref(),
            "--threads".as_ref(),
            "4".as_ref(),
            "--graceful-timeout".as_ref(),
            "20".as_ref(),
            "--chdir".as_ref(),
            chdir.as_os_str(),
            "app:app".as_ref(),
        ])
        .start();
    let load = Load::http(&baton, "http", |c| {
        c.concurrency = 8;
        c.keep_alive_fraction = 0.5;
        c.slow_fraction = 0.05;
        c.slow_ms = 300;
    });
    load.wait_ok(50);
    for generation in 2..=11 {
        assert_eq!(baton.reload_ok(), generation);
        load.wait_ok(30);
    }
    let report = load.finish();
    eprintln!("{report}");
    report.assert_no_failures();
    assert!(report.generations.len() >= 5, "{report}");
    baton.wait_settled();
}
