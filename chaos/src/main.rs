//! `rvol-chaos`: a replicated volume under random faults on every layer
//! for as long as asked, its clients' history checked at the end. See
//! `scripts/chaos.sh` and docs/chaos.md.
//!
//! Exit status: 0 when every check passed, 1 on a violation or a finding
//! (printed with the seed and the fault schedule to replay it), 2 when
//! the soak itself could not run.

mod check;
mod history;
mod lab;
mod nbd;
mod rng;
mod schedule;
mod soak;
mod system;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use schedule::Fault;

#[derive(Parser)]
#[command(about = "Run an rvol volume under random faults and check its clients' history")]
struct Args {
    /// Seeds the schedule and the workload (default: the clock).
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 2.0)]
    minutes: f64,
    /// The faults and operations to draw from (default: all).
    #[arg(long, value_delimiter = ',', value_enum)]
    faults: Vec<Fault>,
    #[arg(long, default_value_t = 3)]
    clients: u32,
    /// 4 KiB blocks the clients write (the volume starts 4 times larger).
    #[arg(long, default_value_t = 4096)]
    blocks: u64,
    /// Faults at once at most (operations aside).
    #[arg(long, default_value_t = 2)]
    max_faults: usize,
    /// Lift every fault, wait for health, read everything and scrub this
    /// often (and at the end).
    #[arg(long, default_value_t = 10.0)]
    checkpoint_minutes: f64,
    /// The run's directory (logs, backups, replica disks); kept on failure.
    #[arg(long)]
    work: Option<PathBuf>,
    /// The rvol binary (default: beside this one).
    #[arg(long)]
    rvol: Option<PathBuf>,
    /// Passed to every engine (e.g. --rebuild-rate-mib 50).
    #[arg(long, allow_hyphen_values = true, num_args = 1)]
    engine_arg: Vec<String>,
    /// Print the schedule the seed makes and exit.
    #[arg(long)]
    plan: bool,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let faults = if a.faults.is_empty() {
        Fault::ALL.to_vec()
    } else {
        a.faults.clone()
    };
    let seconds = a.minutes * 60.0;
    let plan = schedule::plan(seed, seconds, &faults);
    if a.plan {
        for p in &plan {
            println!(
                "{:8.3} s  {:16} hold {:5.2} s  pick {}",
                p.at,
                p.fault.name(),
                p.hold,
                p.pick
            );
        }
        return ExitCode::SUCCESS;
    }
    let work = a
        .work
        .unwrap_or_else(|| std::env::temp_dir().join(format!("rvol-chaos-{seed}")));
    let rvol = a.rvol.unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("rvol")))
            .unwrap_or_else(|| PathBuf::from("rvol"))
    });
    println!(
        "chaos: seed {seed}, {:.1} minutes, {} clients, {} blocks, faults: {}; logs in {}",
        a.minutes,
        a.clients,
        a.blocks,
        faults
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(","),
        work.display()
    );
    let cfg = soak::Config {
        seed,
        seconds,
        clients: a.clients,
        blocks: a.blocks,
        work: work.clone(),
        rvol,
        checkpoint_seconds: a.checkpoint_minutes * 60.0,
        max_faults: a.max_faults,
        engine_args: a.engine_arg,
    };
    let summary = match soak::run(cfg, &plan) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("chaos: the soak could not run: {e:#}\nchaos: replay with --seed {seed}; logs in {}", work.display());
            return ExitCode::from(2);
        }
    };
    print_summary(&summary);
    let _ = std::fs::write(
        work.join("summary.json"),
        serde_json::to_string_pretty(&summary).unwrap_or_default(),
    );
    if summary.violations.is_empty() && summary.findings.is_empty() {
        println!("chaos: PASSED (seed {seed})");
        let _ = std::fs::remove_dir_all(work.join("backups"));
        return ExitCode::SUCCESS;
    }
    println!(
        "chaos: FAILED (seed {seed}); replay: scripts/chaos.sh --seed {seed} --minutes {}",
        a.minutes
    );
    let first = summary.violations.first().cloned().unwrap_or_default();
    println!(
        "chaos: the schedule up to the first failure ({}):",
        work.join("soak.log").display()
    );
    let until: f64 = first
        .strip_prefix("at ")
        .and_then(|r| r.split(' ').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or(seconds);
    for p in plan.iter().take_while(|p| p.at <= until) {
        println!(
            "  {:8.3} s  {:16} hold {:5.2} s",
            p.at,
            p.fault.name(),
            p.hold
        );
    }
    for v in summary.violations.iter().take(10) {
        println!("chaos: VIOLATION {v}");
    }
    for f in &summary.findings {
        println!("chaos: FINDING {f}");
    }
    println!("chaos: history in {}", work.join("history.json").display());
    ExitCode::from(1)
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(((s.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

fn print_summary(s: &soak::Summary) {
    println!("chaos: operations:");
    for (k, n) in &s.operations {
        println!("  {k:22} {n}");
    }
    println!("chaos: faults (injected, skipped; seconds from lifting to healthy p50/p99/max; MiB rebuilt mean):");
    for f in Fault::ALL {
        let name = f.name();
        let r = s.recovery.get(&name).cloned().unwrap_or_default();
        let b = s.rebuilt_bytes.get(&name).cloned().unwrap_or_default();
        let mean = b.iter().sum::<u64>() as f64 / b.len().max(1) as f64 / (1 << 20) as f64;
        println!(
            "  {name:16} {:4} {:4}   {:6.1} {:6.1} {:6.1}   {mean:7.1}",
            s.injected.get(&name).unwrap_or(&0),
            s.skipped.get(&name).unwrap_or(&0),
            percentile(&r, 0.5),
            percentile(&r, 0.99),
            r.iter().copied().fold(0.0, f64::max),
        );
    }
    println!(
        "chaos: checked {} block reads, {} snapshot blocks in {} snapshots, {} MiB of replicas compared, {} scrubs, {} engines",
        s.block_reads_checked,
        s.snapshot_blocks_checked,
        s.snapshots_checked,
        s.replica_bytes_compared >> 20,
        s.scrubs,
        s.engines
    );
}
