//! The `tokenkeep` command: see `tokenkeep --help` and the README.

fn main() -> std::process::ExitCode {
    tokenkeep_cli::cli::main()
}
