//! The tenant record both tiers read (origin from tenants.json, edge from its Config Store) and
//! the validation of a tenants file. Must not hold API keys themselves, only their sha256.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::key::validate_tenant_id;

/// One tenant: who it is, which key digests authenticate it, and its limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    /// A valid tenant id (see `key::validate_tenant_id`); scopes every cache key.
    pub id: String,
    /// Lowercase sha256 hex of each accepted API key (`key::api_key_digest`).
    pub api_key_sha256: Vec<String>,
    /// Models this tenant may call; `"*"` allows any.
    pub allowed_models: Vec<String>,
    /// Default entry TTL, seconds (capped by the tier's settings).
    pub cache_ttl_secs: u64,
    /// How long past its TTL an entry may be served when the origin is unreachable, seconds.
    pub stale_if_error_secs: u64,
    /// Tokens per calendar month; `None` = unlimited.
    pub monthly_token_budget: Option<u64>,
    /// `None` = unlimited.
    pub requests_per_second: Option<u32>,
    /// Cache answers that were sampled (`temperature` absent or above 0, no `seed`) and replay
    /// one sample to every identical request. Default true: most requests leave `temperature`
    /// at the providers' default of 1, so a tenant that turned this off would cache only
    /// requests with `temperature: 0` or a `seed`. A tenant that wants a fresh draw each time
    /// sets it to false; those requests then bypass both tiers (`Cache-Status: detail=sampled`).
    #[serde(default = "default_true")]
    pub cache_sampled: bool,
    /// Answer `"store": true` requests from the cache. Default false: such a request asks the
    /// provider to keep the completion, and a cached answer would silently drop that, so it goes
    /// to the provider uncached (`Cache-Status: detail=store`).
    #[serde(default)]
    pub cache_store_requests: bool,
    /// How many times the tenant purged its whole cache: an entry written under an older
    /// generation is never served (`policy::purged`). Kept by the origin (in Redis) and
    /// carried to the edge in this record (the Config Store `tenants`); not part of a tenants
    /// file.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub purge_generation: u64,
    /// The semantic cache (origin only; off unless the tenant turns it on).
    #[serde(default, skip_serializing_if = "SemanticPolicy::is_default")]
    pub semantic: SemanticPolicy,
}

/// A tenant's semantic cache: whether a paraphrase of a cached question may be answered from
/// the cache, how similar it must be, and which model embeds it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SemanticPolicy {
    #[serde(default)]
    pub enabled: bool,
    /// Cosine similarity at or above which a candidate answers (0 < t ≤ 1); the origin's
    /// evaluated default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f32>,
    #[serde(default)]
    pub embedder: SemanticEmbedder,
}

// JSON has no NaN and `validate` refuses a threshold outside (0, 1], so equality is total.
impl Eq for SemanticPolicy {}

impl SemanticPolicy {
    fn is_default(&self) -> bool {
        *self == SemanticPolicy::default()
    }
}

/// Which model embeds a tenant's questions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SemanticEmbedder {
    /// all-MiniLM-L6-v2 in the origin's process (no call before the cache read).
    #[default]
    Local,
    /// A provider embeddings model, through the origin's router (quality over latency). Its
    /// vectors live in their own index: the scope includes the model name.
    Provider { model: String },
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn default_true() -> bool {
    true
}

impl Tenant {
    /// True if `model` is listed or the list holds `"*"`.
    pub fn allows_model(&self, model: &str) -> bool {
        self.allowed_models.iter().any(|m| m == "*" || m == model)
    }

    /// Check the record: a valid id, at least one key digest, each 64 lowercase hex chars, and
    /// no empty model names. The message names the tenant and the field.
    pub fn validate(&self) -> Result<(), String> {
        validate_tenant_id(&self.id).map_err(|e| format!("tenant {:?}: id: {e}", self.id))?;
        if self.api_key_sha256.is_empty() {
            return Err(format!("tenant {}: api_key_sha256 is empty", self.id));
        }
        for digest in &self.api_key_sha256 {
            let ok = digest.len() == 64
                && digest
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !ok {
                return Err(format!(
                    "tenant {}: api_key_sha256 entries must be 64 lowercase hex characters",
                    self.id
                ));
            }
        }
        if let Some(t) = self.semantic.threshold
            && !(t > 0.0 && t <= 1.0)
        {
            return Err(format!(
                "tenant {}: semantic.threshold must be in (0, 1], got {t}",
                self.id
            ));
        }
        if let SemanticEmbedder::Provider { model } = &self.semantic.embedder
            && model.is_empty()
        {
            return Err(format!(
                "tenant {}: semantic.embedder.provider.model is empty",
                self.id
            ));
        }
        if self.allowed_models.iter().any(String::is_empty) {
            return Err(format!(
                "tenant {}: allowed_models holds an empty name",
                self.id
            ));
        }
        Ok(())
    }
}

