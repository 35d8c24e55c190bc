//! The metadata table: jobs, entries, markers, generations, counters.
//!
//! Metadata layout, one table with `pk`/`sk`:
//! | item | pk | sk | notes |
//! |---|---|---|---|
//! | job | `JOB#{id}` | `JOB` | `doc` JSON + `version` for compare-and-set |
//! | cache entry | `T#{tenant}` | `E#{key}` | `doc` JSON; `gsi1pk`/`gsi1sk` = fresh-until hour bucket, for the warmer; `hits`, `last_hit_at` counted in place, never written by a completion |
//! | in-flight marker | `T#{tenant}` | `M#{key}` | `job_id`, written with a condition |
//! | generation | `T#{tenant}` | `G` or `G#U#{user}` | `gen`, bumped to invalidate |
//! | dataset generation | `T#{tenant}` | `G#D#{dataset}` | `gen`, `window_until` (epoch seconds), `trailing`, `version` for compare-and-set: bumped by source writes, debounced (`domain::invalidation`) |
//! | counters | `T#{tenant}` | `S#{dataset}` | `hits`, `misses`, `stale_hits` |
//! | live entries | `T#{tenant}` | `L#{dataset}#{gen}#{yyyymmddHH}`, `L#{dataset}#{gen}#D{dataset gen}#{yyyymmddHH}` once the dataset generation is past 0 | `entries`, `bytes`, `rows` of the entries of those generations whose stale deadline falls in that hour |
//! | rate limit | `T#{tenant}` | `RL#{yyyymmddHHMM}` | `n`: new exports started in that minute |
//! | running-job slot | `T#{tenant}` | `RUN#{i}` | `job_id`, `until`: one of the tenant's running-job slots |
//! | row count | `T#{tenant}` | `R#{rows key}` | `rows` of the last file of those rows, for progress |
//! Every item that should go away carries `expires_at` (epoch seconds, the table's TTL attribute);
//! readers still check deadlines themselves because TTL deletion is lazy.

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeValue, ConditionCheck, Delete, KeysAndAttributes, Put, TransactWriteItem, Update,
};
use aws_sdk_dynamodb::Client;
use chrono::{DateTime, Duration, DurationRound, Utc};

use super::{get_n, get_s, is_condition_failure, n, s, Item};
use crate::adapters::IamResource::{MetaTable, MetaTableIndexes};
use crate::adapters::{sdk_error, IamNeed};
use crate::domain::invalidation::DatasetGeneration;
use crate::domain::job::LiveBucket;
use crate::domain::{CacheEntry, CacheKey, Generation, Job};
use crate::ports::{
    Counters, Created, EntryStore, EntryTotals, Generations, HitCounts, HitKind, JobStore, Lookup,
    NewJob, PortError, PortResult, Tallies, TenantSlots,
};

/// IAM needs of the metadata store's methods, by port (see [`IamNeed`]); transactions are
/// authorised by the item actions of their parts. Keep in step with the SDK calls below.
#[rustfmt::skip]
pub const META_IAM: &[IamNeed] = &[
    IamNeed::new("jobs", "create_job", &["transact_write_items", "get_item"], &["dynamodb:PutItem", "dynamodb:ConditionCheckItem", "dynamodb:UpdateItem", "dynamodb:GetItem"], MetaTable),
    IamNeed::new("jobs", "get_job", &["get_item"], &["dynamodb:GetItem"], MetaTable),
    IamNeed::new("jobs", "put_job", &["put_item"], &["dynamodb:PutItem"], MetaTable),
    IamNeed::new("jobs", "complete_job", &["get_item", "transact_write_items"], &["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem"], MetaTable),
    IamNeed::new("jobs", "release_marker", &["delete_item"], &["dynamodb:DeleteItem"], MetaTable),
    IamNeed::new("entries", "find", &["batch_get_item", "get_item"], &["dynamodb:BatchGetItem", "dynamodb:GetItem"], MetaTable),
    IamNeed::new("entries", "touch_entry", &["update_item"], &["dynamodb:UpdateItem"], MetaTable),
    IamNeed::new("entries", "expiring_entries", &["query"], &["dynamodb:Query"], MetaTableIndexes),
    IamNeed::new("entries", "delete_entry", &["get_item", "transact_write_items"], &["dynamodb:GetItem", "dynamodb:DeleteItem", "dynamodb:UpdateItem"], MetaTable),
    IamNeed::new("generations", "bump_generation", &["update_item"], &["dynamodb:UpdateItem"], MetaTable),
    IamNeed::new("generations", "current_generation", &["batch_get_item"], &["dynamodb:BatchGetItem"], MetaTable),
    IamNeed::new("generations", "dataset_generations", &["query"], &["dynamodb:Query"], MetaTable),
    IamNeed::new("generations", "dataset_generation", &["get_item"], &["dynamodb:GetItem"], MetaTable),
    IamNeed::new("generations", "put_dataset_generation", &["update_item"], &["dynamodb:UpdateItem"], MetaTable),
    IamNeed::new("counters", "count", &["update_item"], &["dynamodb:UpdateItem"], MetaTable),
    IamNeed::new("counters", "tallies", &["query"], &["dynamodb:Query"], MetaTable),
    IamNeed::new("counters", "row_count", &["get_item"], &["dynamodb:GetItem"], MetaTable),
    IamNeed::new("counters", "record_row_count", &["put_item"], &["dynamodb:PutItem"], MetaTable),
    IamNeed::new("slots", "take_tenant_slot", &["query", "put_item"], &["dynamodb:Query", "dynamodb:PutItem"], MetaTable),
    IamNeed::new("slots", "release_tenant_slot", &["query", "delete_item"], &["dynamodb:Query", "dynamodb:DeleteItem"], MetaTable),
];

