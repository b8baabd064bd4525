//! Write a generated policy set to disk, for load tests and reload timing.
//!
//! `cargo run --release --example gen_policies -- N OUT_DIR` writes `OUT_DIR/registry` and
//! `OUT_DIR/policies` with N capabilities, N workers and about 10·N rules
//! (see `benches/support/generate.rs`).

#[path = "../benches/support/generate.rs"]
mod generate;

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(n), Some(out)) = (args.next(), args.next()) else {
        eprintln!("usage: gen_policies N OUT_DIR");
        std::process::exit(2);
    };
    let n: usize = n.parse().unwrap_or_else(|_| {
        eprintln!("N must be a number");
        std::process::exit(2)
    });
    let out = std::path::PathBuf::from(out);
    let (registry, policies) = generate::generate(n);
    for (dir, files) in [("registry", registry), ("policies", policies)] {
        let d = out.join(dir);
        std::fs::create_dir_all(&d).expect("create output dir");
        for s in files {
            let name = std::path::Path::new(&s.name)
                .file_name()
                .expect("file name")
                .to_owned();
            std::fs::write(d.join(name), s.text).expect("write file");
        }
    }
}
