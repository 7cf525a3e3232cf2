//! How errors reach the user: `error: <message>` and one `  caused by: …` line per cause.
//!
//! The cause chain is the anyhow chain, except that a [`ClientError`] ends it: an API error
//! contributes the server's own chain (`ApiError::chain`), and connection errors already say
//! their innermost cause in their message. A cause whose text the previous line already
//! contains is not repeated.

use tuchka_api::{ApiError, Operation};
use tuchka_client::ClientError;

/// The message and causes of `err`, outermost first.
pub fn error_lines(err: &anyhow::Error) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for cause in err.chain() {
        if let Some(client) = cause.downcast_ref::<ClientError>() {
            push_unique(&mut lines, client.to_string());
            match client {
                ClientError::Api { error, .. } => {
                    for c in &error.chain {
                        push_unique(&mut lines, c.clone());
                    }
                    break;
                }
                ClientError::Connect { .. } | ClientError::Transport { .. } => break,
                _ => continue,
            }
        }
        push_unique(&mut lines, cause.to_string());
    }
    lines
}

/// The lines of a server-side error body: its message, then its chain.
pub fn api_error_lines(error: &ApiError) -> Vec<String> {
    let mut lines = Vec::new();
    push_unique(&mut lines, error.message.clone());
    for c in &error.chain {
        push_unique(&mut lines, c.clone());
    }
    lines
}

/// What a failed operation prints on stderr.
pub fn operation_failure_lines(op: &Operation) -> Vec<String> {
    match &op.error {
        Some(error) => api_error_lines(error),
        None => vec![format!("{} {} failed", op.kind, op.target)],
    }
}

/// Format error lines for stderr.
pub fn format_lines(lines: &[String]) -> String {
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        if i == 0 {
            out.push_str(&format!("error: {line}\n"));
        } else {
            out.push_str(&format!("  caused by: {line}\n"));
        }
    }
    out
}

/// `err` as printed by the CLI: `error: …` and `  caused by: …` lines.
pub fn render_error(err: &anyhow::Error) -> String {
    format_lines(&error_lines(err))
}

/// Print `err` on stderr the way the CLI does (for the binary's own errors, e.g. `serve`'s).
pub fn print_error(err: &anyhow::Error) {
    eprint!("{}", render_error(err));
}

fn push_unique(lines: &mut Vec<String>, line: String) {
    let line = line.trim().to_string();
    if line.is_empty() {
        return;
    }
    if lines.last().is_some_and(|last| last.contains(&line)) {
        return;
    }
    lines.push(line);
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn api_errors_show_the_server_chain() {
        let err = anyhow::Error::new(ClientError::Api {
            status: 409,
            error: ApiError {
                code: "Conflict".into(),
                message: "network \"a\" is used by group \"web\"".into(),
                chain: vec!["remove the group first".into()],
            },
        });
        assert_eq!(
            render_error(&err),
            "error: network \"a\" is used by group \"web\"\n  caused by: remove the group first\n"
        );
    }

    #[test]
    fn context_comes_first_then_the_io_cause() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let err = Err::<(), _>(io)
            .context("cannot read --user-data file \"ud.yaml\"")
            .expect_err("err");
        assert_eq!(
            render_error(&err),
            "error: cannot read --user-data file \"ud.yaml\"\n  caused by: No such file or directory\n"
        );
    }

    #[test]
    fn repeated_causes_are_dropped() {
        let io = std::io::Error::other("boom");
        let err = Err::<(), _>(io)
            .context("upload failed: boom")
            .expect_err("err");
        assert_eq!(render_error(&err), "error: upload failed: boom\n");
    }

    #[test]
    fn failed_operations_print_their_error() {
        let mut op = Operation {
            id: "1".into(),
            kind: "group.create".parse().expect("kind"),
            target: "group/web".into(),
            state: "failed".parse().expect("state"),
            done: 0,
            total: 2,
            message: String::new(),
            error: Some(ApiError {
                code: "NoCapacity".into(),
                message: "no host can take web-1".into(),
                chain: vec!["h1: not enough memory".into()],
            }),
            created_at: String::new(),
            finished_at: None,
            phases: vec![],
            parent: None,
            children: vec![],
            migration: None,
        };
        assert_eq!(
            format_lines(&operation_failure_lines(&op)),
            "error: no host can take web-1\n  caused by: h1: not enough memory\n"
        );
        op.error = None;
        assert_eq!(
            format_lines(&operation_failure_lines(&op)),
            "error: group.create group/web failed\n"
        );
    }
}
