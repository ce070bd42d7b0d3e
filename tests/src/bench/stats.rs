//! The arithmetic of reporting: a [`Spread`] (median, min, max) over the
//! rounds of a figure, nearest-rank quantiles of durations, merging the
//! reports of the loads that run side by side, and formatting durations and
//! ratios for the tables. No I/O.

use std::fmt;
use std::time::Duration;

use crate::load::{Counts, LoadReport};

/// Median, min and max of one figure over several rounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    /// The median (the mean of the two middle values for an even count).
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
}

impl Spread {
    /// The spread of `values`; `None` when empty or when any value is NaN.
    pub fn of(values: &[f64]) -> Option<Spread> {
        if values.is_empty() || values.iter().any(|v| v.is_nan()) {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: sorted[0],
            max: sorted[n - 1],
        })
    }

    /// The spread of durations, in seconds.
    pub fn of_durations(values: &[Duration]) -> Option<Spread> {
        let secs: Vec<f64> = values.iter().map(Duration::as_secs_f64).collect();
        Spread::of(&secs)
    }

    /// Writes the spread as `median (min–max)` with `unit` formatting each.
    pub fn show(&self, unit: fn(f64) -> String) -> String {
        if self.min == self.max {
            unit(self.median)
        } else {
            format!(
                "{} ({}–{})",
                unit(self.median),
                unit(self.min),
                unit(self.max)
            )
        }
    }
}

/// The value below which a fraction `q` of `sorted` falls (nearest rank,
/// as the load client computes its own quantiles).
pub fn quantile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// `seconds` as a short duration: `412µs`, `3.1ms`, `205ms`, `1.20s`.
pub fn secs(seconds: f64) -> String {
    let micros = seconds * 1e6;
    if micros < 1000.0 {
        format!("{micros:.0}µs")
    } else if micros < 10_000.0 {
        format!("{:.1}ms", micros / 1000.0)
    } else if micros < 1_000_000.0 {
        format!("{:.0}ms", micros / 1000.0)
    } else {
        format!("{seconds:.2}s")
    }
}

/// A duration as [`secs`] writes it.
pub fn dur(d: Duration) -> String {
    secs(d.as_secs_f64())
}

/// A ratio with two decimals.
pub fn ratio(r: f64) -> String {
    format!("{r:.2}")
}

/// One report for loads that ran side by side against the same server:
/// counts, latencies, generations, connections and details added up;
/// `elapsed` is the longest.
pub fn merge(reports: impl IntoIterator<Item = LoadReport>) -> LoadReport {
    let mut all = LoadReport::default();
    for report in reports {
        let c = report.counts;
        let a = all.counts;
        all.counts = Counts {
            ok: a.ok + c.ok,
            retried: a.retried + c.retried,
            refused: a.refused + c.refused,
            connect_error: a.connect_error + c.connect_error,
            reset: a.reset + c.reset,
            truncated: a.truncated + c.truncated,
            timeout: a.timeout + c.timeout,
            bad_status: a.bad_status + c.bad_status,
            malformed: a.malformed + c.malformed,
        };
        all.latencies.extend(report.latencies);
        for (generation, n) in report.generations {
            *all.generations.entry(generation).or_insert(0) += n;
        }
        all.without_generation += report.without_generation;
        all.connections += report.connections;
        all.failures.extend(report.failures);
        all.retries.extend(report.retries);
        all.elapsed = all.elapsed.max(report.elapsed);
    }
    all
}

/// A plain text table: a header row, then rows, columns padded to their
/// widest cell; the first column is left-aligned, the others right-aligned.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    /// Adds a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                let pad = widths[c] - cell.chars().count();
                if c == 0 {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad));
                } else {
                    line.push_str("  ");
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                }
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_the_middle() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of(&[1.0, 2.0, 4.0, 3.0]).unwrap().median, 2.5);
        assert_eq!(Spread::of(&[]), None);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(secs(0.000_412), "412µs");
        assert_eq!(secs(0.003_14), "3.1ms");
        assert_eq!(secs(0.205), "205ms");
        assert_eq!(secs(1.2), "1.20s");
    }

    #[test]
    fn merged_reports_add_up() {
        let mut a = LoadReport::default();
        a.counts.ok = 2;
        a.latencies = vec![Duration::from_millis(1); 2];
        let mut b = LoadReport::default();
        b.counts.ok = 1;
        b.counts.refused = 4;
        b.latencies = vec![Duration::from_millis(2)];
        let m = merge([a, b]);
        assert_eq!(m.counts.total(), 7);
        assert_eq!(m.counts.failed(), 4);
        assert_eq!(m.latencies.len(), 3);
    }
}
