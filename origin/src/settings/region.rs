//! Settings of this origin's region (`[region]`): its name, and the peer regions every purge
//! accepted here is forwarded to (`peers.rs`). Checked with the rest at start-up.

use serde::Deserialize;

use super::validate::check_token;
use super::{Secret, SettingsError, invalid};

/// One region of a multi-region deployment. With no peers this origin is a region of one
/// (the default): nothing is forwarded, and the internal purge route refuses every caller
/// unless `peer_token` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionSettings {
    /// This region's name, as the edge's `regions` item spells it (`us`, `eu`): 1 to 32 of
    /// `[a-z0-9_-]` starting with a letter. Reported in `x-origin-region`, the request log
    /// line and `gateway_region_info`.
    pub name: String,
    /// The secret regions send each other (`Authorization: Bearer` on the internal purge
    /// route). The same in every region; required with peers. Never logged.
    #[serde(default)]
    pub peer_token: Option<Secret>,
    /// The other regions: every purge accepted here is forwarded to each of them.
    #[serde(default)]
    pub peers: Vec<PeerSettings>,
    /// Bound on one forward to a peer, connection included.
    pub peer_timeout_ms: u64,
    /// A forward a peer did not take is tried again after this long (by any replica of this
    /// region: the outbox is in Redis).
    pub peer_retry_ms: u64,
    /// Forwards one peer's outbox may hold; past it a purge is refused (503), never accepted
    /// and then lost.
    pub peer_outbox_capacity: usize,
}

/// A peer region.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSettings {
    /// Its `region.name`.
    pub name: String,
    /// Its origin's base URL (`https://eu.origin.example.com`; plain `http` only for a
    /// loopback host), where `POST /internal/region/purge` is.
    pub url: String,
}

/// 1 to 32 of `[a-z0-9_-]` starting with a lowercase letter: the edge's rule too, so a name
/// fits a backend name (`origin_<name>`), a header value and a metric label.
pub fn valid_region_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= 32
        && bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

impl RegionSettings {
    pub(super) fn validate(&self, dev_mode: bool) -> Result<(), SettingsError> {
        if !valid_region_name(&self.name) {
            return Err(invalid(
                "region.name",
                "must be 1 to 32 of [a-z0-9_-], starting with a letter",
            ));
        }
        if let Some(token) = &self.peer_token {
            check_token("region.peer_token", token, dev_mode)?;
        }
        if self.peers.is_empty() {
            return Ok(());
        }
        if self.peer_token.is_none() {
            return Err(invalid(
                "region.peer_token",
                "is required when region.peers is not empty",
            ));
        }
        for (key, value) in [
            ("region.peer_timeout_ms", self.peer_timeout_ms),
            ("region.peer_retry_ms", self.peer_retry_ms),
            (
                "region.peer_outbox_capacity",
                self.peer_outbox_capacity as u64,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, peer) in self.peers.iter().enumerate() {
            let key = |field: &str| format!("region.peers[{i}].{field}");
            if !valid_region_name(&peer.name) {
                return Err(invalid(
                    key("name"),
                    "must be 1 to 32 of [a-z0-9_-], starting with a letter",
                ));
            }
            if peer.name == self.name {
                return Err(invalid(key("name"), "is this region's own name"));
            }
            if !names.insert(peer.name.as_str()) {
                return Err(invalid(key("name"), "names a peer twice"));
            }
            match reqwest::Url::parse(&peer.url) {
                Ok(url) if url.scheme() == "https" => {}
                Ok(url)
                    if url.scheme() == "http"
                        && matches!(url.host_str(), Some("127.0.0.1" | "localhost" | "[::1]")) => {}
                Ok(_) => {
                    return Err(invalid(
                        key("url"),
                        "must be https (plain http only for a loopback host): it carries the peer token",
                    ));
                }
                Err(e) => return Err(invalid(key("url"), e.to_string())),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> RegionSettings {
        RegionSettings {
            name: "us".into(),
            peer_token: Some(Secret::new("a-peer-token-of-32-bytes-0123456")),
            peers: vec![PeerSettings {
                name: "eu".into(),
                url: "https://eu.origin.example.com".into(),
            }],
            peer_timeout_ms: 2000,
            peer_retry_ms: 1000,
            peer_outbox_capacity: 100,
        }
    }

    fn error(s: &RegionSettings) -> String {
        s.validate(false).unwrap_err().to_string()
    }

    #[test]
    fn a_region_with_https_peers_and_a_token_is_valid() {
        assert!(settings().validate(false).is_ok());
    }

    #[test]
    fn each_mistake_names_its_key() {
        let mut s = settings();
        s.name = "US East".into();
        assert!(error(&s).contains("region.name"));

        let mut s = settings();
        s.peer_token = None;
        assert!(error(&s).contains("region.peer_token"));

        let mut s = settings();
        s.peer_token = Some(Secret::new("short"));
        assert!(error(&s).contains("region.peer_token"));

        let mut s = settings();
        s.peers[0].name = "us".into();
        assert!(error(&s).contains("region.peers[0].name"));

        let mut s = settings();
        s.peers.push(s.peers[0].clone());
        assert!(error(&s).contains("region.peers[1].name"));

        let mut s = settings();
        s.peers[0].url = "http://eu.origin.example.com".into();
        assert!(error(&s).contains("region.peers[0].url"));

        let mut s = settings();
        s.peer_retry_ms = 0;
        assert!(error(&s).contains("region.peer_retry_ms"));
    }

    #[test]
    fn a_region_of_one_needs_no_token_and_loopback_peers_may_be_plain_http() {
        let mut s = settings();
        s.peers.clear();
        s.peer_token = None;
        assert!(s.validate(false).is_ok());
        let mut s = settings();
        s.peers[0].url = "http://127.0.0.1:8082".into();
        assert!(s.validate(false).is_ok());
    }
}
