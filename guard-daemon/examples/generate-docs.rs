//! Writes guard's shell completions (bash, zsh, fish) and man pages (`guard(1)`
//! and one per subcommand), generated from its clap definition, into
//! `DIR/completions` and `DIR/man`. `cargo xtask dist` runs it for the Debian
//! package: `cargo run --release -p guard-daemon --example generate-docs -- DIR`.
use std::{fs, io, path::PathBuf};

use clap_complete::Shell;

fn main() -> io::Result<()> {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: generate-docs DIR");
        std::process::exit(2);
    };
    let completions = dir.join("completions");
    let man = dir.join("man");
    for out in [&completions, &man] {
        // Stale pages of a removed subcommand must not be packaged.
        match fs::remove_dir_all(out) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => fs::create_dir_all(out)?,
        }
    }
    let mut command = guard_daemon::cli::command();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = clap_complete::generate_to(shell, &mut command, "guard", &completions)?;
        println!("{}", path.display());
    }
    clap_mangen::generate_to(guard_daemon::cli::command(), &man)?;
    for entry in fs::read_dir(&man)? {
        println!("{}", entry?.path().display());
    }
    Ok(())
}
