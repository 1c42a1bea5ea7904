//! Tasks: messages that exactly one agent takes (docs/PROTOCOL.md, "Tasks"). The states, the
//! moves between them, and who a task's state changes are addressed to.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::notice::Notice;

/// Longest `claim_timeout_ms` / `work_timeout_ms`: 30 days, as a message's TTL.
pub const MAX_TASK_TIMEOUT_MS: i64 = 30 * 24 * 3600 * 1000;
/// Longest result (or error, or cancel reason), in characters.
pub const MAX_RESULT_CHARS: usize = 16_384;

/// What a send asked of its task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TaskTerms {
    /// Dead-letter the task as `unclaimed` if nobody claims it within this long.
    pub claim_timeout_ms: Option<i64>,
    /// Open the task again if its holder has not finished it within this long of claiming.
    pub work_timeout_ms: Option<i64>,
}

/// The life of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Open,
    Claimed,
    Done,
    Failed,
    Canceled,
    /// Nobody claimed it before its claim deadline: a dead letter.
    Unclaimed,
}

impl TaskState {
    pub const ALL: [TaskState; 6] = [
        TaskState::Open,
        TaskState::Claimed,
        TaskState::Done,
        TaskState::Failed,
        TaskState::Canceled,
        TaskState::Unclaimed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Open => "open",
            TaskState::Claimed => "claimed",
            TaskState::Done => "done",
            TaskState::Failed => "failed",
            TaskState::Canceled => "canceled",
            TaskState::Unclaimed => "unclaimed",
        }
    }

    pub fn parse(raw: &str) -> Option<TaskState> {
        TaskState::ALL.into_iter().find(|s| s.as_str() == raw)
    }

    /// Done, failed, canceled or unclaimed: nothing more happens to it.
    pub fn is_closed(self) -> bool {
        !matches!(self, TaskState::Open | TaskState::Claimed)
    }
}

/// A task timeout: absent, or 1 ms to [`MAX_TASK_TIMEOUT_MS`].
pub fn check_timeout(field: &'static str, value: Option<i64>) -> Result<Option<i64>, String> {
    match value {
        None => Ok(None),
        Some(ms) if (1..=MAX_TASK_TIMEOUT_MS).contains(&ms) => Ok(Some(ms)),
        Some(ms) => Err(format!(
            "`{field}` must be between 1 and {MAX_TASK_TIMEOUT_MS} milliseconds, not {ms}"
        )),
    }
}

/// A result, error or reason: at most [`MAX_RESULT_CHARS`] characters, without NUL.
pub fn check_result(field: &'static str, value: Option<String>) -> Result<Option<String>, String> {
    match value {
        Some(v) if v.chars().count() > MAX_RESULT_CHARS || v.contains('\0') => Err(format!(
            "`{field}` must be at most {MAX_RESULT_CHARS} characters, without NUL"
        )),
        other => Ok(other.filter(|v| !v.trim().is_empty())),
    }
}

/// Who a task was offered to, as its message was addressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    Agent(String),
    Type(String),
    Everyone,
}

impl Audience {
    pub fn of(to: Option<&str>, to_type: Option<&str>) -> Audience {
        match (to, to_type) {
            (Some(agent), _) => Audience::Agent(agent.to_owned()),
            (None, Some(agent_type)) => Audience::Type(agent_type.to_owned()),
            (None, None) => Audience::Everyone,
        }
    }

    /// May this agent (a member of this type) take the task sent by `sender`? The agent it
    /// was sent to; an agent of the type it was sent to; for a task to everyone, anyone but
    /// its sender.
    pub fn offered_to(&self, sender: &str, agent_id: &str, agent_type: Option<&str>) -> bool {
        match self {
            Audience::Agent(a) => a == agent_id,
            Audience::Type(t) => agent_type == Some(t.as_str()) && agent_id != sender,
            Audience::Everyone => agent_id != sender,
        }
    }

