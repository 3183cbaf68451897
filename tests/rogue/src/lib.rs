//! A rogue component that fulfils tokenkeep's world on paper and misbehaves
//! in practice, chosen by the provider name given to `ensure-fresh`: it
//! exhausts memory and fuel, posts its own requests (another grant, a
//! refresh token it was handed, data in the URL), reads, locks, writes and
//! deletes the real row `acme`/USER while asked about another, refreshes
//! without a lock, scans, reads another conversation, and returns tokens it
//! made up or another user's. The sandbox tests (tests/sandbox.rs) load it in
//! place of the real one. Natively this crate is empty.

#[cfg(target_arch = "wasm32")]
mod rogue {
    wit_bindgen::generate!({
        // The contract's world plus outgoing HTTP, which the real component
        // does not import and the host links only to refuse.
        inline: "
            package tokenkeep:rogue;
            world rogue {
                include tokenkeep:oauth/keeper-core@0.6.0;
                import wasi:http/outgoing-handler@0.2.12;
            }
        ",
        path: "../../wit",
        world: "tokenkeep:rogue/rogue",
        generate_all,
    });

    use exports::tokenkeep::oauth::conversations::Guest as Conversations;
    use exports::tokenkeep::oauth::token_store::Guest;
    use tokenkeep::oauth::storage::{self, SealedRow};
    use tokenkeep::oauth::types::{
        AccessGrant, ConversationEntry, ConversationSettings, PartialRefresh, ProviderFailure,
        RefreshError, RowKey, TokenHealth, TokenRecord, TokenSet, TokenState, TokenSummary,
    };
    use tokenkeep::oauth::{sealing, token_endpoint};

    struct Rogue;
    export!(Rogue);

    fn refused() -> RefreshError {
        RefreshError::InvalidInput("the rogue component does not do that".into())
    }

    /// What the host said, as an error the test can read.
    fn said(what: String) -> Result<AccessGrant, RefreshError> {
        Err(RefreshError::InvalidInput(what))
    }

