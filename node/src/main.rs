//! `dynakv`: the node and the command-line tool.

use std::process::ExitCode;

use clap::Parser;
use dynakv_node::cli::{Cli, ClusterCommand, Command, bench, cluster, commands, dev};

// A node spends a tenth of its CPU in glibc malloc/free under load (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Ring(args) = cli.command {
        return commands::ring(args);
    }
    if let Command::Token(args) = cli.command {
        return commands::token(args);
    }
    if let Command::Cert(args) = cli.command {
        return commands::cert(args);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => match commands::serve(&args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            },
            Command::Dev(args) => dev::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Put(args) => commands::put(args).await,
            Command::Get(args) => commands::get(args).await,
            Command::Delete(args) => commands::delete(args).await,
            Command::Cluster {
                command: ClusterCommand::Status(args),
            } => commands::cluster_status(args).await,
            Command::Cluster {
                command: ClusterCommand::Roots(args),
            } => commands::cluster_roots(args).await,
            Command::Cluster {
                command: ClusterCommand::Join(args),
            } => cluster::join(args).await,
            Command::Cluster {
                command: ClusterCommand::Weight(args),
            } => cluster::weight(args).await,
            Command::Cluster {
                command: ClusterCommand::Leave(args),
            } => cluster::leave(args).await,
            Command::Cluster {
                command: ClusterCommand::Remove(args),
            } => cluster::remove(args).await,
            Command::Ring(_) | Command::Token(_) | Command::Cert(_) => ExitCode::SUCCESS,
        }
    })
}
