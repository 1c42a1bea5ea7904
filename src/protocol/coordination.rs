//! The coordination frames of the WebSocket protocol: file claims (`claim`, `object`,
//! `release`, `renew`) and tasks (`claim_task`, `complete_task`, `release_task`,
//! `cancel_task`), and the broker's answers to them (`claim_result`, `task_result`).
//! docs/PROTOCOL.md, "File claims" and "Tasks", is the reference.

use bytestring::ByteString;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{ErrorCode, Rejection};
use crate::domain::claims::{Claim, Conflict, Objection};
use crate::domain::tasks::Task;

/// The operations of this module, as `op` names them.
pub const OPS: [&str; 8] = [
    "claim",
    "object",
    "release",
    "renew",
    "claim_task",
    "complete_task",
    "release_task",
    "cancel_task",
];

/// The fields of every coordination frame, all optional, so that validation can say what is
/// wrong.
#[derive(Deserialize, Debug, Default)]
pub struct Fields {
    pub paths: Option<Vec<String>>,
    pub shared: Option<bool>,
    pub ttl_ms: Option<i64>,
    pub objection_ms: Option<i64>,
    pub reason: Option<String>,
    pub claim_id: Option<String>,
    pub task_id: Option<String>,
    pub result: Option<String>,
    pub success: Option<bool>,
}

/// A coordination request, its fields read (their values are checked by the broker's
/// coordination service, against its limits).
#[derive(Debug, Clone, PartialEq)]
pub enum CoordinationOp {
    Claim {
        paths: Vec<String>,
        shared: bool,
        ttl_ms: Option<i64>,
        objection_ms: Option<i64>,
        reason: Option<String>,
    },
    Object {
        claim_id: Uuid,
        reason: String,
    },
    Release {
        claim_id: Uuid,
    },
    Renew {
        claim_id: Uuid,
        ttl_ms: Option<i64>,
    },
    ClaimTask {
        task_id: Uuid,
    },
    CompleteTask {
        task_id: Uuid,
        success: bool,
        result: Option<String>,
    },
    ReleaseTask {
        task_id: Uuid,
    },
    CancelTask {
        task_id: Uuid,
        reason: Option<String>,
    },
}

fn missing(field: &'static str, what: &str) -> Rejection {
    Rejection {
        field: Some(field),
        ..Rejection::new(
            ErrorCode::MissingField,
            format!("`{field}` is required: {what}"),
        )
    }
}

pub fn invalid(field: &'static str, message: impl Into<String>) -> Rejection {
    Rejection {
        field: Some(field),
        ..Rejection::new(ErrorCode::InvalidField, message)
    }
}

fn id(field: &'static str, raw: Option<String>) -> Result<Uuid, Rejection> {
    let raw = raw.ok_or_else(|| missing(field, "the id the broker gave it"))?;
    Uuid::parse_str(&raw).map_err(|_| invalid(field, format!("`{field}` must be a UUID")))
}

/// Reads a coordination frame whose `op` is one of [`OPS`].
pub fn parse(op: &str, text: &str) -> Result<CoordinationOp, Rejection> {
    let f: Fields = serde_json::from_str(text).map_err(|e| {
        Rejection::new(
            ErrorCode::InvalidFrame,
            format!("a field has the wrong type: {e}"),
        )
    })?;
    Ok(match op {
        "claim" => CoordinationOp::Claim {
            paths: f.paths.ok_or_else(|| {
                missing("paths", "a list of paths or globs, e.g. [\"src/api/**\"]")
            })?,
            shared: f.shared.unwrap_or(false),
            ttl_ms: f.ttl_ms,
            objection_ms: f.objection_ms,
            reason: f.reason,
        },
        "object" => CoordinationOp::Object {
            claim_id: id("claim_id", f.claim_id)?,
            reason: f
                .reason
                .filter(|r| !r.trim().is_empty())
                .ok_or_else(|| missing("reason", "say why you object"))?,
        },
        "release" => CoordinationOp::Release {
            claim_id: id("claim_id", f.claim_id)?,
        },
        "renew" => CoordinationOp::Renew {
            claim_id: id("claim_id", f.claim_id)?,
            ttl_ms: f.ttl_ms,
        },
        "claim_task" => CoordinationOp::ClaimTask {
            task_id: id("task_id", f.task_id)?,
        },
        "complete_task" => CoordinationOp::CompleteTask {
            task_id: id("task_id", f.task_id)?,
            success: f.success.unwrap_or(true),
            result: f.result,
        },
        "release_task" => CoordinationOp::ReleaseTask {
            task_id: id("task_id", f.task_id)?,
        },
        "cancel_task" => CoordinationOp::CancelTask {
            task_id: id("task_id", f.task_id)?,
            reason: f.reason,
        },
        other => {
            return Err(Rejection::new(
                ErrorCode::UnknownOp,
                format!("unknown op {other:?}"),
            ))
        }
    })
}

