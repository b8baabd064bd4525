fn main() -> std::process::ExitCode {
    hall::cli::main()
}
