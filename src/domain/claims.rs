//! File claims: path patterns, their validation, and the conservative overlap rule that
//! decides whether two claims conflict (docs/PROTOCOL.md, "File claims").
//!
//! A pattern is a path relative to the repository root, `/`-separated, in which `*` matches
//! any run of characters within one segment (none included), `?` one character of a segment,
//! and a whole segment `**` any number of segments (none included). Every other character is
//! itself (`[id].tsx` is a file name, not a character class). A pattern ending in `/` means
//! everything under that directory (`src/api/` is `src/api/**`).
//!
//! Two patterns **overlap** when some path matches both. The test below is exact for this
//! grammar, and errs only on the conservative side: a `*` is allowed to match an empty
//! segment, which no real path has, so `a/*/b` is taken to overlap `a//b`-shaped patterns
//! that no file could match.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::notice::Notice;

/// Longest pattern, in bytes.
pub const MAX_PATTERN_BYTES: usize = 1024;
/// Longest claim reason or objection reason, in characters.
pub const MAX_REASON_CHARS: usize = 1000;

/// A refused input: the field at fault and a sentence saying how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        FieldError {
            field,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Char(char),
    /// `?`: one character.
    One,
    /// `*`: any run of characters (within a segment).
    Many,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// `**`: any number of segments.
    AnyDepth,
    Glob(Vec<Token>),
}

/// A validated, normalised path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    text: String,
    segments: Vec<Segment>,
    /// The characters before the first wildcard: two patterns can only overlap if one's
    /// prefix starts the other's (a cheap test before the exact one).
    prefix: String,
}

impl PathPattern {
    /// Parses one pattern as a client wrote it.
    pub fn parse(raw: &str) -> Result<PathPattern, String> {
        if raw.is_empty() {
            return Err("a path must not be empty".into());
        }
        if raw.len() > MAX_PATTERN_BYTES {
            return Err(format!(
                "a path may be at most {MAX_PATTERN_BYTES} bytes; this one has {}",
                raw.len()
            ));
        }
        if raw.chars().any(char::is_control) {
            return Err(format!("{raw:?} contains a control character"));
        }
        if raw.starts_with('/') || raw.starts_with('~') || is_drive_path(raw) {
            return Err(format!(
                "{raw:?} is absolute; give paths relative to the repository root, e.g. src/main.rs"
            ));
        }
        if raw.contains('\\') {
            return Err(format!("{raw:?} contains '\\'; separate segments with '/'"));
        }
        let text = match raw.strip_suffix('/') {
            Some(dir) => format!("{dir}/**"),
            None => raw.to_owned(),
        };
        let mut segments = Vec::new();
        for part in text.split('/') {
            match part {
                "" => return Err(format!("{raw:?} has an empty segment ('//')")),
                "." => {
                    return Err(format!(
                        "{raw:?} has a '.' segment; write the path without it"
                    ))
                }
                ".." => {
                    return Err(format!(
                        "{raw:?} has a '..' segment; paths stay inside the repository"
                    ))
                }
                "**" => {
                    // `a/**/**/b` is `a/**/b`.
                    if segments.last() != Some(&Segment::AnyDepth) {
                        segments.push(Segment::AnyDepth);
                    }
                }
                glob => segments.push(Segment::Glob(tokens(glob))),
            }
        }
        let prefix = text
            .chars()
            .take_while(|c| *c != '*' && *c != '?')
            .collect();
        Ok(PathPattern {
            text,
            segments,
            prefix,
        })
    }

    /// A path exactly as git names it: every character is itself, wildcards included.
    pub fn literal(path: &str) -> PathPattern {
        PathPattern {
            text: path.to_owned(),
            segments: path
                .split('/')
                .map(|s| Segment::Glob(s.chars().map(Token::Char).collect()))
                .collect(),
            prefix: path.to_owned(),
        }
    }

    /// The normalised pattern (`src/api/` is shown as `src/api/**`).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Could some path match both patterns?
    pub fn overlaps(&self, other: &PathPattern) -> bool {
        if !(self.prefix.starts_with(&other.prefix) || other.prefix.starts_with(&self.prefix)) {
            return false;
        }
        let mut seen = vec![false; (self.segments.len() + 1) * (other.segments.len() + 1)];
        segments_overlap(&self.segments, &other.segments, 0, 0, &mut seen)
    }

