//! `agentbus inbox --hook FORMAT`: "you have mail" in the shape a coding agent's hook reads.
//!
//! Claude Code and Codex CLI run a hook command at fixed points of a session, pass it a JSON
//! description of the event on standard input (`hook_event_name`, …) and read its standard
//! output after exit status 0:
//!
//! - `UserPromptSubmit`, `SessionStart`, `PostToolUse`: a JSON object
//!   `{"hookSpecificOutput": {"hookEventName": EVENT, "additionalContext": TEXT}}` adds TEXT
//!   to the model's context.
//! - `Stop` (and Claude's `SubagentStop`): `{"decision": "block", "reason": TEXT}` keeps the
//!   agent working, with TEXT as the reason; plain text is not shown to the model there.
//! - Exit status 2 means "block" to both (a prompt would be refused), so a hook never exits 2:
//!   errors exit 1, which both treat as a non-blocking error.
//!
//! Nothing new means no output at all, so the agent is not told twice about the same mail.

use serde_json::{json, Value};

use super::output::{self, is_urgent};

/// Longest piece of one message's content in a notice, in characters.
const MAX_CONTENT_CHARS: usize = 600;
/// Longest notice, in characters (Claude Code shows longer hook output only as a preview).
const MAX_NOTICE_CHARS: usize = 8_000;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookFormat {
    /// Claude Code hooks (settings.json): JSON by event, read from the hook's standard input.
    Claude,
    /// Codex CLI hooks (hooks.json): the same JSON shapes as Claude Code.
    Codex,
    /// Plain text, for any other tool or a person.
    Text,
}

/// The events whose output is read as `hookSpecificOutput.additionalContext`.
const CONTEXT_EVENTS: &[&str] = &["UserPromptSubmit", "SessionStart", "PostToolUse"];
/// The events whose output is read as a `decision` to keep working.
const STOP_EVENTS: &[&str] = &["Stop", "SubagentStop"];

