//! Configuration, read once from the environment at cold start into typed values.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::encode::{EncodeSettings, XLSX_MAX_ROWS_PER_SHEET};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("environment variable {0} is required")]
    Missing(&'static str),
    #[error("environment variable {name}={value:?} is invalid: {message}")]
    Invalid {
        name: &'static str,
        value: String,
        message: String,
    },
}

/// JSON for CloudWatch by default; text for people reading a local terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

/// How the worker reads a source Query page. Either way the SDK builds, signs, sends, retries and
/// times out the call and parses its errors; they differ in who parses a successful page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SourceDecoder {
    /// The page's JSON is decoded straight into rows of the projected columns, without an
    /// attribute map per item (`adapters::dynamodb::page_decoder`); about twice as fast.
    #[default]
    Fast,
    /// The SDK parses the page into attribute maps, which are then converted.
    Sdk,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub meta_table: String,
    pub bucket: String,
    pub queue_url: String,
    pub source_table_prefix: String,
    pub catalog_path: Option<PathBuf>,
    pub tenant_claim: String,
    /// HS256 key the API verifies bearer tokens with where no authorizer ran (local only); at
    /// least [`MIN_LOCAL_JWT_SECRET_BYTES`] long.
    pub local_jwt_secret: Option<String>,
    /// When set, locally verified tokens must carry this `iss` / `aud`.
    pub local_jwt_issuer: Option<String>,
    pub local_jwt_audience: Option<String>,
    pub presign_ttl: Duration,
    /// Cache misses (new exports) a tenant may request per minute; 0 turns the limit off. Hits
    /// are never limited: they cost nothing at the source.
    pub miss_rate_per_minute: u32,
    pub s3_force_path_style: bool,
    /// Small AWS calls: metadata table and job queue. Short, so a stalled service turns into a
    /// quick 503 (API) or a retry later (worker) instead of a hung invocation.
    pub sdk: SdkTimeouts,
    /// Bulk AWS calls: source table pages and file parts, which legitimately take longer.
    pub sdk_bulk: SdkTimeouts,
    pub source_decoder: SourceDecoder,
    pub log_format: LogFormat,
    /// Where the source tables are read; all unset = the same client as everything else.
    pub source: SourceSettings,
    /// `EVENT_BUS_NAME`: the EventBridge bus completion events go to (name or ARN; unset =
    /// `default`, the account's default bus); `off` sends none.
    pub event_bus: Option<String>,
    pub worker: WorkerSettings,
    pub warmer: WarmerSettings,
    pub encode: EncodeSettings,
}

/// Ranges per worker, and segments per job: each of their ranges gets its block of S3's 10,000
/// part numbers (32 x 32 ranges leave 9 parts, 72 MiB, each).
pub const MAX_RANGES: u64 = 32;

/// The source tables may live apart from the stack: in another region, in another account
/// (reached through a role the worker assumes), or locally in another emulator. Each field
/// unset means "as the rest of the stack".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceSettings {
    /// `SOURCE_REGION`: the region of the source tables.
    pub region: Option<String>,
    /// `SOURCE_ROLE_ARN`: an IAM role assumed (STS AssumeRole, in the function's own region)
    /// for every source read; its account's tables are read.
    pub role_arn: Option<String>,
    /// `SOURCE_ENDPOINT_URL`: a DynamoDB endpoint for the source tables only (local emulators).
    pub endpoint_url: Option<String>,
}

impl SourceSettings {
    /// The `SOURCE_*` variables of `env` (part of [`Config::from_map`]; the local tools that
    /// write the source tables read them alone).
    pub fn from_map(env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let get = |name: &'static str, valid: fn(&str) -> bool, expected: &str| {
            env.get(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .map(|v| checked(name, v, valid, expected))
                .transpose()
        };
        Ok(Self {
            region: get(
                "SOURCE_REGION",
                is_region,
                "an AWS region such as eu-west-1",
            )?,
            role_arn: get(
                "SOURCE_ROLE_ARN",
                is_role_arn,
                "an IAM role ARN such as arn:aws:iam::123456789012:role/export-reader",
            )?,
            endpoint_url: get(
                "SOURCE_ENDPOINT_URL",
                is_endpoint_url,
                "an http:// or https:// URL such as http://127.0.0.1:4567",
            )?,
        })
    }

