//! Sender-constrained tokens (DPoP, RFC 9449): a P-256 proof key per token
//! row, made and sealed by the host. Every request the host sends for a
//! DPoP provider's row carries a proof signed with the row's key, so the
//! provider binds the tokens to it: a copied access token (or, for a public
//! client, refresh token) is useless without the key. The component never
//! sees a key. A runtime that asks gets the key with the access token, to
//! sign the proofs of its own API calls.

use crate::client_assertion::SigningKey;
use crate::error::Error;
use crate::keyring::Keyring;
use crate::storage::{SealedProofKey, Store};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use secrecy::{ExposeSecret, SecretSlice, SecretString};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokenkeep_core::model::SealingError;

/// The scheme of a DPoP-bound access token (RFC 9449 section 7.1), as
/// runtimes write it in `Authorization` and providers in `token_type`.
pub const TOKEN_TYPE: &str = "DPoP";

/// Whether a token answer says its token is bound (`token_type` DPoP): a
/// server that ignored the proof issues a bearer token instead.
pub(crate) fn is_bound(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Answer {
        token_type: Option<String>,
    }
    serde_json::from_slice::<Answer>(body)
        .ok()
        .and_then(|a| a.token_type)
        .is_some_and(|t| t.eq_ignore_ascii_case(TOKEN_TYPE))
}

/// What a proof key is sealed as (see [`Keyring::seal_host_secret`]).
const LABEL_PREFIX: &str = "tokenkeep/dpop-key/";

/// A row's proof key (ES256). Debug shows its thumbprint only.
pub struct ProofKey {
    signing: SigningKey,
    /// PKCS#8, for sealing and for the private JWK.
    pkcs8: SecretSlice<u8>,
}

impl std::fmt::Debug for ProofKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProofKey")
            .field("thumbprint", &self.thumbprint())
            .finish_non_exhaustive()
    }
}

