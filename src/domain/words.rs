//! The words of a text, as full-text search sees them: one rule for the documents the
//! search indexer stores and for the queries that look them up.
//!
//! **A word is a longest run of letters and digits** (Unicode alphanumerics), **lowercased**.
//! Everything else separates words, punctuation included: `config.yaml` is the words
//! `config` and `yaml`, `src/db/search.rs` is `src`, `db`, `search` and `rs`, and
//! `index_pending` is `index` and `pending`. A search for `config.yaml` asks for both words,
//! so it finds the message that names the file, and a search for `yaml` finds it too.
//!
//! The rule runs in the broker, not in PostgreSQL: PostgreSQL's own parser cost about
//! 20 µs of its CPU per 200-byte message, this about half a microsecond of the broker's
//! (docs/PERFORMANCE.md).

/// The longest word kept, in bytes. A longer run of letters and digits (a hash, a blob of
/// base64) is not a word anyone searches for; PostgreSQL's lexemes stop at 2,047 bytes.
pub const MAX_WORD_BYTES: usize = 255;

/// The most bytes of distinct words one document keeps; words past it are not indexed.
/// Well below PostgreSQL's 1 MB limit on a `tsvector`, whatever the configured content limit.
pub const MAX_DOCUMENT_BYTES: usize = 256 * 1024;

/// Every word of `text`, in order, repeats included.
pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty() && w.len() <= MAX_WORD_BYTES)
        .map(str::to_lowercase)
}

/// The distinct words of `text`, sorted by their bytes: the search document of a message
/// (a `tsvector` without positions). Stops before their bytes, a separator each, pass
/// [`MAX_DOCUMENT_BYTES`].
pub fn document(text: &str) -> Vec<String> {
    let mut all: Vec<String> = words(text).collect();
    all.sort_unstable();
    all.dedup();
    let mut bytes = 0;
    let kept = all
        .iter()
        .take_while(|word| {
            bytes += word.len() + 1;
            bytes <= MAX_DOCUMENT_BYTES
        })
        .count();
    all.truncate(kept);
    all
}

/// The query a search for `text` makes, as a `tsquery` literal: every word must appear
/// (`'a' & 'b'`). `None` when `text` has no word at all: such a search matches nothing.
pub fn query(text: &str) -> Option<String> {
    let all = document(text);
    (!all.is_empty()).then(|| {
        all.iter()
            .map(|w| format!("'{w}'"))
            .collect::<Vec<_>>()
            .join(" & ")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(text: &str) -> Vec<String> {
        words(text).collect()
    }

    #[test]
    fn punctuation_separates_words_and_case_does_not_matter() {
        assert_eq!(
            split("About to modify config.yaml, OK?"),
            ["about", "to", "modify", "config", "yaml", "ok"]
        );
        assert_eq!(
            split("src/db/search.rs:42"),
            ["src", "db", "search", "rs", "42"]
        );
        assert_eq!(split("index_pending v1.2"), ["index", "pending", "v1", "2"]);
        assert_eq!(
            split("Größe ÄNDERN naïve 東京"),
            ["größe", "ändern", "naïve", "東京"]
        );
        assert!(split("  ... -- !! ").is_empty());
    }

    #[test]
    fn a_document_is_its_distinct_words_sorted() {
        assert_eq!(
            document("the bug, the API, THE fix"),
            ["api", "bug", "fix", "the"]
        );
        assert!(document("").is_empty());
        assert!(document("?!").is_empty());
        // By bytes, as PostgreSQL orders lexemes: a prefix first, then byte values.
        assert_eq!(document("ab a b Ä z"), ["a", "ab", "b", "z", "ä"]);
    }

    #[test]
    fn overlong_words_are_dropped_and_a_document_is_bounded() {
        let long = "x".repeat(MAX_WORD_BYTES + 1);
        assert_eq!(split(&format!("a {long} b")), ["a", "b"]);
        let longest = "y".repeat(MAX_WORD_BYTES);
        assert_eq!(split(&longest), std::slice::from_ref(&longest));

        // Far more distinct words than a document keeps.
        let text: String = (0..200_000).map(|n| format!("w{n} ")).collect();
        let bytes: usize = document(&text).iter().map(|w| w.len() + 1).sum();
        assert!(bytes <= MAX_DOCUMENT_BYTES, "{bytes}");
        assert!(bytes > MAX_DOCUMENT_BYTES - MAX_WORD_BYTES - 1);
    }

    #[test]
    fn a_query_asks_for_every_word_once() {
        assert_eq!(query("API bug").as_deref(), Some("'api' & 'bug'"));
        assert_eq!(query("config.yaml").as_deref(), Some("'config' & 'yaml'"));
        assert_eq!(query("bug BUG bug").as_deref(), Some("'bug'"));
        assert_eq!(query("... ?"), None);
        assert_eq!(query(""), None);
    }

    #[test]
    fn a_query_finds_what_the_document_holds() {
        let doc = document("Modified src/config.yaml: retries=3");
        for q in ["config.yaml", "CONFIG", "retries 3", "src/config"] {
            let asked = query(q).expect("words");
            for word in asked.split(" & ") {
                let word = word.trim_matches('\'');
                assert!(doc.iter().any(|w| w == word), "{q}: {word} in {doc:?}");
            }
        }
    }
}
