//! The requests the metadata store builds, as DynamoDB receives them: keys, conditions,
//! projections and transaction items, read back from the JSON the SDK sends.

use chrono::TimeZone;
use serde_json::{json, Value as Json};

use super::*;
use crate::adapters::testkit::{
    answering, cancelled, dynamodb, dynamodb_calls, entry, error, job, ok, only_call, t0,
};

const TABLE: &str = "meta-test";

fn store(http: &aws_smithy_http_client::test_util::StaticReplayClient) -> MetaStore {
    MetaStore::new(dynamodb(http), TABLE)
}

/// `{"pk": {"S": pk}, "sk": {"S": sk}}`
fn key_json(pk: &str, sk: &str) -> Json {
    json!({ "pk": { "S": pk }, "sk": { "S": sk } })
}

/// The entry item as DynamoDB returns it, with hits counted on it.
fn stored(e: &CacheEntry, hits: u64) -> Json {
    json!({
        "pk": { "S": format!("T#{}", e.tenant) },
        "sk": { "S": format!("E#{}", e.cache_key) },
        "doc": { "S": serde_json::to_string(e).unwrap() },
        "job_id": { "S": e.job_id },
        "bytes": { "N": e.bytes.to_string() },
        "hits": { "N": hits.to_string() },
    })
}

fn gen_item(sk: &str, gen: u64) -> Json {
    json!({ "pk": { "S": "T#acme" }, "sk": { "S": sk }, "gen": { "N": gen.to_string() } })
}

/// The condition of an entry write that expects the entry built by `:seen`.
const SEEN: &str = "job_id = :seen OR (attribute_exists(pk) AND attribute_not_exists(job_id))";

/// A write's condition and the values its expressions name.
fn condition(write: &Json) -> (&str, &Json) {
    (
        write["ConditionExpression"].as_str().unwrap_or_default(),
        &write["ExpressionAttributeValues"],
    )
}

fn n_of(v: &Json) -> i64 {
    v["N"].as_str().unwrap().parse().unwrap()
}

#[test]
fn expiry_index_keys_sort_by_time() {
    let a = Utc.with_ymd_and_hms(2024, 1, 1, 9, 59, 59).unwrap();
    let b = a + Duration::milliseconds(1500);
    assert!(sortable(a) < sortable(b));
    assert_eq!(hour_bucket(a), "EXP#2024-01-01T09");
}

#[tokio::test]
async fn find_reads_the_entry_and_both_users_generations_consistently() {
    let mut built_by_bob = entry(&job("acme", "j0"));
    built_by_bob.user = "bob".into();
    // Built after the orders' trailing bump took effect.
    built_by_bob.generation.dataset = 4;
    let now = Utc.with_ymd_and_hms(2026, 12, 7, 12, 0, 0).unwrap();
    let mut dataset_gen = gen_item("G#D#orders", 3);
    dataset_gen["trailing"] = json!({ "BOOL": true });
    dataset_gen["window_until"] = json!({ "N": (now.timestamp() - 1).to_string() });
    let http = answering(vec![
        ok(json!({ "Responses": { TABLE: [
            stored(&built_by_bob, 4), gen_item("G", 2), gen_item("G#U#alice", 9), dataset_gen,
        ] } })),
        ok(json!({ "Item": gen_item("G#U#bob", 5) })),
    ]);
    let found = store(&http)
        .find("acme", "alice", "orders", &CacheKey("k1".into()), now)
        .await
        .unwrap();

    let calls = dynamodb_calls(&http);
    assert_eq!(calls.len(), 2, "{calls:?}");
    let (op, batch) = &calls[0];
    assert_eq!(op, "BatchGetItem");
    let read = &batch["RequestItems"][TABLE];
    assert_eq!(read["ConsistentRead"], true);
    let mut keys: Vec<Json> = read["Keys"].as_array().unwrap().clone();
    keys.sort_by_key(|k| k["sk"]["S"].as_str().unwrap().to_string());
    assert_eq!(
        keys,
        vec![
            key_json("T#acme", "E#k1"),
            key_json("T#acme", "G"),
            key_json("T#acme", "G#D#orders"),
            key_json("T#acme", "G#U#alice"),
        ]
    );
    // The entry is bob's: his generation is read too, to judge it.
    let (op, get) = &calls[1];
    assert_eq!(op, "GetItem");
    assert_eq!(get["TableName"], TABLE);
    assert_eq!(get["Key"], key_json("T#acme", "G#U#bob"));
    assert_eq!(get["ConsistentRead"], true);

    let generation = |user| Generation {
        tenant: 2,
        user,
        dataset: 4,
    };
    assert_eq!(found.generation, generation(9));
    assert_eq!(found.builder_generation, generation(5));
    assert_eq!(found.entry.as_ref().map(|e| e.hits), Some(4));
    assert!(found.current_entry().is_some(), "bob's generations match");
}

