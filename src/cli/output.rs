//! Human output: one compact line per message or agent.

use serde_json::Value;

/// Highest priority that counts as urgent (0 and 1).
pub const URGENT_PRIORITY: i64 = 1;

pub fn is_urgent(message: &Value) -> bool {
    message["priority"]
        .as_i64()
        .is_some_and(|p| p <= URGENT_PRIORITY)
}

/// `#seq [type] sender → recipient (notes): content`, on one line: newlines in the content
/// are shown as `⏎`. Notes say what a reader must know to act: urgent, a request (and the id
/// to reply to), a reply (to which seq), an error.
pub fn message_line(m: &Value) -> String {
    let seq = m["seq"].as_i64().map_or("?".to_owned(), |s| s.to_string());
    let kind = m["message_type"].as_str().unwrap_or("message");
    let sender = m["sender_agent_id"].as_str().unwrap_or("?");
    let recipient = match (m["to"].as_str(), m["to_type"].as_str()) {
        (Some(agent), _) => agent.to_owned(),
        (None, Some(agent_type)) => format!("type:{agent_type}"),
        (None, None) => "all".to_owned(),
    };
    let mut notes = Vec::new();
    if is_urgent(m) {
        notes.push(format!("urgent, priority {}", m["priority"]));
    }
    if m["expects_reply"] == true {
        let id = m["id"].as_str().unwrap_or("?");
        notes.push(format!("request: agentbus reply {id}"));
    }
    if m["task"] == true {
        let id = m["id"].as_str().unwrap_or("?");
        notes.push(format!("task: agentbus task claim {id}"));
    }
    if let Some(of) = m["in_reply_to_seq"].as_i64() {
        notes.push(format!("reply to #{of}"));
    }
    if m["success"] == false {
        match m["error"].as_str() {
            Some(error) => notes.push(format!("failed: {}", compact(error))),
            None => notes.push("failed".to_owned()),
        }
    }
    if m["late"] == true {
        notes.push("late".to_owned());
    }
    let notes = if notes.is_empty() {
        String::new()
    } else {
        format!(" ({})", notes.join("; "))
    };
    let content = compact(m["content"].as_str().unwrap_or(""));
    format!("#{seq} [{kind}] {sender} → {recipient}{notes}: {content}")
}

/// Text on one line: line breaks become `⏎`.
pub fn compact(text: &str) -> String {
    text.trim_end()
        .replace("\r\n", "\n")
        .replace(['\n', '\r'], " ⏎ ")
}

/// One member of `GET …/agents`: `agent_id (type) online via rest · queue 3 · …`.
pub fn agent_line(a: &Value) -> String {
    let id = a["agent_id"].as_str().unwrap_or("?");
    let agent_type = a["agent_type"].as_str().unwrap_or("?");
    let mut parts = vec![format!("{id} ({agent_type})")];
    let presence = if a["online"] == true {
        match a["interface"].as_str() {
            Some(via) => format!("online via {via}"),
            None => "online".to_owned(),
        }
    } else {
        "offline".to_owned()
    };
    parts[0].push(' ');
    parts[0].push_str(&presence);
    parts.push(format!("queue {}", a["queue_depth"].as_i64().unwrap_or(0)));
    if let Some(seen) = a["last_seen_at"].as_str() {
        parts.push(format!("last seen {seen}"));
    }
    let capabilities: Vec<&str> = a["capabilities"]
        .as_array()
        .map(|c| c.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if !capabilities.is_empty() {
        parts.push(format!("can {}", capabilities.join(", ")));
    }
    if let Some(description) = a["description"].as_str().filter(|d| !d.is_empty()) {
        parts.push(compact(description));
    }
    parts.join(" · ")
}

/// One project of `GET /api/projects`: `id  name  (head N)`.
pub fn project_line(p: &Value) -> String {
    format!(
        "{}  {}  (head {})",
        p["id"].as_str().unwrap_or("?"),
        p["name"].as_str().unwrap_or("?"),
        p["head_seq"].as_i64().unwrap_or(0)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_broadcast() {
        let m = json!({"seq": 7, "message_type": "status", "sender_agent_id": "alice",
            "to": null, "to_type": null, "priority": 5, "content": "done\nall green\n"});
        assert_eq!(
            message_line(&m),
            "#7 [status] alice → all: done ⏎ all green"
        );
    }

    #[test]
    fn a_direct_urgent_request() {
        let m = json!({"seq": 12, "message_type": "question", "sender_agent_id": "coord",
            "to": "backend", "priority": 0, "expects_reply": true,
            "id": "0193a7e2-0000-7000-8000-000000000001", "content": "ready?"});
        assert_eq!(
            message_line(&m),
            "#12 [question] coord → backend (urgent, priority 0; request: agentbus reply 0193a7e2-0000-7000-8000-000000000001): ready?"
        );
    }

    #[test]
    fn a_failed_reply_to_a_type() {
        let m = json!({"seq": 13, "message_type": "response", "sender_agent_id": "agentbus",
            "to_type": "frontend", "priority": 3, "in_reply_to_seq": 12, "success": false,
            "error": "timeout", "late": true, "content": "no reply"});
        assert_eq!(
            message_line(&m),
            "#13 [response] agentbus → type:frontend (reply to #12; failed: timeout; late): no reply"
        );
    }

    #[test]
    fn urgency_is_priority_0_and_1() {
        assert!(is_urgent(&json!({"priority": 0})));
        assert!(is_urgent(&json!({"priority": 1})));
        assert!(!is_urgent(&json!({"priority": 2})));
        assert!(!is_urgent(&json!({})));
    }

    #[test]
    fn agents_and_projects() {
        let a = json!({"agent_id": "web", "agent_type": "frontend", "online": true,
            "interface": "rest", "queue_depth": 3, "last_seen_at": "2026-01-01T00:00:00Z",
            "capabilities": ["react", "css"], "description": "the UI"});
        assert_eq!(
            agent_line(&a),
            "web (frontend) online via rest · queue 3 · last seen 2026-01-01T00:00:00Z · can react, css · the UI"
        );
        let a =
            json!({"agent_id": "db", "agent_type": "backend", "online": false, "queue_depth": 0});
        assert_eq!(agent_line(&a), "db (backend) offline · queue 0");
        let p = json!({"id": "a7e2", "name": "web", "head_seq": 4});
        assert_eq!(project_line(&p), "a7e2  web  (head 4)");
    }
}
