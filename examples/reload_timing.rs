//! Where a reload's time goes, on a policy set on disk, with no other load.
//!
//! `cargo run --release --example reload_timing -- DIR [ROUNDS]`, where DIR holds `registry/`
//! and `policies/` (as `gen_policies` writes them). Each round appends a comment to the first
//! `*-rules.toml` file (as `bench/load.sh` does), then times: the notify event and the
//! debounce, a reload that reuses the unchanged files (what the daemon does), a cold load (what
//! `hall check` and startup do), and dropping a snapshot. The file is restored at the end.
//! Per-stage times (read, parse, validate, version, compile, lint) are the `hall::load`
//! debug events, printed to stderr.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hall::load::{load_dirs, watch, Reloader};

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next() else {
        eprintln!("usage: reload_timing DIR [ROUNDS]");
        std::process::exit(2);
    };
    let rounds: usize = args.next().and_then(|r| r.parse().ok()).unwrap_or(5);
    tracing_subscriber::fmt()
        .with_env_filter("hall::load=debug")
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .init();
    let dir = PathBuf::from(dir);
    let (reg, pol) = (dir.join("registry"), dir.join("policies"));
    let file = first_rules_file(&pol);
    let original = std::fs::read_to_string(&file).expect("read the rules file");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let _watcher = watch::watch(&[reg.clone(), pol.clone()], tx).expect("watch");

    let mut reloader = Reloader::default();
    reloader.load_dirs(&reg, &pol).expect("first load");
    for k in 0..rounds {
        let text = format!("{original}\n# reload {k}\n");
        let t0 = Instant::now();
        std::fs::write(&file, text).expect("write");
        let (event, quiet) = rt.block_on(async {
            rx.recv().await;
            let event = t0.elapsed();
            // The write's own later events fall inside the quiet window, as in the daemon.
            watch::settle(&mut rx, watch::QUIET).await;
            (event, t0.elapsed())
        });
        let t = Instant::now();
        let warm = reloader.load_dirs(&reg, &pol).expect("warm reload");
        let warm_ms = t.elapsed();
        let t = Instant::now();
        let cold = load_dirs(&reg, &pol).expect("cold load");
        let cold_ms = t.elapsed();
        assert_eq!(warm.snapshot.version, cold.snapshot.version);
        let t = Instant::now();
        drop(cold);
        let drop_ms = t.elapsed();
        drop(warm);
        println!(
            "round {k}: notify {} debounce done {} warm reload {} (edit→swap ≈ {}) cold load {} snapshot drop {}",
            ms(event),
            ms(quiet),
            ms(warm_ms),
            ms(quiet + warm_ms),
            ms(cold_ms),
            ms(drop_ms)
        );
        std::thread::sleep(Duration::from_millis(200));
        while rx.try_recv().is_ok() {}
    }
    std::fs::write(&file, original).expect("restore the rules file");
}

fn first_rules_file(pol: &Path) -> PathBuf {
    let mut files: Vec<PathBuf> = std::fs::read_dir(pol)
        .expect("read policies dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with("-rules.toml"))
        .collect();
    files.sort();
    files.into_iter().next().expect("a *-rules.toml file")
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}
