//! Where the broker is, who is speaking, in which project: flags or the environment, and the
//! checks that turn a missing or malformed setting into a sentence that names the fix.

use std::io::{IsTerminal, Read};

use clap::Args;

use super::error::CliError;

/// The broker a command talks to when neither `--url` nor `AGENTBUS_URL` says otherwise.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";

/// The agent type of an agent that names none.
pub const DEFAULT_AGENT_TYPE: &str = "agent";

/// Most bytes read from standard input as a message's content.
const MAX_STDIN_BYTES: u64 = 16 * 1024 * 1024;

/// The settings every agent command shares.
#[derive(Args, Clone, Debug)]
pub struct Connection {
    /// The broker's base URL.
    #[arg(long, env = "AGENTBUS_URL", default_value = DEFAULT_URL)]
    pub url: String,

    /// A token of the project (or the admin token); sent as `Authorization: Bearer`.
    #[arg(long, env = "AGENTBUS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// The project: its id, or its name (resolved through `GET /api/projects`, which needs
    /// the admin token on a protected broker).
    #[arg(long, env = "AGENTBUS_PROJECT")]
    pub project: Option<String>,

    /// The agent this command speaks as.
    #[arg(long, env = "AGENTBUS_AGENT_ID")]
    pub agent_id: Option<String>,

    /// The agent's type (used when it joins, and as the sender type of what it sends).
    #[arg(long, env = "AGENTBUS_AGENT_TYPE", default_value = DEFAULT_AGENT_TYPE)]
    pub agent_type: String,

    /// Print the broker's JSON instead of one line per message (docs/PROTOCOL.md,
    /// "Command line").
    #[arg(long)]
    pub json: bool,
}

impl Connection {
    /// The base URL without a trailing slash, checked to be http(s).
    pub fn base_url(&self) -> Result<String, CliError> {
        let url = self.url.trim().trim_end_matches('/');
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(CliError::failed(format!(
                "AGENTBUS_URL {:?} is not an http:// or https:// URL; set it (or --url) to the broker, e.g. {DEFAULT_URL}",
                self.url
            )));
        }
        Ok(url.to_owned())
    }

    /// The project setting, which must be given.
    pub fn project(&self) -> Result<&str, CliError> {
        self.project
            .as_deref()
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .ok_or_else(|| {
                CliError::failed(
                    "no project given; set AGENTBUS_PROJECT (a project id or name) or pass --project (see `agentbus project list`)",
                )
            })
    }

    /// The agent id, which commands that speak as an agent need.
    pub fn agent_id(&self) -> Result<&str, CliError> {
        self.agent_id
            .as_deref()
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .ok_or_else(|| {
                CliError::failed("no agent id given; set AGENTBUS_AGENT_ID or pass --agent-id")
            })
    }
}

/// Finds the project a setting names among the broker's projects (`GET /api/projects`): by
/// id first, then by exact name.
pub fn find_project(wanted: &str, projects: &serde_json::Value) -> Result<String, CliError> {
    let list = projects["projects"].as_array().cloned().unwrap_or_default();
    let named: Vec<&serde_json::Value> = list.iter().filter(|p| p["name"] == wanted).collect();
    match named.as_slice() {
        [one] => one["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| CliError::failed("the broker listed a project without an id")),
        [] => Err(CliError::refused(format!(
            "no project named {wanted:?}; see `agentbus project list`, or create it with `agentbus project create {wanted}`"
        ))),
        many => Err(CliError::refused(format!(
            "{} projects are named {wanted:?}; set AGENTBUS_PROJECT to one's id (see `agentbus project list`)",
            many.len()
        ))),
    }
}

/// Whether a project setting is an id (else it is a name to resolve).
pub fn is_project_id(setting: &str) -> bool {
    uuid::Uuid::parse_str(setting).is_ok()
}

/// A message's content: the argument, or standard input for `-` or when no argument is
/// given and standard input is not a terminal.
pub fn content(argument: Option<String>) -> Result<String, CliError> {
    let from_stdin = match argument.as_deref() {
        Some("-") => true,
        Some(_) => false,
        None => {
            if std::io::stdin().is_terminal() {
                return Err(CliError::failed(
                    "no content given; pass it as an argument, or `-` to read it from standard input",
                ));
            }
            true
        }
    };
    let text = if from_stdin {
        let mut bytes = Vec::new();
        std::io::stdin()
            .take(MAX_STDIN_BYTES)
            .read_to_end(&mut bytes)
            .map_err(|e| CliError::failed(format!("cannot read standard input: {e}")))?;
        String::from_utf8(bytes)
            .map_err(|_| CliError::failed("standard input is not UTF-8 text; send text content"))?
    } else {
        argument.unwrap_or_default()
    };
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.trim().is_empty() {
        return Err(CliError::failed(
            "the content is empty; pass it as an argument or on standard input",
        ));
    }
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn connection(url: &str) -> Connection {
        Connection {
            url: url.into(),
            token: None,
            project: None,
            agent_id: None,
            agent_type: DEFAULT_AGENT_TYPE.into(),
            json: false,
        }
    }

    #[test]
    fn base_url_is_checked_and_trimmed() {
        assert_eq!(connection("http://h:1/").base_url().unwrap(), "http://h:1");
        assert_eq!(
            connection("https://h/x/").base_url().unwrap(),
            "https://h/x"
        );
        let e = connection("h:8080").base_url().unwrap_err();
        assert!(e.message.contains("AGENTBUS_URL"), "{e}");
    }

    #[test]
    fn missing_settings_name_the_variable() {
        let c = connection(DEFAULT_URL);
        assert!(c
            .project()
            .unwrap_err()
            .message
            .contains("AGENTBUS_PROJECT"));
        assert!(c
            .agent_id()
            .unwrap_err()
            .message
            .contains("AGENTBUS_AGENT_ID"));
        let c = Connection {
            project: Some("  ".into()),
            ..connection(DEFAULT_URL)
        };
        assert!(c.project().is_err());
    }

    #[test]
    fn projects_are_found_by_exact_name() {
        let list = json!({"projects": [
            {"id": "a", "name": "web"}, {"id": "b", "name": "api"}, {"id": "c", "name": "api"},
        ]});
        assert_eq!(find_project("web", &list).unwrap(), "a");
        let e = find_project("Web", &list).unwrap_err();
        assert_eq!(
            e.message,
            "no project named \"Web\"; see `agentbus project list`, or create it with `agentbus project create Web`"
        );
        assert!(find_project("api", &list)
            .unwrap_err()
            .message
            .starts_with("2 projects"));
        assert!(find_project("x", &json!({})).is_err());
    }

    #[test]
    fn ids_are_told_from_names() {
        assert!(is_project_id("a7e25b55-1b88-4689-84dc-90d40cb4d053"));
        assert!(!is_project_id("web"));
    }

    #[test]
    fn an_argument_is_the_content() {
        assert_eq!(content(Some("hello\n".into())).unwrap(), "hello");
        assert!(content(Some("  ".into())).is_err());
    }
}