    /// POSTs `body` to `url` (`http://authority/path`), claiming to be a
    /// configured provider.
    fn post(url: &str, body: &str) -> String {
        use wasi::http::outgoing_handler;
        use wasi::http::types::{Fields, Method, OutgoingBody, OutgoingRequest, Scheme};
        let Some((authority, path)) = url
            .strip_prefix("http://")
            .and_then(|rest| rest.split_once('/'))
        else {
            return "bad url".into();
        };
        let headers = Fields::from_list(&[
            ("x-tokenkeep-provider".into(), b"acme".to_vec()),
            (
                "content-type".into(),
                b"application/x-www-form-urlencoded".to_vec(),
            ),
        ])
        .expect("headers");
        let request = OutgoingRequest::new(headers);
        let _ = request.set_method(&Method::Post);
        let _ = request.set_scheme(Some(&Scheme::Http));
        let _ = request.set_authority(Some(authority));
        let _ = request.set_path_with_query(Some(&format!("/{path}")));
        let outgoing = request.body().expect("body");
        match outgoing_handler::handle(request, None) {
            Ok(future) => {
                if let Ok(stream) = outgoing.write() {
                    let _ = stream.blocking_write_and_flush(body.as_bytes());
                }
                let _ = OutgoingBody::finish(outgoing, None);
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

    fn forged_row(provider: &str, user_id: &str) -> SealedRow {
        SealedRow {
            provider: provider.into(),
            user_id: user_id.into(),
            key_id: "k1".into(),
            access_token: b"forged".to_vec(),
            refresh_token: None,
            access_token_expires_at: None,
            refresh_token_expires_at: None,
            scopes: Vec::new(),
            baseline_scopes: Vec::new(),
            obtained_at: 0,
            generation: 99,
            health: TokenHealth {
                failed_attempts: 0,
                last_failure_at: None,
                last_failure: None,
                last_success_at: None,
                refresh_started_at: None,
                retry_not_before: None,
            },
        }
    }

    fn grant(provider: &str, user_id: &str, token: &str) -> AccessGrant {
        AccessGrant {
            provider: provider.into(),
            user_id: user_id.into(),
            access_token: token.into(),
            expires_at: None,
            scopes: Vec::new(),
            obtained_at: 0,
            generation: 1,
        }
    }

    /// What one call keeps for the next, if instances were shared.
    static STASH: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

    /// How many times `reversed`, reversed, appears anywhere in this
    /// instance's linear memory but in the needle it builds to look for.
    fn copies_in_memory(reversed: &str) -> usize {
        let needle: Vec<u8> = reversed.bytes().rev().collect();
        let Some(&first) = needle.first() else {
            return 0;
        };
        let size = core::arch::wasm32::memory_size(0) * 65536;
        let mut copies = 0;
        // From 1: address 0 is the null pointer.
        for at in 1..size.saturating_sub(needle.len()) {
            // SAFETY: every address below the memory's size is readable.
            let byte = unsafe { core::ptr::read_volatile(at as *const u8) };
            if byte != first || at == needle.as_ptr() as usize {
                continue;
            }
            let here = (0..needle.len())
                .all(|i| unsafe { core::ptr::read_volatile((at + i) as *const u8) } == needle[i]);
            copies += usize::from(here);
        }
        copies
    }

    /// A token request the host denies (the row has no refresh token),
    /// then new tokens of its own as the row's next generation.
    fn denied_then_forged(user_id: &str) -> Result<AccessGrant, RefreshError> {
        let txn = storage::begin().map_err(|_| refused())?;
        let locked = txn
            .load_for_update("acme", user_id)
            .map_err(|_| refused())?
            .row
            .ok_or(RefreshError::NotFound)?;
        let denied = token_endpoint::request_refresh(&txn).map(|_| ());
        let mut forged = forged_row("acme", user_id);
        forged.generation = locked.generation + 1;
        forged.baseline_scopes = locked.baseline_scopes.clone();
        let cas = txn.compare_and_set(&forged, locked.generation);
        let _ = txn.commit();
        said(format!("{denied:?} {cas:?}"))
    }

    /// Asked about acme/USER, it tries to get that row's refresh token out,
    /// hammer the provider, or rewrite the row without moving its generation;
    /// USER names the trick (`leak:seal`, `leak:return`, ...).
    fn on_its_own_row(user_id: &str) -> Result<AccessGrant, RefreshError> {
        if user_id == "leak:denied-forge" {
            return denied_then_forged(user_id);
        }
        let read = storage::read("acme", user_id).map_err(|_| refused())?;
        let row = read.row.ok_or(RefreshError::NotFound)?;
        let open = |field, bytes: &[u8]| {
            sealing::open("acme", user_id, field, &row.key_id, bytes).map_err(|_| refused())
        };
        let access = open(sealing::Field::AccessToken, &row.access_token)?;
        let refresh = open(
            sealing::Field::RefreshToken,
            row.refresh_token.as_deref().unwrap_or_default(),
        )?;
        match user_id {
            "leak:seal" => {
                let sealed = sealing::seal_tokens("acme", user_id, &refresh, Some(&refresh));
                said(format!("{:?}", sealed.map(|_| ())))
            }
            "leak:return" => Ok(grant("acme", user_id, &refresh)),
            "leak:scope" => {
                let mut g = grant("acme", user_id, &access);
                g.scopes = vec![format!("repo {refresh}")];
                Ok(g)
            }
            "leak:error" => Err(RefreshError::ProviderUnavailable(format!(
                "upstream said\n{refresh}"
            ))),
            "leak:hammer" => {
                let txn = storage::begin().map_err(|_| refused())?;
                let _ = txn.load_for_update("acme", user_id);
                let mut sent = 0;
                for _ in 0..10 {
                    let _ = token_endpoint::request_refresh(&txn);
                    sent += 1;
                }
                said(format!("{sent} requests"))
            }
            "leak:mismatch" => {
                let hex: String = refresh.bytes().map(|b| format!("{b:02x}")).collect();
                Err(RefreshError::ScopeMismatch(vec![hex]))
            }
            "leak:baseline" | "leak:backoff" => {
                // Rewrites its own row's bookkeeping under the lock: no
                // baseline (a narrowed token would be served), or no
                // refreshes for ever.
                let txn = storage::begin().map_err(|_| refused())?;
                let mut row = txn
                    .load_for_update("acme", user_id)
                    .map_err(|_| refused())?
                    .row
                    .ok_or(RefreshError::NotFound)?;
                if user_id == "leak:baseline" {
                    row.baseline_scopes = Vec::new();
                } else {
                    row.health.retry_not_before = Some(i64::MAX);
                }
                let generation = row.generation;
                said(format!("{:?}", txn.compare_and_set(&row, generation)))
            }
            "leak:upsert" => {
                let mut row = forged_row("acme", user_id);
                row.generation = 1;
                said(format!("{:?}", storage::upsert(&row)))
            }
            "leak:rotate-and-hammer" => {
                // Moves the generation after each request, hoping to reset
                // the host's count.
                let txn = storage::begin().map_err(|_| refused())?;
                let mut locked = txn
                    .load_for_update("acme", user_id)
                    .map_err(|_| refused())?
                    .row
                    .ok_or(RefreshError::NotFound)?;
                for _ in 0..5 {
                    let _ = token_endpoint::request_refresh(&txn);
                    let mut next = locked.clone();
                    next.generation += 1;
                    let _ = txn.compare_and_set(&next, locked.generation);
                    locked = next;
                }
                said("5 rounds".into())
            }
            "leak:generation" => {
                let txn = storage::begin().map_err(|_| refused())?;
                let locked = txn
                    .load_for_update("acme", user_id)
                    .map_err(|_| refused())?
                    .row
                    .ok_or(RefreshError::NotFound)?;
                let mut forged = forged_row("acme", user_id);
                forged.generation = locked.generation;
                let cas = txn.compare_and_set(&forged, locked.generation);
                let _ = txn.commit();
                said(format!("{cas:?}"))
            }
            "leak:stash" => {
                // Keeps the refresh token for whichever call comes next, in
                // a static and in freed heap memory.
                let copies = copies_in_memory(&refresh.chars().rev().collect::<String>());
                if let Ok(mut stash) = STASH.lock() {
                    *stash = refresh.clone();
                }
                drop(refresh);
                said(format!("stashed; {copies} copies in memory"))
            }
            "leak:two-transactions" => {
                let first = storage::begin().map_err(|_| refused())?;
                let second = storage::begin().map(|_| ());
                drop(first);
                said(format!("{second:?}"))
            }
            _ => Err(RefreshError::NotFound),
        }
    }

    impl Guest for Rogue {
        fn ensure_fresh(provider: String, user_id: String) -> Result<AccessGrant, RefreshError> {
            // `user_id` carries the rogue's argument; the real row it goes
            // after is acme's row of that user.
            if provider == "acme" {
                return on_its_own_row(&user_id);
            }
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
                // user id: "URL BODY": another grant, a refresh token it
                // learnt, or data smuggled in the URL.
                "egress" => {
                    let (url, body) = user_id.split_once(' ').unwrap_or((&user_id, ""));
                    said(post(url, body))
                }
                // user id: a secret, reversed: what this instance can see
                // of it, left by an earlier call.
                "remember" => {
                    let stashed = STASH.lock().map(|s| s.clone()).unwrap_or_default();
                    said(format!(
                        "stash {:?}; {} copies in memory",
                        stashed,
                        copies_in_memory(&user_id)
                    ))
                }
                "read-other" => said(format!("{:?}", storage::read("acme", &user_id).map(|_| ()))),
                "open-other" => said(format!(
                    "{:?}",
                    sealing::open(
                        "acme",
                        &user_id,
                        sealing::Field::RefreshToken,
                        "k1",
                        b"anything",
                    )
                )),
                "write-other" => {
                    let upsert = storage::upsert(&forged_row("acme", &user_id));
                    let insert = storage::insert(&forged_row("acme", &user_id));
                    let delete = storage::delete("acme", &user_id);
                    said(format!("{upsert:?} {insert:?} {delete:?}"))
                }
                "cas-other" => {
                    let txn = storage::begin().map_err(|_| refused())?;
                    // Locks the row it was asked about, then writes another.
                    let _ = txn.load_for_update("cas-other", &user_id);
                    let cas = txn.compare_and_set(&forged_row("acme", &user_id), 1);
                    let _ = txn.commit();
                    said(format!("{cas:?}"))
                }
                "lock-other" => {
                    let txn = storage::begin().map_err(|_| refused())?;
                    let lock = txn.load_for_update("acme", &user_id).map(|_| ());
                    let refresh = token_endpoint::request_refresh(&txn).map(|_| ());
                    said(format!("{lock:?} {refresh:?}"))
                }
                "refresh-unlocked" => {
                    let txn = storage::begin().map_err(|_| refused())?;
                    said(format!(
                        "{:?}",
                        token_endpoint::request_refresh(&txn).map(|_| ())
                    ))
                }
                "scan" => said(format!(
                    "{:?}",
                    storage::list_rows(None, 100).map(|r| r.len())
                )),
                "other-conversation" => said(format!(
                    "{:?}",
                    storage::conversation_entries(&user_id).map(|e| e.len())
                )),
                "forge" => Ok(grant(&provider, &user_id, "tk-FORGED-token")),
                "other-user" => Ok(grant("acme", &user_id, "tk-FORGED-token")),
                "filesystem" => said(match std::fs::read(&user_id) {
                    Ok(bytes) => format!("read {} bytes", bytes.len()),
                    Err(_) => "no filesystem".into(),
                }),
                "env" => said(format!(
                    "{} environment variables",
                    std::env::vars().count()
                )),
                _ => Err(RefreshError::NotFound),
            }
        }

        fn ensure_fresh_for(
            provider: String,
            user_id: String,
            _: u32,
        ) -> Result<AccessGrant, RefreshError> {
            Self::ensure_fresh(provider, user_id)
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
        fn list_tokens(after: Option<RowKey>, _: u32) -> Result<Vec<TokenSummary>, RefreshError> {
            // Asked for a page after a row: scans from the start instead.
            if after.is_some() {
                let _ = storage::list_rows(None, 10_000);
            }
            Err(refused())
        }
    }

    impl Conversations for Rogue {
        fn refresh_provider_tokens(
            _: ConversationSettings,
            _: String,
            _: String,
        ) -> Result<ConversationSettings, ProviderFailure> {
            // Names a provider the call is not about: a free-text channel.
            Err(ProviderFailure {
                provider: "tk-SMUGGLED-provider".into(),
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
