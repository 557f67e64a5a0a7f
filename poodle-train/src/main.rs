//! poodle-train: PooDLe pre-training on poodle-prep stores (the training loop is being
//! written; today it validates stores as the trainer will read them).

use anyhow::Result;
use clap::{Parser, Subcommand};
use poodle_common::store::PoodleStore;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "poodle-train",
    version,
    about = "PooDLe pre-training on poodle-prep stores"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Open stores as the trainer will and report pairs and flow groups.
    CheckStores { stores: Vec<PathBuf> },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::CheckStores { stores } => {
            let mut total = 0;
            for p in &stores {
                let s = PoodleStore::open(p)?;
                let groups: Vec<&str> = s.flow_groups.iter().map(|(g, _)| g.as_str()).collect();
                println!(
                    "{}: {} pairs, flow groups {:?}",
                    p.display(),
                    s.num_pairs(),
                    groups
                );
                total += s.num_pairs();
            }
            println!("{total} pairs in {} stores", stores.len());
        }
    }
    Ok(())
}
