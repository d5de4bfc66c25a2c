fn main() {
    std::process::exit(guard_daemon::cli::main());
}