#[tokio::test]
async fn create_job_writes_marker_job_entry_check_and_rate_slot_in_one_transaction() {
    let job = job("acme", "j1");
    let http = answering(vec![ok(json!({}))]);
    let created = store(&http)
        .create_job(NewJob {
            job: &job,
            marker_until: t0() + Duration::hours(6),
            replacing: None,
            entry_seen: Some("j0"),
            miss_limit: Some(5),
        })
        .await
        .unwrap();
    assert_eq!(created, Created::Created);

    let tx = only_call(&http, "TransactWriteItems");
    let items = tx["TransactItems"].as_array().unwrap();
    assert_eq!(items.len(), 4, "{tx}");
    let marker = &items[0]["Put"];
    assert_eq!(marker["TableName"], TABLE);
    assert_eq!(marker["Item"]["pk"]["S"], "T#acme");
    assert_eq!(marker["Item"]["sk"]["S"], "M#k1");
    assert_eq!(marker["Item"]["job_id"]["S"], "j1");
    let now = t0().timestamp();
    assert_eq!(
        condition(marker),
        (
            "attribute_not_exists(pk) OR expires_at < :now",
            &json!({ ":now": { "N": now.to_string() } })
        )
    );
    let job_put = &items[1]["Put"];
    assert_eq!(job_put["Item"]["pk"]["S"], "JOB#j1");
    assert_eq!(job_put["Item"]["sk"]["S"], "JOB");
    assert_eq!(job_put["Item"]["version"]["N"], "1");
    assert_eq!(
        condition(job_put),
        ("attribute_not_exists(pk)", &Json::Null)
    );
    let check = &items[2]["ConditionCheck"];
    assert_eq!(check["Key"], key_json("T#acme", "E#k1"));
    assert_eq!(condition(check), (SEEN, &json!({ ":seen": { "S": "j0" } })));
    let rate = &items[3]["Update"];
    assert_eq!(rate["Key"], key_json("T#acme", "RL#202405010930"));
    let rate_values = json!({
        ":one": { "N": "1" }, ":limit": { "N": "5" }, ":exp": { "N": (now + 3600).to_string() },
    });
    assert_eq!(
        condition(rate),
        ("attribute_not_exists(n) OR n < :limit", &rate_values)
    );
}

#[tokio::test]
async fn create_job_takes_a_marker_over_only_from_the_job_it_names_and_expects_no_entry() {
    let job = job("acme", "j2");
    let http = answering(vec![ok(json!({}))]);
    store(&http)
        .create_job(NewJob {
            job: &job,
            marker_until: t0() + Duration::hours(6),
            replacing: Some("j1"),
            entry_seen: None,
            miss_limit: None,
        })
        .await
        .unwrap();
    let tx = only_call(&http, "TransactWriteItems");
    let items = tx["TransactItems"].as_array().unwrap();
    assert_eq!(items.len(), 3, "no rate slot without a limit: {tx}");
    assert_eq!(
        condition(&items[0]["Put"]),
        ("job_id = :old", &json!({ ":old": { "S": "j1" } }))
    );
    assert_eq!(
        condition(&items[2]["ConditionCheck"]),
        ("attribute_not_exists(pk)", &Json::Null)
    );
}

