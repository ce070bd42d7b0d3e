//! The text form of `baton status`: one line per generation, listener and
//! counter, for a person at a terminal (`--json` is for programs). This
//! module only formats; it never asks the supervisor anything.

use crate::api::Status;

/// The text form of `baton status`.
pub fn describe(s: &Status) -> String {
    let mut out = String::new();
    let serving = match s.generation {
        Some(n) => format!("generation {n} serving"),
        None => "no generation serving".to_owned(),
    };
    out.push_str(&format!("baton {} (pid {}): {serving}\n", s.version, s.pid));
    for l in &s.listeners {
        out.push_str(&format!("  listener {}: {}\n", l.name, l.address));
    }
    for g in &s.generations {
        let status = g
            .status
            .as_ref()
            .map(|t| format!(" - {t}"))
            .unwrap_or_default();
        let state = serde_json::to_value(g.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let pid = g.pids.first().map_or("?".into(), |p| p.to_string());
        out.push_str(&format!(
            "  generation {}: {state} (pid {pid}, up {}ms){status}\n",
            g.generation, g.age_ms
        ));
    }
    if let Some(r) = &s.reloading {
        let step = serde_json::to_value(r.step)
            .ok()
            .and_then(|v| v.as_str().map(|s| s.replace('_', " ")))
            .unwrap_or_default();
        out.push_str(&format!(
            "  reloading to generation {}: {step} for {}ms\n",
            r.generation, r.ms
        ));
    }
    match &s.last_reload {
        Some(r) if r.ok => {
            let pause = r
                .accept_pause_ms
                .map(|ms| format!(", kept values handed over with {ms:.1}ms of accept pause"))
                .unwrap_or_default();
            out.push_str(&format!(
                "  last reload: generation {} ok in {}ms{pause}\n",
                r.generation, r.ms
            ))
        }
        Some(r) => out.push_str(&format!(
            "  last reload: generation {} FAILED after {}ms: {}\n",
            r.generation,
            r.ms,
            r.error.as_deref().unwrap_or("?")
        )),
        None => out.push_str("  last reload: none yet\n"),
    }
    if let Some(u) = &s.upgrading {
        out.push_str(&format!(
            "  upgrading to {}: {} for {}ms\n",
            u.binary, u.step, u.ms
        ));
    }
    let counts = format!("{} ok, {} failed", s.upgrades.ok, s.upgrades.failed);
    match &s.last_upgrade {
        Some(u) if u.ok => out.push_str(&format!(
            "  upgrades: {counts}; last: {} -> {} ok in {}ms ({})\n",
            u.from, u.to, u.ms, u.binary
        )),
        Some(u) => out.push_str(&format!(
            "  upgrades: {counts}; last: {} FAILED after {}ms: {}\n",
            u.binary,
            u.ms,
            u.error.as_deref().unwrap_or("?")
        )),
        None => out.push_str(&format!("  upgrades: {counts}\n")),
    }
    out
}
