//! `private_key_jwt` client authentication (RFC 7523 section 2.2, OpenID
//! Connect Core section 9): a short-lived JWT signed with a P-256 key that
//! only the host holds. The component never sees the key or the assertion.

use base64::Engine as _;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use secrecy::SecretString;
use std::path::Path;

/// How long an assertion is good for: one request.
const ASSERTION_SECONDS: u64 = 60;

/// A client's signing key (ES256). Debug shows the key id only.
pub struct SigningKey {
    pair: EcdsaKeyPair,
    key_id: Option<String>,
    rng: ring::rand::SystemRandom,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Reads a PKCS#8 PEM P-256 private key. Errors name the file, never
    /// its content.
    pub fn load(path: &Path, key_id: Option<String>) -> Result<Self, String> {
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_file(path).map_err(|_| {
            format!(
                "private_key_file {} is not a PKCS#8 PEM private key",
                path.display()
            )
        })?;
        Self::from_pkcs8(der.secret_pkcs8_der(), key_id)
            .map_err(|why| format!("private_key_file {}: {why}", path.display()))
    }

    /// A key from PKCS#8 DER.
    pub fn from_pkcs8(der: &[u8], key_id: Option<String>) -> Result<Self, String> {
        let rng = ring::rand::SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
            .map_err(|_| "not a P-256 (ES256) key".to_string())?;
        Ok(Self { pair, key_id, rng })
    }

    /// The public key as a JWK, for registering the client.
    pub fn public_jwk(&self) -> serde_json::Value {
        // Uncompressed point: 0x04, x, y.
        let point = self.pair.public_key().as_ref();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let mut jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig",
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        });
        if let Some(kid) = &self.key_id {
            jwk["kid"] = kid.clone().into();
        }
        jwk
    }

    /// The public key as an uncompressed point: 0x04, x, y.
    pub(crate) fn public_point(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    /// Signs a JWS over `claims` with this key (ES256, compact form).
    pub(crate) fn sign(
        &self,
        typ: &str,
        extra_header: serde_json::Value,
        claims: &serde_json::Value,
    ) -> Result<String, String> {
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let mut header = serde_json::json!({ "alg": "ES256", "typ": typ });
        if let Some(kid) = &self.key_id {
            header["kid"] = kid.clone().into();
        }
        if let (Some(h), serde_json::Value::Object(extra)) = (header.as_object_mut(), extra_header)
        {
            h.extend(extra);
        }
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = self
            .pair
            .sign(&self.rng, input.as_bytes())
            .map_err(|_| format!("the {typ} could not be signed"))?;
        Ok(format!("{input}.{}", b64(signature.as_ref())))
    }

    /// What every JWT signed here starts from: `iat` (now, on this
    /// machine's clock, as the server will judge it) and a random `jti`.
    pub(crate) fn issued(&self) -> Result<(u64, String), String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| "the system clock is before 1970".to_string())?
            .as_secs();
        let mut jti = [0u8; 16];
        ring::rand::SecureRandom::fill(&self.rng, &mut jti)
            .map_err(|_| "no system randomness for a JWT".to_string())?;
        Ok((
            now,
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(jti),
        ))
    }

    /// A client assertion for `client_id` at `audience` (the token URL).
    pub fn assertion(&self, client_id: &str, audience: &str) -> Result<SecretString, String> {
        let (now, jti) = self.issued()?;
        let claims = serde_json::json!({
            "iss": client_id,
            "sub": client_id,
            "aud": audience,
            "jti": jti,
            "iat": now,
            "exp": now + ASSERTION_SECONDS,
        });
        self.sign("JWT", serde_json::Value::Null, &claims)
            .map(SecretString::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn an_assertion_verifies_with_the_public_key_and_names_the_client() {
        let rng = ring::rand::SystemRandom::new();
        let der = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = SigningKey::from_pkcs8(der.as_ref(), Some("k1".into())).unwrap();
        let jwt = key
            .assertion("client-1", "https://as.example/token")
            .unwrap();
        let parts: Vec<&str> = jwt.expose_secret().split('.').collect();
        assert_eq!(parts.len(), 3);
        let decode = |s: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(s)
                .unwrap()
        };
        let header: serde_json::Value = serde_json::from_slice(&decode(parts[0])).unwrap();
        let claims: serde_json::Value = serde_json::from_slice(&decode(parts[1])).unwrap();
        assert_eq!(
            (header["alg"].as_str(), header["kid"].as_str()),
            (Some("ES256"), Some("k1"))
        );
        assert_eq!(claims["iss"], "client-1");
        assert_eq!(claims["sub"], "client-1");
        assert_eq!(claims["aud"], "https://as.example/token");
        let public = ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            key.pair.public_key().as_ref(),
        );
        let signed = format!("{}.{}", parts[0], parts[1]);
        public.verify(signed.as_bytes(), &decode(parts[2])).unwrap();
        assert!(!format!("{key:?}").contains(&format!("{:?}", der.as_ref())));
    }
}
