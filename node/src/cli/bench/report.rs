//! The result of a benchmark: a table for people, `-o json` for scripts (the JSON field names are
//! a contract of `scripts/bench-vs-etcd.sh`).

use std::fmt::{self, Write as _};

use serde::Serialize;

use super::workload::WorkloadArgs;

/// What was benchmarked, as the driver describes it.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    /// "dynakv", "etcd", ...
    pub driver: String,
    /// The endpoints the clients talked to.
    pub endpoints: String,
    /// gRPC connections shared by the client tasks.
    pub channels: usize,
    /// The consistency asked for, e.g. "r=quorum w=quorum" or "linearizable reads".
    pub consistency: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub target: Target,
    pub workload: &'static str,
    pub distribution: &'static str,
    pub keys: u64,
    pub value_size: usize,
    pub clients: usize,
    pub warmup_s: f64,
    pub seed: u64,
    /// Unix time (seconds) when the report was made.
    pub finished_unix_s: u64,
    pub load: Option<PhaseReport>,
    pub run: Option<PhaseReport>,
}

/// One phase: `load` (every key written once) or `run` (the workload, after the warm-up).
#[derive(Clone, Debug, Serialize)]
pub struct PhaseReport {
    pub phase: &'static str,
    /// Measured time: first measured operation started to last one answered.
    pub elapsed_s: f64,
    /// Operations measured, errors included.
    pub ops: u64,
    pub errors: u64,
    /// Successful operations (ok and not found) per second.
    pub ops_per_s: f64,
    /// One row per operation and outcome.
    pub by_op: Vec<OpReport>,
    pub error_codes: Vec<ErrorCount>,
}

#[derive(Clone, Debug, Serialize)]
pub struct OpReport {
    /// "read", "update", "cart" or "insert".
    pub op: &'static str,
    /// "ok", "not_found" or "error".
    pub outcome: &'static str,
    pub count: u64,
    pub ops_per_s: f64,
    pub latency_ms: Latency,
}

/// Latency percentiles in milliseconds (HdrHistogram, 3 significant digits, 1 us resolution).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ErrorCount {
    pub op: &'static str,
    /// gRPC code name, e.g. "UNAVAILABLE".
    pub code: &'static str,
    pub count: u64,
    /// The message of the first such error, to say why.
    pub first_message: String,
}

impl Report {
    pub fn new(args: &WorkloadArgs, target: Target) -> Report {
        Report {
            target,
            workload: args.workload.name(),
            distribution: args.distribution.name(),
            keys: args.keys,
            value_size: args.value_size,
            clients: args.clients,
            warmup_s: args.warmup.as_secs_f64(),
            seed: args.seed,
            finished_unix_s: 0,
            load: None,
            run: None,
        }
    }

    /// Whether every measured operation failed (the exit code then says so).
    pub fn all_failed(&self) -> bool {
        [&self.load, &self.run]
            .into_iter()
            .flatten()
            .any(|p| p.ops > 0 && p.errors == p.ops)
    }

    /// The most frequent error code, if any operation failed.
    pub fn main_error(&self) -> Option<&ErrorCount> {
        [&self.load, &self.run]
            .into_iter()
            .flatten()
            .flat_map(|p| p.error_codes.iter())
            .max_by_key(|e| e.count)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} bench: workload {}, {} keys ({}), {}-byte values, {} clients over {} connections",
            self.target.driver,
            self.workload,
            self.keys,
            self.distribution,
            self.value_size,
            self.clients,
            self.target.channels,
        )?;
        writeln!(
            f,
            "target: {}; consistency: {}",
            self.target.endpoints, self.target.consistency
        )?;
        for phase in [&self.load, &self.run].into_iter().flatten() {
            writeln!(f)?;
            write!(f, "{phase}")?;
        }
        Ok(())
    }
}

impl fmt::Display for PhaseReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} ops in {:.2} s, {:.0} ok ops/s, {} errors",
            self.phase, self.ops, self.elapsed_s, self.ops_per_s, self.errors
        )?;
        writeln!(
            f,
            "  {:<7} {:<9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "op",
            "outcome",
            "count",
            "ops/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "mean ms"
        )?;
        for row in &self.by_op {
            let l = &row.latency_ms;
            writeln!(
                f,
                "  {:<7} {:<9} {:>9} {:>9.0} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
                row.op,
                row.outcome,
                row.count,
                row.ops_per_s,
                ms(l.p50),
                ms(l.p90),
                ms(l.p99),
                ms(l.p999),
                ms(l.max),
                ms(l.mean)
            )?;
        }
        if !self.error_codes.is_empty() {
            writeln!(f, "  errors by code:")?;
            for e in &self.error_codes {
                let mut message = e.first_message.clone();
                if message.len() > 160 {
                    let mut cut = 160;
                    while !message.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    message.truncate(cut);
                    message.push_str("...");
                }
                writeln!(
                    f,
                    "    {:<7} {:<18} {:>9}  first: {message}",
                    e.op, e.code, e.count
                )?;
            }
        }
        Ok(())
    }
}

/// Milliseconds with 3 significant digits where it matters ("0.412", "12.3", "1234").
fn ms(v: f64) -> String {
    let mut s = String::new();
    let _ = if v < 10.0 {
        write!(s, "{v:.3}")
    } else if v < 100.0 {
        write!(s, "{v:.2}")
    } else if v < 1000.0 {
        write!(s, "{v:.1}")
    } else {
        write!(s, "{v:.0}")
    };
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase() -> PhaseReport {
        PhaseReport {
            phase: "run",
            elapsed_s: 10.0,
            ops: 1003,
            errors: 3,
            ops_per_s: 100.0,
            by_op: vec![OpReport {
                op: "update",
                outcome: "ok",
                count: 1000,
                ops_per_s: 100.0,
                latency_ms: Latency {
                    p50: 1.5,
                    p90: 2.0,
                    p99: 12.25,
                    p999: 130.0,
                    max: 1500.0,
                    mean: 1.7,
                },
            }],
            error_codes: vec![ErrorCount {
                op: "update",
                code: "UNAVAILABLE",
                count: 3,
                first_message: "needed W=2, got 1 ack".into(),
            }],
        }
    }

    #[test]
    fn table_shows_percentiles_and_errors_by_code() {
        let text = phase().to_string();
        assert!(
            text.contains("run: 1003 ops in 10.00 s, 100 ok ops/s, 3 errors"),
            "{text}"
        );
        assert!(text.contains("1.500"), "{text}");
        assert!(text.contains("12.25"), "{text}");
        assert!(text.contains("130.0"), "{text}");
        assert!(text.contains("UNAVAILABLE"), "{text}");
        assert!(text.contains("needed W=2"), "{text}");
    }

    #[test]
    fn json_names_the_fields_the_scripts_read() {
        let v: serde_json::Value = serde_json::to_value(phase()).unwrap();
        assert_eq!(v["ops_per_s"], 100.0);
        assert_eq!(v["by_op"][0]["latency_ms"]["p999"], 130.0);
        assert_eq!(v["error_codes"][0]["code"], "UNAVAILABLE");
    }
}
