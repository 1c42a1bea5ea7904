//! What can go wrong in an agent command, and the exit status each outcome maps to.

use std::fmt;

/// Exit statuses of the agent commands (documented in docs/PROTOCOL.md, "Command line").
pub mod exit {
    /// Success: the message was sent, messages were returned, the reply came.
    pub const OK: u8 = 0;
    /// Nothing: no message owed or found, or no reply before the deadline.
    pub const NOTHING: u8 = 1;
    /// An error: bad usage or settings, no broker, a broker or network failure.
    pub const ERROR: u8 = 2;
    /// The broker refused the request (bad input, no permission, unknown project or
    /// message, nobody to receive it, over a limit): the message says why.
    pub const REFUSED: u8 = 3;
    /// `claim`, `guard`, `task claim`: another agent holds (or asked for) the paths, or
    /// claimed the task first.
    pub const CONFLICT: u8 = 4;
    /// `claim`: another agent objected in the objection window.
    pub const OBJECTED: u8 = 5;
}

/// A failed command: one sentence that names the problem and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Ours or the connection's: usage, settings, no broker, a broker failure.
    Failed,
    /// The broker understood the request and refused it.
    Refused,
}

impl CliError {
    pub fn failed(message: impl Into<String>) -> Self {
        CliError {
            kind: ErrorKind::Failed,
            message: message.into(),
        }
    }

    pub fn refused(message: impl Into<String>) -> Self {
        CliError {
            kind: ErrorKind::Refused,
            message: message.into(),
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self.kind {
            ErrorKind::Failed => exit::ERROR,
            ErrorKind::Refused => exit::REFUSED,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

/// The error a broker's answer means, from its status and `{"error", "code"}` body, with the
/// fix where there is an obvious one.
pub fn from_response(status: u16, body: &serde_json::Value, url: &str) -> CliError {
    let said = body["error"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| format!("HTTP status {status}"));
    let said = said.trim_end_matches('.');
    match status {
        401 => CliError::refused(format!(
            "the broker at {url} refused the credentials ({said}); set AGENTBUS_TOKEN (or --token) to a token of this project"
        )),
        403 => CliError::refused(format!(
            "the broker refused this token here ({said}); use a token of this project (bound to this agent, if it is bound)"
        )),
        404 => CliError::refused(format!("{said}; check the ids (see `agentbus project list` and `agentbus agents`)")),
        429 => CliError::refused(format!("{said}; retry later")),
        400..=499 => CliError::refused(format!("the broker refused the request: {said}")),
        503 => CliError::failed(format!("the broker at {url} is unavailable ({said}); retry later")),
        _ => CliError::failed(format!("the broker at {url} failed ({status}): {said}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn statuses_map_to_kinds_and_fixes() {
        let body = json!({"error": "this token is for another project", "code": "forbidden"});
        let e = from_response(403, &body, "http://b");
        assert_eq!(e.kind, ErrorKind::Refused);
        assert_eq!(e.exit_code(), exit::REFUSED);
        assert!(e.message.contains("another project"), "{}", e.message);

        let e = from_response(401, &json!({"error": "no token"}), "http://b");
        assert!(e.message.contains("AGENTBUS_TOKEN"), "{}", e.message);

        let e = from_response(
            503,
            &json!({"error": "the database is unavailable"}),
            "http://b",
        );
        assert_eq!(e.kind, ErrorKind::Failed);
        assert_eq!(e.exit_code(), exit::ERROR);

        let e = from_response(500, &json!("not an object"), "http://b");
        assert_eq!(
            e.message,
            "the broker at http://b failed (500): HTTP status 500"
        );
    }

    #[test]
    fn messages_are_one_line() {
        for status in [400, 401, 403, 404, 409, 422, 429, 500, 503] {
            let e = from_response(status, &json!({"error": "x."}), "http://b");
            assert!(!e.message.contains('\n'), "{}", e.message);
        }
    }
}
