//! Rate limits: a token bucket per connection and one per project (governor's GCRA), so a
//! short burst passes and a sustained flood is refused with `rate_limited` and a
//! `retry_after_ms`, without disconnecting anyone.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use uuid::Uuid;

fn quota(per_second: u32, burst: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(per_second)?;
    let burst = NonZeroU32::new(burst.max(per_second)).unwrap_or(rate);
    Some(Quota::per_second(rate).allow_burst(burst))
}

/// One connection's bucket (`None`: unlimited).
pub struct SessionLimit(Option<DefaultDirectRateLimiter>);

impl SessionLimit {
    pub fn new(per_second: u32, burst: u32) -> Self {
        SessionLimit(quota(per_second, burst).map(RateLimiter::direct))
    }

    /// `Err(wait)` when the send must wait this long.
    pub fn check(&self) -> Result<(), Duration> {
        match &self.0 {
            None => Ok(()),
            Some(limiter) => limiter
                .check()
                .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now())),
        }
    }
}

/// Every project's bucket, shared by all connections and the REST publish route.
#[derive(Clone)]
pub struct ProjectLimits(Option<Arc<DefaultKeyedRateLimiter<Uuid>>>);

impl ProjectLimits {
    pub fn new(per_second: u32, burst: u32) -> Self {
        ProjectLimits(quota(per_second, burst).map(|q| Arc::new(RateLimiter::keyed(q))))
    }

    /// `Err(wait)` when the project's next send must wait this long.
    pub fn check(&self, project_id: Uuid) -> Result<(), Duration> {
        match &self.0 {
            None => Ok(()),
            Some(limiter) => limiter
                .check_key(&project_id)
                .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let limit = SessionLimit::new(10, 20);
        assert!((0..20).all(|_| limit.check().is_ok()));
        let wait = limit.check().expect_err("the 21st send waits");
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100));
        assert!(SessionLimit::new(0, 0).check().is_ok(), "0 means no limit");
        let projects = ProjectLimits::new(1, 1);
        let (p, q) = (Uuid::new_v4(), Uuid::new_v4());
        assert!(projects.check(p).is_ok());
        assert!(projects.check(p).is_err());
        assert!(projects.check(q).is_ok(), "each project has its own bucket");
    }
}

