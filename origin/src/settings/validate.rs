//! Validation of loaded settings: every value checked once at start-up, each problem naming
//! its key, and outside `dev_mode` a refusal to start with the development defaults (the
//! fixture tenants, an origin anyone can call, an open `/metrics`).

use std::net::SocketAddr;

use super::{RedisMode, ReplicationSettings, Secret, Settings, SettingsError, invalid};

impl Settings {
    /// Checks every value once; the first problem found is returned, naming its key (outside
    /// `dev_mode`, every unsafe production setting is named at once).
    pub fn validate(&self) -> Result<(), SettingsError> {
        self.server
            .listen
            .parse::<SocketAddr>()
            .map_err(|e| invalid("server.listen", e.to_string()))?;
        if self.server.max_body_bytes == 0 {
            return Err(invalid("server.max_body_bytes", "must be > 0"));
        }
        if self.server.max_upstream_body_bytes == 0 {
            return Err(invalid("server.max_upstream_body_bytes", "must be > 0"));
        }
        match self.redis.mode {
            RedisMode::Single => {
                redis::parse_redis_url(self.redis.url.expose())
                    .ok_or_else(|| invalid("redis.url", "not a redis:// URL"))?;
            }
            RedisMode::Cluster => {
                if self.redis.cluster_urls.is_empty() {
                    return Err(invalid(
                        "redis.cluster_urls",
                        "mode = \"cluster\" needs at least one seed node URL",
                    ));
                }
                for (i, url) in self.redis.cluster_urls.iter().enumerate() {
                    // The message names the position, never the URL (it may hold a password).
                    match redis::parse_redis_url(url.expose()) {
                        Some(parsed) if parsed.path().trim_matches('/').is_empty() => {}
                        Some(_) => {
                            return Err(invalid(
                                format!("redis.cluster_urls[{i}]"),
                                "a cluster has no databases: drop the /<db> path",
                            ));
                        }
                        None => {
                            return Err(invalid(
                                format!("redis.cluster_urls[{i}]"),
                                "not a redis:// or rediss:// URL",
                            ));
                        }
                    }
                }
            }
        }
        for (key, value) in [
            ("redis.pool_size", self.redis.pool_size as u64),
            ("redis.response_timeout_ms", self.redis.response_timeout_ms),
            (
                "redis.pool_wait_timeout_ms",
                self.redis.pool_wait_timeout_ms,
            ),
            ("redis.connect_timeout_ms", self.redis.connect_timeout_ms),
            (
                "redis.breaker_failure_threshold",
                u64::from(self.redis.breaker_failure_threshold),
            ),
            ("cache.ttl_cap_secs", self.cache.ttl_cap_secs),
            (
                "cache.coalesce_wait_timeout_ms",
                self.cache.coalesce_wait_timeout_ms,
            ),
            ("cache.usage_flush_ms", self.cache.usage_flush_ms),
            (
                "router.breaker_failure_threshold",
                u64::from(self.router.breaker_failure_threshold),
            ),
            (
                "router.stream_idle_timeout_ms",
                self.router.stream_idle_timeout_ms,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be > 0"));
            }
        }
        match &self.cache.key_secret {
            None if !self.dev_mode => {
                return Err(invalid(
                    "cache.key_secret",
                    "required (it must equal the edge's); only dev_mode = true has a built-in one",
                ));
            }
            None => {}
            Some(secret) => {
                let bytes = decode_key_secret(secret)
                    .map_err(|reason| invalid("cache.key_secret", reason))?;
                if bytes.len() < 16 && !self.dev_mode {
                    return Err(invalid("cache.key_secret", "must be at least 16 bytes"));
                }
            }
        }
        for (key, secret) in [
            ("security.edge_secret", &self.security.edge_secret),
            ("security.admin_token", &self.security.admin_token),
        ] {
            if let Some(secret) = secret {
                check_token(key, secret, self.dev_mode)?;
            }
        }
        if self.security.require_edge_secret && self.security.edge_secret.is_none() {
            return Err(invalid(
                "security.edge_secret",
                "required when security.require_edge_secret = true",
            ));
        }
        // Outside dev_mode a missing key is named with the rest in `check_production`.
        if self.dev_mode || self.seal.current.is_some() {
            self.seal.keyring(self.dev_mode)?;
        }
        self.usage.validate(self.dev_mode)?;
        super::usage::validate_pricing(&self.pricing)?;
        if !self.dev_mode {
            self.check_production()?;
        }
        if !(self.semantic.default_threshold > 0.0 && self.semantic.default_threshold <= 1.0) {
            return Err(invalid("semantic.default_threshold", "must be in (0, 1]"));
        }
        if self.semantic.max_concurrent == 0 {
            return Err(invalid("semantic.max_concurrent", "must be > 0"));
        }
        if self.purge.tenant_per_minute == 0 || self.purge.tenant_burst == 0 {
            return Err(invalid(
                if self.purge.tenant_per_minute == 0 {
                    "purge.tenant_per_minute"
                } else {
                    "purge.tenant_burst"
                },
                "must be > 0",
            ));
        }
        if !(0.0..=10.0).contains(&self.router.retry_budget_ratio) {
            return Err(invalid(
                "router.retry_budget_ratio",
                "must be within 0.0..=10.0",
            ));
        }
        if !(0.0..=1.0e6).contains(&self.router.retry_budget_min_per_sec) {
            return Err(invalid(
                "router.retry_budget_min_per_sec",
                "must be within 0..=1e6",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.filter)
            .map_err(|e| invalid("log.filter", e.to_string()))?;
        self.replication.validate()?;
        self.region.validate(self.dev_mode)?;
        if self.providers.is_empty() {
            return Err(invalid("providers", "at least one provider is required"));
        }
        let mut names = std::collections::HashSet::new();
        for (i, p) in self.providers.iter().enumerate() {
            let key = |field: &str| format!("providers[{i}].{field}");
            if p.name.is_empty()
                || !p
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(invalid(key("name"), "must be non-empty [A-Za-z0-9_-]"));
            }
            if !names.insert(p.name.as_str()) {
                return Err(invalid(
                    key("name"),
                    format!("duplicate provider name {}", p.name),
                ));
            }
            match reqwest::Url::parse(&p.base_url) {
                Ok(url) if matches!(url.scheme(), "http" | "https") => {}
                Ok(_) => return Err(invalid(key("base_url"), "scheme must be http or https")),
                Err(e) => return Err(invalid(key("base_url"), e.to_string())),
            }
            if p.models.is_empty() {
                return Err(invalid(key("models"), "must map at least one model"));
            }
            if p.apis.is_empty() {
                return Err(invalid(key("apis"), "must name at least one API"));
            }
            if let Some((client, _)) = p.models.iter().find(|(c, m)| c.is_empty() || m.is_empty()) {
                return Err(invalid(
                    key("models"),
                    format!("empty model name in mapping of {client:?}"),
                ));
            }
            if p.weight == 0 {
                return Err(invalid(key("weight"), "must be > 0"));
            }
            if p.timeout_ms == 0 {
                return Err(invalid(key("timeout_ms"), "must be > 0"));
            }
            if p.connect_timeout_ms == 0 {
                return Err(invalid(key("connect_timeout_ms"), "must be > 0"));
            }
        }
        Ok(())
    }

    /// What production needs that development can do without; every missing piece is named
    /// in one error, so an operator fixes them all in one go.
    fn check_production(&self) -> Result<(), SettingsError> {
        let mut missing = Vec::new();
        if self.tenants.file.is_none() {
            missing.push(
                "tenants.file: set the path of your tenants file (the development fixture, whose keys are published, is only loaded in dev_mode)",
            );
        }
        if !self.security.require_edge_secret {
            missing.push(
                "security.require_edge_secret: must be true, so only the edge can call the origin (and claim an edge miss)",
            );
        }
        if self.security.edge_secret.is_none() {
            missing.push("security.edge_secret: the edge's edge_shared_secret");
        }
        if self.seal.current.is_none() {
            missing.push(
                "seal.current: the key cache entries are sealed with (the edge's seal_key_current holds it too)",
            );
        }
        if self.security.admin_token.is_none() {
            missing.push(
                "security.admin_token: protects /metrics (tenant ids and usage) and the admin purge",
            );
        }
        if missing.is_empty() {
            return Ok(());
        }
        Err(SettingsError::Production(missing.join("; ")))
    }
}

/// A bearer-style secret: never empty (an empty token would match an empty header), a valid
/// header value (the edge sends it in a header, an admin as a bearer token), and outside
/// `dev_mode` at least 16 bytes.
pub(super) fn check_token(key: &str, secret: &Secret, dev_mode: bool) -> Result<(), SettingsError> {
    let value = secret.expose();
    if value.is_empty() {
        return Err(invalid(key, "must not be empty"));
    }
    if value.len() < 16 && !dev_mode {
        return Err(invalid(key, "must be at least 16 bytes"));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(key, "must be printable ASCII without spaces"));
    }
    Ok(())
}