    /// Does this path (as git names it) match the pattern?
    pub fn matches(&self, path: &str) -> bool {
        self.overlaps(&PathPattern::literal(path))
    }
}

/// `C:` or `C:/...`: a Windows drive path.
fn is_drive_path(raw: &str) -> bool {
    let mut chars = raw.chars();
    matches!((chars.next(), chars.next()), (Some(d), Some(':')) if d.is_ascii_alphabetic())
}

fn tokens(segment: &str) -> Vec<Token> {
    let mut out: Vec<Token> = Vec::with_capacity(segment.len());
    for c in segment.chars() {
        let token = match c {
            '*' => Token::Many,
            '?' => Token::One,
            c => Token::Char(c),
        };
        // `**` inside a segment is `*`.
        if !(token == Token::Many && out.last() == Some(&Token::Many)) {
            out.push(token);
        }
    }
    out
}

/// Whether the segment lists `a[i..]` and `b[j..]` match a common path; `seen` marks the
/// states already explored (each is explored once, so this is O(|a|·|b|) segment tests).
fn segments_overlap(a: &[Segment], b: &[Segment], i: usize, j: usize, seen: &mut [bool]) -> bool {
    let state = i * (b.len() + 1) + j;
    if seen[state] {
        return false;
    }
    seen[state] = true;
    match (a.get(i), b.get(j)) {
        (None, None) => true,
        (Some(Segment::AnyDepth), _) => {
            // `**` matches nothing more, or also the segment b[j].
            segments_overlap(a, b, i + 1, j, seen)
                || (j < b.len() && segments_overlap(a, b, i, j + 1, seen))
        }
        (_, Some(Segment::AnyDepth)) => {
            segments_overlap(a, b, i, j + 1, seen)
                || (i < a.len() && segments_overlap(a, b, i + 1, j, seen))
        }
        (Some(Segment::Glob(x)), Some(Segment::Glob(y))) => {
            globs_overlap(x, y) && segments_overlap(a, b, i + 1, j + 1, seen)
        }
        _ => false,
    }
}

/// Whether two segment globs match a common string.
fn globs_overlap(x: &[Token], y: &[Token]) -> bool {
    let mut seen = vec![false; (x.len() + 1) * (y.len() + 1)];
    let mut stack = vec![(0usize, 0usize)];
    while let Some((i, j)) = stack.pop() {
        let state = i * (y.len() + 1) + j;
        if seen[state] {
            continue;
        }
        seen[state] = true;
        match (x.get(i), y.get(j)) {
            (None, None) => return true,
            (Some(Token::Many), other) => {
                // `*` ends here, or takes the character y[j] stands for.
                stack.push((i + 1, j));
                if other.is_some() {
                    stack.push((i, j + 1));
                }
            }
            (other, Some(Token::Many)) => {
                stack.push((i, j + 1));
                if other.is_some() {
                    stack.push((i + 1, j));
                }
            }
            (Some(p), Some(q)) => {
                let compatible = match (p, q) {
                    (Token::Char(c), Token::Char(d)) => c == d,
                    _ => true,
                };
                if compatible {
                    stack.push((i + 1, j + 1));
                }
            }
            _ => {}
        }
    }
    false
}

/// Parses a claim's list of patterns: 1 to `max` of them, each valid; duplicates (after
/// normalisation) are dropped, the order kept.
pub fn parse_paths(raw: &[String], max: usize) -> Result<Vec<PathPattern>, FieldError> {
    if raw.is_empty() {
        return Err(FieldError::new(
            "paths",
            "`paths` must list at least one path (e.g. [\"src/api/**\"])",
        ));
    }
    if raw.len() > max {
        return Err(FieldError::new(
            "paths",
            format!(
                "`paths` lists {} paths; at most {max} per claim (claim a directory with `dir/**`)",
                raw.len()
            ),
        ));
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for path in raw {
        let pattern = PathPattern::parse(path).map_err(|e| FieldError::new("paths", e))?;
        if seen.insert(pattern.as_str().to_owned()) {
            out.push(pattern);
        }
    }
    Ok(out)
}

/// Re-reads stored patterns (validated when they were claimed).
pub fn stored_paths(stored: &[String]) -> Vec<PathPattern> {
    stored
        .iter()
        .map(|p| PathPattern::parse(p).unwrap_or_else(|_| PathPattern::literal(p)))
        .collect()
}

/// The pairs (one of `mine`, one of `theirs`) that overlap.
pub fn overlapping(mine: &[PathPattern], theirs: &[PathPattern]) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    for a in mine {
        for b in theirs {
            if a.overlaps(b) {
                pairs.push((a.as_str().to_owned(), b.as_str().to_owned()));
            }
        }
    }
    pairs
}

