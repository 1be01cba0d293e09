//! The `snapq` binary: everything lives in the library (src/cli.rs).

fn main() -> std::process::ExitCode {
    snapq::cli::main()
}