/// How long a send refused by the [`CommitBudget`] is told to wait before trying again.
pub const BUDGET_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The broker-wide budget of bytes held by sends waiting for their commit (queued for the
/// group-commit writer or in the batch being written), from every connection and REST
/// publish together. The per-connection bound (`max_pending_sends`) counts sends, not bytes,
/// and not across connections: without this, a stalled database lets a few busy clients fill
/// the broker's memory. Owned by the one writer, so a plain counter.
#[derive(Debug)]
pub struct CommitBudget {
    /// 0: no limit.
    limit: usize,
    held: usize,
}

impl CommitBudget {
    pub fn new(limit: usize) -> Self {
        CommitBudget { limit, held: 0 }
    }

    /// Takes `bytes` from the budget, or says how long to wait (nothing is taken then).
    /// `exempt` sends (the broker's own timeout responses) always pass, and count. A send
    /// always passes when nothing else is held, so one larger than the whole budget is not
    /// refused forever.
    pub fn admit(&mut self, bytes: usize, exempt: bool) -> Result<(), Duration> {
        let fits =
            self.limit == 0 || self.held == 0 || self.held.saturating_add(bytes) <= self.limit;
        if fits || exempt {
            self.held = self.held.saturating_add(bytes);
            Ok(())
        } else {
            Err(BUDGET_RETRY_AFTER)
        }
    }

    /// Gives back what settled sends held.
    pub fn release(&mut self, bytes: usize) {
        self.held = self.held.saturating_sub(bytes);
    }

    pub fn held(&self) -> usize {
        self.held
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    #[test]
    fn the_budget_refuses_what_does_not_fit_until_bytes_are_released() {
        let mut budget = CommitBudget::new(1_000);
        assert!(budget.admit(600, false).is_ok());
        assert!(budget.admit(400, false).is_ok(), "exactly full fits");
        assert_eq!(budget.admit(1, false), Err(BUDGET_RETRY_AFTER));
        assert_eq!(budget.held(), 1_000, "a refusal takes nothing");
        assert!(
            budget.admit(50, true).is_ok(),
            "the broker's own sends pass"
        );
        budget.release(1_050);
        assert_eq!(budget.held(), 0);
        assert!(
            budget.admit(5_000, false).is_ok(),
            "alone, even too large passes"
        );
        assert!(budget.admit(1, false).is_err());
        budget.release(usize::MAX);
        assert_eq!(budget.held(), 0, "never below zero");
        let mut unlimited = CommitBudget::new(0);
        assert!(unlimited.admit(usize::MAX, false).is_ok());
        assert!(
            unlimited.admit(usize::MAX, false).is_ok(),
            "saturates, never wraps"
        );
    }
}

/// Open WebSocket connections per project and per client address, bounded so that one
/// project or one host cannot take every connection the broker can hold.
#[derive(Clone)]
pub struct ConnectionLimits {
    counts: Arc<std::sync::Mutex<ConnectionCounts>>,
    per_project: usize,
    per_address: usize,
}

#[derive(Default)]
struct ConnectionCounts {
    projects: std::collections::HashMap<Uuid, usize>,
    addresses: std::collections::HashMap<std::net::IpAddr, usize>,
}

/// One admitted connection; dropping it (when its session ends) frees the place.
pub struct ConnectionPermit {
    limits: ConnectionLimits,
    project_id: Uuid,
    address: Option<std::net::IpAddr>,
}

impl ConnectionLimits {
    /// 0 means no limit.
    pub fn new(per_project: usize, per_address: usize) -> Self {
        ConnectionLimits {
            counts: Arc::default(),
            per_project: if per_project == 0 {
                usize::MAX
            } else {
                per_project
            },
            per_address: if per_address == 0 {
                usize::MAX
            } else {
                per_address
            },
        }
    }

    /// Admits a connection, or names the limit it would exceed (`"project"`, `"address"`).
    pub fn acquire(
        &self,
        project_id: Uuid,
        address: Option<std::net::IpAddr>,
    ) -> Result<ConnectionPermit, &'static str> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if counts.projects.get(&project_id).copied().unwrap_or(0) >= self.per_project {
            return Err("project");
        }
        if let Some(address) = address {
            if counts.addresses.get(&address).copied().unwrap_or(0) >= self.per_address {
                return Err("address");
            }
            *counts.addresses.entry(address).or_default() += 1;
        }
        *counts.projects.entry(project_id).or_default() += 1;
        Ok(ConnectionPermit {
            limits: self.clone(),
            project_id,
            address,
        })
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut counts = self.limits.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.projects.get_mut(&self.project_id) {
            *n -= 1;
            if *n == 0 {
                counts.projects.remove(&self.project_id);
            }
        }
        if let Some(address) = self.address {
            if let Some(n) = counts.addresses.get_mut(&address) {
                *n -= 1;
                if *n == 0 {
                    counts.addresses.remove(&address);
                }
            }
        }
    }
}

#[cfg(test)]
mod connection_tests {
    use super::*;

    #[test]
    fn connections_are_counted_per_project_and_address_and_freed() {
        let limits = ConnectionLimits::new(2, 3);
        let (p, q) = (Uuid::new_v4(), Uuid::new_v4());
        let host: std::net::IpAddr = "10.0.0.1".parse().expect("ip");
        let a = limits.acquire(p, Some(host)).expect("first");
        let _b = limits.acquire(p, Some(host)).expect("second");
        assert_eq!(limits.acquire(p, Some(host)).err(), Some("project"));
        let _c = limits.acquire(q, Some(host)).expect("another project");
        assert_eq!(limits.acquire(q, Some(host)).err(), Some("address"));
        drop(a);
        assert!(limits.acquire(p, None).is_ok(), "a place was freed");
    }
}
