//! How a binary reports the error it stops on: the error, then each cause the line above
//! does not already show. Many errors print their source in their own message and also
//! return it as their source, so a plain cause chain says the same thing twice.

use std::error::Error;
use std::process::ExitCode;

/// The error and its causes, one per line, without repeats.
pub fn report(e: &(dyn Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut above = out.clone();
    let mut causes = 0;
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !above.contains(&text) {
            if causes == 0 {
                out.push_str("\n\nCaused by:");
            }
            out.push_str(&format!("\n    {causes}: {text}"));
            causes += 1;
        }
        above = text;
        next = cause.source();
    }
    out
}

/// The exit status of a binary whose work returned `result`, with the error reported on
/// stderr.
pub fn exit_code<E>(result: Result<(), E>) -> ExitCode
where
    E: AsRef<dyn Error + Send + Sync + 'static>,
{
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {}", report(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::report;

    #[derive(Debug, thiserror::Error)]
    #[error("opening the store: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("master failed to start")]
    struct Adds(#[source] Repeats);

    #[test]
    fn a_cause_the_line_above_shows_is_left_out() {
        let e = Adds(Repeats(std::io::Error::other("in use")));
        assert_eq!(
            report(&e),
            "master failed to start\n\nCaused by:\n    0: opening the store: in use"
        );
        let plain = std::io::Error::other("just this");
        assert_eq!(report(&plain), "just this");
    }
}
