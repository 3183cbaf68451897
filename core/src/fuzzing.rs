//! The bodies of the fuzz targets (component/fuzz), here so that the unit
//! tests replay the committed corpus on every `cargo test` with the same
//! checks libFuzzer runs. Each panics when an invariant breaks.

use crate::error::{ErrorClass, RefreshError};
use crate::model::{Health, SealedRow, SealingError};
use crate::provider::{parse_token_response, salvage_refresh_token};
use crate::seal::{self, Binding, Field, Key, open_sealed_row};
use secrecy::{ExposeSecret, SecretString};

/// A provider answer: two bytes of status, one byte choosing the content
/// type, then the body, where every 0xFE byte becomes a secret marker.
/// Whatever arrives, the parser returns a token or a typed error, and no
/// error quotes the body beyond a fixed, known error code.
pub fn provider_response(data: &[u8]) {
    let [hi, lo, ct, raw @ ..] = data else {
        return;
    };
    const MARKER: &[u8] = b"tk_SECRET";
    let mut body = Vec::with_capacity(raw.len());
    for &b in raw {
        if b == 0xFE {
            body.extend_from_slice(MARKER);
        } else {
            body.push(b);
        }
    }
    let body = body.as_slice();
    let status = 100 + u16::from_be_bytes([*hi, *lo]) % 500;
    let content_type = match ct % 4 {
        0 => None,
        1 => Some("application/json"),
        2 => Some("application/x-www-form-urlencoded"),
        _ => Some("text/html; charset=utf-8"),
    };
    let codes = [(
        "unauthorized_client".to_string(),
        ErrorClass::ReauthorizationRequired,
    )];
    match parse_token_response(status, content_type, body, &codes) {
        Ok(t) => {
            assert!((200..300).contains(&status));
            assert!(!t.access_token.expose_secret().is_empty());
            for lifetime in [t.expires_in, t.refresh_token_expires_in]
                .into_iter()
                .flatten()
            {
                assert!(lifetime > 0 && lifetime <= 20 * 365 * 86_400);
            }
        }
        Err(e) => {
            let message = e.to_string();
            assert!(message.len() < 256, "error messages stay short");
            assert!(!message.contains("tk_SECRET"), "the body is never quoted");
            if let RefreshError::InvalidProviderResponse(_) = e {
                // Salvage never invents a token and only reads successes.
                if let Some(kept) = salvage_refresh_token(status, content_type, body) {
                    assert!((200..300).contains(&status));
                    assert!(!kept.expose_secret().is_empty());
                }
            }
        }
    }
}

const KEY: [u8; 32] = [0x42; 32];

fn valid_row() -> SealedRow {
    let seal_field = |field, plain: &str| {
        let binding = Binding {
            provider: "github",
            user_id: "alice",
            field,
            key_id: "k1",
        };
        seal::seal(
            &KEY,
            [9; 12],
            &binding,
            &SecretString::from(plain.to_string()),
        )
        .expect("sealing with a valid key")
    };
    SealedRow {
        provider: "github".into(),
        user_id: "alice".into(),
        key_id: "k1".into(),
        access_token: seal_field(Field::AccessToken, "at-fuzz-plaintext"),
        refresh_token: Some(seal_field(Field::RefreshToken, "rt-fuzz-plaintext")),
        access_token_expires_at: Some(1),
        refresh_token_expires_at: None,
        scopes: vec![],
        baseline_scopes: vec![],
        obtained_at: 0,
        generation: 1,
        health: Health::default(),
    }
}

/// A stored row an attacker could have written: the first byte picks what
/// the rest replaces or flips. A row opens only if it is exactly the row
/// that was sealed; otherwise it is a decryption error that quotes nothing.
pub fn sealed_row(data: &[u8]) {
    let [mode, rest @ ..] = data else {
        return;
    };
    let original = valid_row();
    let mut row = original.clone();
    let text = String::from_utf8_lossy(rest).into_owned();
    match mode % 6 {
        0 => row.access_token = rest.to_vec(),
        1 => row.refresh_token = Some(rest.to_vec()),
        2 => {
            for (i, b) in rest.iter().enumerate() {
                let n = row.access_token.len();
                row.access_token[i % n] ^= b;
            }
        }
        3 => row.user_id = text,
        4 => row.key_id = text,
        _ => {
            // Swap the fields: a ciphertext moved to the other column.
            std::mem::swap(
                &mut row.access_token,
                row.refresh_token.as_mut().expect("sealed above"),
            );
            if rest.first().is_some_and(|b| b % 2 == 1) {
                row.provider = text;
            }
        }
    }
    let key: Key = KEY.to_vec().into();
    let key = (row.key_id == "k1").then_some(&key);
    match open_sealed_row(&row, key) {
        Ok(record) => {
            assert_eq!(row, original, "only the untouched row opens");
            assert_eq!(
                record.tokens.access_token.expose_secret(),
                "at-fuzz-plaintext"
            );
        }
        Err(e) => {
            assert!(
                matches!(
                    e,
                    SealingError::UnknownKey(_) | SealingError::Undecryptable(_)
                ),
                "{e:?}"
            );
            let message = RefreshError::from(e).to_string();
            assert!(message.len() < 256, "error messages stay short");
            assert!(!message.contains('\n'), "no line breaks from stored bytes");
            // Unless the attacker wrote it into a label themselves.
            let labels = format!("{}{}{}", row.provider, row.user_id, row.key_id);
            if !labels.contains("plaintext") {
                assert!(!message.contains("fuzz-plaintext"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Replays every committed corpus file through its target.
    fn replay(target: &str, run: fn(&[u8])) -> usize {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("the corpus is committed") {
            run(&std::fs::read(entry.expect("corpus entry").path()).expect("corpus file"));
            n += 1;
        }
        n
    }

    #[test]
    fn the_provider_response_corpus_replays_cleanly() {
        assert!(replay("provider_response", super::provider_response) >= 20);
    }

    #[test]
    fn the_sealed_row_corpus_replays_cleanly() {
        assert!(replay("sealed_row", super::sealed_row) >= 6);
    }
}
