//! Reading guard's input files: policies, the daemon's configuration and
//! its policies directory, saved reports and records.
//!
//! Every one of them goes through [`read_text`], so that no path can hang
//! guard or exhaust its memory: the file is opened without blocking (a FIFO
//! with no writer would otherwise block `open` forever), must be a regular
//! file (not a FIFO, a device such as `/dev/zero` or `/dev/urandom`, a
//! socket or a directory), and is read up to [`MAX_INPUT_BYTES`] only.
use std::{
    fs::OpenOptions,
    io::{self, Read as _},
    os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use thiserror::Error;

/// The largest input file guard reads. A policy of 100,000 names is about
/// 3 MiB; nothing guard reads legitimately comes near this.
pub const MAX_INPUT_BYTES: u64 = 32 << 20;

#[derive(Debug, Error)]
pub enum InputError {
    #[error("{}: cannot read: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("{}: cannot read: it is {kind}, not a regular file", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error(
        "{}: cannot read: larger than {} MiB, the limit for guard's input files",
        path.display(),
        MAX_INPUT_BYTES >> 20
    )]
    TooLarge { path: PathBuf },
    #[error("{}:{line}: invalid UTF-8 (byte {byte:#04x} at column {column})", path.display())]
    Utf8 {
        path: PathBuf,
        line: usize,
        column: usize,
        byte: u8,
    },
}

/// The text of the regular file at `path` (symbolic links followed), with a
/// leading UTF-8 byte-order mark removed. Refuses anything else, files
/// larger than [`MAX_INPUT_BYTES`] and invalid UTF-8 (naming the line).
pub fn read_text(path: &Path) -> Result<String, InputError> {
    let bytes = read_regular(path)?;
    let text = String::from_utf8(bytes).map_err(|error| {
        let bytes = error.as_bytes();
        let at = error.utf8_error().valid_up_to();
        let line_start = bytes[..at]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |newline| newline + 1);
        InputError::Utf8 {
            path: path.to_owned(),
            line: 1 + bytes[..at].iter().filter(|&&b| b == b'\n').count(),
            // Columns count characters, as editors show them.
            column: 1 + String::from_utf8_lossy(&bytes[line_start..at])
                .chars()
                .count(),
            byte: bytes[at],
        }
    })?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_owned(),
        None => text,
    })
}

/// The bytes of the regular file at `path`, at most [`MAX_INPUT_BYTES`].
fn read_regular(path: &Path) -> Result<Vec<u8>, InputError> {
    let open_error = |source| InputError::Open {
        path: path.to_owned(),
        source,
    };
    // O_NONBLOCK: opening a FIFO for reading returns at once instead of
    // waiting for a writer; the type check below then refuses it. O_NOCTTY:
    // a terminal named by mistake must not become guard's controlling one.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(open_error)?;
    let metadata = file.metadata().map_err(open_error)?;
    let file_type = metadata.file_type();
    if !file_type.is_file() {
        let kind = if file_type.is_dir() {
            "a directory"
        } else if file_type.is_fifo() {
            "a FIFO"
        } else if file_type.is_char_device() {
            "a character device"
        } else if file_type.is_block_device() {
            "a block device"
        } else if file_type.is_socket() {
            "a socket"
        } else {
            "a special file"
        };
        return Err(InputError::NotRegular {
            path: path.to_owned(),
            kind,
        });
    }
    let too_large = || InputError::TooLarge {
        path: path.to_owned(),
    };
    if metadata.len() > MAX_INPUT_BYTES {
        return Err(too_large());
    }
    // The size can change between fstat and read (a file being appended
    // to): read one byte past the limit to notice, never more.
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    file.take(MAX_INPUT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(open_error)?;
    if bytes.len() as u64 > MAX_INPUT_BYTES {
        return Err(too_large());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    fn error(path: &Path) -> String {
        read_text(path).unwrap_err().to_string()
    }

    #[test]
    fn refuses_every_kind_of_special_file_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("policy.yaml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // Without O_NONBLOCK this open would wait for a writer forever.
        assert_eq!(
            error(&fifo),
            format!(
                "{}: cannot read: it is a FIFO, not a regular file",
                fifo.display()
            )
        );
        for (path, kind) in [
            ("/dev/zero", "a character device"),
            ("/dev/urandom", "a character device"),
            ("/", "a directory"),
        ] {
            assert_eq!(
                error(Path::new(path)),
                format!("{path}: cannot read: it is {kind}, not a regular file")
            );
        }
        let missing = error(&dir.path().join("missing.yaml"));
        assert!(missing.contains("missing.yaml: cannot read: No such file"));
    }

    #[test]
    fn refuses_a_file_over_the_limit_without_reading_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.yaml");
        // Sparse: the size is what counts, and nothing is written.
        File::create(&path)
            .unwrap()
            .set_len(MAX_INPUT_BYTES + 1)
            .unwrap();
        assert_eq!(
            error(&path),
            format!(
                "{}: cannot read: larger than 32 MiB, the limit for guard's input files",
                path.display()
            )
        );
        File::create(&path)
            .unwrap()
            .set_len(MAX_INPUT_BYTES)
            .unwrap();
        assert_eq!(read_regular(&path).unwrap().len() as u64, MAX_INPUT_BYTES);
    }

    #[test]
    fn strips_a_byte_order_mark_and_names_the_line_of_invalid_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.yaml");
        std::fs::write(&path, "\u{feff}name: x\n").unwrap();
        assert_eq!(read_text(&path).unwrap(), "name: x\n");
        std::fs::write(&path, b"name: x\ndeny:\n  - \xc3\xa9t\xff\n").unwrap();
        assert_eq!(
            error(&path),
            format!(
                "{}:3: invalid UTF-8 (byte 0xff at column 7)",
                path.display()
            )
        );
    }
}
