//! `maildir-backup`: the command-line front end. Parsing and printing only; the work is in
//! the `maildir_backup` library.

mod cli;

use clap::Parser;

fn main() {
    let args = match cli::Cli::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { maildir_backup::sysexits::EX_USAGE } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    std::process::exit(cli::run(args));
}