#[tokio::test]
async fn create_job_reads_which_condition_cancelled_it() {
    let job = job("acme", "j1");
    let new = NewJob {
        job: &job,
        marker_until: t0() + Duration::hours(6),
        replacing: None,
        entry_seen: None,
        miss_limit: Some(1),
    };
    let held = answering(vec![
        cancelled(&["ConditionalCheckFailed", "None", "None", "None"]),
        ok(
            json!({ "Item": { "pk": { "S": "T#acme" }, "sk": { "S": "M#k1" }, "job_id": { "S": "other" } } }),
        ),
    ]);
    assert_eq!(
        store(&held).create_job(new).await.unwrap(),
        Created::Held("other".into())
    );
    let calls = dynamodb_calls(&held);
    assert_eq!(calls[1].0, "GetItem");
    assert_eq!(calls[1].1["Key"], key_json("T#acme", "M#k1"));

    // A changed entry outranks a held marker; a held marker outranks the rate limit.
    for (codes, want) in [
        (
            [
                "ConditionalCheckFailed",
                "None",
                "ConditionalCheckFailed",
                "None",
            ],
            Created::EntryChanged,
        ),
        (
            ["None", "None", "None", "ConditionalCheckFailed"],
            Created::RateLimited,
        ),
    ] {
        let http = answering(vec![cancelled(&codes)]);
        assert_eq!(
            store(&http).create_job(new).await.unwrap(),
            want,
            "{codes:?}"
        );
    }
}

#[tokio::test]
async fn put_job_is_a_compare_and_set_on_the_previous_version() {
    let mut job = job("acme", "j1");
    job.version = 3;
    let http = answering(vec![ok(json!({}))]);
    store(&http).put_job(&job).await.unwrap();
    let put = only_call(&http, "PutItem");
    assert_eq!(put["TableName"], TABLE);
    assert_eq!(put["Item"]["pk"]["S"], "JOB#j1");
    assert_eq!(put["Item"]["version"]["N"], "3");
    assert_eq!(put["Item"]["tenant"]["S"], "acme");
    assert_eq!(
        condition(&put),
        ("version = :prev", &json!({ ":prev": { "N": "2" } }))
    );

    let lost = answering(vec![error("ConditionalCheckFailedException", json!({}))]);
    assert!(matches!(
        store(&lost).put_job(&job).await,
        Err(PortError::Conflict(_))
    ));
}

#[tokio::test]
async fn complete_job_updates_the_entry_but_never_its_hits_and_moves_the_totals() {
    let old = entry(&job("acme", "j0"));
    let mut job = job("acme", "j1");
    job.version = 4;
    let mut new = entry(&job);
    // A later file: its stale deadline falls in another hour, so two buckets move.
    new.stale_until += Duration::hours(2);
    new.bytes = 200;
    new.hits = 99;
    let http = answering(vec![ok(json!({ "Item": stored(&old, 7) })), ok(json!({}))]);
    store(&http).complete_job(&job, &new).await.unwrap();

    let calls = dynamodb_calls(&http);
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0].0, "GetItem");
    assert_eq!(calls[0].1["Key"], key_json("T#acme", "E#k1"));
    assert_eq!(calls[0].1["ConsistentRead"], true);
    assert_eq!(calls[1].0, "TransactWriteItems");
    let items = calls[1].1["TransactItems"].as_array().unwrap();
    assert_eq!(items.len(), 4, "{items:?}");

    let job_put = &items[0]["Put"];
    assert_eq!(job_put["Item"]["pk"]["S"], "JOB#j1");
    assert_eq!(
        condition(job_put),
        ("version = :prev", &json!({ ":prev": { "N": "3" } }))
    );

    let write = &items[1]["Update"];
    assert_eq!(write["TableName"], TABLE);
    assert_eq!(write["Key"], key_json("T#acme", "E#k1"));
    assert!(write["UpdateExpression"]
        .as_str()
        .unwrap()
        .starts_with("SET "));
    let mut set: Vec<&str> = write["ExpressionAttributeNames"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    set.sort_unstable();
    assert_eq!(
        set,
        [
            "bytes",
            "dataset",
            "doc",
            "expires_at",
            "gen_t",
            "gsi1pk",
            "gsi1sk",
            "job_id",
            "rows",
            "stale_until"
        ],
        "hits and last_hit_at are left to touch_entry"
    );
    assert_eq!(condition(write).0, SEEN);
    assert_eq!(write["ExpressionAttributeValues"][":seen"]["S"], "j0");

    let mut moves: Vec<(String, i64, i64)> = items[2..]
        .iter()
        .map(|i| {
            let u = &i["Update"];
            let v = &u["ExpressionAttributeValues"];
            (
                u["Key"]["sk"]["S"].as_str().unwrap().to_string(),
                n_of(&v[":e"]),
                n_of(&v[":b"]),
            )
        })
        .collect();
    moves.sort();
    assert_eq!(
        moves,
        vec![
            ("L#orders#2#2024050110".to_string(), -1, -120),
            ("L#orders#2#2024050112".to_string(), 1, 200),
        ]
    );
}

