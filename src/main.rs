//! The `meridian` binary: parses the command line and runs a subcommand.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use meridian::cli::{Cli, Command};

fn main() -> ExitCode {
    meridian::tune_allocator();
    let cli = Cli::parse();
    // The demo prints its own progress and report; daemons log at info.
    let default_filter = match cli.command {
        Command::Demo(_) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: a log file, journald or a
        // container's log would otherwise carry escape codes.
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .init();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = rt.block_on(async move {
        match cli.command {
            Command::Start(args) => meridian::server::run(args).await,
            Command::Changefeed(args) => meridian::source::postgres::run(args).await,
            Command::Userscript(args) => meridian::script::run_command(args),
            Command::Demo(args) => meridian::demo::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meridian: {e:#}");
            ExitCode::FAILURE
        }
    }
}
