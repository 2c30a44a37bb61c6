#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    vncbroker::cli::main()
}
