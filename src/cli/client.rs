//! The HTTP client of the agent commands: the broker's REST API, nothing else.

use std::time::Duration;

use serde_json::Value;

use super::error::{self, CliError};
use super::settings::{self, Connection};

/// How long a call waits for the broker beyond what it asked the broker to wait for.
const MARGIN: Duration = Duration::from_secs(30);

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

/// A broker's answer: its status and JSON body.
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Client {
    pub fn new(connection: &Connection) -> Result<Client, CliError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("agentbus-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CliError::failed(format!("cannot set up the HTTP client: {e}")))?;
        Ok(Client {
            http,
            base: connection.base_url()?,
            token: connection
                .token
                .clone()
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty()),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET path?query`, waiting at most `wait` plus a margin.
    pub async fn get(
        &self,
        path: &str,
        query: &[(&str, String)],
        wait: Duration,
    ) -> Result<Answer, CliError> {
        self.call(self.http.get(self.url(path)).query(query), wait)
            .await
    }

    /// `POST path?query` with a JSON body.
    pub async fn post(
        &self,
        path: &str,
        query: &[(&str, String)],
        body: &Value,
        wait: Duration,
    ) -> Result<Answer, CliError> {
        self.call(self.http.post(self.url(path)).query(query).json(body), wait)
            .await
    }

    /// `DELETE path?query`.
    pub async fn delete(&self, path: &str, query: &[(&str, String)]) -> Result<Answer, CliError> {
        self.call(
            self.http.delete(self.url(path)).query(query),
            Duration::ZERO,
        )
        .await
    }

    /// Like `get`, but any status other than 2xx is the error it means.
    pub async fn get_ok(&self, path: &str, query: &[(&str, String)]) -> Result<Value, CliError> {
        let answer = self.get(path, query, Duration::ZERO).await?;
        self.ok(answer)
    }

    /// Like `post`, but any status other than 2xx is the error it means.
    pub async fn post_ok(
        &self,
        path: &str,
        query: &[(&str, String)],
        body: &Value,
    ) -> Result<Value, CliError> {
        let answer = self.post(path, query, body, Duration::ZERO).await?;
        self.ok(answer)
    }

    pub fn ok(&self, answer: Answer) -> Result<Value, CliError> {
        if (200..300).contains(&answer.status) {
            Ok(answer.body)
        } else {
            Err(error::from_response(
                answer.status,
                &answer.body,
                &self.base,
            ))
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn call(
        &self,
        request: reqwest::RequestBuilder,
        wait: Duration,
    ) -> Result<Answer, CliError> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request
            .timeout(wait + MARGIN)
            .send()
            .await
            .map_err(|e| self.transport_error(&e))?;
        let status = response.status().as_u16();
        let text = response
            .text()
            .await
            .map_err(|e| self.transport_error(&e))?;
        let body = serde_json::from_str(&text).unwrap_or_else(|_| {
            // Not the broker's JSON (a proxy's page, say): keep a line of it for the error.
            let line = text
                .lines()
                .next()
                .unwrap_or("")
                .chars()
                .take(200)
                .collect::<String>();
            serde_json::json!({ "error": format!("a non-JSON answer: {line:?}") })
        });
        Ok(Answer { status, body })
    }

    fn transport_error(&self, e: &reqwest::Error) -> CliError {
        if e.is_connect() {
            CliError::failed(format!(
                "no broker at {}; start one with `agentbus serve` or set AGENTBUS_URL",
                self.base
            ))
        } else if e.is_timeout() {
            CliError::failed(format!(
                "the broker at {} did not answer in time; check that it is running and reachable",
                self.base
            ))
        } else {
            CliError::failed(format!(
                "the request to the broker at {} failed: {}",
                self.base,
                one_line(e)
            ))
        }
    }

    /// The project id a setting names: itself if it is an id, else the project of that
    /// name on the broker.
    pub async fn project_id(&self, connection: &Connection) -> Result<String, CliError> {
        let wanted = connection.project()?;
        if settings::is_project_id(wanted) {
            return Ok(wanted.to_owned());
        }
        let answer = self.get("/api/projects", &[], Duration::ZERO).await?;
        if answer.status == 401 || answer.status == 403 {
            return Err(CliError::refused(format!(
                "AGENTBUS_PROJECT {wanted:?} is a name, and listing projects to find it needs the admin token; set AGENTBUS_PROJECT to the project's id instead"
            )));
        }
        let list = self.ok(answer)?;
        settings::find_project(wanted, &list)
    }
}

/// An error and its causes, on one line.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text.replace('\n', " ")
}
