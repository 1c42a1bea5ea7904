//! Pages bounded by bytes as well as by rows: a history or inbox page of large messages stops
//! before the message that would take it over its byte budget (it always holds at least one
//! message), so one request cannot make the broker hold hundreds of megabytes.

use diesel::QueryResult;
use diesel_async::AsyncPgConnection;

use super::cursors::{self, OwedQuery};
use crate::models::StoredMessage;

/// What a message costs in a page besides its content and metadata: its other fields, as
/// JSON.
pub const ROW_OVERHEAD_BYTES: usize = 1024;

/// About the size of a message in a page's JSON.
pub fn message_bytes(message: &StoredMessage) -> usize {
    message.content.len()
        + message.error.as_ref().map_or(0, String::len)
        + message.metadata.to_string().len()
        + ROW_OVERHEAD_BYTES
}

/// How many of the first messages, of these sizes, fit in `budget` bytes: at least one (when
/// there is one), so that every message can be read, however large.
pub fn fitting(sizes: impl IntoIterator<Item = usize>, budget: usize) -> usize {
    let mut total = 0usize;
    let mut count = 0;
    for size in sizes {
        total = total.saturating_add(size);
        if count > 0 && total > budget {
            break;
        }
        count += 1;
    }
    count
}

/// A page of owed messages (`q.limit` at most) within `budget` bytes, read in chunks so that
/// no more than about the budget is ever held. Returns the page and whether it stopped at
/// the budget.
pub async fn owed_page_within(
    conn: &mut AsyncPgConnection,
    q: &OwedQuery,
    budget: usize,
) -> QueryResult<(Vec<StoredMessage>, bool)> {
    /// Rows of the first chunk, before anything is known of their size.
    const FIRST_CHUNK: i64 = 32;
    let mut page: Vec<StoredMessage> = Vec::new();
    let mut bytes = 0usize;
    let mut largest = 0usize;
    let mut chunk = q.limit.min(FIRST_CHUNK);
    let mut query = q.clone();
    loop {
        query.limit = chunk;
        let rows = cursors::owed_page(conn, &query).await?;
        let exhausted = (rows.len() as i64) < chunk;
        for message in rows {
            let size = message_bytes(&message);
            if !page.is_empty() && bytes.saturating_add(size) > budget {
                return Ok((page, true));
            }
            bytes = bytes.saturating_add(size);
            largest = largest.max(size);
            query.resume = if q.by_priority {
                (message.priority, message.seq)
            } else {
                (0, message.seq)
            };
            page.push(message);
        }
        let left = q.limit - page.len() as i64;
        if exhausted || left <= 0 {
            return Ok((page, false));
        }
        // As many rows as what is left of the budget holds, at the largest size seen.
        let room = (budget.saturating_sub(bytes) / largest.max(1)).max(1);
        chunk = left.min(i64::try_from(room).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::fitting;

    #[test]
    fn a_page_stops_before_the_message_that_exceeds_the_budget() {
        assert_eq!(fitting([10, 10, 10], 25), 2);
        assert_eq!(fitting([10, 10, 10], 30), 3, "exactly the budget fits");
        assert_eq!(fitting([100, 1], 25), 1, "the first message always fits");
        assert_eq!(fitting([], 25), 0);
        assert_eq!(fitting([usize::MAX, 1], 25), 1, "no overflow");
    }
}
