//! What one region tells another about a purge it accepted: the body of `POST
//! /internal/region/purge`. A key purge names the key; a tenant purge carries the tenant's new
//! purge generation as a value, which the receiver applies as max(its own, this), so regions
//! converge whatever the order or the number of deliveries.

use gateway_common::key::validate_tenant_id;
use serde::{Deserialize, Serialize};

use crate::settings::valid_region_name;

/// One forwarded purge. Exactly one of `key` and `generation` is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerPurge {
    /// The region that accepted the purge.
    pub from: String,
    pub tenant: String,
    /// The purged key's hex (64 digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The tenant's purge generation after the purge, in the accepting region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

/// What a valid forward asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asked<'a> {
    Key(&'a str),
    Generation(u64),
}

impl PeerPurge {
    pub fn key(from: &str, tenant: &str, hex: &str) -> PeerPurge {
        PeerPurge {
            from: from.to_owned(),
            tenant: tenant.to_owned(),
            key: Some(hex.to_owned()),
            generation: None,
        }
    }

    pub fn generation(from: &str, tenant: &str, generation: u64) -> PeerPurge {
        PeerPurge {
            from: from.to_owned(),
            tenant: tenant.to_owned(),
            key: None,
            generation: Some(generation),
        }
    }

    /// What it asks for, or why it is not a valid forward (the message names the field).
    pub fn asked(&self) -> Result<Asked<'_>, String> {
        if !valid_region_name(&self.from) {
            return Err("from: not a region name".into());
        }
        validate_tenant_id(&self.tenant).map_err(|_| "tenant: not a tenant id".to_string())?;
        match (&self.key, self.generation) {
            (Some(hex), None) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Ok(Asked::Key(hex))
            }
            (Some(_), None) => Err("key: must be 64 hex digits".into()),
            (None, Some(generation)) => Ok(Asked::Generation(generation)),
            _ => Err("exactly one of key and generation must be set".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forward_round_trips_through_json_and_says_what_it_asks() {
        let hex = "ab".repeat(32);
        let key = PeerPurge::key("us", "acme", &hex);
        let json = serde_json::to_string(&key).unwrap();
        assert_eq!(
            json,
            format!(r#"{{"from":"us","tenant":"acme","key":"{hex}"}}"#)
        );
        let back: PeerPurge = serde_json::from_str(&json).unwrap();
        assert_eq!(back.asked(), Ok(Asked::Key(&hex)));
        let generation = PeerPurge::generation("us", "acme", 7);
        assert_eq!(generation.asked(), Ok(Asked::Generation(7)));
    }

    #[test]
    fn a_malformed_forward_is_refused_naming_the_field() {
        let mut both = PeerPurge::generation("us", "acme", 7);
        both.key = Some("ab".repeat(32));
        assert!(both.asked().unwrap_err().contains("exactly one"));
        assert!(
            PeerPurge::key("us", "acme", "xyz")
                .asked()
                .unwrap_err()
                .starts_with("key")
        );
        assert!(
            PeerPurge::generation("US", "acme", 1)
                .asked()
                .unwrap_err()
                .starts_with("from")
        );
        assert!(
            PeerPurge::generation("us", "Acme Corp", 1)
                .asked()
                .unwrap_err()
                .starts_with("tenant")
        );
        assert!(serde_json::from_str::<PeerPurge>(r#"{"from":"us","tenant":"a","x":1}"#).is_err());
    }
}