fn key(pk: String, sk: String) -> Item {
    HashMap::from([("pk".to_string(), s(pk)), ("sk".to_string(), s(sk))])
}

fn tenant_pk(tenant: &str) -> String {
    format!("T#{tenant}")
}

fn entry_sk(key: &CacheKey) -> String {
    format!("E#{key}")
}

fn marker_sk(key: &CacheKey) -> String {
    format!("M#{key}")
}

fn row_count_sk(rows_key: &str) -> String {
    format!("R#{rows_key}")
}

/// A row count is an estimate for the next file of the same rows; a month-old one still beats
/// none.
const ROW_COUNT_DAYS: i64 = 30;

fn job_pk(id: &str) -> String {
    format!("JOB#{id}")
}

fn user_gen_sk(user: &str) -> String {
    format!("G#U#{user}")
}

const DATASET_GEN_PREFIX: &str = "G#D#";

fn dataset_gen_sk(dataset: &str) -> String {
    format!("{DATASET_GEN_PREFIX}{dataset}")
}

fn dataset_generation_of(item: &Item) -> DatasetGeneration {
    DatasetGeneration {
        gen: get_n(item, "gen"),
        window_until: DateTime::from_timestamp(get_n(item, "window_until") as i64, 0)
            .unwrap_or_default(),
        trailing: item
            .get("trailing")
            .and_then(|v| v.as_bool().ok())
            .copied()
            .unwrap_or(false),
        version: get_n(item, "version"),
        rewritten: get_n(item, "rewritten"),
    }
}

/// Fixed width, so string order is time order in the expiry index.
fn sortable(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

fn hour_bucket(t: DateTime<Utc>) -> String {
    format!("EXP#{}", t.format("%Y-%m-%dT%H"))
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> PortError {
    PortError::failed("decode metadata", format!("{what}: {e}"), false)
}

impl TryFrom<Item> for Job {
    type Error = PortError;
    fn try_from(item: Item) -> Result<Self, Self::Error> {
        let doc = get_s(&item, "doc").ok_or_else(|| corrupt("job", "no doc attribute"))?;
        serde_json::from_str(doc).map_err(|e| corrupt("job", e))
    }
}

impl TryFrom<Item> for CacheEntry {
    type Error = PortError;
    fn try_from(item: Item) -> Result<Self, Self::Error> {
        let doc = get_s(&item, "doc").ok_or_else(|| corrupt("entry", "no doc attribute"))?;
        let mut e: CacheEntry = serde_json::from_str(doc).map_err(|e| corrupt("entry", e))?;
        // Hits are counted in place (ADD), not in the document.
        e.hits = get_n(&item, "hits");
        e.last_hit_at = get_s(&item, "last_hit_at")
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc));
        Ok(e)
    }
}

fn job_item(job: &Job) -> PortResult<Item> {
    let doc = serde_json::to_string(job).map_err(|e| corrupt("job", e))?;
    let mut item = key(job_pk(&job.job_id), "JOB".into());
    item.insert("doc".into(), s(doc));
    item.insert("version".into(), n(job.version));
    item.insert("tenant".into(), s(&job.tenant));
    item.insert("status".into(), s(job.status.as_str()));
    item.insert("expires_at".into(), n(job.expires_at.timestamp()));
    Ok(item)
}

/// The entry's attributes but its hit count and last-hit time: those are counted in place on
/// the same item (`touch_entry`) and never written with the entry, so a completion keeps the
/// hits counted while its job ran. The copies inside `doc` are not read.
fn entry_attributes(e: &CacheEntry) -> PortResult<Vec<(&'static str, AttributeValue)>> {
    let doc = serde_json::to_string(e).map_err(|err| corrupt("entry", err))?;
    Ok(vec![
        ("doc", s(doc)),
        // Top level so conditions can name the entry they expect (see `entry_is`).
        ("job_id", s(&e.job_id)),
        ("dataset", s(&e.spec.dataset)),
        ("rows", n(e.rows)),
        ("bytes", n(e.bytes)),
        ("gen_t", n(e.generation.tenant)),
        ("stale_until", n(e.stale_until.timestamp())),
        ("gsi1pk", s(hour_bucket(e.fresh_until))),
        (
            "gsi1sk",
            s(format!(
                "{}#{}#{}",
                sortable(e.fresh_until),
                e.tenant,
                e.cache_key
            )),
        ),
        // Metadata outlives the file's usefulness by a day, then TTL removes it.
        (
            "expires_at",
            n((e.stale_until + Duration::days(1)).timestamp()),
        ),
    ])
}

