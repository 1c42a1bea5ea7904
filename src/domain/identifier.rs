//! Identifiers: agent types, message types and capabilities. 1 to 50 characters, each from
//! `A-Z a-z 0-9 _ - . :`, so they can be typed, logged and used in URLs as they are.

use std::fmt;
use std::ops::Deref;

/// Longest identifier, in characters.
pub const MAX_IDENTIFIER_CHARS: usize = 50;

/// Why an identifier was refused: a sentence for the client, naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidIdentifier(pub String);

/// Checks an identifier of at most `max_chars` characters.
pub fn check(field: &str, value: &str, max_chars: usize) -> Result<(), InvalidIdentifier> {
    if value.is_empty() || value.len() > max_chars {
        return Err(InvalidIdentifier(format!(
            "`{field}` must be 1 to {max_chars} characters"
        )));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
    {
        return Err(InvalidIdentifier(format!(
            "`{field}` may contain only letters, digits, '_', '-', '.' and ':'"
        )));
    }
    Ok(())
}

/// An agent's type (`codegen`, `reviewer` …): what messages sent `to_type` are addressed to.
/// Only ever built by [`AgentType::parse`], so holding one means it is valid.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct AgentType(String);

impl AgentType {
    /// The type of an agent that names none.
    pub const DEFAULT: &'static str = "agent";

    /// A valid agent type, or why `value` (given as `field`) is not one.
    pub fn parse(field: &str, value: String) -> Result<AgentType, InvalidIdentifier> {
        check(field, &value, MAX_IDENTIFIER_CHARS)?;
        Ok(AgentType(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl Deref for AgentType {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AgentType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_types_are_short_plain_identifiers() {
        assert_eq!(
            AgentType::parse("agent_type", "code-gen.v2:rust_1".into()).map(AgentType::into_string),
            Ok("code-gen.v2:rust_1".to_owned())
        );
        for bad in ["", "no spaces", "é", &"x".repeat(51)] {
            assert!(
                AgentType::parse("agent_type", bad.to_owned()).is_err(),
                "{bad:?}"
            );
        }
        assert_eq!(
            AgentType::parse("agent_type", "a b".into()),
            Err(InvalidIdentifier(
                "`agent_type` may contain only letters, digits, '_', '-', '.' and ':'".into()
            ))
        );
    }
}