/// The event a hook runs for, from the JSON the tool passes on standard input; absent or
/// unreadable means `UserPromptSubmit`.
pub fn event_name(input: &str) -> String {
    serde_json::from_str::<Value>(input)
        .ok()
        .and_then(|v| v["hook_event_name"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "UserPromptSubmit".to_owned())
}

/// The notice: what is new, urgent messages first, then how to read and answer it.
pub fn notice(agent_id: &str, messages: &[Value], remaining: i64) -> String {
    let mut ordered: Vec<&Value> = messages.iter().filter(|m| is_urgent(m)).collect();
    let urgent = ordered.len();
    ordered.extend(messages.iter().filter(|m| !is_urgent(m)));
    let total = messages.len() as i64 + remaining.max(0);
    let mut text = format!(
        "agentbus: {total} new message{} for {agent_id}",
        if total == 1 { "" } else { "s" }
    );
    if urgent > 0 {
        text.push_str(&format!(" ({urgent} URGENT, shown first)"));
    }
    text.push_str(":\n");
    let mut shown = 0;
    for m in &ordered {
        let mut line = output::message_line(m);
        if line.chars().count() > MAX_CONTENT_CHARS {
            line = line.chars().take(MAX_CONTENT_CHARS).collect::<String>() + "…";
        }
        if text.chars().count() + line.chars().count() > MAX_NOTICE_CHARS {
            break;
        }
        if is_urgent(m) {
            text.push_str("URGENT ");
        }
        text.push_str(&line);
        text.push('\n');
        shown += 1;
    }
    let unshown = total - shown;
    if unshown > 0 {
        text.push_str(&format!("…and {unshown} more not shown here.\n"));
    }
    text.push_str(
        "They stay in your inbox until you read them: `agentbus inbox` (or the check_inbox tool) returns and acknowledges them; answer a request with `agentbus reply ID`.",
    );
    text
}

/// What the hook prints for these new messages, or `None` (print nothing) when there are
/// none.
pub fn render(
    format: HookFormat,
    event: &str,
    agent_id: &str,
    messages: &[Value],
    remaining: i64,
) -> Option<String> {
    if messages.is_empty() {
        return None;
    }
    let text = notice(agent_id, messages, remaining);
    Some(match format {
        HookFormat::Text => text,
        HookFormat::Claude | HookFormat::Codex => {
            if STOP_EVENTS.contains(&event) {
                json!({ "decision": "block", "reason": text }).to_string()
            } else if CONTEXT_EVENTS.contains(&event) {
                json!({
                    "hookSpecificOutput": { "hookEventName": event, "additionalContext": text }
                })
                .to_string()
            } else {
                // An event without a context channel: plain text, which the tool logs.
                text
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(seq: i64, priority: i64, content: &str) -> Value {
        json!({"seq": seq, "priority": priority, "message_type": "status",
            "sender_agent_id": "coord", "to": "web", "content": content})
    }

    #[test]
    fn nothing_new_prints_nothing() {
        for format in [HookFormat::Claude, HookFormat::Codex, HookFormat::Text] {
            assert_eq!(render(format, "UserPromptSubmit", "web", &[], 0), None);
        }
    }

    #[test]
    fn urgent_messages_come_first() {
        let messages = [message(3, 5, "later"), message(4, 0, "now")];
        let text = notice("web", &messages, 0);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "agentbus: 2 new messages for web (1 URGENT, shown first):"
        );
        assert!(lines[1].starts_with("URGENT #4 "), "{text}");
        assert!(lines[2].starts_with("#3 "), "{text}");
        assert!(lines.last().unwrap().contains("agentbus inbox"));
    }

    #[test]
    fn the_rest_is_counted() {
        let text = notice("web", &[message(1, 5, "x")], 4);
        assert!(
            text.starts_with("agentbus: 5 new messages for web:"),
            "{text}"
        );
        assert!(text.contains("…and 4 more not shown here."), "{text}");
    }

    #[test]
    fn long_content_is_cut() {
        let long = "x".repeat(5_000);
        let messages: Vec<Value> = (1..40).map(|s| message(s, 5, &long)).collect();
        let text = notice("web", &messages, 0);
        assert!(
            text.chars().count() <= MAX_NOTICE_CHARS + 300,
            "{}",
            text.len()
        );
        assert!(text.contains("more not shown here"));
    }

    #[test]
    fn claude_context_events_get_additional_context() {
        for event in ["UserPromptSubmit", "SessionStart", "PostToolUse"] {
            let out = render(HookFormat::Claude, event, "web", &[message(1, 5, "hi")], 0).unwrap();
            let v: Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["hookSpecificOutput"]["hookEventName"], event);
            assert!(v["hookSpecificOutput"]["additionalContext"]
                .as_str()
                .unwrap()
                .contains("#1 [status] coord → web: hi"));
            assert_eq!(v.as_object().unwrap().len(), 1, "{out}");
        }
    }

    #[test]
    fn stop_events_block_with_a_reason() {
        for format in [HookFormat::Claude, HookFormat::Codex] {
            let out = render(format, "Stop", "web", &[message(1, 5, "hi")], 0).unwrap();
            let v: Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["decision"], "block");
            assert!(v["reason"].as_str().unwrap().contains("hi"));
            assert_eq!(v.as_object().unwrap().len(), 2, "{out}");
        }
    }

    #[test]
    fn text_is_plain() {
        let out = render(HookFormat::Text, "Stop", "web", &[message(1, 5, "hi")], 0).unwrap();
        assert!(out.starts_with("agentbus: 1 new message for web:"), "{out}");
    }

    #[test]
    fn the_event_comes_from_the_hook_input() {
        assert_eq!(
            event_name(r#"{"hook_event_name":"Stop","stop_hook_active":false}"#),
            "Stop"
        );
        assert_eq!(event_name(""), "UserPromptSubmit");
        assert_eq!(event_name("not json"), "UserPromptSubmit");
    }
}
