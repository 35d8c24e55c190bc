//! Invalidation and statistics: `DELETE /exports/cache...` and `GET /exports/cache/stats`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::{require_scope, Deps, ServiceError};
use crate::domain::identity::{SCOPE_ADMIN, SCOPE_READ};
use crate::domain::invalidation::DatasetGeneration;
use crate::domain::request::normalise;
use crate::domain::{Identity, RawExportRequest};
use crate::encode::ENCODER_VERSION;
use crate::ports::Tallies;

/// Stops serving the one entry the request would hit.
pub async fn invalidate_entry(
    deps: &Deps,
    who: &Identity,
    raw: &RawExportRequest,
) -> Result<(), ServiceError> {
    require_scope(who, SCOPE_READ)?;
    let key = normalise(&deps.catalog, raw)?.cache_key(who.owner(), ENCODER_VERSION);
    deps.entries.delete_entry(&who.tenant, &key).await?;
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Tenant,
    User,
}

/// Stops serving every entry of the tenant (admins only) or of the caller.
pub async fn invalidate_scope(
    deps: &Deps,
    who: &Identity,
    scope: Scope,
) -> Result<(), ServiceError> {
    match scope {
        Scope::Tenant => {
            require_scope(who, SCOPE_ADMIN)?;
            deps.generations.bump_generation(&who.tenant, None).await?;
        }
        Scope::User => {
            require_scope(who, SCOPE_READ)?;
            deps.generations
                .bump_generation(&who.tenant, Some(&who.user))
                .await?;
        }
    }
    Ok(())
}

/// What `GET /exports/cache/stats` shows of one dataset.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct DatasetStats {
    pub hits: u64,
    pub misses: u64,
    pub stale_hits: u64,
    pub entries: u64,
    pub bytes: u64,
    pub rows: u64,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub stale_hits: u64,
    pub hit_rate: f64,
    pub entries: u64,
    pub bytes: u64,
    pub rows: u64,
    pub by_dataset: BTreeMap<String, DatasetStats>,
}

pub async fn stats(deps: &Deps, who: &Identity) -> Result<CacheStats, ServiceError> {
    require_scope(who, SCOPE_READ)?;
    let tallies = deps.counters.tallies(&who.tenant).await?;
    let now = deps.clock.now();
    let generation = deps
        .generations
        .current_generation(&who.tenant, "", "", now)
        .await?;
    let datasets = deps.generations.dataset_generations(&who.tenant).await?;
    let dataset_generation = |d: &str| {
        datasets
            .get(d)
            .map_or(0, |g: &DatasetGeneration| g.effective(now))
    };
    let by_dataset = by_dataset(tallies, generation.tenant, dataset_generation, now);
    let sum = |f: fn(&DatasetStats) -> u64| by_dataset.values().map(f).sum::<u64>();
    let (hits, misses, stale_hits) = (sum(|d| d.hits), sum(|d| d.misses), sum(|d| d.stale_hits));
    let served = hits + stale_hits;
    let total = served + misses;
    Ok(CacheStats {
        hits,
        misses,
        stale_hits,
        hit_rate: if total == 0 {
            0.0
        } else {
            served as f64 / total as f64
        },
        entries: sum(|d| d.entries),
        bytes: sum(|d| d.bytes),
        rows: sum(|d| d.rows),
        by_dataset,
    })
}

/// Hit counts per dataset, with the totals of the entries that still count as live.
fn by_dataset(
    tallies: Tallies,
    tenant_generation: u64,
    dataset_generation: impl Fn(&str) -> u64,
    now: DateTime<Utc>,
) -> BTreeMap<String, DatasetStats> {
    let mut out: BTreeMap<String, DatasetStats> = tallies
        .served
        .into_iter()
        .map(|(dataset, c)| {
            let stats = DatasetStats {
                hits: c.hits,
                misses: c.misses,
                stale_hits: c.stale_hits,
                ..DatasetStats::default()
            };
            (dataset, stats)
        })
        .collect();
    for (bucket, totals) in tallies.buckets {
        let dataset_gen = dataset_generation(&bucket.dataset);
        if !bucket.is_live(tenant_generation, dataset_gen, now) {
            continue;
        }
        let st = out.entry(bucket.dataset).or_default();
        st.entries += totals.entries;
        st.bytes += totals.bytes;
        st.rows += totals.rows;
    }
    out
}
