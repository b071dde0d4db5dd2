use std::alloc::{GlobalAlloc, Layout};

use clap::Parser;
use tern_node::cli::{Cli, Command, run};
use tikv_jemallocator::Jemalloc;
use tracing_subscriber::EnvFilter;

/// The node allocates buffers on one thread and frees them on another
/// (entries composed by the cloud service and sent by the network threads,
/// events, frames); jemalloc does that with less CPU than the system
/// allocator (docs/architecture.md, "Allocator"; BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: Allocator = Allocator;

/// jemalloc, except that a zeroed block of medium size is zeroed with
/// `memset`.
///
/// Asked for a zeroed block of 16 KiB or more, jemalloc hands a reused
/// block's pages back to the kernel and lets them fault in again as
/// zeros. libp2p's Noise layer asks for a zeroed buffer for every frame
/// it decrypts, about every 16 KiB received, so a catch-up spent a tenth
/// of its time in page faults; `memset` of memory already mapped is far
/// cheaper. Blocks of [`MEMSET_BELOW`] and more still come from jemalloc
/// zeroed: they are rare, and a large table zeroed and never touched
/// costs no memory until it is used.
struct Allocator;

/// Zeroed blocks smaller than this are zeroed with `memset`.
const MEMSET_BELOW: usize = 256 * 1024;

// SAFETY: every method hands the layout to jemalloc unchanged, and
// `alloc_zeroed` zeroes exactly the `layout.size()` bytes jemalloc
// returned (a null pointer is returned as is).
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe { Jemalloc.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= MEMSET_BELOW {
            return unsafe { Jemalloc.alloc_zeroed(layout) };
        }
        let block = unsafe { Jemalloc.alloc(layout) };
        if !block.is_null() {
            unsafe { std::ptr::write_bytes(block, 0, layout.size()) };
        }
        block
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        unsafe { Jemalloc.dealloc(block, layout) }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        unsafe { Jemalloc.realloc(block, layout, new_size) }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_blocks_are_zero_where_freed_blocks_were_dirty() {
        for size in [
            1,
            100,
            16 * 1024,
            16 * 1024 + 28,
            200 * 1024,
            MEMSET_BELOW,
            1 << 20,
        ] {
            let layout = Layout::from_size_align(size, 8).unwrap();
            for _ in 0..4 {
                // SAFETY: the block is `layout.size()` bytes, freed with its layout.
                unsafe {
                    let dirty = ALLOCATOR.alloc(layout);
                    assert!(!dirty.is_null());
                    std::ptr::write_bytes(dirty, 0xA5, size);
                    ALLOCATOR.dealloc(dirty, layout);
                }
            }
            // SAFETY: as above; the block is read within its size.
            unsafe {
                let zeroed = ALLOCATOR.alloc_zeroed(layout);
                assert!(!zeroed.is_null());
                let bytes = std::slice::from_raw_parts(zeroed, size);
                assert!(
                    bytes.iter().all(|&b| b == 0),
                    "a zeroed block of {size} bytes"
                );
                ALLOCATOR.dealloc(zeroed, layout);
            }
        }
    }
}
