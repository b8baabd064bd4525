/// mimalloc instead of glibc malloc: fewer instructions per decision and more decisions per
/// second at 64 connections (`hall::memory`, docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tune mimalloc before it initializes: its own constructor runs at priority 101 and reads
/// its options then, before `main` (the Rust runtime allocates first). Priority 100 runs
/// before it. See `hall::memory::configure`.
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array.00100"]
static CONFIGURE_ALLOCATOR: extern "C" fn() = {
    extern "C" fn configure() {
        hall::memory::configure();
    }
    configure
};

fn main() -> std::process::ExitCode {
    hall::cli::main()
}