/// Writes the entry over the key's item, if the item is still the one `seen` names.
fn entry_update(table: &str, e: &CacheEntry, seen: Option<&str>) -> PortResult<Update> {
    let attributes = entry_attributes(e)?;
    let sets: Vec<String> = (0..attributes.len())
        .map(|i| format!("#a{i} = :a{i}"))
        .collect();
    let (condition, seen) = entry_is(seen);
    let mut update = Update::builder()
        .table_name(table)
        .set_key(Some(key(tenant_pk(&e.tenant), entry_sk(&e.cache_key))))
        .update_expression(format!("SET {}", sets.join(", ")))
        .condition_expression(condition)
        .set_expression_attribute_values(seen.map(|v| HashMap::from([(":seen".into(), v)])));
    for (i, (name, value)) in attributes.into_iter().enumerate() {
        update = update
            .expression_attribute_names(format!("#a{i}"), name)
            .expression_attribute_values(format!(":a{i}"), value);
    }
    update
        .build()
        .map_err(|err| PortError::failed("write entry", err.to_string(), false))
}

/// Why a transaction was cancelled, one code per item in order ("None" for items that passed);
/// `None` when it failed for another reason.
fn cancellation_codes<R>(e: &SdkError<TransactWriteItemsError, R>) -> Option<Vec<String>> {
    match e.as_service_error()? {
        TransactWriteItemsError::TransactionCanceledException(tc) => Some(
            tc.cancellation_reasons
                .iter()
                .flatten()
                .map(|r| r.code.clone().unwrap_or_default())
                .collect(),
        ),
        _ => None,
    }
}

fn condition_failed(codes: &[String], item: usize) -> bool {
    codes
        .get(item)
        .is_some_and(|c| c == "ConditionalCheckFailed")
}

/// A cancelled transaction that no condition explains (a concurrent transaction on the same
/// items, throttling): worth retrying.
fn cancelled(op: &str, codes: &[String]) -> PortError {
    PortError::failed(op, format!("transaction cancelled: {codes:?}"), true)
}

/// The condition that the key's entry is still the one `seen` names: the entry built by that job,
/// or no entry at all. Entries written before `job_id` was a top-level attribute match any id.
fn entry_is(seen: Option<&str>) -> (&'static str, Option<AttributeValue>) {
    match seen {
        None => ("attribute_not_exists(pk)", None),
        Some(id) => (
            "job_id = :seen OR (attribute_exists(pk) AND attribute_not_exists(job_id))",
            Some(s(id)),
        ),
    }
}

fn bucket_sk(b: &LiveBucket) -> String {
    // Dataset generation 0 keeps the key buckets had before dataset generations existed, so
    // entries written then are still taken off their bucket.
    let dataset_gen = match b.dataset_generation {
        0 => String::new(),
        g => format!("D{g}#"),
    };
    format!(
        "L#{}#{}#{dataset_gen}{}",
        b.dataset,
        b.tenant_generation,
        b.hour.format("%Y%m%d%H")
    )
}

/// The bucket a live-entry totals item counts (see the layout above).
fn bucket_of(item: &Item) -> Option<LiveBucket> {
    let ends = DateTime::from_timestamp(get_n(item, "hour_end") as i64, 0)?;
    Some(LiveBucket {
        dataset: get_s(item, "dataset")?.to_string(),
        tenant_generation: get_n(item, "gen_t"),
        dataset_generation: get_n(item, "gen_d"),
        hour: ends - Duration::hours(1),
    })
}