#[tokio::test]
async fn buckets_of_a_dataset_generation_past_zero_have_their_own_key() {
    let job = job("acme", "j1");
    let mut e = entry(&job);
    e.generation.dataset = 7;
    let http = answering(vec![ok(json!({})), ok(json!({}))]);
    store(&http).complete_job(&job, &e).await.unwrap();
    let calls = dynamodb_calls(&http);
    let bucket = &calls[1].1["TransactItems"][2]["Update"];
    assert_eq!(
        bucket["Key"],
        key_json("T#acme", "L#orders#2#D7#2024050110")
    );
    assert_eq!(n_of(&bucket["ExpressionAttributeValues"][":gd"]), 7);
}

#[tokio::test]
async fn complete_job_on_a_key_without_entry_expects_none_and_adds_one_bucket() {
    let job = job("acme", "j1");
    let http = answering(vec![ok(json!({})), ok(json!({}))]);
    store(&http).complete_job(&job, &entry(&job)).await.unwrap();
    let calls = dynamodb_calls(&http);
    let items = calls[1].1["TransactItems"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(condition(&items[1]["Update"]).0, "attribute_not_exists(pk)");
    let bucket = &items[2]["Update"];
    assert_eq!(bucket["Key"], key_json("T#acme", "L#orders#2#2024050110"));
    assert_eq!(
        bucket["UpdateExpression"],
        "ADD #e :e, #b :b, #r :r SET dataset = :d, gen_t = :g, gen_d = :gd, hour_end = :h, expires_at = :x"
    );
    let v = &bucket["ExpressionAttributeValues"];
    assert_eq!(n_of(&v[":gd"]), 0);
    assert_eq!(
        (n_of(&v[":e"]), n_of(&v[":b"]), n_of(&v[":r"])),
        (1, 120, 3)
    );
    assert_eq!(
        n_of(&v[":h"]),
        Utc.with_ymd_and_hms(2024, 5, 1, 11, 0, 0)
            .unwrap()
            .timestamp()
    );
}

#[tokio::test]
async fn touch_entry_adds_a_hit_in_place_and_never_creates_an_entry() {
    let e = entry(&job("acme", "j1"));
    let at = t0() + Duration::minutes(3);
    let http = answering(vec![ok(json!({}))]);
    store(&http).touch_entry(&e, at).await.unwrap();
    let update = only_call(&http, "UpdateItem");
    assert_eq!(update["TableName"], TABLE);
    assert_eq!(update["Key"], key_json("T#acme", "E#k1"));
    assert_eq!(
        update["UpdateExpression"],
        "ADD hits :one SET last_hit_at = :now"
    );
    assert_eq!(
        condition(&update),
        (
            "attribute_exists(pk)",
            &json!({ ":one": { "N": "1" }, ":now": { "S": at.to_rfc3339() } })
        )
    );

    let gone = answering(vec![error("ConditionalCheckFailedException", json!({}))]);
    assert_eq!(store(&gone).touch_entry(&e, at).await, Ok(()));
}

#[tokio::test]
async fn delete_entry_deletes_the_entry_it_read_and_takes_it_off_its_bucket() {
    let old = entry(&job("acme", "j0"));
    let http = answering(vec![ok(json!({ "Item": stored(&old, 2) })), ok(json!({}))]);
    store(&http)
        .delete_entry("acme", &CacheKey("k1".into()))
        .await
        .unwrap();
    let calls = dynamodb_calls(&http);
    assert_eq!(calls[0].0, "GetItem");
    let items = calls[1].1["TransactItems"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    let delete = &items[0]["Delete"];
    assert_eq!(delete["TableName"], TABLE);
    assert_eq!(delete["Key"], key_json("T#acme", "E#k1"));
    assert_eq!(
        condition(delete),
        (SEEN, &json!({ ":seen": { "S": "j0" } }))
    );
    let bucket = &items[1]["Update"];
    assert_eq!(bucket["Key"], key_json("T#acme", "L#orders#2#2024050110"));
    assert_eq!(n_of(&bucket["ExpressionAttributeValues"][":e"]), -1);

    // No entry: nothing to write.
    let none = answering(vec![ok(json!({}))]);
    store(&none)
        .delete_entry("acme", &CacheKey("k1".into()))
        .await
        .unwrap();
    assert_eq!(dynamodb_calls(&none).len(), 1);
}

#[tokio::test]
async fn release_marker_deletes_it_only_for_the_job_holding_it() {
    let http = answering(vec![ok(json!({}))]);
    store(&http)
        .release_marker("acme", &CacheKey("k1".into()), "j1")
        .await
        .unwrap();
    let delete = only_call(&http, "DeleteItem");
    assert_eq!(delete["Key"], key_json("T#acme", "M#k1"));
    assert_eq!(
        condition(&delete),
        ("job_id = :j", &json!({ ":j": { "S": "j1" } }))
    );
}

#[tokio::test]
async fn expiring_entries_query_the_expiry_index_one_hour_bucket_at_a_time() {
    let from = Utc.with_ymd_and_hms(2024, 5, 1, 9, 50, 0).unwrap();
    let to = from + Duration::minutes(20);
    let http = answering(vec![ok(json!({ "Items": [] })), ok(json!({ "Items": [] }))]);
    store(&http).expiring_entries(from, to).await.unwrap();
    let calls = dynamodb_calls(&http);
    let buckets: Vec<&str> = calls
        .iter()
        .map(|(op, q)| {
            assert_eq!(op, "Query");
            assert_eq!(q["TableName"], TABLE);
            assert_eq!(q["IndexName"], "by_expiry");
            assert_eq!(
                q["KeyConditionExpression"],
                "gsi1pk = :b AND gsi1sk BETWEEN :from AND :to"
            );
            let v = &q["ExpressionAttributeValues"];
            assert_eq!(v[":from"]["S"], "2024-05-01T09:50:00.000Z");
            assert_eq!(v[":to"]["S"], "2024-05-01T10:10:00.000Z~");
            v[":b"]["S"].as_str().unwrap()
        })
        .collect();
    assert_eq!(buckets, ["EXP#2024-05-01T09", "EXP#2024-05-01T10"]);
}

#[tokio::test]
async fn bump_generation_adds_to_the_tenants_or_one_users_counter() {
    let http = answering(vec![ok(json!({})), ok(json!({}))]);
    let meta = store(&http);
    meta.bump_generation("acme", None).await.unwrap();
    meta.bump_generation("acme", Some("bob")).await.unwrap();
    let calls = dynamodb_calls(&http);
    for ((op, update), sk) in calls.iter().zip(["G", "G#U#bob"]) {
        assert_eq!(op, "UpdateItem");
        assert_eq!(update["Key"], key_json("T#acme", sk));
        assert_eq!(update["UpdateExpression"], "ADD gen :one");
    }
}

#[tokio::test]
async fn tallies_read_the_hit_counters_and_every_live_bucket_as_stored() {
    let hour_end = Utc.with_ymd_and_hms(2024, 5, 1, 11, 0, 0).unwrap();
    let http = answering(vec![
        ok(json!({ "Items": [{
            "pk": { "S": "T#acme" }, "sk": { "S": "S#orders" }, "dataset": { "S": "orders" },
            "hits": { "N": "4" }, "misses": { "N": "2" },
        }] })),
        ok(json!({ "Items": [{
            "pk": { "S": "T#acme" }, "sk": { "S": "L#orders#3#2024050110" },
            "dataset": { "S": "orders" }, "gen_t": { "N": "3" },
            "hour_end": { "N": hour_end.timestamp().to_string() },
            "entries": { "N": "2" }, "bytes": { "N": "500" }, "rows": { "N": "7" },
        }] })),
    ]);
    let tallies = store(&http).tallies("acme").await.unwrap();
    let prefixes: Vec<Json> = dynamodb_calls(&http)
        .into_iter()
        .map(|(op, q)| {
            assert_eq!(op, "Query");
            assert_eq!(
                q["KeyConditionExpression"],
                "pk = :pk AND begins_with(sk, :p)"
            );
            assert_eq!(q["ConsistentRead"], true);
            assert_eq!(q["ExpressionAttributeValues"][":pk"]["S"], "T#acme");
            q["ExpressionAttributeValues"][":p"]["S"].clone()
        })
        .collect();
    assert_eq!(prefixes, [json!("S#"), json!("L#")]);
    assert_eq!(
        tallies.served["orders"],
        HitCounts {
            hits: 4,
            misses: 2,
            stale_hits: 0
        }
    );
    assert_eq!(
        tallies.buckets,
        vec![(
            LiveBucket {
                dataset: "orders".into(),
                tenant_generation: 3,
                dataset_generation: 0,
                hour: hour_end - Duration::hours(1),
            },
            EntryTotals {
                entries: 2,
                bytes: 500,
                rows: 7
            }
        )]
    );
}

#[tokio::test]
async fn take_tenant_slot_reads_the_slots_then_claims_a_free_one_under_a_condition() {
    let now = t0();
    let slot = |i: u32, holder: &str, until: DateTime<Utc>| {
        json!({
            "pk": { "S": "T#acme" }, "sk": { "S": slot_sk(i) }, "job_id": { "S": holder },
            "until": { "N": until.timestamp().to_string() },
        })
    };
    let http = answering(vec![
        ok(json!({ "Items": [
            slot(0, "other", now + Duration::minutes(5)),
            slot(1, "dead", now - Duration::minutes(1)),
        ] })),
        ok(json!({})),
    ]);
    let until = now + Duration::minutes(16);
    assert!(store(&http)
        .take_tenant_slot("acme", "j1", now, until, 2)
        .await
        .unwrap());
    let calls = dynamodb_calls(&http);
    assert_eq!(calls.len(), 2, "{calls:?}");
    let (op, query) = &calls[0];
    assert_eq!(op, "Query");
    assert_eq!(
        query["KeyConditionExpression"],
        "pk = :pk AND begins_with(sk, :p)"
    );
    assert_eq!(query["ExpressionAttributeValues"][":p"]["S"], "RUN#");
    assert_eq!(query["ConsistentRead"], true);
    let (op, put) = &calls[1];
    assert_eq!(op, "PutItem");
    assert_eq!(put["Item"]["sk"]["S"], "RUN#0001", "the expired slot");
    assert_eq!(put["Item"]["job_id"]["S"], "j1");
    assert_eq!(n_of(&put["Item"]["until"]), until.timestamp());
    assert_eq!(
        condition(put),
        (
            "attribute_not_exists(pk) OR job_id = :me OR #u <= :now",
            &json!({ ":me": { "S": "j1" }, ":now": { "N": now.timestamp().to_string() } })
        )
    );
    assert_eq!(put["ExpressionAttributeNames"], json!({ "#u": "until" }));

    // Another worker claimed it first: no slot.
    let raced = answering(vec![
        ok(json!({ "Items": [slot(0, "other", now + Duration::minutes(5))] })),
        error("ConditionalCheckFailedException", json!({})),
    ]);
    assert!(!store(&raced)
        .take_tenant_slot("acme", "j1", now, until, 2)
        .await
        .unwrap());
}
