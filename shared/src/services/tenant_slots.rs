//! A cap on the jobs one tenant runs at once, so a tenant that keeps many exports alive cannot
//! fill every worker while other tenants' jobs wait (the queue is shared, workers are few).
//!
//! A job holds one of its tenant's slots from the moment it is leased until it succeeds, fails,
//! hands over to a continuation or lets go of its lease for a retry; a slot held by a worker that
//! died expires with the job's lease. A job that finds its tenant at the limit goes back on the
//! queue as a fresh, delayed message: waiting its turn must not spend the receive count that
//! sends a failing message to the dead-letter queue.

use chrono::{DateTime, Duration, Utc};

use super::Deps;
use crate::domain::{Job, JobMessage};
use crate::ports::PortResult;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// The job may run (it holds a slot until `release` or until its lease ends).
    Granted,
    /// Every slot of the tenant is held: `defer` the message by `retry_in` seconds.
    Full { retry_in: u32 },
}

/// Takes (or renews) a running slot for `job`, held until its lease as taken at `now` ends.
pub async fn acquire(deps: &Deps, job: &Job, now: DateTime<Utc>) -> PortResult<Slot> {
    let settings = &deps.config.worker;
    let limit = settings.max_running_per_tenant;
    if limit == 0 {
        return Ok(Slot::Granted);
    }
    let until = now + Duration::from_std(settings.lease).unwrap_or(Duration::MAX);
    if deps
        .slots
        .take_tenant_slot(&job.tenant, &job.job_id, now, until, limit)
        .await?
    {
        return Ok(Slot::Granted);
    }
    let wait = u32::try_from(settings.tenant_wait.as_secs()).unwrap_or(u32::MAX);
    // Spread the waiting jobs of a tenant so they do not all come back in the same second.
    let jitter = job
        .job_id
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b.into()))
        % (wait / 4 + 1);
    Ok(Slot::Full {
        retry_in: wait.saturating_add(jitter),
    })
}

/// Frees the job's slot. A failure is only logged: the slot expires with the lease anyway.
pub async fn release(deps: &Deps, job: &Job) {
    if deps.config.worker.max_running_per_tenant == 0 {
        return;
    }
    if let Err(e) = deps
        .slots
        .release_tenant_slot(&job.tenant, &job.job_id)
        .await
    {
        tracing::warn!(job_id = %job.job_id, tenant = %job.tenant, error = %e,
            "could not free the tenant's running slot; it expires with the lease");
    }
}

/// Puts `msg` back on the queue as a new message visible after `retry_in` seconds.
pub async fn defer(deps: &Deps, msg: &JobMessage, retry_in: u32) -> PortResult<()> {
    deps.queue.enqueue_delayed(msg, retry_in).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::MessageKind;
    use crate::ports::Clock;
    use crate::testing::{fakes, test_config, Fakes};

    fn setup(limit: u32) -> Fakes {
        let mut config = test_config();
        config.worker.max_running_per_tenant = limit;
        fakes(config, 10)
    }

    fn job(f: &Fakes, tenant: &str, id: &str) -> Job {
        crate::testing::orders_job(tenant, id, f.clock.now())
    }

    async fn take(f: &Fakes, tenant: &str, id: &str) -> Slot {
        acquire(&f.deps, &job(f, tenant, id), f.clock.now())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_tenant_at_its_limit_waits_while_other_tenants_start() {
        let f = setup(2);
        assert_eq!(take(&f, "acme", "a1").await, Slot::Granted);
        assert_eq!(take(&f, "acme", "a2").await, Slot::Granted);
        let Slot::Full { retry_in } = take(&f, "acme", "a3").await else {
            panic!("a third acme job must wait")
        };
        assert!((30..=38).contains(&retry_in), "{retry_in}");
        assert_eq!(take(&f, "globex", "g1").await, Slot::Granted);
    }

    #[tokio::test]
    async fn a_released_slot_lets_the_next_job_of_the_tenant_start() {
        let f = setup(1);
        assert_eq!(take(&f, "acme", "a1").await, Slot::Granted);
        assert!(matches!(take(&f, "acme", "a2").await, Slot::Full { .. }));
        release(&f.deps, &job(&f, "acme", "a1")).await;
        assert_eq!(take(&f, "acme", "a2").await, Slot::Granted);
    }

    #[tokio::test]
    async fn a_slot_of_a_dead_worker_expires_with_its_lease() {
        let f = setup(1);
        assert_eq!(take(&f, "acme", "a1").await, Slot::Granted);
        f.clock.advance(Duration::seconds(900));
        assert!(matches!(take(&f, "acme", "a2").await, Slot::Full { .. }));
        // LEASE_SECONDS defaults to 960.
        f.clock.advance(Duration::seconds(61));
        assert_eq!(take(&f, "acme", "a2").await, Slot::Granted);
    }

    #[tokio::test]
    async fn a_job_that_holds_a_slot_renews_it_instead_of_taking_another() {
        let f = setup(2);
        assert_eq!(take(&f, "acme", "a1").await, Slot::Granted);
        assert_eq!(take(&f, "acme", "a1").await, Slot::Granted);
        assert_eq!(take(&f, "acme", "a2").await, Slot::Granted);
        assert!(matches!(take(&f, "acme", "a3").await, Slot::Full { .. }));
    }

    #[tokio::test]
    async fn no_limit_when_it_is_zero() {
        let f = setup(0);
        for i in 0..20 {
            assert_eq!(take(&f, "acme", &format!("a{i}")).await, Slot::Granted);
        }
    }

    #[tokio::test]
    async fn a_waiting_job_goes_back_as_a_fresh_delayed_message() {
        let f = setup(1);
        let msg = JobMessage {
            job_id: "a2".into(),
            kind: MessageKind::Export,
            segment: None,
        };
        defer(&f.deps, &msg, 33).await.unwrap();
        assert_eq!(*f.queue.delayed.lock().unwrap(), vec![(msg, 33)]);
        assert!(f.queue.drain().is_empty());
    }
}
