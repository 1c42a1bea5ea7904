//! The rules for an agent id, the name an agent connects, sends, reads and is addressed by.
//!
//! An id is 1 to 255 characters. It may not start or end with white space and may not hold
//! control characters, format characters (bidi overrides such as U+202E, zero-width spaces,
//! the BOM, soft hyphens) or any other default-ignorable code point: all of those let two ids
//! that look the same on a screen, in a log or in the console be different ids.
//!
//! The broker signs its own messages (request timeouts) as [`BROKER_AGENT_ID`], and no client
//! may take that name, nor one a reader could take for it: an id is reserved when, trimmed,
//! NFKC-normalised, case-folded and reduced to its confusable skeleton (Unicode TS #39), it is
//! the skeleton of `agentbus`. So `Agentbus`, `ａｇｅｎｔｂｕｓ` (fullwidth) and `аgentbus` (with a
//! Cyrillic `а`) are all refused.

use unicode_normalization::UnicodeNormalization;
use unicode_security::confusable_detection::skeleton;

/// The sender of the broker's own messages.
pub const BROKER_AGENT_ID: &str = "agentbus";

/// Longest agent id, in characters (the column is VARCHAR(255)).
pub const MAX_AGENT_ID_CHARS: usize = 255;

/// Why an id was refused: a sentence for the client, naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidAgentId(pub String);

/// An agent id a client may use: only ever built by [`AgentId::parse`], so holding one means
/// it passed every rule above, the reserved-id rule included.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct AgentId(String);

impl AgentId {
    /// A valid agent id, or why `value` (given as `field`) is not one.
    pub fn parse(field: &str, value: String) -> Result<AgentId, InvalidAgentId> {
        check(field, &value)?;
        Ok(AgentId(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl std::ops::Deref for AgentId {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for AgentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An id a client may use (connect as, send as, be addressed by, bind a token to).
pub fn check(field: &str, value: &str) -> Result<(), InvalidAgentId> {
    if value.is_empty() {
        return Err(InvalidAgentId(format!("`{field}` must not be empty")));
    }
    if value.chars().count() > MAX_AGENT_ID_CHARS {
        return Err(InvalidAgentId(format!(
            "`{field}` is longer than {MAX_AGENT_ID_CHARS} characters"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(InvalidAgentId(format!(
            "`{field}` must not contain control characters"
        )));
    }
    if let Some(c) = value.chars().find(|&c| is_invisible(c)) {
        return Err(InvalidAgentId(format!(
            "`{field}` must not contain invisible or direction-changing characters (found U+{:04X})",
            c as u32
        )));
    }
    if value.starts_with(char::is_whitespace) || value.ends_with(char::is_whitespace) {
        return Err(InvalidAgentId(format!(
            "`{field}` must not start or end with white space"
        )));
    }
    if is_reserved(value) {
        return Err(InvalidAgentId(format!(
            "{value:?} is, or looks like, the broker's own agent id {BROKER_AGENT_ID:?}"
        )));
    }
    Ok(())
}

/// Whether `value` is the broker's id or would be read as it (see the module doc).
pub fn is_reserved(value: &str) -> bool {
    let folded: String = value
        .trim()
        .chars()
        .filter(|&c| !is_invisible(c))
        .nfkc()
        .flat_map(char::to_lowercase)
        .collect();
    skeleton(&folded).eq(skeleton(BROKER_AGENT_ID))
}

/// Format characters (general category Cf) and the other default-ignorable code points of
/// Unicode's DerivedCoreProperties.txt: characters that render as nothing, or that reorder
/// what is around them.
fn is_invisible(c: char) -> bool {
    matches!(c as u32,
        0x00AD | 0x034F | 0x061C | 0x0600..=0x0605 | 0x06DD | 0x070F | 0x08E2
        | 0x115F..=0x1160 | 0x17B4..=0x17B5 | 0x180B..=0x180F
        | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x206F
        | 0x3164 | 0xFE00..=0xFE0F | 0xFEFF | 0xFFA0 | 0xFFF0..=0xFFFB
        | 0x110BD | 0x110CD | 0x13430..=0x1343F | 0x1BCA0..=0x1BCA3
        | 0x1D173..=0x1D17A | 0xE0000..=0xE0FFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_ids_pass() {
        for id in [
            "alice",
            "codegen-1",
            "Ünïcødé agent",
            "エージェント",
            "a.b:c",
            "agentbus2",
            "agent bus",
        ] {
            assert_eq!(check("agent_id", id), Ok(()), "{id:?}");
        }
    }

    #[test]
    fn the_broker_id_and_its_lookalikes_are_reserved() {
        for id in [
            "agentbus",
            "Agentbus",
            "AGENTBUS",
            "ａｇｅｎｔｂｕｓ", // fullwidth
            "\u{0430}gentbus",  // Cyrillic a
            "agentbu\u{0455}",  // Cyrillic dze
        ] {
            assert!(is_reserved(id), "{id:?} should be reserved");
            assert!(check("agent_id", id).is_err(), "{id:?} should be refused");
        }
        for id in [
            "agentbus ",
            " agentbus",
            "agent\u{00AD}bus",
            "agentbus\u{200B}",
            "\u{FEFF}agentbus",
            "\u{202E}subtnega",
        ] {
            assert!(check("agent_id", id).is_err(), "{id:?} should be refused");
        }
        assert!(is_reserved("agentbus\u{200B}"));
        assert!(!is_reserved("agentbus2"));
        assert!(!is_reserved("agent"));
    }

    #[test]
    fn invisible_and_bidi_characters_are_refused_anywhere() {
        for id in [
            "al\u{200B}ice",
            "bob\u{202E}",
            "\u{2066}carol",
            "da\u{034F}ve",
            "e\u{FE0F}",
        ] {
            let err = check("agent_id", id).expect_err(id);
            assert!(err.0.contains("invisible"), "{err:?}");
        }
    }

    #[test]
    fn length_and_control_characters() {
        assert!(check("agent_id", "").is_err());
        assert!(check("agent_id", &"x".repeat(255)).is_ok());
        assert!(check("agent_id", &"x".repeat(256)).is_err());
        assert!(check("agent_id", "a\u{0}b").is_err());
        assert!(check("agent_id", "a\nb").is_err());
    }
}