impl ProofKey {
    /// A new key from the system's generator.
    pub fn generate() -> Result<Self, String> {
        let rng = ring::rand::SystemRandom::new();
        let der = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| "no system randomness for a proof key".to_string())?;
        Self::from_pkcs8(der.as_ref())
    }

    /// A key in ring's P-256 PKCS#8 layout, the only one made or stored
    /// here: [`ProofKey::private_jwk`] reads the scalar from its place.
    fn from_pkcs8(der: &[u8]) -> Result<Self, String> {
        if der.len() != PKCS8_LEN || !der.starts_with(&PKCS8_HEAD) {
            return Err("the proof key is not a P-256 PKCS#8 document of ring's".into());
        }
        Ok(Self {
            signing: SigningKey::from_pkcs8(der, None)?,
            pkcs8: SecretSlice::from(der.to_vec()),
        })
    }

    /// A key from the private JWK that [`ProofKey::private_jwk`] gave a
    /// runtime: how a Rust runtime signs its own proofs.
    pub fn from_jwk(jwk: &SecretString) -> Result<Self, String> {
        let bad = || "not a P-256 private JWK".to_string();
        let v: serde_json::Value = serde_json::from_str(jwk.expose_secret()).map_err(|_| bad())?;
        if v["kty"] != "EC" || v["crv"] != "P-256" {
            return Err(bad());
        }
        let part = |name: &str| {
            v[name]
                .as_str()
                .and_then(|s| URL_SAFE_NO_PAD.decode(s).ok())
                .filter(|b| b.len() == 32)
                .ok_or_else(bad)
        };
        let d = zeroize::Zeroizing::new(part("d")?);
        let mut point = vec![0x04];
        point.extend(part("x")?);
        point.extend(part("y")?);
        let rng = ring::rand::SystemRandom::new();
        EcdsaKeyPair::from_private_key_and_public_key(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &d,
            &point,
            &rng,
        )
        .map_err(|_| bad())?;
        // ring takes PKCS#8 to keep: the same document it makes.
        let mut der = zeroize::Zeroizing::new(PKCS8_HEAD.to_vec());
        der.extend_from_slice(&d);
        der.extend_from_slice(&PKCS8_MID);
        der.extend_from_slice(&point);
        Self::from_pkcs8(&der)
    }

    /// The public key as a JWK with only its required members (RFC 7638),
    /// as the proof's header carries it.
    pub fn public_jwk(&self) -> serde_json::Value {
        let (x, y) = self.coordinates();
        serde_json::json!({ "crv": "P-256", "kty": "EC", "x": x, "y": y })
    }

    /// The private key as a JWK, for a runtime that signs its own proofs.
    pub fn private_jwk(&self) -> Result<SecretString, String> {
        // Checked when the key was made or opened.
        let d = &self.pkcs8.expose_secret()[PKCS8_HEAD.len()..PKCS8_HEAD.len() + 32];
        let mut jwk = self.public_jwk();
        jwk["d"] = URL_SAFE_NO_PAD.encode(d).into();
        jwk["alg"] = "ES256".into();
        Ok(SecretString::from(jwk.to_string()))
    }

    /// The key's JWK thumbprint (RFC 7638): what a provider binds tokens to
    /// (`cnf.jkt`).
    pub fn thumbprint(&self) -> String {
        // Required members in lexicographic order, no whitespace.
        let (x, y) = self.coordinates();
        let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        URL_SAFE_NO_PAD.encode(ring::digest::digest(
            &ring::digest::SHA256,
            canonical.as_bytes(),
        ))
    }

    fn coordinates(&self) -> (String, String) {
        let point = self.signing.public_point();
        (
            URL_SAFE_NO_PAD.encode(&point[1..33]),
            URL_SAFE_NO_PAD.encode(&point[33..65]),
        )
    }

    /// A proof for one request (RFC 9449 section 4.2): `method` at `url`
    /// (its query and fragment are not part of `htu`), with the server's
    /// nonce when it gave one, and `ath` when the request carries an access
    /// token.
    pub fn proof(
        &self,
        method: &str,
        url: &str,
        access_token: Option<&SecretString>,
        nonce: Option<&str>,
    ) -> Result<String, String> {
        let mut htu =
            url::Url::parse(url).map_err(|_| "the proof's URL is not a URL".to_string())?;
        htu.set_query(None);
        htu.set_fragment(None);
        // What the request line and Host carry: never user info.
        let _ = htu.set_username("");
        let _ = htu.set_password(None);
        let (now, jti) = self.signing.issued()?;
        let mut claims = serde_json::json!({
            "jti": jti,
            "htm": method,
            "htu": htu.as_str(),
            "iat": now,
        });
        if let Some(nonce) = nonce {
            claims["nonce"] = nonce.into();
        }
        if let Some(token) = access_token {
            claims["ath"] = URL_SAFE_NO_PAD
                .encode(ring::digest::digest(
                    &ring::digest::SHA256,
                    token.expose_secret().as_bytes(),
                ))
                .into();
        }
        self.signing.sign(
            "dpop+jwt",
            serde_json::json!({ "jwk": self.public_jwk() }),
            &claims,
        )
    }

    /// Sealed for the row (provider, user id) under the active key.
    pub(crate) fn seal(
        &self,
        keyring: &Keyring,
        provider: &str,
        user_id: &str,
    ) -> Result<SealedProofKey, SealingError> {
        let plain = SecretString::from(STANDARD.encode(self.pkcs8.expose_secret()));
        let (key_id, sealed) = keyring.seal_host_secret(&label(provider), user_id, &plain)?;
        Ok(SealedProofKey {
            provider: provider.to_string(),
            user_id: user_id.to_string(),
            key_id,
            sealed,
        })
    }

    /// Opens a sealed key; it opens only for the row it was sealed for.
    pub(crate) fn open(keyring: &Keyring, s: &SealedProofKey) -> Result<Self, SealingError> {
        let plain =
            keyring.open_host_secret(&label(&s.provider), &s.user_id, &s.key_id, &s.sealed)?;
        let der = zeroize::Zeroizing::new(
            STANDARD
                .decode(plain.expose_secret())
                .map_err(|_| SealingError::Undecryptable("the proof key is not PKCS#8".into()))?,
        );
        Self::from_pkcs8(&der).map_err(SealingError::Undecryptable)
    }
}

