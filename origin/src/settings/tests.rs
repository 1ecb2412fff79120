//! Loading and validating settings: defaults, files, the environment, and what is refused.

use super::*;
use std::io::Write;

pub(super) fn provider_toml() -> &'static str {
    r#"
[[providers]]
name = "mock"
base_url = "http://127.0.0.1:9/v1"
models = { "gpt-4o-mini" = "gpt-4o-mini" }
"#
}

pub(super) fn write_file(contents: &str) -> tempfile_path::TempFile {
    tempfile_path::TempFile::new(contents)
}

/// A tiny temp-file helper (no extra dependency): removed on drop.
mod tempfile_path {
    use super::*;
    pub struct TempFile(pub PathBuf);
    impl TempFile {
        pub fn new(contents: &str) -> TempFile {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = std::env::temp_dir()
                .join(format!("gateway-settings-{}-{n}.toml", std::process::id()));
            let mut f = std::fs::File::create(&path).unwrap();
            f.write_all(contents.as_bytes()).unwrap();
            TempFile(path)
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[test]
fn defaults_with_a_provider_in_dev_mode_load() {
    let file = write_file(&format!("dev_mode = true\n{}", provider_toml()));
    let s = Settings::load(Some(&file.0), &HashMap::new()).unwrap();
    assert_eq!(s.redis.response_timeout_ms, 50);
    assert_eq!(s.providers[0].weight, 1);
    assert_eq!(s.cache_key_secret(), DEV_CACHE_KEY_SECRET.as_bytes());
}

#[test]
fn a_missing_key_secret_outside_dev_mode_stops_start_up() {
    let file = write_file(provider_toml());
    let err = Settings::load(Some(&file.0), &HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("cache.key_secret"), "{err}");
}

#[test]
fn an_unknown_key_stops_start_up_naming_it() {
    let file = write_file(&format!(
        "dev_mode = true\n[redis]\nrespnse_timeout_ms = 5\n{}",
        provider_toml()
    ));
    let err = Settings::load(Some(&file.0), &HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("respnse_timeout_ms"), "{err}");
}

#[test]
fn an_unknown_top_level_key_stops_start_up_naming_it() {
    let file = write_file(&format!("dev_mode = true\nlisten = 1\n{}", provider_toml()));
    let err = Settings::load(Some(&file.0), &HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("listen"), "{err}");
}

#[test]
fn environment_overrides_the_file() {
    let file = write_file(&format!("dev_mode = true\n{}", provider_toml()));
    let env = HashMap::from([
        (
            "GATEWAY__REDIS__RESPONSE_TIMEOUT_MS".to_string(),
            "75".to_string(),
        ),
        (
            "GATEWAY__CACHE__KEY_SECRET".to_string(),
            "hex:00112233445566778899aabbccddeeff".to_string(),
        ),
        ("UNRELATED".to_string(), "x".to_string()),
    ]);
    let s = Settings::load(Some(&file.0), &env).unwrap();
    assert_eq!(s.redis.response_timeout_ms, 75);
    assert_eq!(
        s.cache_key_secret(),
        hex::decode("00112233445566778899aabbccddeeff").unwrap()
    );
}

#[test]
fn an_invalid_value_stops_start_up_naming_it() {
    let file = write_file(&format!(
        "dev_mode = true\n[redis]\nresponse_timeout_ms = 0\n{}",
        provider_toml()
    ));
    let err = Settings::load(Some(&file.0), &HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("redis.response_timeout_ms"), "{err}");
}

#[test]
fn a_provider_key_comes_from_the_named_variable() {
    let toml = format!(
        "dev_mode = true\n{}api_key_env = \"MOCK_KEY\"\n",
        provider_toml()
    );
    let file = write_file(&toml);
    let err = Settings::load(Some(&file.0), &HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("providers[0].api_key_env"), "{err}");
    let env = HashMap::from([("MOCK_KEY".to_string(), "sk-provider".to_string())]);
    let s = Settings::load(Some(&file.0), &env).unwrap();
    assert_eq!(
        s.providers[0].api_key.as_ref().unwrap().expose(),
        "sk-provider"
    );
}

#[test]
fn a_provider_url_can_come_from_the_environment() {
    let toml = format!(
        "dev_mode = true\n{}base_url_env = \"MOCK_URL\"\n",
        provider_toml()
    );
    let file = write_file(&toml);
    let s = Settings::load(Some(&file.0), &HashMap::new()).unwrap();
    assert_eq!(s.providers[0].base_url, "http://127.0.0.1:9/v1");
    let env = HashMap::from([(
        "MOCK_URL".to_string(),
        "http://127.0.0.1:4242/v1".to_string(),
    )]);
    let s = Settings::load(Some(&file.0), &env).unwrap();
    assert_eq!(s.providers[0].base_url, "http://127.0.0.1:4242/v1");
}

#[test]
fn the_dev_config_file_loads() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/dev.toml");
    let env = HashMap::from([
        ("MOCK_PROVIDER_API_KEY".to_string(), "sk-mock".to_string()),
        (
            "FASTLY_API_TOKEN".to_string(),
            "dev-fastly-token".to_string(),
        ),
        (
            "FASTLY_API_URL".to_string(),
            "http://127.0.0.1:9201".to_string(),
        ),
    ]);
    let s = Settings::load(Some(&path), &env).unwrap();
    assert_eq!(s.server.listen, "127.0.0.1:8080");
    assert!(s.replication.enabled);
    assert_eq!(s.replication.api_base_url, "http://127.0.0.1:9201");
    assert_eq!(s.cache_key_secret(), DEV_CACHE_KEY_SECRET.as_bytes());
    // Model names keep their dots and case (config must not read them as key paths).
    assert_eq!(
        s.providers[0]
            .models
            .get("gpt-3.5-turbo-instruct")
            .map(String::as_str),
        Some("gpt-3.5-turbo-instruct")
    );
}

#[test]
fn secrets_never_print() {
    let file = write_file(&format!(
        "dev_mode = true\n[cache]\nkey_secret = \"super-secret-value-123\"\n[security]\nadmin_token = \"tok-123\"\n{}",
        provider_toml()
    ));
    let s = Settings::load(Some(&file.0), &HashMap::new()).unwrap();
    let printed = format!("{s:?}");
    assert!(!printed.contains("super-secret-value-123"));
    assert!(!printed.contains("tok-123"));
    assert!(printed.contains("[redacted]"));
    assert_eq!(Secret::new("x").to_string(), "[redacted]");
}

#[test]
fn replication_takes_its_token_from_the_named_variable_and_never_prints_it() {
    let toml = format!(
        "dev_mode = true\n{}[replication]\nenabled = true\nstore_id = \"kv-store-1\"\n",
        provider_toml()
    );
    let file = write_file(&toml);
    let err = Settings::load(Some(&file.0), &HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("replication.api_token_env"), "{err}");
    let env = HashMap::from([(
        "FASTLY_API_TOKEN".to_string(),
        "fastly-token-123".to_string(),
    )]);
    let s = Settings::load(Some(&file.0), &env).unwrap();
    assert_eq!(s.replication.hourly_request_budget, 900);
    assert_eq!(
        s.replication.api_token.as_ref().unwrap().expose(),
        "fastly-token-123"
    );
    assert!(!format!("{s:?}").contains("fastly-token-123"));
}

#[test]
fn a_cluster_takes_its_seeds_from_a_list_or_one_comma_separated_variable() {
    let file = write_file(&format!(
        "dev_mode = true\n[redis]\nmode = \"cluster\"\ncluster_urls = [\"redis://10.0.0.1:7000\", \"rediss://10.0.0.2:7000\"]\npool = \"deadpool-redis\"\n{}",
        provider_toml()
    ));
    let s = Settings::load(Some(&file.0), &HashMap::new()).unwrap();
    assert_eq!(s.redis.mode, RedisMode::Cluster);
    assert_eq!(s.redis.pool, RedisPool::DeadpoolRedis);
    assert_eq!(s.redis.cluster_urls.len(), 2);
    let env = HashMap::from([
        ("GATEWAY__REDIS__MODE".to_string(), "cluster".to_string()),
        (
            "GATEWAY__REDIS__CLUSTER_URLS".to_string(),
            "redis://a:1, redis://b:2,redis://c:3".to_string(),
        ),
    ]);
    let file = write_file(&format!("dev_mode = true\n{}", provider_toml()));
    let s = Settings::load(Some(&file.0), &env).unwrap();
    let seeds: Vec<&str> = s.redis.cluster_urls.iter().map(|u| u.expose()).collect();
    assert_eq!(seeds, ["redis://a:1", "redis://b:2", "redis://c:3"]);
}

#[test]
fn a_cluster_without_seeds_or_with_a_database_stops_start_up_naming_the_key() {
    let load = |redis: &str| {
        let file = write_file(&format!(
            "dev_mode = true\n[redis]\n{redis}\n{}",
            provider_toml()
        ));
        Settings::load(Some(&file.0), &HashMap::new())
            .unwrap_err()
            .to_string()
    };
    let err = load("mode = \"cluster\"");
    assert!(err.contains("redis.cluster_urls"), "{err}");
    let err = load("mode = \"cluster\"\ncluster_urls = [\"redis://:hunter2@h:1/3\"]");
    assert!(err.contains("redis.cluster_urls[0]"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    let err = load("mode = \"cluster\"\ncluster_urls = [\"http://h:1\"]");
    assert!(err.contains("redis.cluster_urls[0]"), "{err}");
    let err = load("mode = \"sharded\"");
    assert!(err.contains("mode"), "{err}");
    let err = load("pool = \"bb8\"");
    assert!(err.contains("pool"), "{err}");
}