/// Totals updates for an entry written (`added`) in place of another (`removed`); one update
/// when both fall in the same bucket, since a transaction may touch an item only once.
fn live_updates(
    table: &str,
    added: Option<&CacheEntry>,
    removed: Option<&CacheEntry>,
) -> PortResult<Vec<TransactWriteItem>> {
    let mut deltas: Vec<(&str, LiveBucket, i64, i64, i64)> = Vec::new();
    for (e, sign) in added
        .map(|e| (e, 1))
        .into_iter()
        .chain(removed.map(|e| (e, -1)))
    {
        let bucket = LiveBucket::of(e);
        let delta = (sign, sign * e.bytes as i64, sign * e.rows as i64);
        match deltas.iter_mut().find(|d| d.1 == bucket) {
            Some(d) => (d.2, d.3, d.4) = (d.2 + delta.0, d.3 + delta.1, d.4 + delta.2),
            None => deltas.push((&e.tenant, bucket, delta.0, delta.1, delta.2)),
        }
    }
    deltas
        .into_iter()
        .map(|(tenant, bucket, entries, bytes, rows)| {
            let hour_end = bucket.ends();
            let update = Update::builder()
                .table_name(table)
                .set_key(Some(key(tenant_pk(tenant), bucket_sk(&bucket))))
                .update_expression(
                    "ADD #e :e, #b :b, #r :r SET dataset = :d, gen_t = :g, gen_d = :gd, hour_end = :h, expires_at = :x",
                )
                .expression_attribute_names("#e", "entries")
                .expression_attribute_names("#b", "bytes")
                .expression_attribute_names("#r", "rows")
                .expression_attribute_values(":e", n(entries))
                .expression_attribute_values(":b", n(bytes))
                .expression_attribute_values(":r", n(rows))
                .expression_attribute_values(":d", s(&bucket.dataset))
                .expression_attribute_values(":g", n(bucket.tenant_generation))
                .expression_attribute_values(":gd", n(bucket.dataset_generation))
                .expression_attribute_values(":h", n(hour_end.timestamp()))
                .expression_attribute_values(":x", n((hour_end + Duration::days(1)).timestamp()))
                .build()
                .map_err(|err| PortError::failed("live counters", err.to_string(), false))?;
            Ok(TransactWriteItem::builder().update(update).build())
        })
        .collect()
}

fn slot_sk(i: u32) -> String {
    format!("RUN#{i:04}")
}

#[derive(Clone)]
pub struct MetaStore {
    client: Client,
    table: String,
}

impl MetaStore {
    pub fn new(client: Client, table: &str) -> Self {
        Self {
            client,
            table: table.to_string(),
        }
    }

    /// BatchGetItem with strongly consistent reads, retrying unprocessed keys.
    async fn batch_get(&self, keys: Vec<Item>) -> PortResult<Vec<Item>> {
        let mut pending = Some(
            KeysAndAttributes::builder()
                .set_keys(Some(keys))
                .consistent_read(true)
                .build()
                .map_err(|e| PortError::failed("batch get", e.to_string(), false))?,
        );
        let mut out = Vec::new();
        let mut round = 0u32;
        while let Some(req) = pending.take() {
            let resp = self
                .client
                .batch_get_item()
                .request_items(&self.table, req)
                .send()
                .await
                .map_err(|e| sdk_error("metadata batch get", e))?;
            if let Some(mut items) = resp.responses {
                out.extend(items.remove(&self.table).unwrap_or_default());
            }
            pending = resp
                .unprocessed_keys
                .and_then(|mut u| u.remove(&self.table))
                .filter(|k| !k.keys.is_empty());
            if pending.is_some() {
                round += 1;
                if round > 8 {
                    return Err(PortError::failed(
                        "metadata batch get",
                        "keys stayed unprocessed",
                        true,
                    ));
                }
                tokio::time::sleep(std::time::Duration::from_millis(20 << round.min(6))).await;
            }
        }
        Ok(out)
    }

    async fn get_item(&self, pk: String, sk: String) -> PortResult<Option<Item>> {
        let resp = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(pk, sk)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_error("metadata get", e))?;
        Ok(resp.item)
    }

    async fn query_all(
        &self,
        build: impl Fn(
            aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder,
        ) -> aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder,
    ) -> PortResult<Vec<Item>> {
        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let resp = build(self.client.query().table_name(&self.table))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| sdk_error("metadata query", e))?;
            out.extend(resp.items.unwrap_or_default());
            match resp.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(out),
            }
        }
    }
}

impl MetaStore {
    /// Runs the transaction `items` builds from the key's current entry (nothing when it builds
    /// none), and again when that entry changed in between: item `entry_item` is conditioned on
    /// it. Any other cancellation comes back as its reasons.
    async fn on_current_entry(
        &self,
        tenant: &str,
        key_: &CacheKey,
        entry_item: usize,
        items: impl Fn(Option<&CacheEntry>) -> PortResult<Vec<TransactWriteItem>>,
    ) -> PortResult<Result<(), Vec<String>>> {
        for _ in 0..4 {
            let old = self
                .get_item(tenant_pk(tenant), entry_sk(key_))
                .await?
                .map(CacheEntry::try_from)
                .transpose()?;
            let items = items(old.as_ref())?;
            if items.is_empty() {
                return Ok(Ok(()));
            }
            let err = match self
                .client
                .transact_write_items()
                .set_transact_items(Some(items))
                .send()
                .await
            {
                Ok(_) => return Ok(Ok(())),
                Err(e) => e,
            };
            match cancellation_codes(&err) {
                Some(codes) if condition_failed(&codes, entry_item) => continue,
                Some(codes) => return Ok(Err(codes)),
                None => return Err(sdk_error("entry transaction", err)),
            }
        }
        Err(PortError::failed(
            "entry transaction",
            "the entry kept changing underneath",
            true,
        ))
    }

