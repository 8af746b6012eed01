//! `watchd --config FILE`: ftkit's per-host daemon, in the foreground.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use watchd::config::Config;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Supervise programs: crash and hang detection, restart policies, escalation.
#[derive(Debug, Parser)]
#[command(name = "watchd", version)]
struct Args {
    /// The configuration file (TOML).
    #[arg(short, long, env = "WATCHD_CONFIG")]
    config: PathBuf,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Only check the configuration and exit (0 valid, 2 invalid).
    #[arg(long)]
    check: bool,
}

/// glibc hands freed heap memory back to the kernel as soon as the top of the heap holds more
/// than a dynamic threshold, and takes it back page by page (each page zeroed) on the next
/// burst: with the replication stream's frames of several MiB that churn cost the backup about a
/// sixth of its CPU. watchd keeps up to this much freed memory for reuse instead.
const MALLOC_KEEP_FREED: i32 = 64 << 20;
/// Allocations below this come from the heap (reused) rather than from a fresh `mmap` each.
const MALLOC_MMAP_THRESHOLD: i32 = 32 << 20;

fn tune_malloc() {
    // SAFETY: mallopt only changes allocator parameters; it is called before any other thread
    // exists, with parameters glibc documents, and a refusal (return 0) only keeps the defaults.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, MALLOC_KEEP_FREED);
    }
}

fn main() -> ExitCode {
    tune_malloc();
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("WATCHD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("watchd: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!(
            "{}: valid ({} services)",
            args.config.display(),
            config.services.len()
        );
        return ExitCode::SUCCESS;
    }
    let options = watchd::daemon::Options {
        test_hooks: std::env::var("WATCHD_TEST_HOOKS").is_ok_and(|v| v == "1"),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("watchd")
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("watchd: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(watchd::daemon::run(args.config, config, options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("watchd: {e:#}");
            ExitCode::from(2)
        }
    }
}