    /// The addresses a state change of the task is sent to, as `(to, to_type)`: the audience,
    /// and the task's sender directly unless the audience already reaches it (a task to
    /// everyone; a task to the sender itself; a task to the sender's own type).
    pub fn targets(
        &self,
        sender: &str,
        sender_type: Option<&str>,
    ) -> Vec<(Option<String>, Option<String>)> {
        let (audience, covers_sender) = match self {
            Audience::Agent(a) => ((Some(a.clone()), None), a == sender),
            Audience::Type(t) => ((None, Some(t.clone())), sender_type == Some(t.as_str())),
            Audience::Everyone => ((None, None), true),
        };
        let mut targets = vec![audience];
        if !covers_sender {
            targets.push((Some(sender.to_owned()), None));
        }
        targets
    }
}

/// A task as clients see it: its message's addressing and content, and its state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Task {
    /// The task's message id.
    pub id: Uuid,
    pub project_id: Uuid,
    pub seq: i64,
    pub sender_agent_id: String,
    pub sender_agent_type: String,
    pub to: Option<String>,
    pub to_type: Option<String>,
    pub message_type: String,
    pub content: String,
    #[serde(serialize_with = "serialize_state")]
    pub state: TaskState,
    pub holder: Option<String>,
    pub claim_timeout_ms: Option<i64>,
    pub work_timeout_ms: Option<i64>,
    pub claim_deadline: Option<DateTime<Utc>>,
    pub work_deadline: Option<DateTime<Utc>>,
    pub claimed_at: Option<DateTime<Utc>>,
    pub closed_at: Option<DateTime<Utc>>,
    pub result: Option<String>,
    pub offers: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The sender's type as a member (whether a notice to the task's type reaches it).
    #[serde(skip)]
    pub sender_member_type: Option<String>,
}

fn serialize_state<S: serde::Serializer>(state: &TaskState, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(state.as_str())
}

/// What happened to a task, as its notices tell it.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskEvent {
    Claimed,
    /// Finished by its holder: `done` or `failed`.
    Finished,
    /// Its holder gave it back: open again.
    Released {
        by: String,
    },
    /// Its holder's work timeout ran out: open again, offered again.
    Reopened {
        by: String,
    },
    Canceled {
        reason: Option<String>,
    },
    /// Nobody claimed it in time: a dead letter.
    Unclaimed,
}

impl TaskEvent {
    pub fn name(&self, task: &Task) -> &'static str {
        match self {
            TaskEvent::Claimed => "claimed",
            TaskEvent::Finished => task.state.as_str(),
            TaskEvent::Released { .. } => "released",
            TaskEvent::Reopened { .. } => "reopened",
            TaskEvent::Canceled { .. } => "canceled",
            TaskEvent::Unclaimed => "unclaimed",
        }
    }
}

/// At most this many characters of the task's content are quoted in its notices.
const QUOTED_CHARS: usize = 200;

fn quoted(content: &str) -> String {
    let line = content.replace('\n', " ");
    if line.chars().count() > QUOTED_CHARS {
        format!("{}…", line.chars().take(QUOTED_CHARS).collect::<String>())
    } else {
        line
    }
}

impl Task {
    pub fn audience(&self) -> Audience {
        Audience::of(self.to.as_deref(), self.to_type.as_deref())
    }

