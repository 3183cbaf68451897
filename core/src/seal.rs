//! AES-256-GCM sealing of tokens at rest.
//!
//! A sealed value is `version (1) || nonce (12) || ciphertext || tag (16)`.
//! The associated data binds it to its provider, user, field and key id, so a
//! ciphertext copied to another row or column, or relabelled with another key,
//! fails to open instead of yielding somebody else's token.

//!
//! Only hosts seal and open: the component asks them through the WIT
//! `sealing` interface and never holds a key.

pub use crate::model::Field;
use crate::model::{SealedRow, SealingError, TokenRecord, TokenSet};
use crate::refresh::is_plain_name;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use secrecy::{ExposeSecret, SecretSlice, SecretString};
use thiserror::Error;

/// A data-encryption key, kept secret in memory.
pub type Key = SecretSlice<u8>;

const VERSION: u8 = 1;
/// Bytes of the nonce; callers draw it fresh from a CSPRNG for every seal.
pub const NONCE_LEN: usize = 12;
/// Bytes of an AES-256 key.
pub const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;

impl Field {
    fn label(self) -> &'static [u8] {
        match self {
            Field::AccessToken => b"access_token",
            Field::RefreshToken => b"refresh_token",
        }
    }
}

/// Where a sealed value belongs: the associated data of the AEAD.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    pub provider: &'a str,
    pub user_id: &'a str,
    pub field: Field,
    pub key_id: &'a str,
}

impl Binding<'_> {
    fn associated_data(&self) -> Vec<u8> {
        let mut aad = b"tokenkeep/v1\0".to_vec();
        for part in [
            self.provider.as_bytes(),
            self.user_id.as_bytes(),
            self.field.label(),
            self.key_id.as_bytes(),
        ] {
            // Length prefixes keep ("ab","c") and ("a","bc") apart.
            aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
            aad.extend_from_slice(part);
        }
        aad
    }
}

/// Why a sealed value did not open. Says nothing about the plaintext.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SealError {
    #[error("key must be {KEY_LEN} bytes")]
    BadKey,
    #[error("sealed value is malformed")]
    Malformed,
    #[error("sealed value failed authentication (tampered, moved, or wrong key)")]
    Authentication,
    #[error("sealed value is not UTF-8")]
    NotUtf8,
}

/// Seals `plaintext` for `binding` under `key` with the given fresh nonce.
pub fn seal(
    key: &[u8],
    nonce: [u8; NONCE_LEN],
    binding: &Binding<'_>,
    plaintext: &SecretString,
) -> Result<Vec<u8>, SealError> {
    let cipher = Aes256Gcm::new_from_slice(key).map_err(|_| SealError::BadKey)?;
    let aad = binding.associated_data();
    let ct = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext.expose_secret().as_bytes(),
                aad: &aad,
            },
        )
        .map_err(|_| SealError::BadKey)?;
    let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
    out.push(VERSION);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Opens a value sealed by [`seal`] for the same binding.
pub fn open(key: &[u8], binding: &Binding<'_>, sealed: &[u8]) -> Result<SecretString, SealError> {
    let cipher = Aes256Gcm::new_from_slice(key).map_err(|_| SealError::BadKey)?;
    if sealed.len() < 1 + NONCE_LEN + TAG_LEN || sealed[0] != VERSION {
        return Err(SealError::Malformed);
    }
    let (nonce, ct) = sealed[1..].split_at(NONCE_LEN);
    let aad = binding.associated_data();
    let plain = cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: &aad })
        .map_err(|_| SealError::Authentication)?;
    String::from_utf8(plain)
        .map(SecretString::from)
        .map_err(|_| SealError::NotUtf8)
}

/// Opens one field of a row with the key its row names (`None`: the key is
/// not in the keyring). Anything but an intact value, sealed for exactly this
/// provider, user, field and key, is an error that quotes no stored bytes.
pub fn open_field(
    key: Option<&Key>,
    binding: &Binding<'_>,
    sealed: &[u8],
) -> Result<SecretString, SealingError> {
    let key = key.ok_or_else(|| {
        // The key id comes from the row, which anyone with database access
        // can write: quoted only when it looks like a key id.
        SealingError::UnknownKey(if is_plain_name(binding.key_id) {
            format!("key {} is not in the keyring", binding.key_id)
        } else {
            "the row names a key id that is not in the keyring".into()
        })
    })?;
    open(key.expose_secret(), binding, sealed)
        .map_err(|e| SealingError::Undecryptable(format!("{:?}: {e}", binding.field)))
}

/// Opens both tokens of a stored row (key rotation, the fuzz target).
pub fn open_sealed_row(row: &SealedRow, key: Option<&Key>) -> Result<TokenRecord, SealingError> {
    let open = |field, sealed: &[u8]| {
        let binding = Binding {
            provider: &row.provider,
            user_id: &row.user_id,
            field,
            key_id: &row.key_id,
        };
        open_field(key, &binding, sealed)
    };
    Ok(TokenRecord {
        provider: row.provider.clone(),
        user_id: row.user_id.clone(),
        tokens: TokenSet {
            access_token: open(Field::AccessToken, &row.access_token)?,
            refresh_token: row
                .refresh_token
                .as_deref()
                .map(|s| open(Field::RefreshToken, s))
                .transpose()?,
            access_token_expires_at: row.access_token_expires_at,
            refresh_token_expires_at: row.refresh_token_expires_at,
            scopes: row.scopes.clone(),
        },
        obtained_at: row.obtained_at,
        generation: row.generation,
        health: row.health.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7; 32];

    fn binding<'a>(user: &'a str, field: Field) -> Binding<'a> {
        Binding {
            provider: "github",
            user_id: user,
            field,
            key_id: "k1",
        }
    }

    #[test]
    fn round_trip() {
        let b = binding("alice", Field::AccessToken);
        let sealed = seal(&KEY, [1; 12], &b, &"gho_secret".into()).unwrap();
        assert_eq!(
            open(&KEY, &b, &sealed).unwrap().expose_secret(),
            "gho_secret"
        );
        assert!(!sealed.windows(10).any(|w| w == b"gho_secret"));
    }

    #[test]
    fn a_ciphertext_moved_to_another_row_or_field_fails() {
        let sealed = seal(
            &KEY,
            [1; 12],
            &binding("alice", Field::AccessToken),
            &"t".into(),
        )
        .unwrap();
        assert_eq!(
            open(&KEY, &binding("bob", Field::AccessToken), &sealed).unwrap_err(),
            SealError::Authentication
        );
        assert_eq!(
            open(&KEY, &binding("alice", Field::RefreshToken), &sealed).unwrap_err(),
            SealError::Authentication
        );
        let relabelled = Binding {
            key_id: "k2",
            ..binding("alice", Field::AccessToken)
        };
        assert_eq!(
            open(&KEY, &relabelled, &sealed).unwrap_err(),
            SealError::Authentication
        );
    }

    #[test]
    fn tampering_and_wrong_keys_fail() {
        let b = binding("alice", Field::AccessToken);
        let mut sealed = seal(&KEY, [1; 12], &b, &"token".into()).unwrap();
        assert_eq!(
            open(&[8; 32], &b, &sealed).unwrap_err(),
            SealError::Authentication
        );
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert_eq!(
            open(&KEY, &b, &sealed).unwrap_err(),
            SealError::Authentication
        );
        assert_eq!(
            open(&KEY, &b, &sealed[..5]).unwrap_err(),
            SealError::Malformed
        );
        assert_eq!(
            open(&KEY[..16], &b, &sealed).unwrap_err(),
            SealError::BadKey
        );
    }
}
