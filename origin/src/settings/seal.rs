//! `[seal]`: the keys the origin seals cache entries with (the current one) and still opens
//! them with (the previous one, during a rotation). Validation only; `crate::seal` uses them.

use gateway_common::seal::{Keyring, SealKey};
use serde::Deserialize;

use super::validate::decode_key_secret;
use super::{Secret, SettingsError, invalid};

/// The seal key id used in `dev_mode` when `seal.current` is not set. It matches the edge's
/// development secret `seal_key_current` (`fastly.toml` `[local_server]`).
pub const DEV_SEAL_KEY_ID: &str = "dev1";

/// The seal secret used in `dev_mode` when `seal.current` is not set (published: dev only).
pub const DEV_SEAL_SECRET: &str = "gateway-dev-seal-secret";

/// Seal secrets shorter than this are refused outside `dev_mode`: 32 random bytes
/// (`hex:` and 64 hex digits) is what the README asks for.
const MIN_SECRET_BYTES: usize = 32;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealSettings {
    /// Seals every entry written. Required outside `dev_mode`; in it, the development key
    /// ([`DEV_SEAL_KEY_ID`]) when unset. Must be a key the edge holds too.
    #[serde(default)]
    pub current: Option<SealKeySettings>,
    /// Opens entries sealed before the last rotation, until they expire; never seals.
    #[serde(default)]
    pub previous: Option<SealKeySettings>,
}

/// One seal key: `GATEWAY__SEAL__CURRENT__ID` and `GATEWAY__SEAL__CURRENT__SECRET`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealKeySettings {
    /// 1..=16 chars of [a-z0-9_-], written in every entry sealed with this key.
    pub id: String,
    /// `hex:` prefix for hex-encoded bytes, otherwise the UTF-8 bytes of the string. At least
    /// 32 bytes outside `dev_mode`.
    pub secret: Secret,
}

impl SealSettings {
    /// The keyring these settings describe (validated: ids, lengths, distinct ids).
    pub fn keyring(&self, dev_mode: bool) -> Result<Keyring, SettingsError> {
        let current = match &self.current {
            Some(key) => key.seal_key("seal.current", dev_mode)?,
            None if dev_mode => SealKey::new(DEV_SEAL_KEY_ID, DEV_SEAL_SECRET.as_bytes())
                .map_err(|e| invalid("seal.current", e.to_string()))?,
            None => {
                return Err(invalid(
                    "seal.current",
                    "required (a key the edge holds too); only dev_mode = true has a built-in one",
                ));
            }
        };
        let previous = self
            .previous
            .as_ref()
            .map(|key| key.seal_key("seal.previous", dev_mode))
            .transpose()?;
        Keyring::new(current, previous).map_err(|e| invalid("seal.previous.id", e.to_string()))
    }
}

impl SealKeySettings {
    fn seal_key(&self, name: &str, dev_mode: bool) -> Result<SealKey, SettingsError> {
        let bytes =
            decode_key_secret(&self.secret).map_err(|r| invalid(format!("{name}.secret"), r))?;
        if bytes.len() < MIN_SECRET_BYTES && !dev_mode {
            return Err(invalid(
                format!("{name}.secret"),
                format!("must be at least {MIN_SECRET_BYTES} bytes (e.g. hex: and 64 hex digits)"),
            ));
        }
        SealKey::new(&self.id, &bytes).map_err(|e| invalid(format!("{name}.id"), e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, secret: &str) -> Option<SealKeySettings> {
        Some(SealKeySettings {
            id: id.into(),
            secret: Secret::new(secret),
        })
    }

    #[test]
    fn dev_mode_alone_has_a_built_in_seal_key() {
        let none = SealSettings::default();
        assert_eq!(none.keyring(true).unwrap().current().id(), DEV_SEAL_KEY_ID);
        let err = none.keyring(false).err().unwrap().to_string();
        assert!(err.contains("seal.current"), "{err}");
    }

    #[test]
    fn production_seal_secrets_are_long_and_key_ids_distinct_and_valid() {
        let long = format!("hex:{}", "ab".repeat(32));
        let ok = SealSettings {
            current: key("k2", &long),
            previous: key("k1", &long),
        };
        let ring = ok.keyring(false).unwrap();
        assert_eq!(ring.current().id(), "k2");
        assert!(ring.get("k1").is_some());
        let short = SealSettings {
            current: key("k2", "short"),
            previous: None,
        };
        let err = short.keyring(false).err().unwrap().to_string();
        assert!(err.contains("seal.current.secret"), "{err}");
        assert!(short.keyring(true).is_ok());
        let same = SealSettings {
            current: key("k1", &long),
            previous: key("k1", &long),
        };
        assert!(same.keyring(false).is_err());
        let bad_id = SealSettings {
            current: key("K 1", &long),
            previous: None,
        };
        let err = bad_id.keyring(false).err().unwrap().to_string();
        assert!(err.contains("seal.current.id"), "{err}");
    }
}
