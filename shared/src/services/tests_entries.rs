//! Use-case tests for what is kept per cache entry: which entries count as live in the
//! statistics (decided here, in the services, not in a store) and hit counts that survive the
//! refresh completing meanwhile. The same flows run against the emulator in `tests/export_flow.rs`
//! and `tests/hardening.rs`.

use chrono::{Duration, TimeZone, Utc};

use super::cache_admin::{invalidate_entry, invalidate_scope, stats, Scope};
use super::export::{request_export, ExportAnswer};
use super::tests::{miss, orders, run_queue, setup, who};
use crate::domain::job::LiveBucket;
use crate::domain::CacheEntry;
use crate::ports::Clock;
use crate::testing::{Fakes, HitBeforeCompletion};

async fn served(f: &Fakes) -> &'static str {
    match request_export(&f.deps, &who("acme"), &orders(&[]))
        .await
        .unwrap()
    {
        ExportAnswer::File { stale: false, .. } => "hit",
        ExportAnswer::File { stale: true, .. } => "stale",
        ExportAnswer::Job { .. } => "miss",
    }
}

fn only_entry(f: &Fakes) -> CacheEntry {
    let entries = f.meta.entries.lock().unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    entries.values().next().cloned().unwrap()
}

#[tokio::test]
async fn a_hit_counted_while_a_refresh_completes_survives_the_new_entry() {
    let mut f = setup(3);
    miss(&f, "acme", &orders(&[])).await;
    run_queue(&f).await;
    let first = only_entry(&f);
    assert_eq!((served(&f).await, served(&f).await), ("hit", "hit"));
    // Past fresh (900 s): served stale, with a refresh queued; three hits so far.
    f.clock.advance(Duration::seconds(1000));
    assert_eq!(served(&f).await, "stale");
    assert_eq!(only_entry(&f).hits, 3);

    let racing_hit = f.clock.now() + Duration::seconds(5);
    HitBeforeCompletion::before_every_completion(&mut f.deps, racing_hit);
    run_queue(&f).await;
    let refreshed = only_entry(&f);
    assert_ne!(
        refreshed.job_id, first.job_id,
        "the refresh wrote its entry"
    );
    assert_eq!(refreshed.hits, 4);
    assert_eq!(refreshed.last_hit_at, Some(racing_hit));
}

#[tokio::test]
async fn stats_count_entries_until_deleted_invalidated_or_past_their_stale_hour() {
    let f = setup(3);
    let entries = || async { stats(&f.deps, &who("acme")).await.unwrap() };
    miss(&f, "acme", &orders(&[])).await;
    miss(&f, "globex", &orders(&[])).await;
    run_queue(&f).await;
    assert_eq!(served(&f).await, "hit");
    let one = entries().await;
    assert_eq!(
        (one.entries, one.rows, one.hits, one.misses),
        (1, 3, 1, 1),
        "{one:?}"
    );
    assert_eq!(one.bytes, only_acme(&f).bytes);
    assert_eq!(one.hit_rate, 0.5);

    miss(&f, "acme", &orders(&[("status", "paid")])).await;
    run_queue(&f).await;
    assert_eq!(entries().await.entries, 2);
    invalidate_entry(&f.deps, &who("acme"), &orders(&[("status", "paid")]))
        .await
        .unwrap();
    assert_eq!(entries().await.entries, 1);

    // orders: 900 s fresh + 3600 s stale, counted to the end of the stale deadline's hour.
    f.clock.advance(Duration::hours(3));
    assert_eq!(entries().await.entries, 0);
    miss(&f, "acme", &orders(&[("status", "shipped")])).await;
    miss(&f, "globex", &orders(&[("status", "shipped")])).await;
    run_queue(&f).await;
    assert_eq!(entries().await.entries, 1);
    invalidate_scope(&f.deps, &who("acme"), Scope::Tenant)
        .await
        .unwrap();
    let after_bump = entries().await;
    assert_eq!((after_bump.entries, after_bump.bytes), (0, 0));
    assert_eq!(stats(&f.deps, &who("globex")).await.unwrap().entries, 1);
}

fn only_acme(f: &Fakes) -> CacheEntry {
    let entries = f.meta.entries.lock().unwrap();
    let acme: Vec<_> = entries.values().filter(|e| e.tenant == "acme").collect();
    assert_eq!(acme.len(), 1);
    acme[0].clone()
}

#[tokio::test]
async fn a_bucket_is_live_in_its_generation_until_its_stale_hour_ends() {
    let f = setup(3);
    miss(&f, "acme", &orders(&[])).await;
    run_queue(&f).await;
    let mut entry = only_entry(&f);
    entry.stale_until = Utc.with_ymd_and_hms(2024, 5, 1, 10, 20, 0).unwrap();
    let bucket = LiveBucket::of(&entry);
    assert_eq!(
        bucket.hour,
        Utc.with_ymd_and_hms(2024, 5, 1, 10, 0, 0).unwrap()
    );
    let (gen, ds) = (entry.generation.tenant, entry.generation.dataset);
    let just_before_the_hour_ends = bucket.ends() - Duration::seconds(1);
    assert!(bucket.is_live(gen, ds, entry.stale_until));
    assert!(bucket.is_live(gen, ds, just_before_the_hour_ends));
    assert!(!bucket.is_live(gen, ds, bucket.ends()));
    let earlier = entry.stale_until - Duration::hours(1);
    assert!(!bucket.is_live(gen + 1, ds, earlier));
    assert!(
        !bucket.is_live(gen, ds + 1, earlier),
        "a source write invalidated it"
    );
}
