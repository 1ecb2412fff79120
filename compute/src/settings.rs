//! The edge's settings: Config Store `edge_config` and Secret Store `gateway_secrets`.
//! Every value has a documented default; a bad value is logged and falls back, never panics.

use std::cell::OnceCell;
use std::time::Duration;

use fastly::{ConfigStore, SecretStore};
use gateway_common::seal::{KeySource, SealKey, TenantKey};

use crate::region::{Region, RegionMap};
use crate::trace::edge_log;

/// Config Store holding the edge's tunables (string values).
pub const EDGE_CONFIG_STORE: &str = "edge_config";
/// Secret Store holding the cache key secret, the seal keys and the origin's shared secret.
pub const SECRET_STORE: &str = "gateway_secrets";

/// `ttl_cap_secs` when `edge_config` does not set it: one day.
const DEFAULT_TTL_CAP_SECS: u64 = 86_400;

/// The shortest and longest penalty box TTL Edge Rate Limiting accepts, in seconds (fastly
/// crate, `erl.rs`: "Valid ttl span is 1m to 1h and TTL value is truncated to the nearest
/// minute").
const PENALTY_SECS_MIN: u64 = 60;
const PENALTY_SECS_MAX: u64 = 3600;

/// Settings for one request (a Compute instance serves one request). What a KV hit needs is
/// read up front (four lookups); the five that only a fallback to the origin needs are read
/// on first use, so a hit never pays for them, and the two of the edge rate limit only for a
/// tenant that has a limit. Deliberately not `Debug`: it holds secrets.
pub struct EdgeSettings {
    /// Largest request body accepted. Default `common::canonical::DEFAULT_MAX_BODY_BYTES`.
    pub max_body_bytes: usize,
    /// Upper bound on any entry's TTL, as on the origin, in seconds: on what the edge stores
    /// and on every entry it reads, whoever wrote it. Default 86400.
    pub ttl_cap_secs: u64,
    /// The HMAC key for cache keys; `None` when the secret is missing, in which case the edge
    /// keys nothing and forwards every request (slower, never wrong).
    pub cache_key_secret: Option<Vec<u8>>,
    /// Write one usage record per authenticated request to the `usage` log endpoint, which
    /// Fastly batches to the origin's ingest route (`[setup.log_endpoints.usage]`). Default
    /// true; off only to measure what it costs.
    pub usage_log: bool,
    config: Option<ConfigStore>,
    secrets: Option<SecretStore>,
    /// `seal_key_current`: opens entries sealed with it and seals what this edge stores.
    seal_current: OnceCell<Option<SealKey>>,
    /// `seal_key_previous`: opens entries sealed before the last rotation; only read for an
    /// entry that names it.
    seal_previous: OnceCell<Option<SealKey>>,
    fallback: OnceCell<Fallback>,
    rate_limit: OnceCell<RateLimit>,
}

/// What the edge needs only when it goes to the origin. Not `Debug`: it holds a secret.
pub struct Fallback {
    /// Insert the origin's cacheable answers into the KV store ourselves. On under Viceroy,
    /// whose KV store the origin's API writes cannot reach; off in production, where the
    /// origin's dual-write fills the store. Default: false.
    pub populate_on_fallback: bool,
    /// Default 1000 ms.
    pub origin_connect_timeout: Duration,
    /// Long completions can think for minutes before the first byte. Default 300 s.
    pub origin_first_byte_timeout: Duration,
    /// Default 120 s (a reasoning model can pause between streamed chunks).
    pub origin_between_bytes_timeout: Duration,
    /// Sent to the origin in `x-gateway-edge-secret` when set.
    pub edge_shared_secret: Option<Vec<u8>>,
    /// The origin regions to try for this POP, nearest first: `regions` (JSON, see
    /// `region.rs`) for the POP named by `pop`, else by `FASTLY_POP`. Default: the one
    /// region `default` on backend `origin`; so is a bad `regions` value (logged).
    pub regions: Vec<Region>,
}

impl Default for Fallback {
    fn default() -> Self {
        Fallback {
            populate_on_fallback: false,
            origin_connect_timeout: Duration::from_millis(1000),
            origin_first_byte_timeout: Duration::from_secs(300),
            origin_between_bytes_timeout: Duration::from_secs(120),
            edge_shared_secret: None,
            regions: RegionMap::single().order(None),
        }
    }
}

/// How the edge enforces a tenant's `requests_per_second` (see `limit.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// `edge_rate_limit`: count and refuse at the edge with Edge Rate Limiting. Off, only the
    /// origin enforces the limit, so edge hits are not limited. Default: true.
    pub enabled: bool,
    /// `rate_limit_penalty_secs`: how long a tenant far over its limit is refused outright.
    /// Whole minutes from 60 to 3600 (what a penalty box accepts); a value outside is clamped
    /// and one that is not a whole minute rounded down, both logged. Default 60 s.
    pub penalty: Duration,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            enabled: true,
            penalty: Duration::from_secs(PENALTY_SECS_MIN),
        }
    }
}