/// The PKCS#8 document ring reads for a P-256 key, around the private
/// scalar (after [`PKCS8_HEAD`]) and the public point (after [`PKCS8_MID`]).
const PKCS8_HEAD: [u8; 36] = [
    0x30, 0x81, 0x87, 0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02,
    0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x04, 0x6d, 0x30, 0x6b, 0x02,
    0x01, 0x01, 0x04, 0x20,
];
const PKCS8_MID: [u8; 5] = [0xa1, 0x44, 0x03, 0x42, 0x00];
const PKCS8_LEN: usize = PKCS8_HEAD.len() + 32 + PKCS8_MID.len() + 65;

fn label(provider: &str) -> String {
    format!("{LABEL_PREFIX}{provider}")
}

/// A key as stored (its ciphertext) and opened.
type Opened = (Vec<u8>, Arc<ProofKey>);

/// The proof keys this process has opened, and the newest nonce each
/// provider gave (RFC 9449 section 8). A key is read from the database
/// each time it is used (it goes with the row, and a deleted row's key is
/// deleted); the one opened before is reused while the stored ciphertext
/// is the same.
#[derive(Debug, Default)]
pub struct ProofKeys {
    keys: Mutex<HashMap<(String, String), Opened>>,
    nonces: Mutex<HashMap<String, String>>,
}

impl ProofKeys {
    /// The row's key; none when the row has none.
    pub(crate) async fn find(
        &self,
        store: &Store,
        keyring: &Keyring,
        provider: &str,
        user_id: &str,
    ) -> Result<Option<Arc<ProofKey>>, Error> {
        let Some(sealed) = store.proof_key(provider, user_id).await? else {
            return Ok(None);
        };
        self.open(keyring, &sealed).map(Some)
    }

    /// The row's key, made and stored first when it has none (the first
    /// host to store one wins; the others use it). Not under a row's lock:
    /// on SQLite the store's write would wait for that very lock.
    pub(crate) async fn get_or_make(
        &self,
        store: &Store,
        keyring: &Keyring,
        provider: &str,
        user_id: &str,
    ) -> Result<Arc<ProofKey>, Error> {
        if let Some(key) = self.find(store, keyring, provider, user_id).await? {
            return Ok(key);
        }
        tokenkeep_core::refresh::check_user_id(user_id)
            .map_err(|e| Error::from_refresh(e, provider, user_id))?;
        let sealed = ProofKey::generate()
            .map_err(Error::Config)?
            .seal(keyring, provider, user_id)
            .map_err(|e| Error::from_refresh(e.into(), provider, user_id))?;
        let stored = store.put_proof_key(&sealed).await?;
        self.open(keyring, &stored)
    }

    fn open(&self, keyring: &Keyring, sealed: &SealedProofKey) -> Result<Arc<ProofKey>, Error> {
        let row = (sealed.provider.clone(), sealed.user_id.clone());
        if let Ok(keys) = self.keys.lock()
            && let Some((ciphertext, key)) = keys.get(&row)
            && *ciphertext == sealed.sealed
        {
            return Ok(key.clone());
        }
        let key = Arc::new(
            ProofKey::open(keyring, sealed)
                .map_err(|e| Error::from_refresh(e.into(), &sealed.provider, &sealed.user_id))?,
        );
        if let Ok(mut keys) = self.keys.lock() {
            keys.insert(row, (sealed.sealed.clone(), key.clone()));
        }
        Ok(key)
    }

    /// The nonce to put in the next proof for `provider`'s server.
    pub(crate) fn nonce(&self, provider: &str) -> Option<String> {
        self.nonces.lock().ok()?.get(provider).cloned()
    }

    /// A `DPoP-Nonce` the provider's server sent.
    pub(crate) fn set_nonce(&self, provider: &str, nonce: &str) {
        if let Ok(mut nonces) = self.nonces.lock() {
            nonces.insert(provider.to_string(), nonce.to_string());
        }
    }
}

/// An access token bound to a proof key, with the key: a runtime signs a
/// proof with it for each request it makes with the token.
#[derive(Debug)]
pub struct BoundGrant {
    pub grant: crate::AccessGrant,
    pub proof_key: Arc<ProofKey>,
}

