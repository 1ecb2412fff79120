//! The settings file an origin replica process starts with, built key by key so a test can
//! change one setting, or add one this harness has never heard of, without rewriting the rest.
//! It renders TOML and checks nothing: the origin's own loader refuses what it does not know.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Sections of raw TOML values: `section → key → value`, the top level being section `""`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginConfig {
    sections: BTreeMap<String, BTreeMap<String, String>>,
}

impl OriginConfig {
    /// Sets `key` in `[section]` (`""`: the top level) to `value`, a raw TOML value
    /// (`30`, `true`, `"text"`, `{ a = 1 }`), replacing any earlier value.
    pub fn set(&mut self, section: &str, key: &str, value: impl Into<String>) -> &mut Self {
        self.sections
            .entry(section.to_owned())
            .or_default()
            .insert(key.to_owned(), value.into());
        self
    }

    /// Sets `key` in `[section]` to the TOML string `value` (quoted and escaped here).
    pub fn set_str(&mut self, section: &str, key: &str, value: &str) -> &mut Self {
        self.set(section, key, quote(value))
    }

    /// The raw TOML value of `key` in `[section]`, if set.
    pub fn get(&self, section: &str, key: &str) -> Option<&str> {
        self.sections
            .get(section)
            .and_then(|keys| keys.get(key))
            .map(String::as_str)
    }

    /// Removes `key` from `[section]` (the origin's compiled-in default applies again).
    pub fn remove(&mut self, section: &str, key: &str) -> &mut Self {
        if let Some(keys) = self.sections.get_mut(section) {
            keys.remove(key);
        }
        self
    }

    /// The file: top-level keys first (TOML needs them before any table), then each section.
    pub fn render(&self) -> String {
        let mut toml = String::new();
        if let Some(top) = self.sections.get("") {
            for (key, value) in top {
                let _ = writeln!(toml, "{key} = {value}");
            }
        }
        for (section, keys) in self.sections.iter().filter(|(s, _)| !s.is_empty()) {
            let _ = writeln!(toml, "\n[{section}]");
            for (key, value) in keys {
                let _ = writeln!(toml, "{key} = {value}");
            }
        }
        toml
    }
}

/// `value` as a TOML basic string. JSON's string escapes are a subset of TOML's.
pub fn quote(value: &str) -> String {
    serde_json::Value::String(value.to_owned()).to_string()
}

/// A TOML inline table of string pairs, `{ "a" = "b", ... }` (a provider's `models`, say).
pub fn inline_table(pairs: &[(&str, &str)]) -> String {
    let body: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{} = {}", quote(k), quote(v)))
        .collect();
    format!("{{ {} }}", body.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_level_keys_come_before_every_section_and_later_values_win() {
        let mut config = OriginConfig::default();
        config
            .set("replication", "linger_ms", "50")
            .set("", "dev_mode", "true")
            .set_str("redis", "url", "redis://127.0.0.1:1")
            .set("replication", "linger_ms", "60000");
        assert_eq!(
            config.render(),
            "dev_mode = true\n\n[redis]\nurl = \"redis://127.0.0.1:1\"\n\n[replication]\nlinger_ms = 60000\n"
        );
        assert_eq!(config.get("replication", "linger_ms"), Some("60000"));
        config.remove("replication", "linger_ms");
        assert_eq!(config.get("replication", "linger_ms"), None);
    }

    #[test]
    fn strings_are_quoted_and_escaped() {
        assert_eq!(quote(r#"a "b" \c"#), r#""a \"b\" \\c""#);
    }

    #[test]
    fn an_inline_table_quotes_keys_and_values() {
        assert_eq!(
            inline_table(&[("gpt-4o-mini", "gpt-4o-mini")]),
            r#"{ "gpt-4o-mini" = "gpt-4o-mini" }"#
        );
    }
}
