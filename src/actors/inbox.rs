//! Inboxes read over HTTP (the REST inbox, MCP's `check_inbox`): one page of what an agent is
//! owed, optionally acknowledged in the same call, and optionally waited for.
//!
//! A waiting read registers with its project's channel ([`WaitInbox`]) *before* it reads the
//! store, so a message committed at any moment is either in what the read sees or wakes the
//! waiter afterwards. The channel wakes the waiters a committed message may be owed to
//! ([`InboxWaiters`]); a woken read reads the store again. Nothing polls the database.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::channel::{ChannelActor, WaitInbox};
use crate::db::cursors::{self, Progress};
use crate::db::{inbox, DbPool};
use crate::models::StoredMessage;

/// Why a waiting read was woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Something committed may be owed to it.
    Owed,
    /// The broker is shutting down: answer now.
    ShuttingDown,
}

struct Waiter {
    agent_type: String,
    tx: oneshot::Sender<Wake>,
}

/// The reads of one project waiting for mail, by agent id. Each is woken at most once (a
/// woken read registers again if it found nothing).
#[derive(Default)]
pub struct InboxWaiters {
    by_agent: HashMap<String, Vec<Waiter>>,
    /// Shutting down: new waiters are answered at once.
    draining: bool,
}

impl InboxWaiters {
    /// Registers a waiter. Waiters whose read gave up (the client went away) are dropped
    /// here, so the map holds no more than the reads still waiting plus those since the last
    /// registration.
    pub fn add(&mut self, agent_id: String, agent_type: String, tx: oneshot::Sender<Wake>) {
        if self.draining {
            let _ = tx.send(Wake::ShuttingDown);
            return;
        }
        self.by_agent.retain(|_, waiters| {
            waiters.retain(|w| !w.tx.is_closed());
            !waiters.is_empty()
        });
        self.by_agent
            .entry(agent_id)
            .or_default()
            .push(Waiter { agent_type, tx });
    }

    /// Wakes every waiter the message may be owed to: the agent it is addressed to, the
    /// agents of the type it is addressed to, or everyone; never its sender (unless it
    /// addressed itself by name). Returns how many were woken.
    pub fn wake_for(&mut self, message: &StoredMessage) -> usize {
        if self.by_agent.is_empty() {
            return 0;
        }
        let wake = |waiters: Vec<Waiter>| {
            let n = waiters.len();
            for w in waiters {
                let _ = w.tx.send(Wake::Owed);
            }
            n
        };
        if let Some(to) = &message.recipient_agent_id {
            return self.by_agent.remove(to).map_or(0, wake);
        }
        let mut woken = 0;
        self.by_agent.retain(|agent_id, waiters| {
            if *agent_id == message.sender_agent_id {
                return true;
            }
            let (hit, keep): (Vec<Waiter>, Vec<Waiter>) =
                std::mem::take(waiters).into_iter().partition(|w| {
                    message
                        .recipient_agent_type
                        .as_ref()
                        .is_none_or(|t| *t == w.agent_type)
                });
            woken += wake(hit);
            *waiters = keep;
            !waiters.is_empty()
        });
        woken
    }

    /// Answers every waiter (the broker is shutting down) and every later one. Returns how
    /// many were waiting.
    pub fn drain(&mut self) -> usize {
        self.draining = true;
        let mut n = 0;
        for (_, waiters) in self.by_agent.drain() {
            for w in waiters {
                n += 1;
                let _ = w.tx.send(Wake::ShuttingDown);
            }
        }
        n
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_agent.values().map(Vec::len).sum()
    }

    /// No read is waiting (a channel without any reads no other node's commits for them).
    pub fn is_empty(&self) -> bool {
        self.by_agent.is_empty()
    }
}

/// Bounds on the inbox reads waiting at once: over the whole broker and per project.
#[derive(Clone)]
pub struct WaitLimits {
    counts: Arc<Mutex<WaitCounts>>,
    overall: usize,
    per_project: usize,
    /// Reads waiting now, for `/metrics`.
    gauge: prometheus_client::metrics::gauge::Gauge,
}

#[derive(Default)]
struct WaitCounts {
    total: usize,
    projects: HashMap<Uuid, usize>,
}

/// One admitted waiting read; dropping it frees its place.
pub struct WaitPermit {
    limits: WaitLimits,
    project_id: Uuid,
}

impl WaitLimits {
    /// 0 means no limit. `gauge` follows the number of reads waiting.
    pub fn new(
        overall: usize,
        per_project: usize,
        gauge: prometheus_client::metrics::gauge::Gauge,
    ) -> Self {
        let unbounded = |n: usize| if n == 0 { usize::MAX } else { n };
        WaitLimits {
            counts: Arc::default(),
            overall: unbounded(overall),
            per_project: unbounded(per_project),
            gauge,
        }
    }