    /// The tenant's items whose sort key starts with `prefix`, read consistently.
    async fn tenant_items(&self, tenant: &str, prefix: &str) -> PortResult<Vec<Item>> {
        let pk = tenant_pk(tenant);
        self.query_all(|q| {
            q.key_condition_expression("pk = :pk AND begins_with(sk, :p)")
                .consistent_read(true)
                .expression_attribute_values(":pk", s(&pk))
                .expression_attribute_values(":p", s(prefix))
        })
        .await
    }
}

fn generation_from(items: &[Item], user: &str, dataset: &str, now: DateTime<Utc>) -> Generation {
    let mut g = Generation::default();
    let user_sk = user_gen_sk(user);
    let dataset_sk = dataset_gen_sk(dataset);
    for item in items {
        match get_s(item, "sk") {
            Some("G") => g.tenant = get_n(item, "gen"),
            Some(sk) if sk == user_sk => g.user = get_n(item, "gen"),
            Some(sk) if sk == dataset_sk => g.dataset = dataset_generation_of(item).effective(now),
            _ => {}
        }
    }
    g
}

#[async_trait]
impl JobStore for MetaStore {
    async fn create_job(&self, new: NewJob<'_>) -> PortResult<Created> {
        let job = new.job;
        let now = job.created_at;
        let pk = tenant_pk(&job.tenant);
        let mut marker = key(pk.clone(), marker_sk(&job.cache_key));
        marker.insert("job_id".into(), s(&job.job_id));
        marker.insert("expires_at".into(), n(new.marker_until.timestamp()));
        let mut marker_put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(marker));
        marker_put = match new.replacing {
            None => marker_put
                .condition_expression("attribute_not_exists(pk) OR expires_at < :now")
                .expression_attribute_values(":now", n(now.timestamp())),
            Some(old) => marker_put
                .condition_expression("job_id = :old")
                .expression_attribute_values(":old", s(old)),
        };
        let job_put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(job_item(job)?))
            .condition_expression("attribute_not_exists(pk)");
        let (entry_condition, seen) = entry_is(new.entry_seen);
        let entry_check = ConditionCheck::builder()
            .table_name(&self.table)
            .set_key(Some(key(pk.clone(), entry_sk(&job.cache_key))))
            .condition_expression(entry_condition)
            .set_expression_attribute_values(seen.map(|v| HashMap::from([(":seen".into(), v)])));
        let invalid = |e: aws_sdk_dynamodb::error::BuildError| {
            PortError::failed("create job", e.to_string(), false)
        };
        // Items in this order; cancellation reasons come back in the same order.
        let mut tx = self
            .client
            .transact_write_items()
            .transact_items(
                TransactWriteItem::builder()
                    .put(marker_put.build().map_err(invalid)?)
                    .build(),
            )
            .transact_items(
                TransactWriteItem::builder()
                    .put(job_put.build().map_err(invalid)?)
                    .build(),
            )
            .transact_items(
                TransactWriteItem::builder()
                    .condition_check(entry_check.build().map_err(invalid)?)
                    .build(),
            );
        if let Some(limit) = new.miss_limit {
            let slot = Update::builder()
                .table_name(&self.table)
                .set_key(Some(key(
                    pk.clone(),
                    format!("RL#{}", now.format("%Y%m%d%H%M")),
                )))
                .update_expression("ADD n :one SET expires_at = :exp")
                .condition_expression("attribute_not_exists(n) OR n < :limit")
                .expression_attribute_values(":one", n(1))
                .expression_attribute_values(":limit", n(limit))
                .expression_attribute_values(":exp", n(now.timestamp() + 3600))
                .build()
                .map_err(invalid)?;
            tx = tx.transact_items(TransactWriteItem::builder().update(slot).build());
        }
        let err = match tx.send().await {
            Ok(_) => return Ok(Created::Created),
            Err(e) => e,
        };
        let Some(codes) = cancellation_codes(&err) else {
            return Err(sdk_error("create job", err));
        };
        // A changed entry outranks a held marker (serve the file rather than join), and a held
        // marker outranks the rate limit (joining costs nothing).
        if condition_failed(&codes, 2) {
            return Ok(Created::EntryChanged);
        }
        if condition_failed(&codes, 0) {
            return match self
                .get_item(pk, marker_sk(&job.cache_key))
                .await?
                .as_ref()
                .and_then(|m| get_s(m, "job_id"))
            {
                Some(id) => Ok(Created::Held(id.to_string())),
                None => Err(PortError::Conflict("marker released meanwhile".into())),
            };
        }
        if condition_failed(&codes, 3) {
            return Ok(Created::RateLimited);
        }
        Err(cancelled("create job", &codes))
    }

    async fn get_job(&self, job_id: &str) -> PortResult<Option<Job>> {
        self.get_item(job_pk(job_id), "JOB".into())
            .await?
            .map(Job::try_from)
            .transpose()
    }

    async fn put_job(&self, job: &Job) -> PortResult<()> {
        let res = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(job_item(job)?))
            .condition_expression("version = :prev")
            .expression_attribute_values(":prev", n(job.version.saturating_sub(1)))
            .send()
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().is_some_and(is_condition_failure) => Err(
                PortError::Conflict(format!("job {} changed meanwhile", job.job_id)),
            ),
            Err(e) => Err(sdk_error("put job", e)),
        }
    }

    async fn complete_job(&self, job: &Job, entry: &CacheEntry) -> PortResult<()> {
        let invalid = |e: aws_sdk_dynamodb::error::BuildError| {
            PortError::failed("complete job", e.to_string(), false)
        };
        // The entry replaces whatever is there (its hits stay), and the totals move from the
        // old entry to the new one.
        let outcome = self
            .on_current_entry(&entry.tenant, &entry.cache_key, 1, |old| {
                let job_put = Put::builder()
                    .table_name(&self.table)
                    .set_item(Some(job_item(job)?))
                    .condition_expression("version = :prev")
                    .expression_attribute_values(":prev", n(job.version.saturating_sub(1)))
                    .build()
                    .map_err(invalid)?;
                let entry_write = entry_update(&self.table, entry, old.map(|o| o.job_id.as_str()))?;
                let mut items = vec![
                    TransactWriteItem::builder().put(job_put).build(),
                    TransactWriteItem::builder().update(entry_write).build(),
                ];
                items.extend(live_updates(&self.table, Some(entry), old)?);
                Ok(items)
            })
            .await?;
        match outcome {
            Ok(()) => Ok(()),
            Err(codes) if condition_failed(&codes, 0) => Err(PortError::Conflict(format!(
                "job {} changed before completion",
                job.job_id
            ))),
            Err(codes) => Err(cancelled("complete job", &codes)),
        }
    }

    async fn release_marker(&self, tenant: &str, key_: &CacheKey, job_id: &str) -> PortResult<()> {
        let res = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(key(tenant_pk(tenant), marker_sk(key_))))
            .condition_expression("job_id = :j")
            .expression_attribute_values(":j", s(job_id))
            .send()
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().is_some_and(is_condition_failure) => Ok(()),
            Err(e) => Err(sdk_error("release marker", e)),
        }
    }
}