impl BoundGrant {
    /// [`crate::keeper::grant_json`] with the token's type and the private
    /// proof key (a JWK): a secret as a whole.
    pub fn json(&self) -> Result<serde_json::Value, Error> {
        let mut v = crate::keeper::grant_json(&self.grant);
        let jwk = self.proof_key.private_jwk().map_err(Error::Config)?;
        v["token_type"] = TOKEN_TYPE.into();
        v["dpop_jwk"] = serde_json::from_str(jwk.expose_secret())
            .map_err(|_| Error::Config("the proof key's JWK is not JSON".into()))?;
        Ok(v)
    }
}

impl crate::Keeper {
    /// The row's proof key, made first when it has none, for a provider
    /// that binds tokens (`dpop = true`).
    pub(crate) async fn proof_key(
        &self,
        provider: &str,
        user_id: &str,
    ) -> Result<Arc<ProofKey>, Error> {
        self.proof_keys()
            .get_or_make(self.store(), self.keyring(), provider, user_id)
            .await
    }

    /// The proof key for requests about the row, when its provider binds
    /// tokens: made before the request that needs it.
    pub(crate) async fn proof_key_for(
        &self,
        p: &crate::config::Provider,
        user_id: &str,
    ) -> Result<Option<Arc<ProofKey>>, Error> {
        if p.dpop {
            self.proof_key(&p.name, user_id).await.map(Some)
        } else {
            Ok(None)
        }
    }

    /// Before a call that may refresh these rows: the proof keys of those
    /// whose provider binds tokens, made now, outside any row's lock (the
    /// refresh only reads them). Only for rows that exist: no key is made
    /// for a user nobody stored. A failure here is logged, not returned: a
    /// valid token is still served, and a refresh without a key is refused
    /// as that row's error.
    pub(crate) async fn prepare_proof_keys(&self, rows: &[(&str, &str)]) {
        let config = self.config();
        for &(provider, user_id) in rows {
            if !config.providers.get(provider).is_some_and(|p| p.dpop) {
                continue;
            }
            let made = async {
                let (store, keyring) = (self.store(), self.keyring());
                if self
                    .proof_keys()
                    .find(store, keyring, provider, user_id)
                    .await?
                    .is_none()
                    && store.read(provider, user_id).await?.row.is_some()
                {
                    self.proof_key(provider, user_id).await?;
                }
                Ok::<_, Error>(())
            };
            if let Err(e) = made.await {
                tracing::warn!(provider = %provider, error = %e, "the row's DPoP proof key could not be made");
            }
        }
    }

    /// Key rotation's part for proof keys: each one sealed with an older
    /// key is sealed again under the active one. A key never changes, so
    /// a plain compare-and-set on its key id suffices.
    pub(crate) async fn reseal_proof_keys(&self, batch: u32) -> Result<crate::Rotation, Error> {
        let (store, keyring) = (self.store(), self.keyring());
        let active = keyring.active_id();
        let mut rotation = crate::Rotation::default();
        let mut after = crate::RowKey {
            provider: String::new(),
            user_id: String::new(),
        };
        loop {
            let page = store
                .proof_keys_to_reseal(active, &after, batch.clamp(1, 10_000))
                .await?;
            let Some(last) = page.last() else {
                return Ok(rotation);
            };
            after = crate::RowKey {
                provider: last.provider.clone(),
                user_id: last.user_id.clone(),
            };
            for sealed in &page {
                rotation.examined += 1;
                let again = ProofKey::open(keyring, sealed)
                    .and_then(|key| key.seal(keyring, &sealed.provider, &sealed.user_id));
                match again {
                    Ok(again) => {
                        if store.reseal_proof_key(&sealed.key_id, &again).await? {
                            rotation.resealed += 1;
                        }
                    }
                    Err(_) => rotation
                        .undecryptable
                        .push((sealed.provider.clone(), sealed.user_id.clone())),
                }
            }
        }
    }