/// Why the broker did not do what a valid coordination request asked. Every code is also
/// the REST error code of the same refusal.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Refused {
    /// The claim conflicts with another agent's claim (`conflicts` names them).
    Conflict,
    /// Another agent objected in the claim's window (`objections` says why).
    Objected,
    /// No such claim or task in this project.
    NotFound,
    /// Not this agent's to do: another agent's claim, its own claim (objections), a task not
    /// offered to it or not sent by it (cancel).
    Forbidden,
    /// An objection to a claim whose window is over (granted, refused, released...).
    ClaimDecided,
    /// Released, renewed: the claim is not held any more (expired, released, refused).
    NotHeld,
    /// Another agent claimed the task first (`task.holder`).
    AlreadyClaimed,
    /// Complete, release: the task is not claimed by this agent.
    NotHolder,
    /// The task is done, failed, canceled or unclaimed.
    TaskClosed,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Conflict => "conflict",
            Refused::Objected => "objected",
            Refused::NotFound => "not_found",
            Refused::Forbidden => "forbidden",
            Refused::ClaimDecided => "claim_decided",
            Refused::NotHeld => "not_held",
            Refused::AlreadyClaimed => "already_claimed",
            Refused::NotHolder => "not_holder",
            Refused::TaskClosed => "task_closed",
        }
    }
}

/// The answer to a valid coordination request: done, or refused with a reason.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    /// `claim`, `object`, `release`, `renew`, `claim_task`, `complete_task`, …
    pub action: &'static str,
    pub refused: Option<(Refused, String)>,
    pub claim: Option<Claim>,
    pub task: Option<Task>,
    pub conflicts: Vec<Conflict>,
    pub objections: Vec<Objection>,
    /// The claim was merged into the agent's existing claim.
    pub merged: bool,
    /// The seq of the stored notice of what was done (the first, when there are several).
    pub seq: Option<i64>,
}

impl Answer {
    pub fn done(action: &'static str) -> Answer {
        Answer {
            action,
            ..Answer::default()
        }
    }

    pub fn refuse(mut self, why: Refused, message: impl Into<String>) -> Answer {
        self.refused = Some((why, message.into()));
        self
    }

    pub fn ok(&self) -> bool {
        self.refused.is_none()
    }
}

#[derive(Serialize)]
struct ResultFrame<'a> {
    op: &'static str,
    action: &'static str,
    ok: bool,
    code: Option<&'static str>,
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    claim: Option<&'a Claim>,
    #[serde(skip_serializing_if = "Option::is_none")]
    task: Option<&'a Task>,
    #[serde(skip_serializing_if = "Option::is_none")]
    conflicts: Option<&'a [Conflict]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    objections: Option<&'a [Objection]>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    merged: bool,
    seq: Option<i64>,
    client_msg_id: Option<&'a str>,
}

/// The `claim_result` or `task_result` frame of an answer.
pub fn result_frame(answer: &Answer, client_msg_id: Option<&str>) -> ByteString {
    let is_task = answer.action.ends_with("_task");
    let frame = ResultFrame {
        op: if is_task {
            "task_result"
        } else {
            "claim_result"
        },
        action: answer.action,
        ok: answer.ok(),
        code: answer.refused.as_ref().map(|(code, _)| code.as_str()),
        error: answer.refused.as_ref().map(|(_, text)| text.as_str()),
        claim: answer.claim.as_ref(),
        task: answer.task.as_ref(),
        conflicts: (!is_task).then_some(answer.conflicts.as_slice()),
        objections: (!is_task).then_some(answer.objections.as_slice()),
        merged: answer.merged,
        seq: answer.seq,
        client_msg_id,
    };
    super::to_frame(&frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordination_frames_are_read() {
        let op = parse(
            "claim",
            r#"{"op":"claim","paths":["src/**"],"objection_ms":5}"#,
        )
        .unwrap();
        assert_eq!(
            op,
            CoordinationOp::Claim {
                paths: vec!["src/**".into()],
                shared: false,
                ttl_ms: None,
                objection_ms: Some(5),
                reason: None
            }
        );
        let e = parse("claim", r#"{"op":"claim"}"#).unwrap_err();
        assert_eq!((e.code, e.field), (ErrorCode::MissingField, Some("paths")));
        let e = parse("claim", r#"{"op":"claim","paths":"src"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidFrame);
        let e = parse("object", r#"{"op":"object","claim_id":"x","reason":"no"}"#).unwrap_err();
        assert_eq!(
            (e.code, e.field),
            (ErrorCode::InvalidField, Some("claim_id"))
        );
        let id = Uuid::new_v4();
        let e = parse("object", &format!(r#"{{"claim_id":"{id}","reason":" "}}"#)).unwrap_err();
        assert_eq!(e.field, Some("reason"));
        assert_eq!(
            parse("complete_task", &format!(r#"{{"task_id":"{id}"}}"#)).unwrap(),
            CoordinationOp::CompleteTask {
                task_id: id,
                success: true,
                result: None
            }
        );
        assert_eq!(
            parse("release_task", "{}").unwrap_err().field,
            Some("task_id")
        );
    }

    #[test]
    fn answers_become_result_frames() {
        let answer = Answer::done("claim_task").refuse(Refused::AlreadyClaimed, "taken by b");
        let frame: serde_json::Value =
            serde_json::from_str(&result_frame(&answer, Some("c1"))).unwrap();
        assert_eq!(frame["op"], "task_result");
        assert_eq!(frame["ok"], false);
        assert_eq!(frame["code"], "already_claimed");
        assert_eq!(frame["client_msg_id"], "c1");
        assert!(frame.get("conflicts").is_none());
        let frame: serde_json::Value =
            serde_json::from_str(&result_frame(&Answer::done("renew"), None)).unwrap();
        assert_eq!(frame["op"], "claim_result");
        assert_eq!(
            (frame["ok"].clone(), frame["code"].clone()),
            (true.into(), serde_json::Value::Null)
        );
        assert_eq!(frame["conflicts"], serde_json::json!([]));
    }
}
