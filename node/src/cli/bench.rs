//! `dynakv bench`: YCSB-style workloads against a cluster.

use std::process::ExitCode;

use clap::Args;

#[derive(Args, Debug)]
pub struct BenchArgs {}

pub async fn run(_args: BenchArgs) -> ExitCode {
    eprintln!("error: dynakv bench is not available in this build");
    ExitCode::FAILURE
}
