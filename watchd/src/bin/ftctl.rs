//! `ftctl`: the operator's CLI for the local watchd. All logic lives in [`watchd::ctl`].

use std::process::ExitCode;

fn main() -> ExitCode {
    let code = watchd::ctl::run(
        std::env::args_os(),
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    );
    ExitCode::from(u8::try_from(code).unwrap_or(2))
}
