//! Use-case tests over the in-memory fakes: fast, deterministic, and racing the same conditional
//! writes as the DynamoDB adapter. The same flows run against the emulator in `tests/`.

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::{Duration, NaiveDate, TimeZone, Utc};

use super::cache_admin::{invalidate_scope, Scope};
use super::export::{request_export, ExportAnswer};
use super::process::{process_job, Fate, Outcome};
use super::status::{download_url, job_for};
use super::warm::warm;
use super::ServiceError;
use crate::domain::catalog::{Catalog, BUILTIN_CATALOG};
use crate::domain::identity::{SCOPE_ADMIN, SCOPE_READ};
use crate::domain::{Identity, JobMessage, JobStatus, MessageKind, RawExportRequest, Row, Value};
use crate::testing::{fakes, test_config, Fakes};

pub(super) fn who(tenant: &str) -> Identity {
    Identity {
        tenant: tenant.into(),
        user: "alice".into(),
        scopes: BTreeSet::from([SCOPE_READ.to_string(), SCOPE_ADMIN.to_string()]),
    }
}

pub(super) fn order_rows(n: usize) -> Vec<Row> {
    (0..n)
        .map(|i| {
            vec![
                Value::Str(format!("ORD-{i:06}")),
                Value::Ts(Utc.timestamp_opt(1_700_000_000 + i as i64 * 60, 0).unwrap()),
                Value::Str(format!("C{}", i % 7)),
                Value::Str(if i % 5 == 0 {
                    "=cmd()".into()
                } else {
                    format!("Name, {i}")
                }),
                Value::Str("paid".into()),
                Value::Str("EUR".into()),
                Value::Dec(format!("{}.{:02}", i, i % 100)),
                Value::Dec("0.10".into()),
                Value::Int(i as i64 % 9),
                Value::Bool(i % 2 == 0),
                Value::Date(NaiveDate::from_ymd_opt(2024, 1, 1 + (i % 28) as u32).unwrap()),
                if i % 3 == 0 {
                    Value::Null
                } else {
                    Value::Str(format!("note \"{i}\""))
                },
            ]
        })
        .collect()
}

/// Fakes with small parts and pages so a few dozen rows cross several part boundaries.
pub(super) fn setup(rows: usize) -> Fakes {
    setup_with(rows, Catalog::builtin().unwrap())
}

pub(super) fn setup_with(rows: usize, catalog: Catalog) -> Fakes {
    let mut config = test_config();
    config.worker.part_size = 300;
    let mut f = fakes(config, 10);
    f.deps.catalog = Arc::new(catalog);
    for t in ["acme", "globex"] {
        f.source
            .rows
            .lock()
            .unwrap()
            .insert(t.into(), order_rows(rows));
    }
    f
}

