//! The only file that touches the KV Store `edge_cache`. A missing key, an error or an entry
//! that does not decode for this request is a miss (`None`), never a failure.

use std::time::Duration;

use crate::trace::edge_log;
use fastly::kv_store::{KVStore, KVStoreError};
use gateway_common::entry::Entry;
use gateway_common::key::CacheKey;

/// The KV Store name the service links (`[local_server.kv_stores]` / `[setup.kv_stores]`).
pub const STORE: &str = "edge_cache";

/// Why a lookup found nothing usable; reported in the log line, never to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// No such key.
    Absent,
    /// The store or the lookup failed.
    Error,
    /// The value or its metadata did not decode for this request (version, tenant, key).
    Rejected,
}

impl Miss {
    pub fn as_str(self) -> &'static str {
        match self {
            Miss::Absent => "absent",
            Miss::Error => "error",
            Miss::Rejected => "rejected",
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

/// One lookup. The entry is checked against `key` (version, tenant, key) by `common`;
/// freshness is the caller's decision.
pub fn lookup(key: &CacheKey) -> Result<Entry, Miss> {
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
    Entry::decode_kv(value, metadata.as_deref(), key).map_err(|e| {
        edge_log!("kv entry rejected ({e})");
        Miss::Rejected
    })
}

/// Store an entry (local populate). `kv_ttl_secs` only bounds storage (see
/// `Entry::kv_expiry`: the TTL plus the tenant's stale-if-error window, so a stale copy can
/// still save a request when the origin is down); freshness is always judged from the
/// entry's own created-at and TTL. Errors are logged and dropped.
pub fn insert(key: &CacheKey, entry: &Entry, kv_ttl_secs: u64) {
    let Some(store) = open() else { return };
    let (value, metadata) = match entry.encode_kv() {
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