    /// True when the source is read through the same client as the metadata table.
    pub fn is_shared(&self) -> bool {
        self == &Self::default()
    }
}

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// The worker function's timeout (the template's `Timeout`): the deadline assumed when the
    /// runtime gives none that makes sense (cargo-lambda's local one lies in 1970).
    pub timeout: Duration,
    /// Parts are cut at page boundaries once at least this many bytes are buffered (S3's minimum
    /// for every part but the last is 5 MiB).
    pub part_size: usize,
    pub lease: Duration,
    pub progress_interval: Duration,
    /// Checkpoint and hand over to a continuation when less than this is left before the deadline.
    pub deadline_margin: Duration,
    /// Attempts before a job is failed for good (matches the queue's maxReceiveCount).
    pub max_attempts: u32,
    /// Items per source Query page (None = DynamoDB's 1 MB pages).
    pub page_size: Option<i32>,
    /// Jobs of one tenant running at once; more wait their turn. 0 = no limit.
    pub max_running_per_tenant: u32,
    /// How long a job that found its tenant at the limit waits before it asks again.
    pub tenant_wait: Duration,
    /// Key ranges one worker reads at once (1 = one sequential Query loop).
    pub ranges: u32,
    /// Jobs whose expected rows (from the previous file of the same rows) reach this are split
    /// into `fan_out_segments` invocations; 0 = never.
    pub fan_out_rows: u64,
    pub fan_out_segments: u32,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(MAX_LAMBDA_TIMEOUT),
            part_size: 8 * 1024 * 1024,
            lease: Duration::from_secs(960),
            progress_interval: Duration::from_secs(3),
            deadline_margin: Duration::from_secs(60),
            max_attempts: 5,
            page_size: None,
            max_running_per_tenant: 3,
            tenant_wait: Duration::from_secs(30),
            ranges: 1,
            fan_out_rows: 2_000_000,
            fan_out_segments: 4,
        }
    }
}

/// Limits on one AWS SDK call: connecting, each attempt, and the whole call with its retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SdkTimeouts {
    pub connect: Duration,
    pub attempt: Duration,
    pub call: Duration,
}

#[derive(Debug, Clone)]
pub struct WarmerSettings {
    pub interval: Duration,
    pub hit_window: Duration,
    /// New refresh jobs one tenant may get per warmer run (pins included); 0 = no limit.
    pub max_refreshes_per_tenant: u32,
}

impl Default for WarmerSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(900),
            hit_window: Duration::from_secs(86_400),
            max_refreshes_per_tenant: 20,
        }
    }
}

pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;
/// An HS256 key shorter than its hash output can be brute-forced from one token (RFC 7518 3.2).
pub const MIN_LOCAL_JWT_SECRET_BYTES: usize = 32;
pub const MAX_PRESIGN_TTL: u64 = 900;
/// The bus completion events go to when `EVENT_BUS_NAME` is unset.
pub const DEFAULT_EVENT_BUS: &str = "default";
/// The `EVENT_BUS_NAME` that turns completion events off.
pub const EVENTS_OFF: &str = "off";
/// Lambda's longest function timeout, in seconds.
pub const MAX_LAMBDA_TIMEOUT: u64 = 900;

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_map(&std::env::vars().collect())
    }

    /// The same as `from_env`, from any map: tests build configs without touching the process env.
    pub fn from_map(env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let get = |k: &str| {
            env.get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let required = |k: &'static str| get(k).ok_or(ConfigError::Missing(k));
        let secs =
            |k: &'static str, default: u64| -> Result<Duration, ConfigError> {
                match get(k) {
                    None => Ok(Duration::from_secs(default)),
                    Some(v) => v.parse::<u64>().map(Duration::from_secs).map_err(|_| {
                        ConfigError::Invalid {
                            name: k,
                            value: v,
                            message: "expected a whole number of seconds".into(),
                        }
                    }),
                }
            };
        let flag = |k: &'static str| -> Result<bool, ConfigError> {
            match get(k).as_deref() {
                None | Some("false") | Some("0") => Ok(false),
                Some("true") | Some("1") => Ok(true),
                Some(v) => Err(ConfigError::Invalid {
                    name: k,
                    value: v.to_string(),
                    message: "expected true or false".into(),
                }),
            }
        };
        let number = |k: &'static str, default: u64| -> Result<u64, ConfigError> {
            match get(k) {
                None => Ok(default),
                Some(v) => v.parse::<u64>().map_err(|_| ConfigError::Invalid {
                    name: k,
                    value: v,
                    message: "expected a whole number".into(),
                }),
            }
        };

        let count = |k: &'static str, default: u32| -> Result<u32, ConfigError> {
            let v = number(k, default.into())?;
            u32::try_from(v).map_err(|_| ConfigError::Invalid {
                name: k,
                value: v.to_string(),
                message: format!("must be at most {}", u32::MAX),
            })
        };
        let warm_defaults = WarmerSettings::default();
        let presign_ttl = secs("PRESIGN_TTL_SECONDS", 300)?;
        if presign_ttl.as_secs() == 0 || presign_ttl.as_secs() > MAX_PRESIGN_TTL {
            return Err(ConfigError::Invalid {
                name: "PRESIGN_TTL_SECONDS",
                value: presign_ttl.as_secs().to_string(),
                message: format!("must be between 1 and {MAX_PRESIGN_TTL}"),
            });
        }
        let log_format = match get("LOG_FORMAT").as_deref() {
            None | Some("json") => LogFormat::Json,
            Some("text") => LogFormat::Text,
            Some(v) => {
                return Err(ConfigError::Invalid {
                    name: "LOG_FORMAT",
                    value: v.into(),
                    message: "expected json or text".into(),
                })
            }
        };
        let source_decoder = match get("SOURCE_DECODER").as_deref() {
            None | Some("fast") => SourceDecoder::Fast,
            Some("sdk") => SourceDecoder::Sdk,
            Some(v) => {
                return Err(ConfigError::Invalid {
                    name: "SOURCE_DECODER",
                    value: v.into(),
                    message: "expected fast or sdk".into(),
                })
            }
        };
        let millis = |k: &'static str, default: u64| -> Result<Duration, ConfigError> {
            match number(k, default)? {
                0 => Err(ConfigError::Invalid {
                    name: k,
                    value: "0".into(),
                    message: "must be a positive number of milliseconds".into(),
                }),
                ms => Ok(Duration::from_millis(ms)),
            }
        };
        let connect = millis("SDK_CONNECT_TIMEOUT_MS", 1_000)?;
        let timeouts = |attempt: (&'static str, u64), call: (&'static str, u64)| {
            let t = SdkTimeouts {
                connect,
                attempt: millis(attempt.0, attempt.1)?,
                call: millis(call.0, call.1)?,
            };
            if t.attempt > t.call {
                return Err(ConfigError::Invalid {
                    name: attempt.0,
                    value: t.attempt.as_millis().to_string(),
                    message: format!("must not exceed {}", call.0),
                });
            }
            Ok(t)
        };
        let sdk = timeouts(
            ("SDK_ATTEMPT_TIMEOUT_MS", 3_000),
            ("SDK_CALL_TIMEOUT_MS", 8_000),
        )?;
        let sdk_bulk = timeouts(
            ("SDK_BULK_ATTEMPT_TIMEOUT_MS", 60_000),
            ("SDK_BULK_CALL_TIMEOUT_MS", 180_000),
        )?;
        let local_jwt_secret = get("LOCAL_JWT_SECRET");
        if let Some(secret) = &local_jwt_secret {
            if secret.len() < MIN_LOCAL_JWT_SECRET_BYTES {
                return Err(ConfigError::Invalid {
                    name: "LOCAL_JWT_SECRET",
                    // Never echo a key, not even a weak one.
                    value: format!("({} bytes)", secret.len()),
                    message: format!(
                        "must be at least {MIN_LOCAL_JWT_SECRET_BYTES} bytes (e.g. `openssl rand -hex 32`)"
                    ),
                });
            }
        }
        let defaults = WorkerSettings::default();
        let tenant_wait = secs("TENANT_WAIT_SECONDS", defaults.tenant_wait.as_secs())?;
        if !(1..=900).contains(&tenant_wait.as_secs()) {
            return Err(ConfigError::Invalid {
                name: "TENANT_WAIT_SECONDS",
                value: tenant_wait.as_secs().to_string(),
                message: "must be between 1 and 900 (the longest SQS message delay)".into(),
            });
        }
        let part_size = number("PART_SIZE_BYTES", defaults.part_size as u64)? as usize;
        if part_size < MIN_PART_SIZE {
            return Err(ConfigError::Invalid {
                name: "PART_SIZE_BYTES",
                value: part_size.to_string(),
                message: format!("S3 parts must be at least {MIN_PART_SIZE} bytes"),
            });
        }
        let page_size = match number("SOURCE_PAGE_SIZE", 0)? {
            0 => None,
            n => Some(i32::try_from(n).map_err(|_| ConfigError::Invalid {
                name: "SOURCE_PAGE_SIZE",
                value: n.to_string(),
                message: "too large".into(),
            })?),
        };
        let ranges = number("RANGES_PER_WORKER", defaults.ranges as u64)?;
        let segments = number("FAN_OUT_SEGMENTS", defaults.fan_out_segments as u64)?;
        for (name, value) in [
            ("RANGES_PER_WORKER", ranges),
            ("FAN_OUT_SEGMENTS", segments),
        ] {
            if !(1..=MAX_RANGES).contains(&value) {
                return Err(ConfigError::Invalid {
                    name,
                    value: value.to_string(),
                    message: format!("must be between 1 and {MAX_RANGES}"),
                });
            }
        }
        let rows_per_sheet = number("XLSX_ROWS_PER_SHEET", XLSX_MAX_ROWS_PER_SHEET as u64)?;
        if !(2..=XLSX_MAX_ROWS_PER_SHEET as u64).contains(&rows_per_sheet) {
            return Err(ConfigError::Invalid {
                name: "XLSX_ROWS_PER_SHEET",
                value: rows_per_sheet.to_string(),
                message: format!(
                    "must be between 2 and {XLSX_MAX_ROWS_PER_SHEET} (header included)"
                ),
            });
        }
        let encode_defaults = EncodeSettings::default();
        let zip_level = number("XLSX_ZIP_LEVEL", encode_defaults.xlsx_zip_level as u64)?;
        if zip_level > 9 {
            return Err(ConfigError::Invalid {
                name: "XLSX_ZIP_LEVEL",
                value: zip_level.to_string(),
                message: "must be 0..=9".into(),
            });
        }

        let timeout = secs("WORKER_TIMEOUT_SECONDS", defaults.timeout.as_secs())?;
        if !(1..=MAX_LAMBDA_TIMEOUT).contains(&timeout.as_secs()) {
            return Err(ConfigError::Invalid {
                name: "WORKER_TIMEOUT_SECONDS",
                value: timeout.as_secs().to_string(),
                message: format!("must be between 1 and {MAX_LAMBDA_TIMEOUT} (Lambda's limit)"),
            });
        }
        let source = SourceSettings::from_map(env)?;
        let event_bus = match get("EVENT_BUS_NAME") {
            None => Some(DEFAULT_EVENT_BUS.to_string()),
            Some(v) if v == EVENTS_OFF => None,
            Some(v) => Some(checked(
                "EVENT_BUS_NAME",
                v,
                is_event_bus,
                "an EventBridge bus name or ARN, or `off`",
            )?),
        };

        Ok(Self {
            meta_table: required("META_TABLE")?,
            bucket: required("EXPORT_BUCKET")?,
            queue_url: required("JOB_QUEUE_URL")?,
            source_table_prefix: get("SOURCE_TABLE_PREFIX").unwrap_or_default(),
            catalog_path: get("CATALOG_PATH").map(PathBuf::from),
            tenant_claim: get("TENANT_CLAIM").unwrap_or_else(|| "tenant_id".into()),
            local_jwt_secret,
            local_jwt_issuer: get("LOCAL_JWT_ISSUER"),
            local_jwt_audience: get("LOCAL_JWT_AUDIENCE"),
            presign_ttl,
            miss_rate_per_minute: count("MISS_RATE_LIMIT_PER_MINUTE", 120)?,
            s3_force_path_style: flag("S3_FORCE_PATH_STYLE")?,
            sdk,
            sdk_bulk,
            source_decoder,
            log_format,
            source,
            event_bus,
            worker: WorkerSettings {
                timeout,
                part_size,
                lease: secs("LEASE_SECONDS", defaults.lease.as_secs())?,
                progress_interval: secs(
                    "PROGRESS_INTERVAL_SECONDS",
                    defaults.progress_interval.as_secs(),
                )?,
                deadline_margin: secs(
                    "DEADLINE_MARGIN_SECONDS",
                    defaults.deadline_margin.as_secs(),
                )?,
                max_attempts: number("MAX_ATTEMPTS", defaults.max_attempts as u64)? as u32,
                page_size,
                max_running_per_tenant: count(
                    "TENANT_MAX_RUNNING_JOBS",
                    defaults.max_running_per_tenant,
                )?,
                tenant_wait,
                ranges: ranges as u32,
                fan_out_rows: number("FAN_OUT_ROWS", defaults.fan_out_rows)?,
                fan_out_segments: segments as u32,
            },
            warmer: WarmerSettings {
                interval: secs("WARM_INTERVAL_SECONDS", 900)?,
                hit_window: secs("WARM_HIT_WINDOW_SECONDS", 86_400)?,
                max_refreshes_per_tenant: count(
                    "WARM_MAX_REFRESHES_PER_TENANT",
                    warm_defaults.max_refreshes_per_tenant,
                )?,
            },
            encode: EncodeSettings {
                xlsx_rows_per_sheet: rows_per_sheet as u32,
                xlsx_zip_level: zip_level as u8,
                gzip_level: encode_defaults.gzip_level,
            },
        })
    }
}

