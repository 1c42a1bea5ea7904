//! Finds a project's [`ChannelActor`], starting it on first use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use actix::{Actor, Addr, ArbiterHandle};
use uuid::Uuid;

use super::channel::{ChannelActor, ClusterLink, Committed, CommittedItem};
use super::settle::Settlement;
use crate::stats::Stats;

/// The running channels, one per project that has seen a connection or a message since the
/// broker started. Consulted once per connection and once per project per committed batch,
/// never per delivery.
#[derive(Clone)]
pub struct ChannelRegistry {
    channels: Arc<Mutex<HashMap<Uuid, Addr<ChannelActor>>>>,
    /// Where channels run: one arbiter (thread) for all of them, apart from the HTTP workers.
    arbiter: ArbiterHandle,
    stats: Stats,
    /// This node and the database, for channels that follow other nodes' commits.
    cluster: Option<ClusterLink>,
}

impl ChannelRegistry {
    pub fn new(arbiter: ArbiterHandle, stats: Stats) -> Self {
        ChannelRegistry {
            channels: Arc::default(),
            arbiter,
            stats,
            cluster: None,
        }
    }

    /// Channels started from now on register their sessions as this node's and follow the
    /// commits of other nodes on the same database.
    pub fn clustered(mut self, link: ClusterLink) -> Self {
        self.cluster = Some(link);
        self
    }

    /// This node's id, when it is part of a cluster.
    pub fn node_id(&self) -> Option<&str> {
        self.cluster.as_ref().map(|link| link.node_id.as_str())
    }

    /// The channel of `project_id`, started with `head_seq` as its newest committed seq if it
    /// is not running yet. Callers pass the head they know to be committed; once running, the
    /// channel learns every later commit from the persistence actor.
    pub fn get_or_start(&self, project_id: Uuid, head_seq: i64) -> Addr<ChannelActor> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        channels
            .entry(project_id)
            .or_insert_with(|| {
                let (stats, cluster) = (self.stats.clone(), self.cluster.clone());
                ChannelActor::start_in_arbiter(&self.arbiter, move |_| {
                    let channel = ChannelActor::new(project_id, head_seq, stats);
                    match cluster {
                        Some(link) => channel.clustered(link),
                        None => channel,
                    }
                })
            })
            .clone()
    }

    /// Routes committed messages of one project, in seq order, to its channel: the one way
    /// a commit reaches live sessions. The persistence actor calls it after each batch; any
    /// other source of commits (another broker's, read back from PostgreSQL) can call it the
    /// same way, with items settled by [`super::settle::Reply::Broker`]. `head_before`: the
    /// seq just before the first new message of the items, or `None` if they are all
    /// retries of messages stored earlier. `committed`: when their commit returned.
    pub fn route(
        &self,
        project_id: Uuid,
        head_before: Option<i64>,
        items: Vec<CommittedItem>,
        committed: Instant,
    ) {
        if let Some(head_before) = head_before {
            // A channel started here starts before these messages, so that a session joining
            // it now receives them live rather than missing them.
            self.get_or_start(project_id, head_before)
                .do_send(Committed {
                    head_before: Some(head_before),
                    items,
                    committed,
                });
        } else if let Some(channel) = self.get(project_id) {
            channel.do_send(Committed {
                head_before: None,
                items,
                committed,
            });
        } else {
            // Only retries, and nobody connected to the project: settle them here.
            for item in items {
                item.reply.settle(Settlement::Stored {
                    message: item.message,
                    no_recipient: item.no_recipient,
                });
            }
        }
    }

    /// The channel of `project_id` if it is running.
    pub fn get(&self, project_id: Uuid) -> Option<Addr<ChannelActor>> {
        self.channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&project_id)
            .cloned()
    }

    /// Every running channel, with its project.
    pub fn projects(&self) -> Vec<(Uuid, Addr<ChannelActor>)> {
        self.channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .map(|(id, channel)| (*id, channel.clone()))
            .collect()
    }

    /// Every running channel.
    pub fn all(&self) -> Vec<Addr<ChannelActor>> {
        self.channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .values()
            .cloned()
            .collect()
    }
}