    /// The broker's notices of this event: one to the agents the task was offered to, and
    /// one to its sender unless that one reaches it. Each replies to the task's message.
    pub fn notices(&self, event: &TaskEvent) -> Vec<Notice> {
        let holder = self.holder.as_deref().unwrap_or("-");
        let task = format!("task #{} ({})", self.seq, quoted(&self.content));
        let (content, priority, success, error) = match event {
            TaskEvent::Claimed => (format!("{task} taken by {holder}"), 3, None, None),
            TaskEvent::Finished if self.state == TaskState::Done => (
                match &self.result {
                    Some(result) => format!("task #{} done by {holder}: {result}", self.seq),
                    None => format!("{task} done by {holder}"),
                },
                2,
                Some(true),
                None,
            ),
            TaskEvent::Finished => (
                match &self.result {
                    Some(error) => format!("task #{} failed ({holder}): {error}", self.seq),
                    None => format!("{task} failed ({holder})"),
                },
                2,
                Some(false),
                Some(self.result.clone().unwrap_or_else(|| "failed".into())),
            ),
            TaskEvent::Released { by } => (
                format!("{task} is open again: {by} released it; claim it to take it"),
                2,
                None,
                None,
            ),
            TaskEvent::Reopened { by } => (
                format!(
                    "{task} is open again: {by} did not finish it within {} ms; claim it to take it",
                    self.work_timeout_ms.unwrap_or(0)
                ),
                2,
                None,
                None,
            ),
            TaskEvent::Canceled { reason } => (
                format!(
                    "{task} canceled by {}{}",
                    self.sender_agent_id,
                    reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
                ),
                2,
                None,
                None,
            ),
            TaskEvent::Unclaimed => (
                format!(
                    "{task} was not claimed within {} ms; it is a dead letter (unclaimed)",
                    self.claim_timeout_ms.unwrap_or(0)
                ),
                1,
                None,
                None,
            ),
        };
        let metadata = serde_json::json!({"event": event.name(self), "task": self});
        self.audience()
            .targets(&self.sender_agent_id, self.sender_member_type.as_deref())
            .into_iter()
            .map(|(to, to_type)| {
                let mut notice =
                    Notice::new(content.clone(), metadata.clone(), priority).to(to, to_type);
                notice.reply_to = Some(self.id);
                notice.success = success;
                notice.error = error.clone();
                notice
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_close() {
        for s in TaskState::ALL {
            assert_eq!(TaskState::parse(s.as_str()), Some(s));
        }
        assert!(!TaskState::Open.is_closed());
        assert!(!TaskState::Claimed.is_closed());
        assert!(TaskState::Done.is_closed() && TaskState::Unclaimed.is_closed());
        assert_eq!(TaskState::parse("taken"), None);
    }

    #[test]
    fn timeouts_and_results_are_bounded() {
        assert_eq!(check_timeout("claim_timeout_ms", None), Ok(None));
        assert_eq!(check_timeout("claim_timeout_ms", Some(5)), Ok(Some(5)));
        assert!(check_timeout("claim_timeout_ms", Some(0)).is_err());
        assert!(
            check_timeout("work_timeout_ms", Some(MAX_TASK_TIMEOUT_MS + 1))
                .unwrap_err()
                .contains("work_timeout_ms")
        );
        assert_eq!(check_result("result", Some(" ".into())), Ok(None));
        assert!(check_result("result", Some("a\0".into())).is_err());
        assert!(check_result("result", Some("x".repeat(MAX_RESULT_CHARS + 1))).is_err());
    }

    #[test]
    fn who_may_take_a_task() {
        let to_type = Audience::of(None, Some("frontend"));
        assert!(to_type.offered_to("lead", "fe-1", Some("frontend")));
        assert!(!to_type.offered_to("lead", "be-1", Some("backend")));
        assert!(!to_type.offered_to("lead", "fe-1", None));
        let everyone = Audience::of(None, None);
        assert!(everyone.offered_to("lead", "x", None));
        assert!(!everyone.offered_to("lead", "lead", None));
        let one = Audience::of(Some("fe-2"), Some("ignored"));
        assert!(one.offered_to("lead", "fe-2", Some("frontend")));
        assert!(!one.offered_to("lead", "fe-1", Some("frontend")));
    }

    #[test]
    fn state_changes_reach_the_audience_and_the_sender() {
        let both = Audience::Type("frontend".into()).targets("lead", Some("lead"));
        assert_eq!(
            both,
            vec![(None, Some("frontend".into())), (Some("lead".into()), None)]
        );
        assert_eq!(
            Audience::Type("frontend".into()).targets("fe-0", Some("frontend")),
            vec![(None, Some("frontend".into()))]
        );
        assert_eq!(Audience::Everyone.targets("lead", None), vec![(None, None)]);
        assert_eq!(
            Audience::Agent("fe-2".into()).targets("lead", None),
            vec![(Some("fe-2".into()), None), (Some("lead".into()), None)]
        );
        assert_eq!(
            Audience::Agent("lead".into()).targets("lead", None),
            vec![(Some("lead".into()), None)]
        );
    }
}