#[async_trait]
impl EntryStore for MetaStore {
    async fn find(
        &self,
        tenant: &str,
        user: &str,
        dataset: &str,
        key_: &CacheKey,
        now: DateTime<Utc>,
    ) -> PortResult<Lookup> {
        let items = self
            .batch_get(vec![
                key(tenant_pk(tenant), entry_sk(key_)),
                key(tenant_pk(tenant), "G".into()),
                key(tenant_pk(tenant), user_gen_sk(user)),
                key(tenant_pk(tenant), dataset_gen_sk(dataset)),
            ])
            .await?;
        let generation = generation_from(&items, user, dataset, now);
        let entry = items
            .into_iter()
            .find(|i| get_s(i, "sk").is_some_and(|sk| sk.starts_with("E#")))
            .map(CacheEntry::try_from)
            .transpose()?;
        let builder_generation = match &entry {
            Some(e) if e.user != user => Generation {
                tenant: generation.tenant,
                dataset: generation.dataset,
                user: self
                    .get_item(tenant_pk(tenant), user_gen_sk(&e.user))
                    .await?
                    .map_or(0, |i| get_n(&i, "gen")),
            },
            _ => generation,
        };
        Ok(Lookup {
            entry,
            builder_generation,
            generation,
        })
    }

    async fn touch_entry(&self, entry: &CacheEntry, now: DateTime<Utc>) -> PortResult<()> {
        let res = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(
                tenant_pk(&entry.tenant),
                entry_sk(&entry.cache_key),
            )))
            .update_expression("ADD hits :one SET last_hit_at = :now")
            // Never resurrect an entry deleted in the meantime.
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":now", s(now.to_rfc3339()))
            .send()
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().is_some_and(is_condition_failure) => Ok(()),
            Err(e) => Err(sdk_error("touch entry", e)),
        }
    }

    async fn expiring_entries(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> PortResult<Vec<CacheEntry>> {
        let mut out = Vec::new();
        let mut bucket = from
            .duration_trunc(Duration::hours(1))
            .map_err(|e| PortError::failed("expiring entries", e.to_string(), false))?;
        while bucket < to {
            let items = self
                .query_all(|q| {
                    q.index_name("by_expiry")
                        .key_condition_expression("gsi1pk = :b AND gsi1sk BETWEEN :from AND :to")
                        .expression_attribute_values(":b", s(hour_bucket(bucket)))
                        .expression_attribute_values(":from", s(sortable(from)))
                        // `~` sorts after `#`, so every key of the last millisecond is included.
                        .expression_attribute_values(":to", s(format!("{}~", sortable(to))))
                })
                .await?;
            for item in items {
                out.push(CacheEntry::try_from(item)?);
            }
            bucket += Duration::hours(1);
        }
        out.retain(|e| e.fresh_until >= from && e.fresh_until < to);
        Ok(out)
    }

    async fn delete_entry(&self, tenant: &str, key_: &CacheKey) -> PortResult<()> {
        let outcome = self
            .on_current_entry(tenant, key_, 0, |old| {
                let Some(old) = old else {
                    return Ok(Vec::new());
                };
                let (condition, seen) = entry_is(Some(&old.job_id));
                let delete = Delete::builder()
                    .table_name(&self.table)
                    .set_key(Some(key(tenant_pk(tenant), entry_sk(key_))))
                    .condition_expression(condition)
                    .set_expression_attribute_values(
                        seen.map(|v| HashMap::from([(":seen".into(), v)])),
                    )
                    .build()
                    .map_err(|e| PortError::failed("delete entry", e.to_string(), false))?;
                let mut items = vec![TransactWriteItem::builder().delete(delete).build()];
                items.extend(live_updates(&self.table, None, Some(old))?);
                Ok(items)
            })
            .await?;
        outcome.map_err(|codes| cancelled("delete entry", &codes))
    }
}