    /// [`crate::Keeper::ensure_fresh_for`] for a runtime that presents the
    /// token with DPoP: the token and the row's proof key.
    pub async fn ensure_fresh_bound(
        &self,
        provider: &str,
        user_id: &str,
        min_remaining: u32,
    ) -> Result<BoundGrant, Error> {
        match self.config().providers.get(provider) {
            Some(p) if p.dpop => {}
            Some(_) => {
                return Err(Error::InvalidInput(format!(
                    "provider {provider} does not bind its tokens to a proof key (dpop = true)"
                )));
            }
            None => return Err(Error::UnknownProvider(provider.into())),
        }
        let grant = self
            .ensure_fresh_for(provider, user_id, min_remaining)
            .await?;
        let proof_key = self.proof_key(provider, user_id).await?;
        Ok(BoundGrant { grant, proof_key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(part: &str) -> serde_json::Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    #[test]
    fn a_proof_verifies_with_the_key_in_its_header_and_names_the_request() {
        let key = ProofKey::generate().unwrap();
        let token = SecretString::from("the access token".to_string());
        let proof = key
            .proof(
                "GET",
                "https://api.example/me?x=1#f",
                Some(&token),
                Some("n1"),
            )
            .unwrap();
        let parts: Vec<&str> = proof.split('.').collect();
        let (header, claims) = (decode(parts[0]), decode(parts[1]));
        assert_eq!(header["typ"], "dpop+jwt");
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["jwk"], key.public_jwk());
        assert!(header["jwk"].get("d").is_none());
        assert_eq!(claims["htm"], "GET");
        assert_eq!(claims["htu"], "https://api.example/me");
        assert_eq!(claims["nonce"], "n1");
        let ath = URL_SAFE_NO_PAD.encode(ring::digest::digest(
            &ring::digest::SHA256,
            b"the access token",
        ));
        assert_eq!(claims["ath"], ath);
        let mut point = vec![4];
        point.extend(
            URL_SAFE_NO_PAD
                .decode(header["jwk"]["x"].as_str().unwrap())
                .unwrap(),
        );
        point.extend(
            URL_SAFE_NO_PAD
                .decode(header["jwk"]["y"].as_str().unwrap())
                .unwrap(),
        );
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point)
            .verify(
                format!("{}.{}", parts[0], parts[1]).as_bytes(),
                &URL_SAFE_NO_PAD.decode(parts[2]).unwrap(),
            )
            .unwrap();
    }

    #[test]
    fn the_private_jwk_makes_the_same_key_and_debug_shows_none_of_it() {
        let key = ProofKey::generate().unwrap();
        let jwk = key.private_jwk().unwrap();
        let again = ProofKey::from_jwk(&jwk).unwrap();
        assert_eq!(again.thumbprint(), key.thumbprint());
        assert_eq!(
            again.private_jwk().unwrap().expose_secret(),
            jwk.expose_secret()
        );
        let d: serde_json::Value = serde_json::from_str(jwk.expose_secret()).unwrap();
        let d = d["d"].as_str().unwrap();
        assert!(!format!("{key:?}").contains(d));
        assert!(format!("{key:?}").contains(&key.thumbprint()));
        assert!(ProofKey::from_jwk(&SecretString::from(r#"{"kty":"RSA"}"#.to_string())).is_err());
    }

    #[test]
    fn a_sealed_key_opens_only_for_its_own_row() {
        let keyring = Keyring::parse(&SecretString::from(
            "k1=AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=".to_string(),
        ))
        .unwrap();
        let key = ProofKey::generate().unwrap();
        let sealed = key.seal(&keyring, "acme", "alice").unwrap();
        let opened = ProofKey::open(&keyring, &sealed).unwrap();
        assert_eq!(opened.thumbprint(), key.thumbprint());
        for moved in [
            SealedProofKey {
                user_id: "bob".into(),
                ..sealed.clone()
            },
            SealedProofKey {
                provider: "other".into(),
                ..sealed.clone()
            },
        ] {
            assert!(ProofKey::open(&keyring, &moved).is_err());
        }
        // Not a token row's field either.
        assert!(
            keyring
                .open(
                    "acme",
                    "alice",
                    tokenkeep_core::seal::Field::AccessToken,
                    "k1",
                    &sealed.sealed
                )
                .is_err()
        );
    }
}
