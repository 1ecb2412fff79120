//! Tenants: loaded once from `tenants.json` (the same file fills the edge's Config Store) and
//! looked up by the SHA-256 of a bearer key. Knows nothing of HTTP or of Redis.

use foldhash::{HashMap, HashMapExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use gateway_common::key::api_key_digest;
use gateway_common::tenant::{Tenant, TenantsFile};

#[derive(Debug, thiserror::Error)]
pub enum TenantsError {
    #[error("tenants file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tenants file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// The tenant table. Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct Tenants {
    by_digest: Arc<HashMap<String, Arc<Tenant>>>,
    by_id: Arc<HashMap<String, Arc<Tenant>>>,
    all: Arc<Vec<Arc<Tenant>>>,
}

impl Tenants {
    pub fn from_file(path: &Path) -> Result<Tenants, TenantsError> {
        let bytes = std::fs::read(path).map_err(|source| TenantsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file = TenantsFile::parse(&bytes).map_err(|reason| TenantsError::Invalid {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(Tenants::new(file.tenants))
    }

    /// From records already validated (e.g. by `TenantsFile::parse`).
    pub fn new(tenants: Vec<Tenant>) -> Tenants {
        let all: Vec<Arc<Tenant>> = tenants.into_iter().map(Arc::new).collect();
        let mut by_digest = HashMap::new();
        for tenant in &all {
            for digest in &tenant.api_key_sha256 {
                by_digest.insert(digest.to_ascii_lowercase(), Arc::clone(tenant));
            }
        }
        let by_id = all.iter().map(|t| (t.id.clone(), Arc::clone(t))).collect();
        Tenants {
            by_digest: Arc::new(by_digest),
            by_id: Arc::new(by_id),
            all: Arc::new(all),
        }
    }

    /// The tenant owning `api_key`, or `None` for an unknown key. The lookup is by digest, so
    /// timing reveals nothing about the key.
    pub fn authenticate(&self, api_key: &str) -> Option<Arc<Tenant>> {
        if api_key.is_empty() {
            return None;
        }
        self.by_digest.get(&api_key_digest(api_key)).cloned()
    }

    /// The tenant with id `id` (the usage ingest names tenants by id).
    pub fn get(&self, id: &str) -> Option<&Arc<Tenant>> {
        self.by_id.get(id)
    }

    pub fn len(&self) -> usize {
        self.all.len()
    }

    /// Every tenant, in file order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Tenant>> {
        self.all.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(id: &str, key: &str) -> Tenant {
        Tenant {
            id: id.into(),
            api_key_sha256: vec![api_key_digest(key)],
            allowed_models: vec!["gpt-4o-mini".into()],
            cache_ttl_secs: 60,
            stale_if_error_secs: 0,
            monthly_token_budget: None,
            requests_per_second: None,
            cache_sampled: true,
            cache_store_requests: false,
            purge_generation: 0,
            semantic: Default::default(),
        }
    }

    #[test]
    fn a_known_key_finds_its_tenant_and_an_unknown_one_none() {
        let tenants = Tenants::new(vec![tenant("acme", "sk-a"), tenant("globex", "sk-g")]);
        assert_eq!(tenants.authenticate("sk-a").unwrap().id, "acme");
        assert_eq!(tenants.authenticate("sk-g").unwrap().id, "globex");
        assert!(tenants.authenticate("sk-x").is_none());
        assert!(tenants.authenticate("").is_none());
    }

    #[test]
    fn a_tenant_is_found_by_its_id_and_never_by_a_key() {
        let tenants = Tenants::new(vec![tenant("acme", "sk-a"), tenant("globex", "sk-g")]);
        assert_eq!(tenants.get("globex").unwrap().id, "globex");
        assert!(tenants.get("sk-a").is_none());
        assert!(tenants.get("*").is_none());
    }
}