    /// Admits a waiting read, or names the limit it would exceed (`"broker"`, `"project"`).
    pub fn acquire(&self, project_id: Uuid) -> Result<WaitPermit, &'static str> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if counts.total >= self.overall {
            return Err("broker");
        }
        let project = counts.projects.entry(project_id).or_default();
        if *project >= self.per_project {
            return Err("project");
        }
        *project += 1;
        counts.total += 1;
        self.gauge.set(counts.total as i64);
        Ok(WaitPermit {
            limits: self.clone(),
            project_id,
        })
    }

    /// Reads waiting now.
    pub fn waiting(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Drop for WaitPermit {
    fn drop(&mut self) {
        let mut counts = self.limits.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.total = counts.total.saturating_sub(1);
        self.limits.gauge.set(counts.total as i64);
        if let Some(n) = counts.projects.get_mut(&self.project_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.projects.remove(&self.project_id);
            }
        }
    }
}

/// One read of an agent's inbox.
#[derive(Debug, Clone)]
pub struct InboxRead {
    pub project_id: Uuid,
    pub agent_id: String,
    pub limit: i64,
    pub urgent_only: bool,
    /// Acknowledge what is returned (done, `delivered_at` set), in the same call.
    pub ack: bool,
    /// Wait this long for something to be owed when nothing is.
    pub wait: Duration,
    /// Most bytes of messages in the page (`max_page_bytes`).
    pub max_bytes: usize,
    /// Continue after this (priority, seq) of the delivery order (a page's `next`).
    pub resume: Option<(i16, i64)>,
}