/// `value` when `valid` holds for it, else an error naming the variable and what it expects.
fn checked(
    name: &'static str,
    value: String,
    valid: fn(&str) -> bool,
    expected: &str,
) -> Result<String, ConfigError> {
    if valid(&value) {
        Ok(value)
    } else {
        Err(ConfigError::Invalid {
            name,
            value: value.chars().take(80).collect(),
            message: format!("expected {expected}"),
        })
    }
}

/// EventBridge's pattern for an `EventBusName`: a name, or the ARN of a bus.
fn is_event_bus(v: &str) -> bool {
    (1..=1600).contains(&v.len())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:".contains(c))
}

/// `us-east-1`, `eu-central-2`, `us-gov-west-1`: lower-case words joined by `-`, ending in a number.
fn is_region(v: &str) -> bool {
    let parts: Vec<&str> = v.split('-').collect();
    parts.len() >= 3
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && parts[parts.len() - 1].bytes().all(|b| b.is_ascii_digit())
        && !parts[parts.len() - 1].is_empty()
}

/// `arn:{partition}:iam::{12-digit account}:role/{optional path/}{name}`.
fn is_role_arn(v: &str) -> bool {
    let parts: Vec<&str> = v.splitn(6, ':').collect();
    let [arn, partition, service, region, account, resource] = parts.as_slice() else {
        return false;
    };
    let name_ok = resource.strip_prefix("role/").is_some_and(|name| {
        !name.is_empty()
            && !name.ends_with('/')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-/".contains(&b))
    });
    *arn == "arn"
        && partition.starts_with("aws")
        && *service == "iam"
        && region.is_empty()
        && account.len() == 12
        && account.bytes().all(|b| b.is_ascii_digit())
        && name_ok
}