/// What the conflict rule needs to know of a claim.
pub struct ClaimShape<'a> {
    pub agent_id: &'a str,
    pub shared: bool,
    pub paths: &'a [PathPattern],
}

/// The conflict rule: a claim conflicts with another agent's claim when at least one of the
/// two is exclusive and some path could match both. Returns the overlapping pairs of
/// patterns when they conflict. An agent's own claims never conflict with each other.
pub fn conflict(mine: &ClaimShape<'_>, theirs: &ClaimShape<'_>) -> Option<Vec<(String, String)>> {
    if mine.agent_id == theirs.agent_id || (mine.shared && theirs.shared) {
        return None;
    }
    let pairs = overlapping(mine.paths, theirs.paths);
    (!pairs.is_empty()).then_some(pairs)
}

/// The life of a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimState {
    /// Announced, in its objection window.
    Pending,
    Granted,
    /// Conflicted with another agent's claim when it was made.
    Refused,
    /// Another agent objected in the window.
    Objected,
    Released,
    /// Its TTL ran out.
    Expired,
}

impl ClaimState {
    pub const ALL: [ClaimState; 6] = [
        ClaimState::Pending,
        ClaimState::Granted,
        ClaimState::Refused,
        ClaimState::Objected,
        ClaimState::Released,
        ClaimState::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ClaimState::Pending => "pending",
            ClaimState::Granted => "granted",
            ClaimState::Refused => "refused",
            ClaimState::Objected => "objected",
            ClaimState::Released => "released",
            ClaimState::Expired => "expired",
        }
    }

    pub fn parse(raw: &str) -> Option<ClaimState> {
        ClaimState::ALL.into_iter().find(|s| s.as_str() == raw)
    }
}

/// The configured bounds of a claim.
#[derive(Debug, Clone, Copy)]
pub struct ClaimLimits {
    pub default_ttl_ms: i64,
    pub max_ttl_ms: i64,
    pub max_objection_ms: i64,
    pub max_paths: usize,
}

/// A claim request that passed validation.
#[derive(Debug, Clone)]
pub struct ClaimSpec {
    pub paths: Vec<PathPattern>,
    pub shared: bool,
    pub ttl_ms: i64,
    /// The objection window, if one was asked for.
    pub objection_ms: Option<i64>,
    pub reason: Option<String>,
}

impl ClaimSpec {
    /// Checks a claim's fields, in this order: `paths`, `ttl_ms`, `objection_ms`, `reason`.
    pub fn new(
        paths: &[String],
        shared: bool,
        ttl_ms: Option<i64>,
        objection_ms: Option<i64>,
        reason: Option<String>,
        limits: &ClaimLimits,
    ) -> Result<ClaimSpec, FieldError> {
        let paths = parse_paths(paths, limits.max_paths)?;
        let ttl_ms = check_ttl(ttl_ms, limits)?;
        let objection_ms = match objection_ms {
            None => None,
            Some(ms) if (1..=limits.max_objection_ms).contains(&ms) => Some(ms),
            Some(ms) => {
                return Err(FieldError::new(
                    "objection_ms",
                    format!(
                    "`objection_ms` must be between 1 and {} (claim_max_objection_ms), not {ms}",
                    limits.max_objection_ms
                ),
                ))
            }
        };
        let reason = check_reason("reason", reason)?;
        Ok(ClaimSpec {
            paths,
            shared,
            ttl_ms,
            objection_ms,
            reason,
        })
    }