/// A tenants file: `{"tenants":[...]}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantsFile {
    pub tenants: Vec<Tenant>,
}

impl TenantsFile {
    /// Parse and validate: unknown fields are errors, every tenant must validate, ids must be
    /// unique and no key digest may belong to two tenants.
    pub fn parse(json: &[u8]) -> Result<TenantsFile, String> {
        let file: TenantsFile =
            serde_json::from_slice(json).map_err(|e| format!("tenants file: {e}"))?;
        let mut ids = HashSet::new();
        let mut digests = HashSet::new();
        for tenant in &file.tenants {
            tenant.validate()?;
            if !ids.insert(tenant.id.as_str()) {
                return Err(format!("tenant {}: id is used twice", tenant.id));
            }
            for digest in &tenant.api_key_sha256 {
                if !digests.insert(digest.as_str()) {
                    return Err(format!(
                        "tenant {}: an api_key_sha256 is also listed elsewhere",
                        tenant.id
                    ));
                }
            }
        }
        Ok(file)
    }

    /// The edge's Config Store "tenants" contents: sha256(key) -> tenant record JSON (one line).
    pub fn config_store_entries(&self) -> Vec<(String, String)> {
        let mut entries = Vec::new();
        for tenant in &self.tenants {
            #[allow(
                clippy::expect_used,
                reason = "a struct of strings, integers and options always serializes"
            )]
            let record = serde_json::to_string(tenant).expect("a Tenant always serializes");
            for digest in &tenant.api_key_sha256 {
                entries.push((digest.clone(), record.clone()));
            }
        }
        entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::api_key_digest;

    fn tenants_json(a_keys: &[&str], b_id: &str) -> String {
        let digests = |keys: &[&str]| {
            keys.iter()
                .map(|k| format!("\"{}\"", api_key_digest(k)))
                .collect::<Vec<_>>()
                .join(",")
        };
        format!(
            r#"{{"tenants":[
              {{"id":"acme","api_key_sha256":[{}],"allowed_models":["gpt-4o-mini"],
                "cache_ttl_secs":3600,"stale_if_error_secs":600,
                "monthly_token_budget":1000000,"requests_per_second":null}},
              {{"id":"{b_id}","api_key_sha256":[{}],"allowed_models":["*"],
                "cache_ttl_secs":60,"stale_if_error_secs":0,
                "monthly_token_budget":null,"requests_per_second":5}}]}}"#,
            digests(a_keys),
            digests(&["key-b"])
        )
    }

    #[test]
    fn a_valid_file_parses_and_feeds_the_config_store() {
        let file =
            TenantsFile::parse(tenants_json(&["key-a1", "key-a2"], "beta").as_bytes()).unwrap();
        assert_eq!(file.tenants.len(), 2);
        let entries = file.config_store_entries();
        assert_eq!(entries.len(), 3);
        let (digest, record) = &entries[0];
        assert_eq!(digest, &api_key_digest("key-a1"));
        assert!(!record.contains('\n'));
        let back: Tenant = serde_json::from_str(record).unwrap();
        assert_eq!(back, file.tenants[0]);
        // Records written before the cache policy fields existed read with their defaults.
        assert!(file.tenants[0].cache_sampled);
        assert!(!file.tenants[0].cache_store_requests);
    }

    #[test]
    fn models_are_allowed_by_name_or_wildcard() {
        let file = TenantsFile::parse(tenants_json(&["k"], "beta").as_bytes()).unwrap();
        assert!(file.tenants[0].allows_model("gpt-4o-mini"));
        assert!(!file.tenants[0].allows_model("gpt-4o"));
        assert!(file.tenants[1].allows_model("anything"));
    }

    #[test]
    fn duplicate_ids_and_shared_keys_are_refused() {
        let dup_id = TenantsFile::parse(tenants_json(&["k"], "acme").as_bytes()).unwrap_err();
        assert!(dup_id.contains("used twice"), "{dup_id}");
        let shared = TenantsFile::parse(tenants_json(&["key-b"], "beta").as_bytes()).unwrap_err();
        assert!(shared.contains("elsewhere"), "{shared}");
    }

    #[test]
    fn unknown_fields_and_bad_records_are_refused() {
        let unknown = tenants_json(&["k"], "beta").replacen("\"id\"", "\"extra\":1,\"id\"", 1);
        assert!(TenantsFile::parse(unknown.as_bytes()).is_err());
        assert!(TenantsFile::parse(tenants_json(&["k"], "Beta").as_bytes()).is_err());
        assert!(TenantsFile::parse(tenants_json(&[], "beta").as_bytes()).is_err());
        let upper = tenants_json(&["k"], "beta")
            .replace(&api_key_digest("k"), &api_key_digest("k").to_uppercase());
        assert!(TenantsFile::parse(upper.as_bytes()).is_err());
    }
}
