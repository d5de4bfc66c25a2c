//! The files a run writes when it ends (`--report`, `--junit`,
//! `--summary-markdown`, `--record`, GitHub's step summary), opened before
//! the command starts: a path that cannot be written is found while the
//! command can still be left unrun, not after it has done its work.
use std::{
    fs::{File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use super::RunOptions;

/// One output file, open for writing.
struct Output {
    option: &'static str,
    path: PathBuf,
    file: File,
    /// Appended to (the step summary) rather than replaced.
    append: bool,
    /// Made by this run: removed again if the run never writes it (the
    /// command was not run), so a failed start leaves no empty reports.
    created: bool,
    written: bool,
}

/// Every output a run was asked for.
#[derive(Default)]
pub(super) struct Outputs {
    report: Option<Output>,
    junit: Option<Output>,
    summary_markdown: Option<Output>,
    record: Option<Output>,
    step_summary: Option<Output>,
}

impl Outputs {
    /// Opens every output file `options` names, and `$GITHUB_STEP_SUMMARY`
    /// on GitHub Actions. An existing file is not truncated until the run
    /// writes it. The error names the option, the path and why.
    pub(super) fn open(options: &RunOptions) -> Result<Outputs, String> {
        let open = |option, path: &Option<PathBuf>| {
            path.as_deref()
                .map(|path| Output::open(option, path, false))
                .transpose()
        };
        let step_summary = if std::env::var("GITHUB_ACTIONS").is_ok_and(|v| v == "true") {
            std::env::var_os("GITHUB_STEP_SUMMARY")
                .filter(|s| !s.is_empty())
                .map(|path| Output::open("$GITHUB_STEP_SUMMARY", Path::new(&path), true))
                .transpose()?
        } else {
            None
        };
        Ok(Outputs {
            report: open("--report", &options.report)?,
            junit: open("--junit", &options.junit)?,
            summary_markdown: open("--summary-markdown", &options.summary_markdown)?,
            record: open("--record", &options.record)?,
            step_summary,
        })
    }

    /// Writes each output the run asked for from `render` (given which one);
    /// returns whether every write succeeded, after naming each failure.
    pub(super) fn write_all(&mut self, render: impl Fn(Kind) -> Option<String>) -> bool {
        let mut all_written = true;
        for (kind, output) in [
            (Kind::StepSummary, &mut self.step_summary),
            (Kind::SummaryMarkdown, &mut self.summary_markdown),
            (Kind::Junit, &mut self.junit),
            (Kind::Report, &mut self.report),
            (Kind::Record, &mut self.record),
        ] {
            let (Some(output), Some(text)) = (output.as_mut(), render(kind)) else {
                continue;
            };
            if let Err(e) = output.write(&text) {
                eprintln!(
                    "guard: {} {}: writing: {e}",
                    output.option,
                    output.path.display()
                );
                all_written = false;
            }
        }
        all_written
    }
}

/// Which output [`Outputs::write_all`] asks the text of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Report,
    Junit,
    SummaryMarkdown,
    Record,
    /// `$GITHUB_STEP_SUMMARY` (appended to).
    StepSummary,
}

impl Output {
    fn open(option: &'static str, path: &Path, append: bool) -> Result<Output, String> {
        let open = |create_new: bool| {
            let mut options = OpenOptions::new();
            options
                .write(true)
                .append(append)
                // O_NONBLOCK: a FIFO without a reader fails at once (ENXIO)
                // instead of blocking the open until someone reads it.
                .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
                .mode(0o644);
            if create_new {
                options.create_new(true);
            }
            options.open(path)
        };
        let opened = match open(true) {
            Ok(file) => Ok((file, true)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => open(false).map(|f| (f, false)),
            Err(e) => Err(e),
        };
        let (file, created) = opened.map_err(|e| {
            let why = if e.raw_os_error() == Some(libc::ENXIO) {
                "a FIFO with no reader".to_owned()
            } else {
                e.to_string()
            };
            format!("{option} {}: cannot write: {why}", path.display())
        })?;
        // Writes at the end of the run block as any write does (a pipe
        // being read slowly); only the open had to be non-blocking.
        let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL)
            .map(nix::fcntl::OFlag::from_bits_truncate)
            .and_then(|flags| {
                nix::fcntl::fcntl(
                    &file,
                    nix::fcntl::FcntlArg::F_SETFL(flags - nix::fcntl::OFlag::O_NONBLOCK),
                )
            });
        flags.map_err(|e| format!("{option} {}: cannot write: {e}", path.display()))?;
        Ok(Output {
            option,
            path: path.to_owned(),
            file,
            append,
            created,
            written: false,
        })
    }

    fn write(&mut self, text: &str) -> io::Result<()> {
        self.written = true;
        // Opened without O_TRUNC so that a run that never starts leaves an
        // existing file as it was; truncate now (regular files only: a
        // pipe or /dev/stdout cannot be, and need not be).
        if !self.append && self.file.metadata()?.is_file() {
            self.file.set_len(0)?;
        }
        self.file.write_all(text.as_bytes())?;
        self.file.flush()
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if self.created && !self.written {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(report: PathBuf) -> RunOptions {
        RunOptions {
            command: vec!["true".into()],
            policy_files: Vec::new(),
            deny: Vec::new(),
            allow: Vec::new(),
            audit: false,
            fail_open: false,
            report: Some(report),
            dns_ports: vec![53],
            cgroup_parent: None,
            quiet: true,
            ring_buffer_bytes: 4096,
            fail_on_block: false,
            junit: None,
            summary_markdown: None,
            record: None,
            standalone: true,
            allow_raw_sockets: false,
            resolver_sockets: Vec::new(),
            deps: None,
        }
    }

    #[test]
    fn unwritable_paths_are_named_before_anything_runs() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no/such/dir/r.json");
        let e = Outputs::open(&options(missing.clone())).err().unwrap();
        assert_eq!(
            e,
            format!(
                "--report {}: cannot write: No such file or directory (os error 2)",
                missing.display()
            )
        );
        let e = Outputs::open(&options(dir.path().to_owned()))
            .err()
            .unwrap();
        assert!(
            e.ends_with("cannot write: Is a directory (os error 21)"),
            "{e}"
        );
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = Outputs::open(&options(fifo)).err().unwrap();
        assert!(e.ends_with("cannot write: a FIFO with no reader"), "{e}");
    }

    #[test]
    fn a_file_is_replaced_only_when_written_and_removed_if_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let existing = dir.path().join("old.json");
        std::fs::write(&existing, "previous report, longer than the new one").unwrap();
        drop(Outputs::open(&options(existing.clone())).unwrap());
        assert_eq!(
            std::fs::read_to_string(&existing).unwrap(),
            "previous report, longer than the new one"
        );
        let mut outputs = Outputs::open(&options(existing.clone())).unwrap();
        assert!(outputs.write_all(|kind| (kind == Kind::Report).then(|| "new".to_owned())));
        drop(outputs);
        assert_eq!(std::fs::read_to_string(&existing).unwrap(), "new");

        let fresh = dir.path().join("fresh.json");
        drop(Outputs::open(&options(fresh.clone())).unwrap());
        assert!(!fresh.exists(), "a run that wrote nothing leaves no file");
    }
}
