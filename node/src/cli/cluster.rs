//! `dynakv cluster join|weight|leave|remove`: membership change for people, over the Admin
//! service. Every command is idempotent (running it again after an error or a timeout is safe);
//! `--wait` (always on for `join`, which ramps in steps) follows the ring change with a progress
//! bar on a terminal, or plain progress lines otherwise, until it is done.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde_json::json;

use super::client::{self, ClientError, Conn};
use super::{ClientArgs, OutputFormat};
use crate::proto::admin_client::AdminClient;
use crate::proto::{
    ClusterStatusRequest, ClusterStatusResponse, LeaveRequest, Member, RemoveRequest,
    SetWeightRequest,
};

#[derive(Args, Debug)]
pub struct WeightArgs {
    /// The member (node id).
    pub node: String,
    /// Its new weight: 0..=1000, 100 normal, 0 owns nothing.
    pub weight: u32,
    /// Wait until the ring change is done, showing its progress.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub wait_opts: WaitArgs,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug)]
pub struct JoinArgs {
    /// The member (a node started with --seed, at weight 0).
    pub node: String,
    /// The weight to ramp it up to.
    #[arg(long, default_value_t = 100)]
    pub weight: u32,
    /// Weight added per step; each step's handoff finishes before the next starts.
    #[arg(long, default_value_t = 25)]
    pub step: u32,
    #[command(flatten)]
    pub wait_opts: WaitArgs,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// The member (node id).
    pub node: String,
    /// Wait until it is done, showing the progress.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub wait_opts: WaitArgs,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug, Clone)]
pub struct WaitArgs {
    /// Give up waiting after this many seconds (the change goes on; exit code 5).
    #[arg(long, default_value_t = 3600)]
    pub wait_timeout_s: u64,
}

/// What a wait waits for.
enum Goal<'a> {
    /// The member at this committed weight, its change done.
    Weight(&'a str, u32),
    /// The member left.
    Left(&'a str),
    /// The member removed.
    Removed(&'a str),
}

impl Goal<'_> {
    fn reached(&self, s: &ClusterStatusResponse) -> bool {
        let member = |id: &str| s.members.iter().find(|m| m.id == id);
        let settled = |id: &str| {
            s.rebalance
                .as_ref()
                .is_none_or(|r| !r.active || r.node != id)
        };
        match self {
            Goal::Weight(id, w) => {
                member(id).is_some_and(|m| m.weight == *w && m.target_weight == *w) && settled(id)
            }
            Goal::Left(id) => member(id).is_some_and(|m| m.lifecycle == "left"),
            Goal::Removed(id) => member(id).is_none_or(|m| m.lifecycle == "removed"),
        }
    }
}

async fn admin(args: &ClientArgs) -> Result<AdminClient<Conn>, ClientError> {
    let (channel, _) = client::connect_args(args).await?;
    Ok(AdminClient::new(channel))
}

fn fail(format: OutputFormat, e: ClientError) -> ExitCode {
    match format {
        OutputFormat::Json => println!(
            "{}",
            json!({ "error": { "code": client::code_name(e.code), "message": e.message } })
        ),
        OutputFormat::Text => eprintln!("error: {}: {}", client::code_name(e.code), e.message),
    }
    ExitCode::from(e.exit_code())
}

pub async fn weight(args: WeightArgs) -> ExitCode {
    let format = args.client.output;
    let result = async {
        let mut client = admin(&args.client).await?;
        let r = client
            .set_weight(SetWeightRequest {
                node: args.node.clone(),
                weight: args.weight,
            })
            .await?
            .into_inner();
        announce(format, &r.message, r.changed, !args.wait);
        if args.wait {
            let s = wait(
                &mut client,
                Goal::Weight(&args.node, args.weight),
                format,
                &args.wait_opts,
            )
            .await?;
            done(format, &s);
        }
        Ok::<_, ClientError>(())
    }
    .await;
    result.map_or_else(|e| fail(format, e), |()| ExitCode::SUCCESS)
}

pub async fn join(args: JoinArgs) -> ExitCode {
    let format = args.client.output;
    if args.step == 0 {
        return fail(format, ClientError::invalid("--step must be above 0"));
    }
    let result = async {
        let mut client = admin(&args.client).await?;
        let status = client
            .cluster_status(ClusterStatusRequest {})
            .await?
            .into_inner();
        let Some(member) = status.members.iter().find(|m| m.id == args.node) else {
            return Err(ClientError::invalid(format!(
                "{} is not a member the cluster knows: start it with --seed pointing at a node \
                 of the cluster first",
                args.node
            )));
        };
        let mut at = member.weight;
        let mut last = status;
        for weight in ramp(at, args.weight, args.step) {
            let r = client
                .set_weight(SetWeightRequest {
                    node: args.node.clone(),
                    weight,
                })
                .await?
                .into_inner();
            announce(
                format,
                &format!("step {at} -> {weight}: {}", r.message),
                r.changed,
                false,
            );
            last = wait(
                &mut client,
                Goal::Weight(&args.node, weight),
                format,
                &args.wait_opts,
            )
            .await?;
            at = weight;
        }
        done(format, &last);
        Ok::<_, ClientError>(())
    }
    .await;
    result.map_or_else(|e| fail(format, e), |()| ExitCode::SUCCESS)
}

/// The weights a ramp from `from` to `to` goes through, `step` at a time (the last one `to`).
pub fn ramp(from: u32, to: u32, step: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut w = from;
    while w != to {
        w = if to > w {
            w.saturating_add(step).min(to)
        } else {
            w.saturating_sub(step).max(to)
        };
        out.push(w);
    }
    if out.is_empty() {
        out.push(to);
    }
    out
}

pub async fn leave(args: NodeArgs) -> ExitCode {
    let format = args.client.output;
    let result = async {
        let mut client = admin(&args.client).await?;
        let r = client
            .leave(LeaveRequest {
                node: args.node.clone(),
            })
            .await?
            .into_inner();
        announce(format, &r.message, r.changed, !args.wait);
        if args.wait {
            let s = wait(&mut client, Goal::Left(&args.node), format, &args.wait_opts).await?;
            done(format, &s);
        }
        Ok::<_, ClientError>(())
    }
    .await;
    result.map_or_else(|e| fail(format, e), |()| ExitCode::SUCCESS)
}

pub async fn remove(args: NodeArgs) -> ExitCode {
    let format = args.client.output;
    let result = async {
        let mut client = admin(&args.client).await?;
        let r = client
            .remove(RemoveRequest {
                node: args.node.clone(),
            })
            .await?
            .into_inner();
        announce(format, &r.message, r.changed, !args.wait);
        if args.wait {
            let s = wait(
                &mut client,
                Goal::Removed(&args.node),
                format,
                &args.wait_opts,
            )
            .await?;
            done(format, &s);
        }
        Ok::<_, ClientError>(())
    }
    .await;
    result.map_or_else(|e| fail(format, e), |()| ExitCode::SUCCESS)
}

/// Prints what a request did (as JSON when it is the command's whole output).
fn announce(format: OutputFormat, message: &str, changed: bool, final_output: bool) {
    match format {
        OutputFormat::Json if final_output => {
            println!("{}", json!({ "changed": changed, "message": message }))
        }
        OutputFormat::Json => {}
        OutputFormat::Text => println!("{message}"),
    }
}

fn done(format: OutputFormat, s: &ClusterStatusResponse) {
    match format {
        OutputFormat::Json => println!("{}", status_json(s, "")),
        OutputFormat::Text => println!("done: ring {:016x}", s.ring_version),
    }
}

/// Polls the cluster's status until `goal` holds, showing progress; the status that met it.
async fn wait(
    client: &mut AdminClient<Conn>,
    goal: Goal<'_>,
    format: OutputFormat,
    opts: &WaitArgs,
) -> Result<ClusterStatusResponse, ClientError> {
    use std::io::IsTerminal;
    let bar = (format == OutputFormat::Text && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {percent:>3}% {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(opts.wait_timeout_s);
    let mut last_line = String::new();
    let mut failures = 0;
    loop {
        let status = match client.cluster_status(ClusterStatusRequest {}).await {
            Ok(s) => {
                failures = 0;
                s.into_inner()
            }
            // The node we talk to may restart during a long change: keep trying for a while.
            Err(e) if crate::admin::retryable(&e) && failures < 30 => {
                failures += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if goal.reached(&status) {
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            return Ok(status);
        }
        let line = progress_line(&status);
        match &bar {
            Some(bar) => {
                if let Some(r) = status.rebalance.as_ref().filter(|r| r.active) {
                    bar.set_length(r.bytes_total.max(r.ranges_total).max(1));
                    bar.set_position(if r.bytes_total > 0 {
                        r.bytes_done
                    } else {
                        r.ranges_done
                    });
                }
                bar.set_message(line);
                bar.tick();
            }
            None if line != last_line && format == OutputFormat::Text => {
                eprintln!("{line}");
                last_line = line;
            }
            None => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ClientError {
                code: tonic::Code::DeadlineExceeded,
                message: format!(
                    "still not done after {} s (the change goes on): {}",
                    opts.wait_timeout_s,
                    progress_line(&status)
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One line on the change under way: what, phase, ranges, keys, bytes, rate, ETA, who it waits
/// for.
pub fn progress_line(s: &ClusterStatusResponse) -> String {
    let Some(r) = s.rebalance.as_ref().filter(|r| r.active) else {
        let queued = s
            .rebalance
            .as_ref()
            .map(|r| r.queued.join(", "))
            .unwrap_or_default();
        return if queued.is_empty() {
            "ring settled".to_string()
        } else {
            format!("ring settled; queued: {queued}")
        };
    };
    let mut line = format!(
        "{} {} {} -> {}: {}, ranges {}/{}, keys {}/{}, {}/{}",
        r.kind,
        r.node,
        r.from_weight,
        r.to_weight,
        r.phase,
        r.ranges_done,
        r.ranges_total,
        r.keys_done,
        r.keys_total,
        bytes(r.bytes_done),
        bytes(r.bytes_total),
    );
    if r.bytes_per_second > 0.0 {
        line.push_str(&format!(", {}/s", bytes(r.bytes_per_second as u64)));
    }
    if r.eta_seconds >= 0.0 {
        line.push_str(&format!(", ETA {:.0} s", r.eta_seconds));
    }
    if !r.waiting_for.is_empty() {
        line.push_str(&format!(", waiting for {}", r.waiting_for.join(", ")));
    }
    line
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn member_json(m: &Member) -> serde_json::Value {
    json!({
        "id": m.id,
        "address": m.address,
        "state": m.state,
        "lifecycle": m.lifecycle,
        "weight": m.weight,
        "target_weight": m.target_weight,
        "zone": if m.zone.is_empty() { serde_json::Value::Null } else { json!(m.zone) },
        "tokens": m.tokens,
        "primary_ownership": m.primary_ownership,
        "replica_ownership": m.replica_ownership,
        "metrics_url": m.metrics_url,
        "generation": m.generation,
    })
}

/// `cluster status -o json`, also the final output of a `--wait`.
pub fn status_json(s: &ClusterStatusResponse, endpoint: &str) -> serde_json::Value {
    let rebalance = s.rebalance.clone().unwrap_or_default();
    json!({
        "cluster_id": s.cluster_id,
        "node_id": s.node_id,
        "endpoint": endpoint,
        "replication_factor": s.replication_factor,
        "conflict_mode": s.conflict_mode,
        "ring_version": format!("{:016x}", s.ring_version),
        "vnodes_per_node": s.vnodes_per_node,
        "members": s.members.iter().map(member_json).collect::<Vec<_>>(),
        "rebalance": {
            "active": rebalance.active,
            "node": rebalance.node,
            "kind": rebalance.kind,
            "from_weight": rebalance.from_weight,
            "to_weight": rebalance.to_weight,
            "phase": rebalance.phase,
            "ring_versions": rebalance.ring_versions.iter().map(|v| format!("{v:016x}")).collect::<Vec<_>>(),
            "read_ring_version": format!("{:016x}", rebalance.read_ring_version),
            "ranges_total": rebalance.ranges_total,
            "ranges_done": rebalance.ranges_done,
            "keys_total": rebalance.keys_total,
            "keys_done": rebalance.keys_done,
            "bytes_total": rebalance.bytes_total,
            "bytes_done": rebalance.bytes_done,
            "bytes_per_second": rebalance.bytes_per_second,
            "eta_seconds": rebalance.eta_seconds,
            "waiting_for": rebalance.waiting_for,
            "queued": rebalance.queued,
            "transfers": rebalance.transfers.iter().map(|t| json!({
                "source": t.source,
                "target": t.target,
                "state": t.state,
                "ranges_total": t.ranges_total,
                "ranges_done": t.ranges_done,
                "keys_done": t.keys_done,
                "keys_total": t.keys_total,
                "bytes_done": t.bytes_done,
                "bytes_total": t.bytes_total,
                "bytes_per_second": t.bytes_per_second,
                "retries": t.retries,
            })).collect::<Vec<_>>(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ramp_goes_in_steps_and_ends_at_the_target() {
        assert_eq!(ramp(0, 100, 25), vec![25, 50, 75, 100]);
        assert_eq!(ramp(0, 100, 30), vec![30, 60, 90, 100]);
        assert_eq!(ramp(100, 0, 50), vec![50, 0]);
        assert_eq!(ramp(40, 40, 10), vec![40]);
    }

    #[test]
    fn byte_counts_read_like_a_person_wrote_them() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }
}