impl ReplicationSettings {
    /// Checked only when enabled, so the defaults need no store or token.
    fn validate(&self) -> Result<(), SettingsError> {
        if !self.enabled {
            return Ok(());
        }
        match reqwest::Url::parse(&self.api_base_url) {
            Ok(url) if url.scheme() == "https" => {}
            Ok(url)
                if url.scheme() == "http"
                    && matches!(url.host_str(), Some("127.0.0.1" | "localhost" | "[::1]")) => {}
            Ok(_) => {
                return Err(invalid(
                    "replication.api_base_url",
                    "must be https (plain http only for a loopback host): it carries the API token",
                ));
            }
            Err(e) => return Err(invalid("replication.api_base_url", e.to_string())),
        }
        if self.store_id.is_empty()
            || !self
                .store_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "replication.store_id",
                "required: the KV store id, [A-Za-z0-9_-]",
            ));
        }
        if !self
            .config_store_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "replication.config_store_id",
                "the Config Store id: [A-Za-z0-9_-]",
            ));
        }
        match &self.api_token {
            Some(token) if !token.expose().is_empty() => {}
            _ => {
                return Err(invalid(
                    "replication.api_token_env",
                    format!("environment variable {} is not set", self.api_token_env),
                ));
            }
        }
        for (key, value) in [
            ("replication.queue_capacity", self.queue_capacity as u64),
            (
                "replication.batch_max_entries",
                self.batch_max_entries as u64,
            ),
            ("replication.batch_max_bytes", self.batch_max_bytes as u64),
            ("replication.request_timeout_ms", self.request_timeout_ms),
            ("replication.backoff_base_ms", self.backoff_base_ms),
            ("replication.claim_idle_ms", self.claim_idle_ms),
            ("replication.poll_ms", self.poll_ms),
            (
                "replication.hourly_request_budget",
                u64::from(self.hourly_request_budget),
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be > 0"));
            }
        }
        if self.batch_max_entries > 10_000 {
            return Err(invalid("replication.batch_max_entries", "must be <= 10000"));
        }
        if self.backoff_max_ms < self.backoff_base_ms {
            return Err(invalid(
                "replication.backoff_max_ms",
                "must be >= replication.backoff_base_ms",
            ));
        }
        Ok(())
    }
}

