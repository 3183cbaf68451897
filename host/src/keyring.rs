//! Data-encryption keys: where they come from and which one seals new writes.
//!
//! Keys are `id=base64(32 bytes)` entries, one per line in a key file or
//! comma-separated in `TOKENKEEP_KEYS`; the first entry is the active key,
//! the others still open rows they sealed.

use crate::error::Error;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretSlice, SecretString};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// The keys a host hands the component.
#[derive(Clone)]
pub struct Keyring {
    active: String,
    keys: BTreeMap<String, SecretSlice<u8>>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("active", &self.active)
            .field("ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Keyring {
    /// Parses `id=base64` entries separated by newlines or commas.
    pub fn parse(text: &SecretString) -> Result<Self, Error> {
        let mut active = None;
        let mut keys = BTreeMap::new();
        for entry in text.expose_secret().split(['\n', ',']).map(str::trim) {
            if entry.is_empty() || entry.starts_with('#') {
                continue;
            }
            let (id, b64) = entry
                .split_once('=')
                .ok_or_else(|| Error::Config("key entries must be id=base64".into()))?;
            let id = id.trim();
            if !tokenkeep_core::refresh::is_plain_name(id) {
                return Err(Error::Config(
                    "key ids must be 1-64 characters of [A-Za-z0-9._-]".into(),
                ));
            }
            let bytes = STANDARD
                .decode(b64.trim())
                .map_err(|_| Error::Config(format!("key {id} is not valid base64")))?;
            if bytes.len() != 32 {
                return Err(Error::Config(format!(
                    "key {id} must be 32 bytes, not {}",
                    bytes.len()
                )));
            }
            if keys
                .insert(id.to_string(), SecretSlice::from(bytes))
                .is_some()
            {
                return Err(Error::Config(format!("key {id} is listed twice")));
            }
            active.get_or_insert_with(|| id.to_string());
        }
        let active = active.ok_or_else(|| Error::Config("the keyring holds no key".into()))?;
        Ok(Self { active, keys })
    }

    /// Reads a key file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read key file {}: {e}", path.display())))?;
        Self::parse(&SecretString::from(text))
    }

    /// Creates a key file holding one new random key, readable by its owner only.
    pub fn create(path: &Path) -> Result<Self, Error> {
        let mut bytes = vec![0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let text = SecretString::from(format!("k1={}\n", STANDARD.encode(&bytes)));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::Config(format!("cannot create {}: {e}", dir.display())))?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(|e| {
            Error::Config(format!("cannot create key file {}: {e}", path.display()))
        })?;
        file.write_all(text.expose_secret().as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::Config(format!("cannot write key file {}: {e}", path.display())))?;
        Self::parse(&text)
    }

    /// The id new writes are sealed with.
    pub fn active_id(&self) -> &str {
        &self.active
    }

    /// A key by id.
    pub fn key(&self, id: &str) -> Option<&SecretSlice<u8>> {
        self.keys.get(id)
    }

    /// All key ids, the active one included.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_key_is_active_and_debug_shows_no_bytes() {
        let a = STANDARD.encode([1u8; 32]);
        let b = STANDARD.encode([2u8; 32]);
        let ring = Keyring::parse(&SecretString::from(format!("new={a}\nold={b}\n"))).unwrap();
        assert_eq!(ring.active_id(), "new");
        assert_eq!(ring.key("old").unwrap().expose_secret(), &[2u8; 32]);
        let debug = format!("{ring:?}");
        assert!(!debug.contains(&a) && !debug.contains(&b), "{debug}");
    }

    #[test]
    fn short_keys_are_refused() {
        let short = STANDARD.encode([1u8; 16]);
        assert!(Keyring::parse(&SecretString::from(format!("k={short}"))).is_err());
    }
}
