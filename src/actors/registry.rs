//! Finds a project's [`ChannelActor`], starting it on first use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use actix::{Actor, Addr, ArbiterHandle};
use uuid::Uuid;

use super::channel::ChannelActor;
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
}

impl ChannelRegistry {
    pub fn new(arbiter: ArbiterHandle, stats: Stats) -> Self {
        ChannelRegistry {
            channels: Arc::default(),
            arbiter,
            stats,
        }
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
                let stats = self.stats.clone();
                ChannelActor::start_in_arbiter(&self.arbiter, move |_| {
                    ChannelActor::new(project_id, head_seq, stats)
                })
            })
            .clone()
    }

    /// The channel of `project_id` if it is running.
    pub fn get(&self, project_id: Uuid) -> Option<Addr<ChannelActor>> {
        self.channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&project_id)
            .cloned()
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