#[async_trait]
impl Generations for MetaStore {
    async fn bump_generation(&self, tenant: &str, user: Option<&str>) -> PortResult<()> {
        let sk = user.map_or_else(|| "G".to_string(), user_gen_sk);
        self.client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(tenant_pk(tenant), sk)))
            .update_expression("ADD gen :one")
            .expression_attribute_values(":one", n(1))
            .send()
            .await
            .map_err(|e| sdk_error("bump generation", e))?;
        Ok(())
    }

    async fn current_generation(
        &self,
        tenant: &str,
        user: &str,
        dataset: &str,
        now: DateTime<Utc>,
    ) -> PortResult<Generation> {
        let items = self
            .batch_get(vec![
                key(tenant_pk(tenant), "G".into()),
                key(tenant_pk(tenant), user_gen_sk(user)),
                key(tenant_pk(tenant), dataset_gen_sk(dataset)),
            ])
            .await?;
        Ok(generation_from(&items, user, dataset, now))
    }

    async fn dataset_generations(
        &self,
        tenant: &str,
    ) -> PortResult<BTreeMap<String, DatasetGeneration>> {
        let pk = tenant_pk(tenant);
        let items = self
            .query_all(|q| {
                q.key_condition_expression("pk = :pk AND begins_with(sk, :p)")
                    .consistent_read(true)
                    .expression_attribute_values(":pk", s(&pk))
                    .expression_attribute_values(":p", s(DATASET_GEN_PREFIX))
            })
            .await?;
        Ok(items
            .iter()
            .filter_map(|i| {
                let dataset = get_s(i, "sk")?.strip_prefix(DATASET_GEN_PREFIX)?;
                Some((dataset.to_string(), dataset_generation_of(i)))
            })
            .collect())
    }

    async fn dataset_generation(
        &self,
        tenant: &str,
        dataset: &str,
    ) -> PortResult<DatasetGeneration> {
        Ok(self
            .get_item(tenant_pk(tenant), dataset_gen_sk(dataset))
            .await?
            .map(|i| dataset_generation_of(&i))
            .unwrap_or_default())
    }

    async fn put_dataset_generation(
        &self,
        tenant: &str,
        dataset: &str,
        record: &DatasetGeneration,
    ) -> PortResult<()> {
        let prev = record.version.saturating_sub(1);
        let condition = if prev == 0 {
            "attribute_not_exists(#v)"
        } else {
            "#v = :prev"
        };
        let mut update = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(tenant_pk(tenant), dataset_gen_sk(dataset))))
            // `trailing` is a reserved word, so every name goes through a placeholder.
            .update_expression("SET #g = :g, #w = :w, #t = :t, #v = :v, #rw = :rw")
            .condition_expression(condition)
            .expression_attribute_names("#g", "gen")
            .expression_attribute_names("#w", "window_until")
            .expression_attribute_names("#t", "trailing")
            .expression_attribute_names("#v", "version")
            .expression_attribute_names("#rw", "rewritten")
            .expression_attribute_values(":g", n(record.gen))
            .expression_attribute_values(":w", n(record.window_until.timestamp()))
            .expression_attribute_values(":t", AttributeValue::Bool(record.trailing))
            .expression_attribute_values(":v", n(record.version))
            .expression_attribute_values(":rw", n(record.rewritten));
        if prev > 0 {
            update = update.expression_attribute_values(":prev", n(prev));
        }
        match update.send().await {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().is_some_and(is_condition_failure) => Err(
                PortError::Conflict(format!("dataset generation {tenant}/{dataset}")),
            ),
            Err(e) => Err(sdk_error("put dataset generation", e)),
        }
    }
}