/// `hex:<hex digits>` → those bytes; anything else → its UTF-8 bytes.
pub(super) fn decode_key_secret(secret: &Secret) -> Result<Vec<u8>, String> {
    let value = secret.expose();
    let bytes = match value.strip_prefix("hex:") {
        Some(digits) => hex::decode(digits).map_err(|e| format!("bad hex: {e}"))?,
        None => value.as_bytes().to_vec(),
    };
    if bytes.is_empty() {
        return Err("must not be empty".into());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::super::tests::{provider_toml, write_file};
    use super::super::{ProviderSettings, Secret, Settings};

    /// Everything production needs, as a file body (no dev_mode).
    fn production_toml() -> String {
        format!(
            r#"[cache]
key_secret = "0123456789abcdef-key"
[seal]
current = {{ id = "k1", secret = "seal-secret-0123456789abcdef-0123456789" }}
[tenants]
file = "/etc/gateway/tenants.json"
[security]
require_edge_secret = true
edge_secret = "edge-secret-0123456789"
admin_token = "admin-token-0123456789"
{}"#,
            provider_toml()
        )
    }

    fn load(toml: &str) -> Result<Settings, String> {
        let file = write_file(toml);
        Settings::load(Some(&file.0), &HashMap::new()).map_err(|e| e.to_string())
    }

    #[test]
    fn the_edge_secret_is_required_when_demanded() {
        let file = write_file(&format!(
            "dev_mode = true\n[security]\nrequire_edge_secret = true\n{}",
            provider_toml()
        ));
        let err = Settings::load(Some(&file.0), &HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("security.edge_secret"), "{err}");
    }

    #[test]
    fn outside_dev_mode_the_origin_refuses_to_start_naming_each_missing_setting() {
        let err = load(&format!(
            "[cache]\nkey_secret = \"0123456789abcdef-key\"\n{}",
            provider_toml()
        ))
        .unwrap_err();
        for key in [
            "tenants.file",
            "security.require_edge_secret",
            "security.edge_secret",
            "security.admin_token",
            "seal.current",
        ] {
            assert!(err.contains(key), "{key} not named in: {err}");
        }
        assert!(err.contains("dev_mode"), "{err}");

        let complete = load(&production_toml()).unwrap();
        assert!(!complete.dev_mode);
        assert_eq!(
            complete.tenants_file().unwrap(),
            std::path::PathBuf::from("/etc/gateway/tenants.json")
        );
        // Each piece alone is enough to refuse, and is named.
        for (line, key) in [
            ("file = \"/etc/gateway/tenants.json\"", "tenants.file"),
            ("require_edge_secret = true", "security.require_edge_secret"),
            (
                "admin_token = \"admin-token-0123456789\"",
                "security.admin_token",
            ),
        ] {
            let err = load(&production_toml().replace(line, "")).unwrap_err();
            assert!(err.contains(key), "{key}: {err}");
        }
        let err = load(&production_toml().replace("edge_secret = \"edge-secret-0123456789\"", ""))
            .unwrap_err();
        assert!(err.contains("security.edge_secret"), "{err}");
    }

    #[test]
    fn the_production_example_loads_once_its_secrets_are_in_the_environment() {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("config/production.example.toml");
        let mut env = HashMap::from([
            ("OPENAI_API_KEY".to_string(), "sk-openai".to_string()),
            ("FASTLY_API_TOKEN".to_string(), "fastly-token".to_string()),
        ]);
        let err = Settings::load(Some(&path), &env).unwrap_err().to_string();
        assert!(err.contains("cache.key_secret"), "{err}");
        for (key, value) in [
            ("GATEWAY__CACHE__KEY_SECRET", "0123456789abcdef-key"),
            ("GATEWAY__SECURITY__EDGE_SECRET", "edge-secret-0123456789"),
            ("GATEWAY__SECURITY__ADMIN_TOKEN", "admin-token-0123456789"),
        ] {
            env.insert(key.to_string(), value.to_string());
        }
        let err = Settings::load(Some(&path), &env).unwrap_err().to_string();
        assert!(err.contains("seal.current"), "{err}");
        env.insert("GATEWAY__SEAL__CURRENT__ID".into(), "k1".into());
        env.insert(
            "GATEWAY__SEAL__CURRENT__SECRET".into(),
            format!("hex:{}", "5a".repeat(32)),
        );
        let s = Settings::load(Some(&path), &env).unwrap();
        assert_eq!(s.seal.keyring(false).unwrap().current().id(), "k1");
        assert!(!s.dev_mode && s.security.require_edge_secret && s.replication.enabled);
    }

    #[test]
    fn dev_mode_loads_the_fixture_tenants_and_needs_no_tokens() {
        let s = load(&format!("dev_mode = true\n{}", provider_toml())).unwrap();
        assert_eq!(
            s.tenants_file().unwrap(),
            std::path::PathBuf::from(super::super::DEV_TENANTS_FILE)
        );
        assert!(s.security.admin_token.is_none());
    }

    #[test]
    fn empty_and_short_secrets_are_refused() {
        for key in ["edge_secret", "admin_token"] {
            // Empty never passes, not even in dev_mode: it would equal an empty header.
            let err = load(&format!(
                "dev_mode = true\n[security]\n{key} = \"\"\n{}",
                provider_toml()
            ))
            .unwrap_err();
            assert!(err.contains(&format!("security.{key}")), "{err}");
            assert!(err.contains("empty"), "{err}");
            let short = production_toml().replace("-0123456789\"", "\"");
            let err = load(&short).unwrap_err();
            assert!(err.contains("at least 16 bytes"), "{err}");
        }
        let err = load(&production_toml().replace("0123456789abcdef-key", "")).unwrap_err();
        assert!(err.contains("cache.key_secret"), "{err}");
        let spaced = production_toml().replace("admin-token-0123456789", "admin token 0123456789");
        assert!(load(&spaced).unwrap_err().contains("security.admin_token"));
    }

    #[test]
    fn replication_settings_are_validated_only_when_enabled_and_name_the_key() {
        let mut s = Settings::for_tests();
        s.providers = vec![];
        let check = |s: &Settings| s.replication.validate().map_err(|e| e.to_string());
        s.replication.store_id = String::new();
        assert!(check(&s).is_ok());
        s.replication.enabled = true;
        s.replication.api_token = Some(Secret::new("t"));
        assert!(check(&s).unwrap_err().contains("replication.store_id"));
        s.replication.store_id = "abc".into();
        assert!(check(&s).is_ok());
        s.replication.api_base_url = "http://api.example.com".into();
        assert!(check(&s).unwrap_err().contains("replication.api_base_url"));
        s.replication.api_base_url = "http://127.0.0.1:9999".into();
        assert!(check(&s).is_ok());
        s.replication.backoff_max_ms = 1;
        assert!(
            check(&s)
                .unwrap_err()
                .contains("replication.backoff_max_ms")
        );
        s.replication.backoff_max_ms = 60_000;
        s.replication.queue_capacity = 0;
        assert!(
            check(&s)
                .unwrap_err()
                .contains("replication.queue_capacity")
        );
    }

    #[test]
    fn test_settings_are_valid_once_a_provider_is_added() {
        let mut s = Settings::for_tests();
        assert!(s.validate().is_err());
        s.providers.push(ProviderSettings {
            name: "p".into(),
            base_url: "http://127.0.0.1:1/v1".into(),
            base_url_env: None,
            api_key_env: None,
            api_key: None,
            models: BTreeMap::from([("m".to_string(), "m".to_string())]),
            apis: crate::provider_api::ProviderApi::default_set(),
            priority: 0,
            weight: 1,
            timeout_ms: 100,
            connect_timeout_ms: 100,
        });
        s.validate().unwrap();
    }
}