    pub fn path_strings(&self) -> Vec<String> {
        self.paths.iter().map(|p| p.as_str().to_owned()).collect()
    }
}

/// A claim's TTL: the default when absent, 1 ms to the maximum otherwise.
pub fn check_ttl(ttl_ms: Option<i64>, limits: &ClaimLimits) -> Result<i64, FieldError> {
    match ttl_ms {
        None => Ok(limits.default_ttl_ms),
        Some(ms) if (1..=limits.max_ttl_ms).contains(&ms) => Ok(ms),
        Some(ms) => Err(FieldError::new(
            "ttl_ms",
            format!(
                "`ttl_ms` must be between 1 and {} (claim_max_ttl_ms), not {ms}",
                limits.max_ttl_ms
            ),
        )),
    }
}

/// An optional reason: at most [`MAX_REASON_CHARS`] characters without NUL; blank is none.
pub fn check_reason(
    field: &'static str,
    reason: Option<String>,
) -> Result<Option<String>, FieldError> {
    match reason {
        None => Ok(None),
        Some(r) if r.trim().is_empty() => Ok(None),
        Some(r) if r.chars().count() > MAX_REASON_CHARS || r.contains('\0') => {
            Err(FieldError::new(
                field,
                format!("`{field}` must be at most {MAX_REASON_CHARS} characters, without NUL"),
            ))
        }
        Some(r) => Ok(Some(r)),
    }
}

/// The union of two pattern lists, as stored strings, the first list's order first.
pub fn merged(existing: &[String], added: &[PathPattern]) -> Vec<String> {
    let mut out = existing.to_vec();
    for p in added {
        if !out.iter().any(|e| e == p.as_str()) {
            out.push(p.as_str().to_owned());
        }
    }
    out
}

/// A claim as stored and as clients see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Claim {
    pub id: Uuid,
    pub project_id: Uuid,
    pub agent_id: String,
    pub paths: Vec<String>,
    pub shared: bool,
    pub reason: Option<String>,
    #[serde(serialize_with = "serialize_state")]
    pub state: ClaimState,
    pub ttl_ms: i64,
    pub created_at: DateTime<Utc>,
    /// The end of its objection window, if it asked for one.
    pub decide_at: Option<DateTime<Utc>>,
    pub granted_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    /// Who ended it: the objector, or who released it.
    pub ended_by: Option<String>,
    pub end_reason: Option<String>,
}

fn serialize_state<S: serde::Serializer>(state: &ClaimState, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(state.as_str())
}

/// Another agent's claim that a claim conflicts with.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Conflict {
    pub claim_id: Uuid,
    /// The agent that holds (or, pending, asked for) it.
    pub holder: String,
    pub shared: bool,
    pub state: &'static str,
    pub paths: Vec<String>,
    pub reason: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub decide_at: Option<DateTime<Utc>>,
    /// `[mine, theirs]` pairs of patterns that could match a common path.
    pub overlapping: Vec<[String; 2]>,
}

impl Conflict {
    pub fn new(theirs: &Claim, pairs: Vec<(String, String)>) -> Conflict {
        Conflict {
            claim_id: theirs.id,
            holder: theirs.agent_id.clone(),
            shared: theirs.shared,
            state: theirs.state.as_str(),
            paths: theirs.paths.clone(),
            reason: theirs.reason.clone(),
            expires_at: theirs.expires_at,
            decide_at: theirs.decide_at,
            overlapping: pairs.into_iter().map(|(a, b)| [a, b]).collect(),
        }
    }
}

/// An objection to a pending claim.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Objection {
    pub agent_id: String,
    pub reason: String,
    pub created_at: DateTime<Utc>,
}

/// What happened to a claim, as its notice tells it.
#[derive(Debug, Clone, PartialEq)]
pub enum ClaimEvent {
    /// Pending: others may object until `decide_at`.
    Announced,
    Granted {
        merged: bool,
    },
    Refused {
        conflicts: Vec<Conflict>,
    },
    Objected {
        objection: Objection,
    },
    Released {
        forced: bool,
    },
    Expired,
}