pub(super) fn orders(pairs: &[(&str, &str)]) -> RawExportRequest {
    RawExportRequest::from_query(
        "orders",
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

pub(super) fn far_deadline(f: &Fakes) -> chrono::DateTime<Utc> {
    f.deps.clock.now() + Duration::minutes(15)
}

pub(super) async fn miss(f: &Fakes, tenant: &str, req: &RawExportRequest) -> String {
    match request_export(&f.deps, &who(tenant), req).await.unwrap() {
        ExportAnswer::Job { job, .. } => job.job_id,
        other => panic!("expected a miss, got {other:?}"),
    }
}

pub(super) async fn run_queue(f: &Fakes) -> Vec<Outcome> {
    f.run_jobs().await
}

/// An uninterrupted export of the same rows for globex, to compare a resumed acme file with.
async fn reference_csv(f: &Fakes) -> Vec<u8> {
    miss(f, "globex", &orders(&[])).await;
    run_queue(f).await;
    only_object(f, ".csv")
}

fn acme_csv(f: &Fakes) -> Vec<u8> {
    let objects = f.files.objects.lock().unwrap();
    objects
        .iter()
        .find(|(k, _)| k.contains("/acme/") && k.ends_with(".csv"))
        .unwrap()
        .1
        .clone()
}

fn only_object(f: &Fakes, suffix: &str) -> Vec<u8> {
    let objects = f.files.objects.lock().unwrap();
    let files: Vec<_> = objects
        .iter()
        .filter(|(k, _)| k.ends_with(suffix))
        .collect();
    assert_eq!(files.len(), 1, "{:?}", objects.keys().collect::<Vec<_>>());
    files[0].1.clone()
}

#[tokio::test]
async fn miss_then_hit_serves_the_same_file() {
    let f = setup(57);
    let job_id = miss(&f, "acme", &orders(&[])).await;
    let outcomes = run_queue(&f).await;
    assert_eq!(
        outcomes,
        vec![Outcome::Succeeded {
            rows: 57,
            bytes: only_object(&f, ".csv").len() as u64
        }]
    );
    let pages_after_miss = *f.source.pages_read.lock().unwrap();

    let hit = request_export(&f.deps, &who("acme"), &orders(&[]))
        .await
        .unwrap();
    let ExportAnswer::File { entry, stale, .. } = hit else {
        panic!("expected a hit")
    };
    assert!(!stale);
    assert_eq!(entry.job_id, job_id);
    assert_eq!(entry.rows, 57);
    assert_eq!(
        *f.source.pages_read.lock().unwrap(),
        pages_after_miss,
        "a hit reads nothing"
    );

    let file = String::from_utf8(only_object(&f, ".csv")).unwrap();
    assert!(file.starts_with("Order ID,Created at,"));
    assert_eq!(file.matches("\r\n").count(), 58, "header + rows");
    assert!(file.contains("'=cmd()"), "formula neutralised");
    let job = job_for(&f.deps, &who("acme"), &job_id).await.unwrap();
    assert_eq!(job.status, JobStatus::Succeeded);
    assert!(job.pages_read >= 6 && job.read_capacity > 0.0);
    assert!(only_object(&f, ".manifest.json").len() > 10);
}

#[tokio::test]
async fn concurrent_identical_misses_join_one_job() {
    let f = setup(5);
    let reqs: Vec<_> = (0..12)
        .map(|i| {
            // Same export, spelled differently.
            let cols = if i % 2 == 0 {
                "amount,order_id"
            } else {
                "order_id,amount"
            };
            orders(&[("columns", cols), ("status", "paid")])
        })
        .collect();
    let caller = who("acme");
    let answers =
        futures::future::join_all(reqs.iter().map(|r| request_export(&f.deps, &caller, r))).await;
    let ids: BTreeSet<String> = answers
        .into_iter()
        .map(|a| match a.unwrap() {
            ExportAnswer::Job { job, .. } => job.job_id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(f.queue.drain().len(), 1, "one message for one job");
}

#[tokio::test]
async fn duplicate_and_concurrent_deliveries_make_one_file() {
    let f = setup(40);
    let job_id = miss(&f, "acme", &orders(&[])).await;
    let msg = f.queue.drain().remove(0);
    let deadline = far_deadline(&f);
    let (a, b) = tokio::join!(
        process_job(&f.deps, &msg, "w1", deadline, false),
        process_job(&f.deps, &msg, "w2", deadline, false)
    );
    let results = [a, b];
    assert_eq!(
        results
            .iter()
            .filter(|r| matches!(r, Outcome::Succeeded { .. }))
            .count(),
        1
    );
    assert!(
        results.iter().all(|r| matches!(
            r,
            Outcome::Succeeded { .. } | Outcome::AlreadyFinished | Outcome::Busy { .. }
        )),
        "{results:?}"
    );
    // A late redelivery finds the job finished.
    assert_eq!(
        process_job(&f.deps, &msg, "w3", deadline, false).await,
        Outcome::AlreadyFinished
    );
    only_object(&f, ".csv");
    assert_eq!(
        job_for(&f.deps, &who("acme"), &job_id)
            .await
            .unwrap()
            .status,
        JobStatus::Succeeded
    );
}

#[tokio::test]
async fn failed_job_aborts_its_upload_and_serves_nothing() {
    let small =
        Catalog::from_toml(&BUILTIN_CATALOG.replace("row_limit = 5000000", "row_limit = 25"))
            .unwrap();
    let f = setup_with(60, small);
    let job_id = miss(&f, "acme", &orders(&[])).await;
    let outcomes = run_queue(&f).await;
    assert_eq!(
        outcomes,
        vec![Outcome::Failed {
            code: "row_limit_exceeded".into()
        }]
    );
    assert_eq!(f.files.aborted.lock().unwrap().len(), 1);
    assert!(
        f.files.objects.lock().unwrap().is_empty(),
        "no file, not even a manifest"
    );
    let job = job_for(&f.deps, &who("acme"), &job_id).await.unwrap();
    assert_eq!(job.error.unwrap().code, "row_limit_exceeded");
    // The failure released the key: the next request starts a new job instead of joining.
    let again = miss(&f, "acme", &orders(&[])).await;
    assert_ne!(again, job_id);
    assert!(matches!(
        download_url(&f.deps, &who("acme"), &job_id).await,
        Err(ServiceError::NotReady(_))
    ));
}

#[tokio::test]
async fn continuation_before_the_deadline_yields_the_identical_file() {
    let f = setup(83);
    // Uninterrupted reference run for tenant globex (same rows).
    let reference = reference_csv(&f).await;

    let job_id = miss(&f, "acme", &orders(&[])).await;
    let msg = f.queue.drain().remove(0);
    // The deadline is already inside the margin: hand over after the first page.
    let tight = f.deps.clock.now() + Duration::seconds(30);
    let first = process_job(&f.deps, &msg, "w1", tight, false).await;
    assert!(matches!(first, Outcome::Continued { .. }), "{first:?}");
    let cont = f.queue.drain();
    assert_eq!(
        cont,
        vec![JobMessage {
            job_id: job_id.clone(),
            kind: MessageKind::Continue,
            segment: None,
        }]
    );
    let mut outcome = process_job(&f.deps, &cont[0], "w2", tight, false).await;
    // Each continuation makes progress; finish with a roomy deadline.
    while let Outcome::Continued { .. } = outcome {
        let next = f.queue.drain().remove(0);
        outcome = process_job(&f.deps, &next, "w3", far_deadline(&f), false).await;
    }
    assert!(
        matches!(outcome, Outcome::Succeeded { rows: 83, .. }),
        "{outcome:?}"
    );
    assert_eq!(acme_csv(&f), reference);
    let job = f.meta.jobs.lock().unwrap().get(&job_id).cloned().unwrap();
    assert!(job.continuations >= 1);
    assert_eq!(
        job.sha256.unwrap(),
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&reference))
    );
}

#[tokio::test]
async fn expired_entry_is_a_miss_again_and_stale_is_served_with_a_refresh() {
    let f = setup(12);
    let first = miss(&f, "acme", &orders(&[])).await;
    run_queue(&f).await;
    // orders: fresh 900 s, stale window 3600 s.
    f.clock.advance(Duration::seconds(1000));
    match request_export(&f.deps, &who("acme"), &orders(&[]))
        .await
        .unwrap()
    {
        ExportAnswer::File { stale: true, .. } => {}
        other => panic!("expected a stale hit, got {other:?}"),
    }
    assert_eq!(f.queue.drain().len(), 1, "the stale hit queued a refresh");
    // A caller that accepts no staleness joins that refresh instead.
    match request_export(&f.deps, &who("acme"), &orders(&[("max_stale", "0")]))
        .await
        .unwrap()
    {
        ExportAnswer::Job { joined: true, .. } => {}
        other => panic!("expected to join the refresh, got {other:?}"),
    }
    f.clock.advance(Duration::seconds(5000));
    let fresh_miss = miss(&f, "acme", &orders(&[])).await;
    assert_ne!(fresh_miss, first);
}

#[tokio::test]
async fn other_tenants_job_is_not_found() {
    let f = setup(3);
    let job_id = miss(&f, "acme", &orders(&[])).await;
    assert!(matches!(
        job_for(&f.deps, &who("globex"), &job_id).await,
        Err(ServiceError::NotFound(_))
    ));
    assert!(matches!(
        job_for(&f.deps, &who("acme"), "nope").await,
        Err(ServiceError::NotFound(_))
    ));
    // And tenants never share files: the same request for globex is its own miss.
    run_queue(&f).await;
    let other = miss(&f, "globex", &orders(&[])).await;
    assert_ne!(other, job_id);
}

#[tokio::test]
async fn invalidating_the_tenant_hides_its_entries() {
    let f = setup(3);
    miss(&f, "acme", &orders(&[])).await;
    run_queue(&f).await;
    let mut reader = who("acme");
    reader.scopes.remove(SCOPE_ADMIN);
    assert!(matches!(
        invalidate_scope(&f.deps, &reader, Scope::Tenant).await,
        Err(ServiceError::Forbidden(_))
    ));
    invalidate_scope(&f.deps, &who("acme"), Scope::Tenant)
        .await
        .unwrap();
    miss(&f, "acme", &orders(&[])).await;
}

#[tokio::test]
async fn warmer_refreshes_only_hit_entries_about_to_expire() {
    let f = setup(3);
    miss(&f, "acme", &orders(&[])).await; // will be hit
    miss(&f, "acme", &orders(&[("status", "paid")])).await; // never hit
    miss(&f, "globex", &orders(&[])).await; // hit, but fresh for long
    run_queue(&f).await;
    request_export(&f.deps, &who("acme"), &orders(&[]))
        .await
        .unwrap();
    f.clock.advance(Duration::seconds(300));
    request_export(&f.deps, &who("globex"), &orders(&[]))
        .await
        .unwrap();
    // Shift globex's entry far into the future.
    for e in f.meta.entries.lock().unwrap().values_mut() {
        if e.tenant == "globex" {
            e.fresh_until += Duration::hours(5);
        }
    }
    // The next run is 900 s away; acme's entries go stale at +900 s.
    let report = warm(&f.deps, f.deps.clock.now()).await.unwrap();
    assert_eq!(report.enqueued, 1, "{report:?}");
    assert_eq!(report.skipped_cold, 1, "{report:?}");
    let sent = f.queue.drain();
    let job = f
        .meta
        .jobs
        .lock()
        .unwrap()
        .get(&sent[0].job_id)
        .cloned()
        .unwrap();
    assert_eq!(job.tenant, "acme");
    assert!(job.spec.filters.is_empty());
    // A second run joins the in-flight refresh instead of queuing another.
    let again = warm(&f.deps, f.deps.clock.now()).await.unwrap();
    assert_eq!((again.enqueued, again.joined), (0, 1));
}

/// Runs the queued job with the deadline always inside the margin, so every run hands over right
/// after its first checkpoint; returns how it ended and the number of runs.
async fn run_always_near_the_deadline(f: &Fakes, max_runs: usize) -> (Outcome, usize) {
    let mut runs = 0;
    loop {
        let msg = f.queue.drain().remove(0);
        runs += 1;
        assert!(runs < max_runs, "no progress across continuations");
        let tight = f.deps.clock.now() + Duration::seconds(1);
        match process_job(&f.deps, &msg, &format!("w{runs}"), tight, false).await {
            Outcome::Continued { .. } => continue,
            other => return (other, runs),
        }
    }
}

/// Fakes whose clock starts at a fixed instant, so two of them given the same requests make the
/// same jobs (same creation time) and so the same bytes in every format.
pub(super) fn fixed_fakes(rows: usize, page_rows: usize, part_size: usize) -> Fakes {
    let mut config = test_config();
    config.worker.part_size = part_size;
    let f = fakes(config, page_rows);
    *f.clock.0.lock().unwrap() = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
    f.source
        .rows
        .lock()
        .unwrap()
        .insert("acme".into(), order_rows(rows));
    f
}

/// The only file of `format` the fakes hold.
fn file_of(f: &Fakes, format: &str) -> Vec<u8> {
    only_object(f, &format!(".{format}"))
}

/// An uninterrupted export: the file every interrupted run must reproduce.
pub(super) async fn uninterrupted(
    rows: usize,
    page_rows: usize,
    part_size: usize,
    format: &str,
) -> Vec<u8> {
    let f = fixed_fakes(rows, page_rows, part_size);
    miss(&f, "acme", &orders(&[("format", format)])).await;
    let outcomes = run_queue(&f).await;
    assert!(
        matches!(outcomes[..], [Outcome::Succeeded { .. }]),
        "{format}: {outcomes:?}"
    );
    file_of(&f, format)
}

const FORMATS: [&str; 4] = ["csv", "csv.gz", "xlsx", "ndjson"];

/// A part size that cuts the file into about `parts` parts, and the uninterrupted file made with
/// it.
async fn reference_in_parts(
    rows: usize,
    page_rows: usize,
    parts: usize,
    format: &str,
) -> (usize, Vec<u8>) {
    let whole = uninterrupted(rows, page_rows, usize::MAX, format).await;
    let part_size = whole.len() / parts;
    (
        part_size,
        uninterrupted(rows, page_rows, part_size, format).await,
    )
}

/// Routes the fakes' object store and job store through a crash plan.
pub(super) fn with_crashes(f: &mut Fakes) -> Arc<crate::testing::CrashPlan> {
    use crate::testing::{CrashPlan, CrashingFiles, HookedJobs};
    let plan = Arc::new(CrashPlan::default());
    f.deps.files = Arc::new(CrashingFiles {
        inner: f.files.clone(),
        plan: plan.clone(),
    });
    f.deps.jobs = Arc::new(HookedJobs {
        inner: f.meta.clone(),
        hook: plan.clone(),
    });
    plan
}

#[tokio::test]
async fn every_format_continues_across_twenty_runs_into_the_identical_file() {
    const ROWS: usize = 50_000;
    const PAGE: usize = 500;
    for format in FORMATS {
        // Small parts: a run that hands over at every checkpoint takes twenty runs or more.
        // (Compressed formats cut later than the part size says: the compressor holds back up
        // to a block.)
        let (part_size, reference) = reference_in_parts(ROWS, PAGE, 32, format).await;

        let f = fixed_fakes(ROWS, PAGE, part_size);
        let job_id = miss(&f, "acme", &orders(&[("format", format)])).await;
        let (outcome, runs) = run_always_near_the_deadline(&f, 100).await;
        assert!(
            matches!(outcome, Outcome::Succeeded { rows, .. } if rows == ROWS as u64),
            "{format}: {outcome:?}"
        );
        assert!(runs >= 20, "{format}: {runs} runs");
        let file = file_of(&f, format);
        assert!(file == reference, "{format}: the continued file differs");
        let job = f.meta.jobs.lock().unwrap()[&job_id].clone();
        assert_eq!(
            job.sha256.clone().unwrap(),
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&reference))
        );
        assert_eq!(job.failed_attempts(), 0, "hand-overs are not failures");
    }
}