/// An absolute http(s) URL with a host, nothing the SDK's endpoint parser would trip on.
fn is_endpoint_url(v: &str) -> bool {
    let rest = v
        .strip_prefix("http://")
        .or_else(|| v.strip_prefix("https://"));
    rest.is_some_and(|r| {
        let host = r.split(['/', '?', '#']).next().unwrap_or_default();
        !host.is_empty() && !host.starts_with(':') && r.bytes().all(|b| b.is_ascii_graphic())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> HashMap<String, String> {
        [
            ("META_TABLE", "m"),
            ("EXPORT_BUCKET", "b"),
            ("JOB_QUEUE_URL", "q"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn defaults_apply_and_required_values_are_named() {
        let c = Config::from_map(&base()).unwrap();
        assert_eq!(c.tenant_claim, "tenant_id");
        assert_eq!(c.presign_ttl, Duration::from_secs(300));
        assert!(c.local_jwt_secret.is_none());
        assert_eq!(c.source_decoder, SourceDecoder::Fast);
        let mut env = base();
        env.remove("JOB_QUEUE_URL");
        assert_eq!(
            Config::from_map(&env).unwrap_err(),
            ConfigError::Missing("JOB_QUEUE_URL")
        );
    }

    #[test]
    fn short_local_signing_keys_are_refused_at_start_up() {
        let mut env = base();
        env.insert("LOCAL_JWT_SECRET".into(), "k".repeat(31));
        let err = Config::from_map(&env).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { name: "LOCAL_JWT_SECRET", value, .. } if !value.contains('k')),
            "{err:?}"
        );
        env.insert("LOCAL_JWT_SECRET".into(), "k".repeat(32));
        assert!(Config::from_map(&env).unwrap().local_jwt_secret.is_some());
    }

    #[test]
    fn out_of_range_values_are_refused() {
        for (k, v) in [
            ("PRESIGN_TTL_SECONDS", "3600"),
            ("PART_SIZE_BYTES", "1000"),
            ("S3_FORCE_PATH_STYLE", "yes please"),
            ("LOG_FORMAT", "xml"),
            ("SOURCE_DECODER", "simd"),
            ("XLSX_ROWS_PER_SHEET", "2000000"),
            ("TENANT_WAIT_SECONDS", "901"),
            ("SDK_CALL_TIMEOUT_MS", "0"),
            ("SDK_ATTEMPT_TIMEOUT_MS", "9000"),
            ("TENANT_MAX_RUNNING_JOBS", "5000000000"),
            ("EVENT_BUS_NAME", "my bus"),
        ] {
            let mut env = base();
            env.insert(k.into(), v.into());
            assert!(
                matches!(Config::from_map(&env), Err(ConfigError::Invalid { name, .. }) if name == k),
                "{k}={v}"
            );
        }
    }

    #[test]
    fn events_go_to_the_default_bus_unless_named_or_turned_off() {
        let c = Config::from_map(&base()).unwrap();
        assert_eq!(c.event_bus.as_deref(), Some("default"));
        let mut env = base();
        env.insert("EVENT_BUS_NAME".into(), "exports".into());
        assert_eq!(
            Config::from_map(&env).unwrap().event_bus.as_deref(),
            Some("exports")
        );
        env.insert("EVENT_BUS_NAME".into(), "off".into());
        assert_eq!(Config::from_map(&env).unwrap().event_bus, None);
    }

    #[test]
    fn the_source_is_shared_unless_configured() {
        let c = Config::from_map(&base()).unwrap();
        assert!(c.source.is_shared());
        assert_eq!(c.worker.timeout, Duration::from_secs(900));
        let mut env = base();
        for (k, v) in [
            ("SOURCE_REGION", "eu-west-1"),
            (
                "SOURCE_ROLE_ARN",
                "arn:aws:iam::111122223333:role/data/export-reader",
            ),
            ("SOURCE_ENDPOINT_URL", "http://127.0.0.1:4567"),
            ("WORKER_TIMEOUT_SECONDS", "600"),
        ] {
            env.insert(k.into(), v.into());
        }
        let c = Config::from_map(&env).unwrap();
        assert_eq!(
            c.source,
            SourceSettings {
                region: Some("eu-west-1".into()),
                role_arn: Some("arn:aws:iam::111122223333:role/data/export-reader".into()),
                endpoint_url: Some("http://127.0.0.1:4567".into()),
            }
        );
        assert!(!c.source.is_shared());
        assert_eq!(c.worker.timeout, Duration::from_secs(600));
        // Blank is unset, as for every variable (CloudFormation passes empty parameters).
        env.insert("SOURCE_ROLE_ARN".into(), "  ".into());
        assert_eq!(Config::from_map(&env).unwrap().source.role_arn, None);
        for ok in ["us-gov-west-1", "ap-southeast-2", "cn-north-1"] {
            env.insert("SOURCE_REGION".into(), ok.into());
            assert!(Config::from_map(&env).is_ok(), "{ok}");
        }
        env.insert(
            "SOURCE_ROLE_ARN".into(),
            "arn:aws-cn:iam::111122223333:role/r".into(),
        );
        assert!(Config::from_map(&env).is_ok());
    }

    #[test]
    fn bad_source_settings_name_the_variable_and_what_it_expects() {
        for (k, v, expects) in [
            ("SOURCE_REGION", "EU-WEST-1", "AWS region"),
            ("SOURCE_REGION", "eu-west", "AWS region"),
            ("SOURCE_REGION", "eu--1", "AWS region"),
            (
                "SOURCE_REGION",
                "https://dynamodb.eu-west-1.amazonaws.com",
                "AWS region",
            ),
            ("SOURCE_ROLE_ARN", "export-reader", "role ARN"),
            ("SOURCE_ROLE_ARN", "arn:aws:iam::1234:role/r", "role ARN"),
            (
                "SOURCE_ROLE_ARN",
                "arn:aws:iam::111122223333:user/bob",
                "role ARN",
            ),
            (
                "SOURCE_ROLE_ARN",
                "arn:aws:iam::111122223333:role/",
                "role ARN",
            ),
            (
                "SOURCE_ROLE_ARN",
                "arn:aws:s3:eu-west-1:111122223333:role/r",
                "role ARN",
            ),
            ("SOURCE_ENDPOINT_URL", "127.0.0.1:4567", "URL"),
            ("SOURCE_ENDPOINT_URL", "http://", "URL"),
            ("SOURCE_ENDPOINT_URL", "http://:4567", "URL"),
            ("SOURCE_ENDPOINT_URL", "http://local host", "URL"),
            ("WORKER_TIMEOUT_SECONDS", "0", "between 1 and 900"),
            ("WORKER_TIMEOUT_SECONDS", "901", "between 1 and 900"),
            ("WORKER_TIMEOUT_SECONDS", "15m", "seconds"),
        ] {
            let mut env = base();
            env.insert(k.into(), v.into());
            let err = Config::from_map(&env).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Invalid { name, .. } if *name == k),
                "{k}={v}: {err:?}"
            );
            let text = err.to_string();
            assert!(
                text.contains(k) && text.contains(expects),
                "{k}={v}: {text}"
            );
        }
    }
}
