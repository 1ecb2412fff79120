//! The origin's side of sealed entries: seals every entry it writes to Redis with the current
//! key and a fresh random nonce, and opens entries with the current or previous key. Keeps
//! each tenant's derived key in a small map; never decides what is cached.

use foldhash::{HashMap, HashMapExt};
use std::sync::{Mutex, PoisonError};

use gateway_common::entry::{Entry, EntryError};
use gateway_common::seal::{KeySource, Keyring, NONCE_LEN, TenantKey};

/// Derived keys kept at most: past it the map starts over (each key is two HMACs to derive
/// again, so the bound only caps memory).
const MAX_CACHED_KEYS: usize = 4096;

/// The keyring and its derived-key cache. Not `Debug`: it holds secrets.
pub struct Sealer {
    ring: Keyring,
    /// Key id → tenant → derived key: looked up by `&str` on every hit, no key built.
    derived: Mutex<HashMap<String, HashMap<String, TenantKey>>>,
}

impl Sealer {
    pub fn new(ring: Keyring) -> Sealer {
        Sealer {
            ring,
            derived: Mutex::new(HashMap::new()),
        }
    }

    /// The id new entries are sealed with.
    pub fn current_id(&self) -> &str {
        self.ring.current().id()
    }

    /// The Redis form of `entry`, sealed with the tenant's current key.
    pub fn seal(&self, entry: &Entry) -> Result<Vec<u8>, EntryError> {
        let key = self.key(self.ring.current().id(), &entry.envelope.tenant);
        let nonce: [u8; NONCE_LEN] = rand::random();
        match key {
            Some(key) => entry.seal(&key, &nonce),
            // The current key is always in the ring; kept total rather than panicking.
            None => Err(EntryError::Malformed("no current seal key".into())),
        }
    }

    fn key(&self, key_id: &str, tenant: &str) -> Option<TenantKey> {
        // A poisoned map only ever holds complete derived keys: keep using it.
        let mut derived = self.derived.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(key) = derived.get(key_id).and_then(|tenants| tenants.get(tenant)) {
            return Some(key.clone());
        }
        let key = self.ring.get(key_id)?.tenant_key(tenant);
        if derived.values().map(HashMap::len).sum::<usize>() >= MAX_CACHED_KEYS {
            derived.clear();
        }
        derived
            .entry(key_id.to_owned())
            .or_default()
            .insert(tenant.to_owned(), key.clone());
        Some(key)
    }
}

impl KeySource for Sealer {
    fn tenant_key(&self, key_id: &str, tenant: &str) -> Option<TenantKey> {
        self.key(key_id, tenant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_common::entry::{ENTRY_VERSION, Envelope};
    use gateway_common::key::CacheKey;
    use gateway_common::route::Route;
    use gateway_common::seal::SealKey;

    fn entry(key: &CacheKey) -> Entry {
        Entry {
            envelope: Envelope {
                v: ENTRY_VERSION,
                tenant: key.tenant().into(),
                key: key.hex().into(),
                created: 1,
                ttl: 60,
                status: 200,
                content_type: "application/json".into(),
                model: "m".into(),
                provider: "p".into(),
                usage: None,
                generation: 0,
            },
            body: b"{\"answer\":\"sealed\"}".to_vec(),
        }
    }

    #[test]
    fn every_seal_takes_a_new_nonce_and_opens_with_the_same_keys() {
        let sealer = Sealer::new(Keyring::new(SealKey::new("k1", b"s").unwrap(), None).unwrap());
        let key = CacheKey::derive(b"x", "acme", Route::ChatCompletions, b"{}");
        let e = entry(&key);
        let (a, b) = (sealer.seal(&e).unwrap(), sealer.seal(&e).unwrap());
        assert_ne!(a, b);
        assert_eq!(Entry::decode(&a, &key, &sealer).unwrap(), e);
        assert_eq!(Entry::decode(&b, &key, &sealer).unwrap(), e);
        assert_eq!(sealer.current_id(), "k1");
    }
}