impl ClaimEvent {
    pub fn name(&self) -> &'static str {
        match self {
            ClaimEvent::Announced => "announced",
            ClaimEvent::Granted { .. } => "granted",
            ClaimEvent::Refused { .. } => "refused",
            ClaimEvent::Objected { .. } => "objected",
            ClaimEvent::Released { .. } => "released",
            ClaimEvent::Expired => "expired",
        }
    }
}

fn time(at: Option<DateTime<Utc>>) -> String {
    at.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| "-".into())
}

impl Claim {
    pub fn mode(&self) -> &'static str {
        if self.shared {
            "shared"
        } else {
            "exclusive"
        }
    }

    /// Pending, or granted and not expired at `now`: it can conflict, it is held.
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        match self.state {
            ClaimState::Pending => true,
            ClaimState::Granted => self.expires_at.is_some_and(|at| at > now),
            _ => false,
        }
    }

    /// The broker's notice of this event. The announcement and every decision of an
    /// announced claim go to everyone; an immediate refusal only to the claimant.
    pub fn notice(&self, event: &ClaimEvent) -> Notice {
        let paths = self.paths.join(", ");
        let why = self
            .reason
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default();
        let (content, priority) = match event {
            ClaimEvent::Announced => (
                format!(
                    "{} claims {paths} ({}); objections until {}{why} (claim {})",
                    self.agent_id,
                    self.mode(),
                    time(self.decide_at),
                    self.id
                ),
                1,
            ),
            ClaimEvent::Granted { .. } => (
                format!(
                    "{} holds {paths} ({}) until {}{why} (claim {})",
                    self.agent_id,
                    self.mode(),
                    time(self.expires_at),
                    self.id
                ),
                3,
            ),
            ClaimEvent::Refused { conflicts } => (
                format!(
                    "claim {} of {} on {paths} refused: {}",
                    self.id,
                    self.agent_id,
                    conflicts
                        .iter()
                        .map(|c| format!(
                            "{} {} {} ({}) until {}",
                            c.holder,
                            if c.state == "pending" {
                                "asked for"
                            } else {
                                "holds"
                            },
                            c.paths.join(", "),
                            if c.shared { "shared" } else { "exclusive" },
                            time(c.expires_at.or(c.decide_at))
                        ))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
                2,
            ),
            ClaimEvent::Objected { objection } => (
                format!(
                    "claim {} of {} on {paths} refused: {} objected: {}",
                    self.id, self.agent_id, objection.agent_id, objection.reason
                ),
                2,
            ),
            ClaimEvent::Released { forced: false } => (
                format!("{} released {paths} (claim {})", self.agent_id, self.id),
                3,
            ),
            ClaimEvent::Released { forced: true } => (
                format!(
                    "claim {} of {} on {paths} released by force{}{}",
                    self.id,
                    self.agent_id,
                    self.ended_by
                        .as_deref()
                        .map(|b| format!(" by {b}"))
                        .unwrap_or_default(),
                    self.end_reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                ),
                2,
            ),
            ClaimEvent::Expired => (
                format!(
                    "claim {} of {} on {paths} expired at {}",
                    self.id,
                    self.agent_id,
                    time(self.expires_at)
                ),
                3,
            ),
        };
        let mut metadata = serde_json::json!({"event": event.name(), "claim": self});
        match event {
            ClaimEvent::Refused { conflicts } => {
                metadata["conflicts"] = serde_json::json!(conflicts)
            }
            ClaimEvent::Objected { objection } => {
                metadata["objections"] = serde_json::json!([objection])
            }
            ClaimEvent::Granted { merged: true } => metadata["merged"] = serde_json::json!(true),
            _ => {}
        }
        let notice = Notice::new(content, metadata, priority);
        match event {
            ClaimEvent::Refused { .. } => notice.to(Some(self.agent_id.clone()), None),
            _ => notice,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(raw: &str) -> PathPattern {
        PathPattern::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"))
    }

    fn overlap(a: &str, b: &str) -> bool {
        let (x, y) = (p(a), p(b));
        let forward = x.overlaps(&y);
        assert_eq!(forward, y.overlaps(&x), "overlap is symmetric: {a} / {b}");
        forward
    }

    #[test]
    fn exact_paths_overlap_only_themselves() {
        assert!(overlap("src/main.rs", "src/main.rs"));
        assert!(!overlap("src/main.rs", "src/lib.rs"));
        assert!(!overlap("src/main.rs", "src/main.rs.orig"));
        assert!(!overlap("src", "src/main.rs"));
    }

    #[test]
    fn double_star_covers_any_depth() {
        assert!(overlap("src/api/**", "src/api/v1/users.rs"));
        assert!(overlap("src/api/**", "src/api"));
        assert!(overlap("src/**", "src/api/**"));
        assert!(overlap("**", "anything/at/all"));
        assert!(overlap("**/*.md", "docs/PROTOCOL.md"));
        assert!(overlap("**/*.md", "README.md"));
        assert!(!overlap("src/api/**", "src/apix/a.rs"));
        assert!(!overlap("src/api/**", "docs/api/a.md"));
        assert!(overlap("a/**/z", "a/b/c/z"));
        assert!(overlap("a/**/z", "a/z"));
        assert!(!overlap("a/**/z", "a/b/c/y"));
    }

    #[test]
    fn single_star_stays_in_its_segment() {
        assert!(overlap("docs/*.md", "docs/PROTOCOL.md"));
        assert!(!overlap("docs/*.md", "docs/perf/a.md"));
        assert!(!overlap("docs/*.md", "docs/a.txt"));
        assert!(overlap("src/*/mod.rs", "src/http/mod.rs"));
        assert!(!overlap("src/*/mod.rs", "src/http/x/mod.rs"));
    }

    #[test]
    fn two_globs_overlap_when_some_name_matches_both() {
        assert!(overlap("docs/*.md", "docs/A*"));
        assert!(overlap("docs/*.md", "docs/*"));
        assert!(!overlap("docs/*.md", "docs/*.txt"));
        assert!(overlap("src/*_test.rs", "src/db_*.rs"));
        assert!(!overlap("src/a*b", "src/c*"));
        assert!(overlap("x/?.rs", "x/a.*"));
        assert!(!overlap("x/?.rs", "x/ab.rs"));
        assert!(overlap("x/??", "x/*"));
        assert!(!overlap("x/???", "x/??"));
        assert!(overlap("**/tests/**", "src/**/*.rs"));
        assert!(!overlap("**/*.md", "src/**/*.rs"));
    }

    #[test]
    fn brackets_and_braces_are_plain_characters() {
        assert!(overlap("pages/[id].tsx", "pages/[id].tsx"));
        assert!(!overlap("pages/[id].tsx", "pages/i.tsx"));
        assert!(overlap("pages/*.tsx", "pages/[id].tsx"));
        assert!(p("a/{b,c}").matches("a/{b,c}"));
    }

    #[test]
    fn a_path_matches_a_pattern() {
        assert!(p("src/api/**").matches("src/api/v1/users.rs"));
        assert!(!p("src/api/**").matches("src/apiary.rs"));
        assert!(p("docs/*.md").matches("docs/AGENTS.md"));
        // A path's own '*' is a character of its name, not a wildcard.
        assert!(!p("a/b").matches("a/*"));
        assert!(p("a/*").matches("a/*"));
    }

    #[test]
    fn a_trailing_slash_means_the_whole_directory() {
        assert_eq!(p("src/api/").as_str(), "src/api/**");
        assert!(overlap("src/api/", "src/api/x.rs"));
        assert_eq!(p("a/**/**/b").segments.len(), 3);
    }

    #[test]
    fn bad_paths_are_refused_with_a_reason() {
        for (raw, says) in [
            ("", "empty"),
            ("/etc/passwd", "absolute"),
            ("~/x", "absolute"),
            ("C:/x", "absolute"),
            ("a\\b", "'/'"),
            ("../x", ".."),
            ("a/../b", ".."),
            ("./a", "'.'"),
            ("a//b", "empty segment"),
            ("a\u{0}b", "control"),
            ("a\nb", "control"),
        ] {
            let e = PathPattern::parse(raw).expect_err(raw);
            assert!(e.contains(says), "{raw:?}: {e}");
        }
        let long = "a".repeat(MAX_PATTERN_BYTES + 1);
        assert!(PathPattern::parse(&long).is_err());
        assert!(PathPattern::parse(&"a".repeat(MAX_PATTERN_BYTES)).is_ok());
    }

    #[test]
    fn path_lists_are_bounded_and_deduplicated() {
        let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(parse_paths(&[], 10).unwrap_err().field, "paths");
        let many: Vec<String> = (0..11).map(|i| format!("f{i}")).collect();
        assert!(parse_paths(&many, 10)
            .unwrap_err()
            .message
            .contains("at most 10"));
        let parsed = parse_paths(&list(&["a/", "a/**", "b"]), 10).unwrap();
        let texts: Vec<&str> = parsed.iter().map(PathPattern::as_str).collect();
        assert_eq!(texts, ["a/**", "b"]);
        assert!(parse_paths(&list(&["ok", "/abs"]), 10).is_err());
    }

    #[test]
    fn the_conflict_rule() {
        let api = [p("src/api/**")];
        let users = [p("src/api/users.rs")];
        let docs = [p("docs/*.md")];
        let shape = |agent, shared, paths| ClaimShape {
            agent_id: agent,
            shared,
            paths,
        };
        // Exclusive against exclusive on overlapping patterns: conflict, pairs named.
        assert_eq!(
            conflict(&shape("a", false, &api), &shape("b", false, &users)),
            Some(vec![("src/api/**".into(), "src/api/users.rs".into())])
        );
        // Shared against shared: never.
        assert_eq!(
            conflict(&shape("a", true, &api), &shape("b", true, &users)),
            None
        );
        // Exclusive against shared, either way round.
        assert!(conflict(&shape("a", false, &api), &shape("b", true, &users)).is_some());
        assert!(conflict(&shape("a", true, &api), &shape("b", false, &users)).is_some());
        // No common path.
        assert_eq!(
            conflict(&shape("a", false, &api), &shape("b", false, &docs)),
            None
        );
        // The same agent.
        assert_eq!(
            conflict(&shape("a", false, &api), &shape("a", false, &users)),
            None
        );
    }

    #[test]
    fn claim_fields_are_checked_against_the_limits() {
        let limits = ClaimLimits {
            default_ttl_ms: 1000,
            max_ttl_ms: 5000,
            max_objection_ms: 100,
            max_paths: 2,
        };
        let paths = vec!["a".to_owned()];
        let spec = ClaimSpec::new(&paths, false, None, None, Some("  ".into()), &limits).unwrap();
        assert_eq!(
            (spec.ttl_ms, spec.objection_ms, spec.reason),
            (1000, None, None)
        );
        for ttl in [0, -1, 5001] {
            let e = ClaimSpec::new(&paths, false, Some(ttl), None, None, &limits).unwrap_err();
            assert_eq!(e.field, "ttl_ms");
        }
        let e = ClaimSpec::new(&paths, false, None, Some(101), None, &limits).unwrap_err();
        assert_eq!(e.field, "objection_ms");
        let e =
            ClaimSpec::new(&paths, false, None, None, Some("x".repeat(1001)), &limits).unwrap_err();
        assert_eq!(e.field, "reason");
        assert_eq!(
            merged(&["a".into()], &[p("b"), p("a")]),
            vec!["a".to_owned(), "b".to_owned()]
        );
    }

    #[test]
    fn states_round_trip() {
        for s in ClaimState::ALL {
            assert_eq!(ClaimState::parse(s.as_str()), Some(s));
        }
        assert_eq!(ClaimState::parse("held"), None);
    }

    #[test]
    fn long_patterns_stay_cheap() {
        // Each state is explored once: a worst case finishes at once.
        let a = p(&format!("{}x", "*a".repeat(400)));
        let b = p(&format!("{}y", "a*".repeat(400)));
        assert!(!a.overlaps(&b));
        let deep_a = p(&"**/x".repeat(100));
        let deep_b = p(&"y/**".repeat(100));
        // y/x/y/x/… matches both.
        assert!(deep_a.overlaps(&deep_b));
        let started = std::time::Instant::now();
        assert!(!p("*a/".repeat(300).trim_end_matches('/'))
            .overlaps(&p("*b/".repeat(300).trim_end_matches('/'))));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }
}
