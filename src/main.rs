//! `vublk` binary: parse → validate → run. Every failure is one line on stderr.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;
use vublk::args::{Args, Cmd};
use vublk::config::{Config, capabilities_json};

/// Parses `argv`; on error prints clap's first line (or help/version) and returns the exit code.
fn parse(argv: &[OsString], origin: Option<&std::path::Path>) -> Result<Args, ExitCode> {
    match Args::try_parse_from(argv) {
        Ok(a) => Ok(a),
        Err(e) if !e.use_stderr() => {
            // --help / --version
            let _ = e.print();
            Err(ExitCode::SUCCESS)
        }
        Err(e) => {
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("invalid arguments");
            let first = first.trim_start_matches("error: ");
            match origin {
                Some(f) => eprintln!("vublk: config {}: {first}", f.display()),
                None => eprintln!("vublk: {first}"),
            }
            Err(ExitCode::from(2))
        }
    }
}

fn main() -> ExitCode {
    // Before any thread exists: this edits the environment.
    let activated_fds = vublk::service::take_listen_fds();
    let argv: Vec<OsString> = std::env::args_os().collect();
    let mut args = match parse(&argv, None) {
        Ok(a) => a,
        Err(code) => return code,
    };
    match &args.command {
        Some(Cmd::Stats { socket, json }) => return stats_command(socket, *json),
        Some(Cmd::Resize { socket }) => return resize_command(socket),
        None => {}
    }
    if args.print_capabilities {
        println!("{}", capabilities_json());
        return ExitCode::SUCCESS;
    }
    if let Some(file) = args.config.clone() {
        let from_file = match vublk::conffile::load(&file) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("vublk: {e}");
                return ExitCode::from(2);
            }
        };
        let argv0 = argv.first().cloned().unwrap_or_else(|| "vublk".into());
        // The file alone first, so a bad value there is reported against the file.
        let alone: Vec<OsString> = std::iter::once(argv0.clone())
            .chain(from_file.iter().cloned())
            .collect();
        if let Err(code) = parse(&alone, Some(&file)) {
            return code;
        }
        // Then the file followed by the command line: later flags win.
        let merged: Vec<OsString> = std::iter::once(argv0)
            .chain(from_file)
            .chain(argv.iter().skip(1).cloned())
            .collect();
        args = match parse(&merged, None) {
            Ok(a) => a,
            Err(code) => return code,
        };
    }
    let cfg = match Config::new(args, activated_fds) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vublk: {e}");
            return ExitCode::from(2);
        }
    };
    env_logger::Builder::new()
        .filter_level(cfg.log_level)
        .parse_default_env()
        .format_target(false)
        .init();
    match vublk::daemon::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vublk: {}", vublk::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// `vublk resize CONTROL_SOCKET`.
fn resize_command(socket: &std::path::Path) -> ExitCode {
    match vublk::control::command(socket, "resize", "resized") {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vublk: {}", vublk::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// `vublk stats CONTROL_SOCKET [--json]`.
fn stats_command(socket: &std::path::Path, json: bool) -> ExitCode {
    let out = if json {
        vublk::control::query(socket, "stats")
    } else {
        vublk::control::fetch_stats(socket).map(|s| vublk::stats::format_table(&s))
    };
    match out {
        Ok(text) => {
            println!("{}", text.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vublk: {}", vublk::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
