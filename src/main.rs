//! `vublk` binary: parse → validate → run. Every failure is one line on stderr.

use std::process::ExitCode;

use clap::Parser;
use vublk::args::Args;
use vublk::config::{Config, capabilities_json};

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            // --help / --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("invalid arguments");
            eprintln!("vublk: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    if args.print_capabilities {
        println!("{}", capabilities_json());
        return ExitCode::SUCCESS;
    }
    let cfg = match Config::try_from(args) {
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