#[tokio::test]
async fn a_worker_killed_at_any_step_resumes_into_the_identical_file() {
    use crate::testing::crash_points;
    const ROWS: usize = 3_000;
    const PAGE: usize = 100;
    for format in FORMATS {
        let (part_size, reference) = reference_in_parts(ROWS, PAGE, 5, format).await;
        for at in crash_points() {
            let mut f = fixed_fakes(ROWS, PAGE, part_size);
            let plan = with_crashes(&mut f);
            let job_id = miss(&f, "acme", &orders(&[("format", format)])).await;
            let msg = f.queue.drain().remove(0);
            plan.arm(at);
            let first = plan
                .run(process_job(&f.deps, &msg, "w1", far_deadline(&f), false))
                .await;
            assert!(first.is_none(), "{format} {at:?}: did not crash: {first:?}");

            // The queue delivers the message again once the dead worker's lease ran out.
            f.clock.advance(Duration::seconds(
                f.deps.config.worker.lease.as_secs() as i64 + 1,
            ));
            let second = process_job(&f.deps, &msg, "w2", far_deadline(&f), false).await;
            assert!(
                matches!(second, Outcome::Succeeded { rows, .. } if rows == ROWS as u64),
                "{format} {at:?}: {second:?}"
            );
            assert!(
                file_of(&f, format) == reference,
                "{format} {at:?}: the resumed file differs"
            );
            let job = job_for(&f.deps, &who("acme"), &job_id).await.unwrap();
            assert_eq!(job.status, JobStatus::Succeeded, "{format} {at:?}");
            assert!(
                f.files.uploads.lock().unwrap().is_empty(),
                "{format} {at:?}: upload left open"
            );
            // The entry serves the file: a hit now.
            match request_export(&f.deps, &who("acme"), &orders(&[("format", format)]))
                .await
                .unwrap()
            {
                ExportAnswer::File { stale: false, .. } => {}
                other => panic!("{format} {at:?}: expected a hit, got {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn a_worker_killed_again_while_resuming_resumes_from_the_same_checkpoint() {
    use crate::testing::CrashAt;
    const ROWS: usize = 3_000;
    const PAGE: usize = 100;
    for format in FORMATS {
        let (part_size, reference) = reference_in_parts(ROWS, PAGE, 5, format).await;
        let mut f = fixed_fakes(ROWS, PAGE, part_size);
        let plan = with_crashes(&mut f);
        miss(&f, "acme", &orders(&[("format", format)])).await;
        let msg = f.queue.drain().remove(0);
        let lease = Duration::seconds(f.deps.config.worker.lease.as_secs() as i64 + 1);
        // Dies right after its first checkpoint, then again in the resumed run before it cuts
        // another part, then after completing the upload, then before recording the entry.
        for at in [
            CrashAt {
                op: "put_job",
                nth: 3,
                after: true,
            },
            CrashAt {
                op: "upload_part",
                nth: 1,
                after: false,
            },
            CrashAt {
                op: "complete_upload",
                nth: 1,
                after: true,
            },
            CrashAt {
                op: "complete_job",
                nth: 1,
                after: false,
            },
        ] {
            plan.arm(at);
            let run = plan
                .run(process_job(&f.deps, &msg, "w", far_deadline(&f), false))
                .await;
            assert!(run.is_none(), "{format} {at:?}: did not crash: {run:?}");
            f.clock.advance(lease);
        }
        let last = process_job(&f.deps, &msg, "w", far_deadline(&f), false).await;
        assert!(
            matches!(last, Outcome::Succeeded { .. }),
            "{format}: {last:?}"
        );
        assert!(
            file_of(&f, format) == reference,
            "{format}: the file differs"
        );
        assert!(
            f.files.aborted.lock().unwrap().is_empty(),
            "{format}: no run started over"
        );
    }
}

#[tokio::test]
async fn progress_is_unknown_until_an_earlier_file_of_the_same_rows_gives_the_total() {
    let f = setup(45);
    let first = miss(&f, "acme", &orders(&[("format", "csv")])).await;
    let job = f.meta.jobs.lock().unwrap()[&first].clone();
    assert_eq!(job.progress(), None, "nothing known yet: null, not 0");
    assert_eq!(job.eta_seconds(), None);
    run_queue(&f).await;
    let done = f.meta.jobs.lock().unwrap()[&first].clone();
    assert_eq!(done.progress(), Some(1.0));

    // Same rows in another file (here another delimiter; the fake source always returns every
    // column): the total is known before the first row.
    let second = miss(&f, "acme", &orders(&[("delimiter", ";")])).await;
    let msg = f.queue.drain().remove(0);
    let tight = f.deps.clock.now() + Duration::seconds(1);
    let outcome = process_job(&f.deps, &msg, "w1", tight, false).await;
    assert!(matches!(outcome, Outcome::Continued { .. }), "{outcome:?}");
    let job = f.meta.jobs.lock().unwrap()[&second].clone();
    assert_eq!(job.rows_total, Some(45));
    let p = job.progress().unwrap();
    assert!(p > 0.0 && p < 1.0, "{p}");

    // Other rows (a filter) know nothing of that total.
    let third = miss(&f, "acme", &orders(&[("status", "paid")])).await;
    let msg = f
        .queue
        .drain()
        .into_iter()
        .find(|m| m.job_id == third)
        .unwrap();
    let tight = f.deps.clock.now() + Duration::seconds(1);
    process_job(&f.deps, &msg, "w1", tight, false).await;
    let job = f.meta.jobs.lock().unwrap()[&third].clone();
    assert_eq!(job.rows_total, None);
    assert_eq!(job.progress(), None);
}

#[tokio::test]
async fn every_continuation_makes_progress_even_when_the_deadline_is_always_near() {
    // Parts of about three pages: a run that handed over between parts would re-read forever.
    let mut config = test_config();
    config.worker.part_size = 3000;
    let f = fakes(config, 10);
    f.source
        .rows
        .lock()
        .unwrap()
        .insert("acme".into(), order_rows(200));
    f.source
        .rows
        .lock()
        .unwrap()
        .insert("globex".into(), order_rows(200));
    let reference = reference_csv(&f).await;

    miss(&f, "acme", &orders(&[])).await;
    let (outcome, runs) = run_always_near_the_deadline(&f, 60).await;
    assert!(
        matches!(outcome, Outcome::Succeeded { rows: 200, .. }),
        "{outcome:?}"
    );
    assert!(runs > 2, "it did hand over ({runs} runs)");
    assert_eq!(acme_csv(&f), reference);
}

#[tokio::test]
async fn new_exports_are_rate_limited_per_tenant_but_hits_are_not() {
    let mut config = test_config();
    config.miss_rate_per_minute = 2;
    let f = fakes(config, 10);
    f.source
        .rows
        .lock()
        .unwrap()
        .insert("acme".into(), order_rows(3));
    miss(&f, "acme", &orders(&[])).await;
    run_queue(&f).await;
    miss(&f, "acme", &orders(&[("status", "paid")])).await;
    match request_export(&f.deps, &who("acme"), &orders(&[("status", "shipped")])).await {
        Err(ServiceError::RateLimited { retry_after }) => assert!((1..=60).contains(&retry_after)),
        other => panic!("expected a rate limit, got {other:?}"),
    }
    // Hits cost nothing at the source: never limited.
    assert!(matches!(
        request_export(&f.deps, &who("acme"), &orders(&[])).await,
        Ok(ExportAnswer::File { .. })
    ));
    // Another tenant has its own budget; the next minute a new one.
    miss(&f, "globex", &orders(&[])).await;
    f.clock.advance(Duration::seconds(60));
    miss(&f, "acme", &orders(&[("status", "shipped")])).await;
}

#[tokio::test]
async fn transient_failures_are_retried_then_the_job_fails_for_good_and_aborts() {
    let mut config = test_config();
    config.worker.max_attempts = 3;
    config.worker.part_size = 300;
    let f = fakes(config, 10);
    f.source
        .rows
        .lock()
        .unwrap()
        .insert("acme".into(), order_rows(40));
    let job_id = miss(&f, "acme", &orders(&[])).await;
    let msg = f.queue.drain().remove(0);
    // Every attempt fails on its first read.
    for attempt in 1..=3 {
        *f.source.fail_next.lock().unwrap() = 1;
        let result = process_job(
            &f.deps,
            &msg,
            &format!("w{attempt}"),
            far_deadline(&f),
            false,
        )
        .await;
        if attempt < 3 {
            assert!(matches!(result, Outcome::Transient { .. }), "{result:?}");
            assert!(matches!(
                result.fate(f.deps.clock.now()),
                Fate::RetryIn(delay) if delay > 0
            ));
            let job = f.meta.jobs.lock().unwrap().get(&job_id).cloned().unwrap();
            assert_eq!(job.status, JobStatus::Running);
            assert!(job.lease.is_none(), "the lease is released for the retry");
        } else {
            assert_eq!(
                result,
                Outcome::Exhausted {
                    code: "retries_exhausted".into()
                }
            );
        }
    }
    let job = job_for(&f.deps, &who("acme"), &job_id).await.unwrap();
    assert_eq!(job.status, JobStatus::Failed);
    // Callers get a code and a safe sentence; the SDK's text stays in the logs.
    let error = job.error.unwrap();
    assert_eq!(error.code, "retries_exhausted");
    assert!(
        !error.message.contains("ThrottlingException"),
        "{}",
        error.message
    );
    assert!(f.files.objects.lock().unwrap().is_empty());
    assert!(
        f.files.uploads.lock().unwrap().is_empty(),
        "no upload left open"
    );
}

#[tokio::test]
async fn job_errors_show_a_code_and_a_safe_sentence_never_internals() {
    use crate::ports::PortError;
    let secret_row = "row ORD-1: amount `DROP TABLE` is not a decimal";
    let secret_arn = "AccessDenied: arn:aws:s3:::acme-exports-123456789012/exports";
    for (error, code, secret) in [
        (
            PortError::Data(secret_row.into()),
            "source_data_invalid",
            "DROP TABLE",
        ),
        (
            PortError::failed("source query", secret_arn, false),
            "storage_failed",
            "123456789012",
        ),
    ] {
        let f = setup(5);
        *f.source.broken.lock().unwrap() = Some(error);
        let job_id = miss(&f, "acme", &orders(&[])).await;
        let outcomes = run_queue(&f).await;
        assert_eq!(outcomes, vec![Outcome::Failed { code: code.into() }]);
        let job = job_for(&f.deps, &who("acme"), &job_id).await.unwrap();
        let shown = job.error.unwrap();
        assert_eq!(shown.code, code);
        assert!(!shown.message.contains(secret), "{}", shown.message);
        assert!(!shown.message.contains("arn:"), "{}", shown.message);
    }
}

#[tokio::test]
async fn a_retry_after_a_transient_error_resumes_and_succeeds() {
    let f = setup(45);
    let reference = reference_csv(&f).await;
    let job_id = miss(&f, "acme", &orders(&[])).await;
    let msg = f.queue.drain().remove(0);
    *f.source.fail_next.lock().unwrap() = 1;
    assert!(matches!(
        process_job(&f.deps, &msg, "w1", far_deadline(&f), false).await,
        Outcome::Transient { .. }
    ));
    assert!(matches!(
        process_job(&f.deps, &msg, "w2", far_deadline(&f), false).await,
        Outcome::Succeeded { rows: 45, .. }
    ));
    assert_eq!(acme_csv(&f), reference);
    assert_eq!(f.meta.jobs.lock().unwrap()[&job_id].attempts, 2);
}

#[tokio::test]
async fn invalidating_a_user_hides_the_entries_they_built() {
    let f = setup(3);
    miss(&f, "acme", &orders(&[])).await;
    run_queue(&f).await;
    let bob = Identity {
        user: "bob".into(),
        ..who("acme")
    };
    // Bob shares alice's tenant-wide entry until alice drops hers.
    assert!(matches!(
        request_export(&f.deps, &bob, &orders(&[])).await.unwrap(),
        ExportAnswer::File { .. }
    ));
    invalidate_scope(&f.deps, &bob, Scope::User).await.unwrap();
    assert!(matches!(
        request_export(&f.deps, &bob, &orders(&[])).await.unwrap(),
        ExportAnswer::File { .. }
    ));
    invalidate_scope(&f.deps, &who("acme"), Scope::User)
        .await
        .unwrap();
    assert!(matches!(
        request_export(&f.deps, &bob, &orders(&[])).await.unwrap(),
        ExportAnswer::Job { .. }
    ));
}

#[tokio::test]
async fn a_transient_failure_on_the_last_delivery_is_final() {
    let f = setup(5);
    let job_id = miss(&f, "acme", &orders(&[])).await;
    let msg = f.queue.drain().remove(0);
    *f.source.fail_next.lock().unwrap() = 1;
    let outcome = process_job(&f.deps, &msg, "w1", far_deadline(&f), true).await;
    assert_eq!(outcome.fate(f.deps.clock.now()), Fate::DeadLetter);
    assert_eq!(
        outcome,
        Outcome::Exhausted {
            code: "retries_exhausted".into()
        }
    );
    assert_eq!(
        f.meta.jobs.lock().unwrap()[&job_id].status,
        JobStatus::Failed
    );
    assert!(f.files.uploads.lock().unwrap().is_empty());
}

#[tokio::test]
async fn pinned_exports_are_built_when_missing_and_refreshed_when_due() {
    let pinned = format!(
        "{BUILTIN_CATALOG}\n[[datasets.pins]]\ntenants = [\"acme\", \"globex\"]\nquery = \"format=csv.gz&status=paid\"\n"
    );
    // The pin belongs to the last dataset of the file (customers): move it to orders.
    let pinned = pinned.replace(
        "\n[[datasets]]\nname = \"customers\"",
        "\n[[datasets.pins]]\ntenants = [\"acme\"]\nquery = \"status=paid\"\n\n[[datasets]]\nname = \"customers\"",
    );
    let pinned = pinned.replace(
        "\n[[datasets.pins]]\ntenants = [\"acme\", \"globex\"]\nquery = \"format=csv.gz&status=paid\"\n",
        "\n[[datasets.pins]]\ntenants = [\"acme\", \"globex\"]\nquery = \"format=csv.gz&tier=gold\"\n",
    );
    let f = setup_with(20, Catalog::from_toml(&pinned).unwrap());
    let customer_rows: Vec<Row> = (0..4)
        .map(|i| {
            let mut r = vec![Value::Str(format!("C{i}")); 10];
            r[1] = Value::Ts(Utc.timestamp_opt(1_700_000_000, 0).unwrap());
            r[6] = Value::Dec("1.00".into());
            r[7] = Value::Int(i);
            r[8] = Value::Bool(true);
            r[9] = Value::Null;
            r
        })
        .collect();
    for t in ["acme", "globex"] {
        f.source
            .rows
            .lock()
            .unwrap()
            .insert(format!("customers/{t}"), customer_rows.clone());
    }
    let report = warm(&f.deps, f.deps.clock.now()).await.unwrap();
    assert_eq!(
        (report.pinned_enqueued, report.pinned_fresh),
        (3, 0),
        "{report:?}"
    );
    let sent = f.queue.drain();
    assert_eq!(sent.len(), 3);
    for m in &sent {
        process_job(&f.deps, m, "w", far_deadline(&f), false).await;
    }
    // Fresh for exactly one more run: nothing to do now, due a second later.
    let report = warm(&f.deps, f.deps.clock.now()).await.unwrap();
    assert_eq!(
        (report.pinned_enqueued, report.pinned_fresh),
        (0, 3),
        "{report:?}"
    );
    f.clock.advance(Duration::seconds(1));
    let report = warm(&f.deps, f.deps.clock.now()).await.unwrap();
    // orders (ttl 900) is due; customers (ttl 3600) are not.
    assert_eq!(
        (report.pinned_enqueued, report.pinned_fresh),
        (1, 2),
        "{report:?}"
    );
    // A caller's identical request is served from the pinned file.
    match request_export(&f.deps, &who("acme"), &orders(&[("status", "paid")]))
        .await
        .unwrap()
    {
        ExportAnswer::File { .. } => {}
        other => panic!("expected the pinned file, got {other:?}"),
    }
}

#[tokio::test]
async fn a_tenant_at_its_running_limit_waits_while_other_tenants_start() {
    use crate::testing::CrashAt;
    let mut config = test_config();
    config.worker.part_size = 300;
    config.worker.max_running_per_tenant = 1;
    let mut f = fakes(config, 10);
    for t in ["acme", "globex"] {
        f.source
            .rows
            .lock()
            .unwrap()
            .insert(t.into(), order_rows(40));
    }
    let plan = with_crashes(&mut f);
    // acme's first job dies mid-run and keeps its slot until its lease runs out.
    miss(&f, "acme", &orders(&[])).await;
    let first = f.queue.drain().remove(0);
    plan.arm(CrashAt {
        op: "upload_part",
        nth: 1,
        after: true,
    });
    assert!(plan
        .run(process_job(&f.deps, &first, "w1", far_deadline(&f), false))
        .await
        .is_none());

    miss(&f, "acme", &orders(&[("status", "paid")])).await;
    let second = f.queue.drain().remove(0);
    let outcome = process_job(&f.deps, &second, "w2", far_deadline(&f), false).await;
    assert!(matches!(outcome, Outcome::Deferred { .. }), "{outcome:?}");
    let delayed = f.queue.delayed.lock().unwrap().clone();
    assert_eq!(delayed.len(), 1, "put back to wait its turn");
    assert_eq!(delayed[0].0, second);
    assert!(delayed[0].1 > 0);
    let job = f.meta.jobs.lock().unwrap()[&second.job_id].clone();
    assert_eq!(job.attempts, 0, "waiting spends no attempt");

    miss(&f, "globex", &orders(&[])).await;
    let other = f.queue.drain().remove(0);
    let outcome = process_job(&f.deps, &other, "w3", far_deadline(&f), false).await;
    assert!(matches!(outcome, Outcome::Succeeded { .. }), "{outcome:?}");

    // Once the dead worker's lease is over, the waiting job runs.
    f.clock.advance(Duration::seconds(
        f.deps.config.worker.lease.as_secs() as i64 + 1,
    ));
    let outcome = process_job(&f.deps, &second, "w4", far_deadline(&f), false).await;
    assert!(matches!(outcome, Outcome::Succeeded { .. }), "{outcome:?}");
}
