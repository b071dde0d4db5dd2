use clap::Parser;
use tern_node::cli::{Cli, Command, run};
use tracing_subscriber::EnvFilter;

/// The node allocates buffers on one thread and frees them on another
/// (entries composed by the cloud service and sent by the network threads,
/// events, frames); jemalloc does that with less CPU than the system
/// allocator (docs/architecture.md, "Allocator"; BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main`. `thp:always` makes it zero a
/// large block with `memset` when asked for zeroed memory (libp2p's Noise
/// layer asks for a zeroed 64 KiB buffer for each frame it decrypts)
/// instead of returning the pages to the kernel and faulting them back in,
/// which cost a catch-up a tenth of its rate. `_RJEM_MALLOC_CONF` in the
/// environment still overrides it.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8; 11] = b"thp:always\0";

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One line, per the CLI contract; `--help` has the details.
            let text = e.render().to_string();
            let first = text.split("\n\n").next().unwrap_or(&text);
            eprintln!("{}", tern_node::api::one_line(first));
            std::process::exit(2);
        }
    };
    // The node logs at info by default; client commands only speak up for warnings.
    let default_filter = match cli.command {
        Command::Node(_) | Command::Testnet(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(cli)) {
        eprintln!("error: {}", tern_node::api::one_line(&format!("{e:#}")));
        std::process::exit(1);
    }
}