impl EdgeSettings {
    /// Open both stores and read what every request needs. Never fails: a missing store or
    /// value keeps the default (logged).
    pub fn load() -> EdgeSettings {
        let config = ConfigStore::try_open(EDGE_CONFIG_STORE)
            .map_err(|e| {
                edge_log!("config store {EDGE_CONFIG_STORE} unavailable ({e:?}); using defaults")
            })
            .ok();
        let secrets = SecretStore::open(SECRET_STORE)
            .map_err(|e| edge_log!("secret store {SECRET_STORE} unavailable ({e:?})"))
            .ok();
        let mut s = EdgeSettings {
            max_body_bytes: gateway_common::canonical::DEFAULT_MAX_BODY_BYTES,
            ttl_cap_secs: DEFAULT_TTL_CAP_SECS,
            cache_key_secret: secrets
                .as_ref()
                .and_then(|store| secret(store, "cache_key_secret")),
            usage_log: true,
            config,
            secrets,
            seal_current: OnceCell::new(),
            seal_previous: OnceCell::new(),
            fallback: OnceCell::new(),
            rate_limit: OnceCell::new(),
        };
        s.max_body_bytes = s.setting("max_body_bytes", parse_number, s.max_body_bytes);
        // Read on every request, hits included (one Config Store read): a hit must judge the
        // entry's freshness against the cap, since the origin's replicas carry its own TTL.
        s.ttl_cap_secs = s.setting("ttl_cap_secs", parse_number, s.ttl_cap_secs);
        s.usage_log = s.setting("usage_log", parse_bool, s.usage_log);
        if s.cache_key_secret.is_none() {
            edge_log!(
                "no cache_key_secret; caching at the edge is off, every request goes to the origin"
            );
        }
        s
    }

    /// The seal key new entries are sealed with (`seal_key_current`, read on first use);
    /// `None` when missing or invalid (logged): then every sealed entry is a miss and the
    /// edge stores nothing, never an unsealed entry.
    pub fn seal_current(&self) -> Option<&SealKey> {
        self.seal_current
            .get_or_init(|| self.seal_key("seal_key_current"))
            .as_ref()
    }

    fn seal_previous(&self) -> Option<&SealKey> {
        self.seal_previous
            .get_or_init(|| self.seal_key("seal_key_previous"))
            .as_ref()
    }

    fn seal_key(&self, name: &str) -> Option<SealKey> {
        let value = secret(self.secrets.as_ref()?, name)?;
        parse_seal_key(&value)
            .map_err(|reason| edge_log!("secret {name} is invalid ({reason}); not used"))
            .ok()
    }

    /// The fallback settings, read on first use.
    pub fn fallback(&self) -> &Fallback {
        self.fallback.get_or_init(|| {
            let d = Fallback::default();
            Fallback {
                populate_on_fallback: self.setting(
                    "populate_on_fallback",
                    parse_bool,
                    d.populate_on_fallback,
                ),
                origin_connect_timeout: self.setting(
                    "origin_connect_timeout_ms",
                    parse_ms,
                    d.origin_connect_timeout,
                ),
                origin_first_byte_timeout: self.setting(
                    "origin_first_byte_timeout_ms",
                    parse_ms,
                    d.origin_first_byte_timeout,
                ),
                origin_between_bytes_timeout: self.setting(
                    "origin_between_bytes_timeout_ms",
                    parse_ms,
                    d.origin_between_bytes_timeout,
                ),
                edge_shared_secret: self
                    .secrets
                    .as_ref()
                    .and_then(|store| secret(store, "edge_shared_secret")),
                regions: self.regions(),
            }
        })
    }

    /// The regions for this POP. The POP is `edge_config.pop` when set (a local run, whose
    /// Viceroy calls every POP `XXX`), else the `FASTLY_POP` the host sets.
    fn regions(&self) -> Vec<Region> {
        let map = self.setting("regions", parse_regions, RegionMap::single());
        let pop = self.get("pop").or_else(|| std::env::var("FASTLY_POP").ok());
        map.order(pop.as_deref())
    }

    /// The edge rate limit settings, read on first use (only for a tenant that has a limit).
    pub fn rate_limit(&self) -> RateLimit {
        *self.rate_limit.get_or_init(|| {
            let d = RateLimit::default();
            let requested =
                self.setting("rate_limit_penalty_secs", parse_number, d.penalty.as_secs());
            let secs = penalty_secs(requested);
            if secs != requested {
                edge_log!(
                    "config rate_limit_penalty_secs={requested} is not a whole minute from \
                     {PENALTY_SECS_MIN} to {PENALTY_SECS_MAX}; using {secs}"
                );
            }
            RateLimit {
                enabled: self.setting("edge_rate_limit", parse_bool, d.enabled),
                penalty: Duration::from_secs(secs),
            }
        })
    }

    /// The `edge_config` value of `key` parsed by `parse`, or `default` when it is absent,
    /// unreadable or invalid (the last two logged).
    fn setting<T>(&self, key: &str, parse: impl Fn(&str) -> Option<T>, default: T) -> T {
        let Some(value) = self.get(key) else {
            return default;
        };
        parse(value.trim()).unwrap_or_else(|| {
            edge_log!("config {key}={value:?} is invalid; using the default");
            default
        })
    }