#[async_trait]
impl Counters for MetaStore {
    async fn count(&self, tenant: &str, dataset: &str, kind: HitKind) -> PortResult<()> {
        let counter = match kind {
            HitKind::Hit => "hits",
            HitKind::Stale => "stale_hits",
            HitKind::Miss => "misses",
        };
        self.client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(tenant_pk(tenant), format!("S#{dataset}"))))
            .update_expression("ADD #c :one SET dataset = :d")
            .expression_attribute_names("#c", counter)
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":d", s(dataset))
            .send()
            .await
            .map_err(|e| sdk_error("count", e))?;
        Ok(())
    }

    async fn tallies(&self, tenant: &str) -> PortResult<Tallies> {
        let mut out = Tallies::default();
        for c in &self.tenant_items(tenant, "S#").await? {
            let Some(ds) = get_s(c, "dataset") else {
                continue;
            };
            let counts = HitCounts {
                hits: get_n(c, "hits"),
                misses: get_n(c, "misses"),
                stale_hits: get_n(c, "stale_hits"),
            };
            out.served.insert(ds.to_string(), counts);
        }
        for item in &self.tenant_items(tenant, "L#").await? {
            let Some(bucket) = bucket_of(item) else {
                continue;
            };
            let totals = EntryTotals {
                entries: get_n(item, "entries"),
                bytes: get_n(item, "bytes"),
                rows: get_n(item, "rows"),
            };
            out.buckets.push((bucket, totals));
        }
        Ok(out)
    }

    async fn row_count(&self, tenant: &str, rows_key: &str) -> PortResult<Option<u64>> {
        let res = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(tenant_pk(tenant), row_count_sk(rows_key))))
            .projection_expression("#r")
            .expression_attribute_names("#r", "rows")
            .send()
            .await
            .map_err(|e| sdk_error("read row count", e))?;
        Ok(res.item.map(|item| get_n(&item, "rows")))
    }

    async fn record_row_count(
        &self,
        tenant: &str,
        rows_key: &str,
        rows: u64,
        now: DateTime<Utc>,
    ) -> PortResult<()> {
        let mut item = key(tenant_pk(tenant), row_count_sk(rows_key));
        item.insert("rows".into(), n(rows));
        item.insert(
            "expires_at".into(),
            n((now + Duration::days(ROW_COUNT_DAYS)).timestamp()),
        );
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| sdk_error("record row count", e))?;
        Ok(())
    }
}

#[async_trait]
impl TenantSlots for MetaStore {
    async fn take_tenant_slot(
        &self,
        tenant: &str,
        job_id: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: u32,
    ) -> PortResult<bool> {
        let held = self.tenant_items(tenant, "RUN#").await?;
        let index = |item: &Item| {
            get_s(item, "sk")
                .and_then(|sk| sk.strip_prefix("RUN#"))
                .and_then(|i| i.parse::<u32>().ok())
        };
        let mine = held
            .iter()
            .filter(|i| get_s(i, "job_id") == Some(job_id))
            .find_map(index)
            .filter(|i| *i < limit);
        let taken: Vec<u32> = held
            .iter()
            .filter(|i| get_n(i, "until") as i64 > now.timestamp())
            .filter_map(index)
            .collect();
        // One slot per index, each written with a condition: two workers can never both take
        // the last free one. The job's own slot first, so a renewal never takes a second one.
        let candidates = mine
            .into_iter()
            .chain((0..limit).filter(|i| !taken.contains(i) && Some(*i) != mine));
        for i in candidates {
            let mut item = key(tenant_pk(tenant), slot_sk(i));
            item.insert("job_id".into(), s(job_id));
            item.insert("until".into(), n(until.timestamp()));
            item.insert(
                "expires_at".into(),
                n((until + Duration::days(1)).timestamp()),
            );
            let res = self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(item))
                .condition_expression("attribute_not_exists(pk) OR job_id = :me OR #u <= :now")
                .expression_attribute_names("#u", "until")
                .expression_attribute_values(":me", s(job_id))
                .expression_attribute_values(":now", n(now.timestamp()))
                .send()
                .await;
            match res {
                Ok(_) => return Ok(true),
                Err(e) if e.as_service_error().is_some_and(is_condition_failure) => continue,
                Err(e) => return Err(sdk_error("take tenant slot", e)),
            }
        }
        Ok(false)
    }

    async fn release_tenant_slot(&self, tenant: &str, job_id: &str) -> PortResult<()> {
        for item in self.tenant_items(tenant, "RUN#").await? {
            if get_s(&item, "job_id") != Some(job_id) {
                continue;
            }
            let Some(sk) = get_s(&item, "sk") else {
                continue;
            };
            let res = self
                .client
                .delete_item()
                .table_name(&self.table)
                .set_key(Some(key(tenant_pk(tenant), sk.to_string())))
                .condition_expression("job_id = :me")
                .expression_attribute_values(":me", s(job_id))
                .send()
                .await;
            match res {
                Ok(_) => {}
                // Taken over after it expired: not ours to free any more.
                Err(e) if e.as_service_error().is_some_and(is_condition_failure) => {}
                Err(e) => return Err(sdk_error("release tenant slot", e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
