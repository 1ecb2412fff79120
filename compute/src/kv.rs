//! The only file that touches the KV Store `edge_cache`. A missing key, an error or an entry
//! that does not decode or open for this request is a miss, never a failure; what this edge
//! writes (local populate) it seals first.

use std::time::Duration;

use crate::trace::edge_log;
use fastly::kv_store::{KVStore, KVStoreError};
use gateway_common::entry::Entry;
use gateway_common::key::CacheKey;
use gateway_common::seal::{KeySource, NONCE_LEN, TenantKey};

/// The KV Store name the service links (`[local_server.kv_stores]` / `[setup.kv_stores]`).
pub const STORE: &str = "edge_cache";

/// Why a lookup found nothing usable; reported in the log line, never to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// No such key.
    Absent,
    /// The store or the lookup failed.
    Error,
    /// The value or its metadata did not decode for this request (version, tenant, key) or
    /// did not open (unknown key id, tampered, moved): `EntryError::reason`, logged.
    Rejected(&'static str),
}

impl Miss {
    pub fn as_str(self) -> &'static str {
        match self {
            Miss::Absent => "absent",
            Miss::Error => "error",
            Miss::Rejected(_) => "rejected",
        }
    }

    /// Why an entry was rejected (`unopenable`, `unknown_key_id`, `wrong_tenant`, ...).
    pub fn reason(self) -> Option<&'static str> {
        match self {
            Miss::Rejected(reason) => Some(reason),
            Miss::Absent | Miss::Error => None,
        }
    }
}

fn open() -> Option<KVStore> {
    match KVStore::open(STORE) {
        Ok(Some(store)) => Some(store),
        Ok(None) => {
            edge_log!("kv store {STORE} is not linked");
            None
        }
        Err(e) => {
            edge_log!("kv store {STORE} unavailable ({e})");
            None
        }
    }
}

/// One lookup. The entry is checked against `key` (version, tenant, key) and opened with the
/// key `keys` holds for its key id by `common`; freshness is the caller's decision.
pub fn lookup(key: &CacheKey, keys: &dyn KeySource) -> Result<Entry, Miss> {
    let store = open().ok_or(Miss::Error)?;
    let mut found = match store.lookup(&key.kv_key()) {
        Ok(found) => found,
        Err(KVStoreError::ItemNotFound) => return Err(Miss::Absent),
        Err(e) => {
            edge_log!("kv lookup failed ({e})");
            return Err(Miss::Error);
        }
    };
    let metadata = found.metadata();
    let value = found.take_body_bytes();
    Entry::decode_kv(&value, metadata.as_deref(), key, keys).map_err(|e| {
        edge_log!("kv entry rejected ({e})");
        Miss::Rejected(e.reason())
    })
}

/// Store an entry (local populate). `kv_ttl_secs` only bounds storage (see
/// `Entry::kv_expiry`: the TTL plus the tenant's stale-if-error window, so a stale copy can
/// still save a request when the origin is down); freshness is always judged from the
/// entry's own created-at and TTL. Sealed with `seal` (the tenant's current key) and a nonce
/// from the host's randomness; without one, nothing is stored. Errors are logged and dropped.
pub fn insert(key: &CacheKey, entry: &Entry, seal: &TenantKey, kv_ttl_secs: u64) {
    let mut nonce = [0_u8; NONCE_LEN];
    if let Err(e) = getrandom::fill(&mut nonce) {
        edge_log!("entry not stored: no randomness for its nonce ({e})");
        return;
    }
    let Some(store) = open() else { return };
    let (value, metadata) = match entry.seal_kv(seal, &nonce) {
        Ok(parts) => parts,
        Err(e) => {
            edge_log!("entry not stored ({e})");
            return;
        }
    };
    let result = store
        .build_insert()
        .metadata(&metadata)
        .time_to_live(Duration::from_secs(kv_ttl_secs.max(1)))
        .execute(&key.kv_key(), value);
    if let Err(e) = result {
        edge_log!("kv insert failed ({e})");
    }
}
