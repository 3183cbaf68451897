//! Sealing and opening tokens in the host, with the keyring's keys: the
//! component asks by key id (WIT `sealing`) and never holds a key.

use crate::keyring::Keyring;
use rand::RngCore;
use secrecy::SecretString;
use tokenkeep_core::model::{SealedRow, SealedTokens, SealingError, TokenRecord, TokenSet};
use tokenkeep_core::seal::{self, Binding, Field, NONCE_LEN};

impl Keyring {
    /// Seals a row's tokens with the active key, a fresh nonce each.
    pub fn seal_tokens(
        &self,
        provider: &str,
        user_id: &str,
        access_token: &SecretString,
        refresh_token: Option<&SecretString>,
    ) -> Result<SealedTokens, SealingError> {
        let key_id = self.active_id();
        let seal_field = |field, value: &SecretString| {
            self.seal_active(
                &Binding {
                    provider,
                    user_id,
                    field,
                    key_id,
                },
                value,
            )
        };
        Ok(SealedTokens {
            key_id: key_id.to_string(),
            access_token: seal_field(Field::AccessToken, access_token)?,
            refresh_token: refresh_token
                .map(|t| seal_field(Field::RefreshToken, t))
                .transpose()?,
        })
    }

    /// Opens one sealed field of the row (provider, user id).
    pub fn open(
        &self,
        provider: &str,
        user_id: &str,
        field: Field,
        key_id: &str,
        sealed: &[u8],
    ) -> Result<SecretString, SealingError> {
        let binding = Binding {
            provider,
            user_id,
            field,
            key_id,
        };
        seal::open_field(self.key(key_id), &binding, sealed)
    }

    /// Opens both tokens of a stored row.
    pub fn open_row(&self, row: &SealedRow) -> Result<TokenRecord, SealingError> {
        seal::open_sealed_row(row, self.key(&row.key_id))
    }

    /// Seals a secret of the host's own (never a token row's field) under
    /// the active key: `label` names what it is and takes the provider's
    /// place in the associated data. Labels contain '/', which no provider
    /// name does, so no token opens as one of these, nor one as a token.
    pub(crate) fn seal_host_secret(
        &self,
        label: &str,
        user_id: &str,
        plain: &SecretString,
    ) -> Result<(String, Vec<u8>), SealingError> {
        let key_id = self.active_id();
        let sealed = self.seal_active(&host_binding(label, user_id, key_id), plain)?;
        Ok((key_id.to_string(), sealed))
    }

    /// Seals `value` with the active key (the one `binding` names) and a
    /// fresh nonce.
    fn seal_active(
        &self,
        binding: &Binding<'_>,
        value: &SecretString,
    ) -> Result<Vec<u8>, SealingError> {
        let key_id = self.active_id();
        let key = self.key(key_id).ok_or_else(|| {
            SealingError::UnknownKey(format!("active key {key_id} is not in the keyring"))
        })?;
        let mut nonce = [0; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        use secrecy::ExposeSecret;
        seal::seal(key.expose_secret(), nonce, binding, value)
            .map_err(|e| SealingError::Undecryptable(e.to_string()))
    }

    /// Opens what [`Keyring::seal_host_secret`] sealed.
    pub(crate) fn open_host_secret(
        &self,
        label: &str,
        user_id: &str,
        key_id: &str,
        sealed: &[u8],
    ) -> Result<SecretString, SealingError> {
        seal::open_field(
            self.key(key_id),
            &host_binding(label, user_id, key_id),
            sealed,
        )
    }

    /// `row` with its tokens sealed again under the active key.
    pub fn reseal_row(&self, row: &SealedRow) -> Result<SealedRow, SealingError> {
        let TokenRecord {
            tokens:
                TokenSet {
                    access_token,
                    refresh_token,
                    ..
                },
            ..
        } = self.open_row(row)?;
        let sealed = self.seal_tokens(
            &row.provider,
            &row.user_id,
            &access_token,
            refresh_token.as_ref(),
        )?;
        Ok(SealedRow {
            key_id: sealed.key_id,
            access_token: sealed.access_token,
            refresh_token: sealed.refresh_token,
            ..row.clone()
        })
    }
}

/// The associated data of a host secret: `label` in the provider's place.
fn host_binding<'a>(label: &'a str, user_id: &'a str, key_id: &'a str) -> Binding<'a> {
    debug_assert!(label.contains('/'));
    Binding {
        provider: label,
        user_id,
        field: Field::AccessToken,
        key_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn keyring() -> Keyring {
        Keyring::parse(&SecretString::from(
            "k2=AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=\nk1=AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=".to_string(),
        ))
        .unwrap()
    }

    #[test]
    fn a_sealed_field_opens_only_for_its_own_row_and_field() {
        let ring = keyring();
        let sealed = ring
            .seal_tokens(
                "github",
                "alice",
                &"at".to_string().into(),
                Some(&"rt".to_string().into()),
            )
            .unwrap();
        assert_eq!(sealed.key_id, "k2");
        let open = |user, field, bytes: &[u8]| ring.open("github", user, field, "k2", bytes);
        assert_eq!(
            open("alice", Field::AccessToken, &sealed.access_token)
                .unwrap()
                .expose_secret(),
            "at"
        );
        let refresh = sealed.refresh_token.as_deref().unwrap();
        assert!(open("bob", Field::RefreshToken, refresh).is_err());
        assert!(open("alice", Field::AccessToken, refresh).is_err());
        assert!(matches!(
            ring.open(
                "github",
                "alice",
                Field::AccessToken,
                "k9",
                &sealed.access_token
            ),
            Err(SealingError::UnknownKey(_))
        ));
    }
}
