//! A rogue component that fulfils tokenkeep's world on paper and misbehaves
//! in practice, chosen by the provider name given to `ensure-fresh`:
//! `memory` allocates without end, `spin` loops forever, `egress` posts to
//! the URL in the user id, `filesystem` reads the file in the user id, `env`
//! counts the environment it can see, and anything else answers `not-found`.
//! The sandbox tests (tests/sandbox.rs) load it in place of the real one.
//! Natively this crate is empty.

#[cfg(target_arch = "wasm32")]
mod rogue {
    wit_bindgen::generate!({
        world: "keeper",
        path: "../../wit",
        with: {
            "wasi:http/types@0.2.12": wasip2::http::types,
            "wasi:http/outgoing-handler@0.2.12": wasip2::http::outgoing_handler,
            "wasi:io/poll@0.2.12": wasip2::io::poll,
            "wasi:io/error@0.2.12": wasip2::io::error,
            "wasi:io/streams@0.2.12": wasip2::io::streams,
            "wasi:clocks/monotonic-clock@0.2.12": wasip2::clocks::monotonic_clock,
        },
    });

    use exports::tokenkeep::oauth::conversations::Guest as Conversations;
    use exports::tokenkeep::oauth::token_store::Guest;
    use tokenkeep::oauth::types::{
        ConversationEntry, ConversationSettings, PartialRefresh, ProviderFailure, RefreshError,
        ResealProgress, RowKey, TokenRecord, TokenSet, TokenState, TokenSummary,
    };

    struct Rogue;
    export!(Rogue);

    fn refused() -> RefreshError {
        RefreshError::InvalidInput("the rogue component does not do that".into())
    }

    fn post(url: &str) -> String {
        use wasip2::http::outgoing_handler;
        use wasip2::http::types::{Fields, Method, OutgoingBody, OutgoingRequest, Scheme};
        let Some((authority, path)) = url
            .strip_prefix("http://")
            .and_then(|rest| rest.split_once('/'))
        else {
            return "bad url".into();
        };
        // Claims to be a configured provider, to borrow its credentials.
        let headers = Fields::from_list(&[("x-tokenkeep-provider".into(), b"acme".to_vec())])
            .expect("headers");
        let request = OutgoingRequest::new(headers);
        let _ = request.set_method(&Method::Post);
        let _ = request.set_scheme(Some(&Scheme::Http));
        let _ = request.set_authority(Some(authority));
        let _ = request.set_path_with_query(Some(&format!("/{path}")));
        let body = request.body().expect("body");
        match outgoing_handler::handle(request, None) {
            Ok(future) => {
                let _ = OutgoingBody::finish(body, None);
                future.subscribe().block();
                match future.get() {
                    Some(Ok(Ok(response))) => format!("reached: status {}", response.status()),
                    Some(Ok(Err(e))) => format!("{e:?}"),
                    _ => "no answer".into(),
                }
            }
            Err(e) => format!("{e:?}"),
        }
    }

    impl Guest for Rogue {
        fn ensure_fresh(provider: String, user_id: String) -> Result<TokenRecord, RefreshError> {
            match provider.as_str() {
                "memory" => {
                    let mut hoard: Vec<Vec<u8>> = Vec::new();
                    loop {
                        hoard.push(vec![1u8; 1 << 20]);
                        std::hint::black_box(&hoard);
                    }
                }
                "spin" => {
                    let mut n: u64 = 0;
                    loop {
                        n = std::hint::black_box(n.wrapping_mul(31).wrapping_add(7));
                    }
                }
                "egress" => {
                    let answer = post(&user_id);
                    if answer.contains("HttpRequestDenied") {
                        Err(RefreshError::ProviderRejectedClient(
                            "egress denied: the host allows only configured token URLs".into(),
                        ))
                    } else {
                        Err(RefreshError::InvalidInput(answer))
                    }
                }
                "filesystem" => Err(RefreshError::InvalidInput(match std::fs::read(&user_id) {
                    Ok(bytes) => format!("read {} bytes", bytes.len()),
                    Err(_) => "no filesystem".into(),
                })),
                "env" => Err(RefreshError::InvalidInput(format!(
                    "{} environment variables",
                    std::env::vars().count()
                ))),
                _ => Err(RefreshError::NotFound),
            }
        }

        fn store_tokens(_: String, _: String, _: TokenSet) -> Result<TokenRecord, RefreshError> {
            Err(refused())
        }
        fn load_tokens(_: String, _: String, _: bool) -> Result<Option<TokenRecord>, RefreshError> {
            Err(refused())
        }
        fn is_access_token_valid(_: TokenRecord, _: u32) -> bool {
            false
        }
        fn is_refresh_token_valid(_: TokenRecord) -> bool {
            false
        }
        fn classify(_: TokenRecord, _: u32) -> TokenState {
            TokenState::ReauthorizationRequired
        }
        fn delete_tokens(_: String, _: String) -> Result<bool, RefreshError> {
            Err(refused())
        }
        fn list_tokens() -> Result<Vec<TokenSummary>, RefreshError> {
            Err(refused())
        }
        fn reseal_batch(_: Option<RowKey>, _: u32) -> Result<ResealProgress, RefreshError> {
            Err(refused())
        }
    }

    impl Conversations for Rogue {
        fn refresh_provider_tokens(
            _: ConversationSettings,
            _: String,
            _: String,
        ) -> Result<ConversationSettings, ProviderFailure> {
            Err(ProviderFailure {
                provider: String::new(),
                error: refused(),
            })
        }
        fn refresh_provider_tokens_partial(
            settings: ConversationSettings,
            _: String,
            _: String,
        ) -> PartialRefresh {
            PartialRefresh {
                settings,
                failures: Vec::new(),
            }
        }
        fn resume(_: String) -> Result<Option<ConversationSettings>, ProviderFailure> {
            Ok(None)
        }
        fn entries(_: String) -> Result<Vec<ConversationEntry>, RefreshError> {
            Err(refused())
        }
    }
}
