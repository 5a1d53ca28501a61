//! `--config FILE`: daemon settings in a file (systemd units use `/etc/vublk/NAME.conf`).
//!
//! Format, one setting per line:
//! ```text
//! # comment
//! blk-file = /var/lib/vublk/disk0.raw
//! num-queues = 4
//! read-only = false
//! ```
//! Keys are the long command-line flags without the leading dashes (`_` may stand for `-`).
//! Switches take `true`/`false` (also yes/no, on/off, 1/0). A value may be quoted with `"` or
//! `'`. Flags given on the command line override the file's values.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

use crate::args::Args;

/// Keys that make no sense in a file.
const NOT_IN_FILE: &[&str] = &["config", "print-capabilities", "help", "version"];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfFileError {
    #[error("config {0}: {1}")]
    Read(PathBuf, String),
    #[error("config {path} line {line}: {msg}")]
    Line {
        path: PathBuf,
        line: usize,
        msg: String,
    },
}

/// Reads `path` and turns it into command-line arguments (`--key=value`, `--switch`).
pub fn load(path: &Path) -> Result<Vec<OsString>, ConfFileError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfFileError::Read(path.to_path_buf(), e.to_string()))?;
    to_args(&text).map_err(|(line, msg)| ConfFileError::Line {
        path: path.to_path_buf(),
        line,
        msg,
    })
}

fn unquote(v: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = v.strip_prefix(q).and_then(|r| r.strip_suffix(q)) {
            return inner;
        }
    }
    v
}

/// The file's text as arguments; an error names the 1-based line.
pub fn to_args(text: &str) -> Result<Vec<OsString>, (usize, String)> {
    let cmd = Args::command();
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let err = |msg: String| (i + 1, msg);
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| err(format!("expected \"key = value\", got {line:?}")))?;
        let key = key.trim().replace('_', "-");
        let value = unquote(value.trim());
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()))
            .filter(|_| !NOT_IN_FILE.contains(&key.as_str()))
            .ok_or_else(|| err(format!("unknown setting {key:?}")))?;
        if arg.get_action().takes_values() {
            if value.is_empty() {
                return Err(err(format!("{key} needs a value")));
            }
            out.push(OsString::from(format!("--{key}={value}")));
        } else {
            match value.to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" | "1" => out.push(OsString::from(format!("--{key}"))),
                "false" | "no" | "off" | "0" => {}
                _ => return Err(err(format!("{key} takes true or false, got {value:?}"))),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[OsString]) -> Vec<String> {
        v.iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn settings_become_flags() {
        let a = to_args(
            "# disk0\n\nblk-file = /var/lib/vublk/disk 0.raw\nnum_queues=4\n\
             read-only = yes\nno-lock = false\nserial = \"disk0\"\n  ; other comment\n",
        )
        .unwrap();
        assert_eq!(
            s(&a),
            [
                "--blk-file=/var/lib/vublk/disk 0.raw",
                "--num-queues=4",
                "--read-only",
                "--serial=disk0"
            ]
        );
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(
            to_args("a = b").unwrap_err(),
            (1, "unknown setting \"a\"".into())
        );
        assert_eq!(to_args("\nread-only = maybe").unwrap_err().0, 2);
        assert_eq!(
            to_args("serial =").unwrap_err(),
            (1, "serial needs a value".into())
        );
        assert!(to_args("config = /x").is_err());
        assert!(to_args("print-capabilities = true").is_err());
        assert!(to_args("just words").is_err());
    }

    #[test]
    fn every_flag_is_a_key() {
        // The example shipped for systemd parses.
        let example = include_str!("../share/vublk/example.conf");
        let a = to_args(example).unwrap();
        assert!(s(&a).iter().any(|f| f.starts_with("--blk-file=")));
    }
}
