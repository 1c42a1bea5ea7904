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