    fn get(&self, key: &str) -> Option<String> {
        match self.config.as_ref()?.try_get(key) {
            Ok(v) => v,
            Err(e) => {
                edge_log!("config {EDGE_CONFIG_STORE}.{key} unreadable ({e:?}); using default");
                None
            }
        }
    }
}

/// The opening keys are this edge's current and previous seal keys, whichever the entry names.
impl KeySource for EdgeSettings {
    fn tenant_key(&self, key_id: &str, tenant: &str) -> Option<TenantKey> {
        let current = self.seal_current().filter(|k| k.id() == key_id);
        current
            .or_else(|| self.seal_previous().filter(|k| k.id() == key_id))
            .map(|k| k.tenant_key(tenant))
    }
}

/// A seal key secret: `<id>:<secret>`, the secret's UTF-8 bytes or, after `hex:`, hex digits.
/// One value carries both, so a rotation changes the id and the secret in one write.
fn parse_seal_key(value: &[u8]) -> Result<SealKey, String> {
    let value = std::str::from_utf8(value).map_err(|_| "not UTF-8".to_owned())?;
    let (id, secret) = value
        .trim()
        .split_once(':')
        .ok_or_else(|| "expected <id>:<secret>".to_owned())?;
    let secret = match secret.strip_prefix("hex:") {
        Some(digits) => hex::decode(digits).map_err(|e| format!("bad hex: {e}"))?,
        None => secret.as_bytes().to_vec(),
    };
    SealKey::new(id, &secret).map_err(|e| e.to_string())
}

fn secret(store: &SecretStore, name: &str) -> Option<Vec<u8>> {
    match store.try_get(name) {
        Ok(Some(secret)) => match secret.try_plaintext() {
            Ok(bytes) if !bytes.is_empty() => Some(bytes.to_vec()),
            Ok(_) => None,
            Err(e) => {
                edge_log!("secret {name} cannot be decrypted ({e:?})");
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            edge_log!("secret {name} unreadable ({e:?})");
            None
        }
    }
}

/// `regions`: a bad value is logged with its reason (then the default applies).
fn parse_regions(v: &str) -> Option<RegionMap> {
    RegionMap::parse(v)
        .map_err(|e| edge_log!("config regions: {e}"))
        .ok()
}

fn parse_number<T: std::str::FromStr>(v: &str) -> Option<T> {
    v.parse().ok()
}

/// Milliseconds, at least 1.
fn parse_ms(v: &str) -> Option<Duration> {
    v.parse::<u64>()
        .ok()
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
}

/// A penalty box TTL the host will keep as given: clamped to 60..=3600 s and rounded down to
/// the minute, as the host would truncate it anyway, so the `Retry-After` we send matches the
/// box the tenant is really in.
fn penalty_secs(requested: u64) -> u64 {
    let clamped = requested.clamp(PENALTY_SECS_MIN, PENALTY_SECS_MAX);
    clamped - clamped % 60
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seal_key_secret_names_its_id_before_the_secret() {
        let key = parse_seal_key(b"k2:some secret:with colon").unwrap();
        assert_eq!(key.id(), "k2");
        let hex = parse_seal_key(b"k1:hex:00ff").unwrap();
        assert_eq!(hex.id(), "k1");
        // The same secret in hex and as text derives the same tenant keys.
        let sealed = parse_seal_key(b"k1:ab")
            .unwrap()
            .tenant_key("acme")
            .seal(&[0; 24], b"", b"x");
        let opened = parse_seal_key(b"k1:hex:6162").unwrap().tenant_key("acme");
        assert_eq!(opened.open(b"", &sealed).unwrap(), b"x");
        for bad in [
            &b"no-colon"[..],
            b":secret",
            b"k1:",
            b"K1:x",
            b"k1:hex:zz",
            b"\xff:x",
        ] {
            assert!(parse_seal_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn booleans_accept_the_usual_spellings() {
        assert_eq!(parse_bool("TRUE"), Some(true));
        assert_eq!(parse_bool("off"), Some(false));
        assert_eq!(parse_bool("maybe"), None);
    }

    #[test]
    fn a_penalty_outside_what_a_penalty_box_accepts_is_clamped_to_whole_minutes() {
        assert_eq!(penalty_secs(0), 60);
        assert_eq!(penalty_secs(59), 60);
        assert_eq!(penalty_secs(60), 60);
        assert_eq!(penalty_secs(119), 60);
        assert_eq!(penalty_secs(300), 300);
        assert_eq!(penalty_secs(3600), 3600);
        assert_eq!(penalty_secs(u64::MAX), 3600);
    }

    #[test]
    fn the_edge_rate_limit_is_on_by_default_with_a_one_minute_penalty() {
        let d = RateLimit::default();
        assert!(d.enabled);
        assert_eq!(d.penalty, Duration::from_secs(60));
    }
}