/// What a read returns.
#[derive(Debug, Clone)]
pub struct InboxPage {
    pub messages: Vec<StoredMessage>,
    /// How many more are owed after this page.
    pub remaining: i64,
    /// The page stopped at its byte budget before its limit.
    pub truncated: bool,
    /// The agent's ack floor after the read (and its acknowledgement).
    pub ack_floor: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("the agent is not a member of the project")]
    NotAMember,
    #[error("{0}")]
    Pool(#[from] diesel_async::pooled_connection::deadpool::PoolError),
    #[error("{0}")]
    Database(#[from] diesel::result::Error),
    #[error("the project channel did not answer: {0}")]
    Channel(#[from] MailboxError),
}

/// Reads an agent's inbox: a page of what it is owed at once, or, when nothing is and
/// `read.wait` is not zero, as soon as something is (an empty page at the deadline or when
/// the broker shuts down). No database connection is held while waiting.
pub async fn read(
    pool: &DbPool,
    channel: &Addr<ChannelActor>,
    read: &InboxRead,
) -> Result<InboxPage, InboxError> {
    let deadline = tokio::time::Instant::now() + read.wait;
    loop {
        let waiting = tokio::time::Instant::now() < deadline;
        let (state, woken) = {
            let mut conn = pool.get().await?;
            let state = inbox::member_state(&mut conn, read.project_id, &read.agent_id)
                .await?
                .ok_or(InboxError::NotAMember)?;
            // Registered before the store is read: nothing committed after the read is missed.
            // A channel that no longer answers (the broker is stopping) cannot wake the read:
            // it answers with what the store has now instead of failing.
            let woken = if waiting {
                let (tx, rx) = oneshot::channel();
                channel
                    .send(WaitInbox {
                        agent_id: read.agent_id.clone(),
                        agent_type: state.cursor.agent_type.clone(),
                        tx,
                    })
                    .await
                    .ok()
                    .map(|()| rx)
            } else {
                None
            };
            let page = inbox::owed_page(
                &mut conn,
                read.project_id,
                &read.agent_id,
                &state.cursor,
                &inbox::PageBounds {
                    limit: read.limit,
                    urgent_only: read.urgent_only,
                    resume: read.resume,
                    max_bytes: read.max_bytes,
                },
            )
            .await?;
            match woken {
                Some(rx) if page.messages.is_empty() => (state, rx),
                _ => return finish(&mut conn, read, state.cursor.ack_floor, page).await,
            }
        };
        tokio::select! {
            wake = woken => match wake {
                Ok(Wake::Owed) => continue,
                // Shutting down, or the channel went away: answer with nothing.
                Ok(Wake::ShuttingDown) | Err(_) => {}
            },
            _ = tokio::time::sleep_until(deadline) => {}
        }
        return Ok(InboxPage {
            messages: Vec::new(),
            remaining: 0,
            truncated: false,
            ack_floor: state.cursor.ack_floor,
        });
    }
}

/// Acknowledges the page if asked to, and builds the answer.
async fn finish(
    conn: &mut diesel_async::AsyncPgConnection,
    read: &InboxRead,
    ack_floor: i64,
    page: inbox::OwedPage,
) -> Result<InboxPage, InboxError> {
    let mut ack_floor = ack_floor;
    if read.ack && !page.messages.is_empty() {
        let progress = Progress {
            done: page.messages.iter().map(|m| m.seq).collect(),
            up_to: None,
        };
        ack_floor = cursors::apply_progress(conn, read.project_id, &read.agent_id, &progress)
            .await?
            .ok_or(InboxError::NotAMember)?
            .ack_floor;
    }
    Ok(InboxPage {
        messages: page.messages,
        remaining: page.remaining,
        truncated: page.truncated,
        ack_floor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(sender: &str, to: Option<&str>, to_type: Option<&str>) -> StoredMessage {
        StoredMessage {
            id: Uuid::new_v4(),
            project_id: Uuid::nil(),
            seq: 1,
            sender_agent_id: sender.into(),
            sender_agent_type: "t".into(),
            sender_session_id: None,
            recipient_agent_id: to.map(str::to_owned),
            message_type: "status".into(),
            content: String::new(),
            metadata: serde_json::json!({}),
            priority: 2,
            correlation_id: None,
            reply_to: None,
            client_msg_id: None,
            created_at: chrono::Utc::now(),
            expires_at: None,
            delivered_at: None,
            read_at: None,
            recipient_agent_type: to_type.map(str::to_owned),
            expects_reply: false,
            reply_deadline: None,
            replied_at: None,
            in_reply_to_seq: None,
            success: None,
            error: None,
            duration_ms: None,
            late: false,
            task: false,
        }
    }

    fn waiter(w: &mut InboxWaiters, agent: &str, agent_type: &str) -> oneshot::Receiver<Wake> {
        let (tx, rx) = oneshot::channel();
        w.add(agent.into(), agent_type.into(), tx);
        rx
    }

    #[test]
    fn a_message_wakes_exactly_those_it_may_be_owed_to() {
        let mut w = InboxWaiters::default();
        let mut a = waiter(&mut w, "a", "front");
        let mut b = waiter(&mut w, "b", "back");
        let mut c = waiter(&mut w, "c", "back");
        assert_eq!(w.wake_for(&message("x", Some("a"), None)), 1);
        assert_eq!(a.try_recv(), Ok(Wake::Owed));
        assert!(b.try_recv().is_err() && c.try_recv().is_err());
        // To a type: its agents, not the sender.
        assert_eq!(w.wake_for(&message("c", None, Some("back"))), 1);
        assert_eq!(b.try_recv(), Ok(Wake::Owed));
        assert!(
            c.try_recv().is_err(),
            "the sender is not woken by its own send"
        );
        // A broadcast: everyone else; a direct message to nobody waiting: no one.
        assert_eq!(w.wake_for(&message("x", Some("zz"), None)), 0);
        assert_eq!(w.wake_for(&message("x", None, None)), 1);
        assert_eq!(c.try_recv(), Ok(Wake::Owed));
        assert!(w.is_empty(), "a woken waiter is gone");
    }

    #[test]
    fn gone_waiters_are_dropped_and_draining_answers_everyone() {
        let mut w = InboxWaiters::default();
        drop(waiter(&mut w, "a", "t"));
        let mut b = waiter(&mut w, "b", "t");
        assert_eq!(w.len(), 1, "the abandoned waiter was dropped");
        assert_eq!(w.drain(), 1);
        assert_eq!(b.try_recv(), Ok(Wake::ShuttingDown));
        let mut late = waiter(&mut w, "c", "t");
        assert_eq!(late.try_recv(), Ok(Wake::ShuttingDown));
        assert!(w.is_empty());
    }

    #[test]
    fn waits_are_bounded_per_project_and_overall_and_freed() {
        let gauge = prometheus_client::metrics::gauge::Gauge::default();
        let limits = WaitLimits::new(3, 2, gauge.clone());
        let (p, q) = (Uuid::new_v4(), Uuid::new_v4());
        let first = limits.acquire(p).expect("first");
        let _second = limits.acquire(p).expect("second");
        assert_eq!(limits.acquire(p).err(), Some("project"));
        let _third = limits.acquire(q).expect("another project");
        assert_eq!(limits.acquire(q).err(), Some("broker"));
        drop(first);
        assert_eq!(limits.waiting(), 2);
        assert_eq!(gauge.get(), 2);
        assert!(limits.acquire(p).is_ok(), "a place was freed");
    }
}
