//! What became of a send, and who is told. A send is settled exactly once: by the
//! persistence actor when it fails (or is refused before its batch), or by its project's
//! channel once it committed, in seq order with the deliveries of the same batch. Neither
//! knows who waits: a session, a REST call, or the broker itself. Each formats its own
//! answer from the raw [`Settlement`] (a session writes its own `sent` receipt).

use actix::prelude::*;
use tokio::sync::oneshot;

use crate::models::StoredMessage;
use crate::protocol::Rejection;

/// Who to tell what became of a send.
pub enum Reply {
    /// A WebSocket session: it gets the settlement as a [`Settled`] message.
    Session(Recipient<Settled>),
    /// A REST publish waiting for the commit.
    Http(oneshot::Sender<Settlement>),
    /// The broker itself (its timeout responses, or commits another source routes): nobody
    /// to tell.
    Broker,
}

/// What became of a send.
// Moved once from the persistence actor to the one who waits, never stored in bulk: boxing
// the large variant would only add an allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Settlement {
    Stored {
        message: StoredMessage,
        /// Stored, but nobody can receive it (the sender is warned with `no_recipient`).
        no_recipient: bool,
    },
    Failed {
        rejection: Rejection,
        client_msg_id: Option<String>,
    },
}

/// The settlement of one of a session's sends.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Settled(pub Settlement);

impl Reply {
    /// Tells whoever waits. A waiter that has gone away is not an error: nobody is left to
    /// tell.
    pub fn settle(self, settlement: Settlement) {
        match self {
            Reply::Session(session) => session.do_send(Settled(settlement)),
            Reply::Http(tx) => {
                let _ = tx.send(settlement);
            }
            Reply::Broker => {}
        }
    }
}

/// Why a stored message can reach nobody, in words.
pub fn no_recipient_text(message: &StoredMessage) -> String {
    let whom = match (&message.recipient_agent_id, &message.recipient_agent_type) {
        (Some(agent), _) => format!("agent {agent:?} has never connected to this project"),
        (None, Some(agent_type)) => {
            format!("no agent of type {agent_type:?} is a member of this project")
        }
        (None, None) => "no other agent is a member of this project".to_owned(),
    };
    if message.expects_reply {
        format!("stored, but {whom}: the request was dead-lettered")
    } else {
        format!("stored, but {whom}")
    }
}
