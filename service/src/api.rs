//! The HTTP API: routes, the caller's key, bodies, and the keeper's calls.
//! Every decision about tokens is the [`Keeper`]'s; this module decides
//! who may ask and how the answer is written.

use crate::api_error::ApiError;
use crate::api_keys::{ApiKey, ApiKeys};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use tokenkeep_host::keeper::{grant_json, summary_json, summary_key};
use tokenkeep_host::{ConversationError, ConversationSettings, Error, Keeper, RowKey};

/// The OpenAPI document the service serves at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Rows per page of `GET /v1/tokens` when the caller does not say.
const DEFAULT_PAGE: u32 = 100;
/// Most rows per page of `GET /v1/tokens`.
const MAX_PAGE: u32 = 1000;

/// Where a user's browser comes back after authorising (`POST /v1/connect`).
pub const CONNECT_CALLBACK: &str = "/v1/connect/callback";

/// How long a user has to authorise after `POST /v1/connect`.
const CONNECT_SECONDS: u32 = 15 * 60;

/// What every request handler shares.
pub struct ApiState {
    pub keeper: Arc<Keeper>,
    /// Replaced whole on a reload; a request uses the keys it found.
    pub keys: std::sync::RwLock<Arc<ApiKeys>>,
    pub max_body_bytes: usize,
    /// The redirect URI of `POST /v1/connect`; none without `public_url`.
    pub connect_redirect: Option<String>,
    /// Renders what the process's recorder holds, for `/metrics`.
    pub metrics: PrometheusHandle,
    /// Set when the stop's drain time has run out: a request whose body
    /// arrives after that is not served (the keeper no longer waits for
    /// what it would start).
    pub closed: std::sync::atomic::AtomicBool,
}

/// The process's metrics recorder (installed once, on first use).
pub fn metrics_recorder() -> Result<PrometheusHandle, Error> {
    static HANDLE: std::sync::OnceLock<Result<PrometheusHandle, String>> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets(tokenkeep_host::metrics::BUCKETS)
                .and_then(|b| b.install_recorder())
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| Error::Config(format!("cannot install the metrics recorder: {e}")))
}

type Shared = State<Arc<ApiState>>;

/// The API's routes over `state`: health and readiness for anyone, the
/// rest for a caller with a key.
pub fn router(state: Arc<ApiState>) -> Router {
    let keyed = Router::new()
        .route("/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route("/v1/tokens", get(list_tokens))
        .route(
            "/v1/tokens/{provider}/{user}",
            get(token_state).put(store_tokens).delete(delete_tokens),
        )
        .route(
            "/v1/tokens/{provider}/{user}/access-token",
            get(access_token),
        )
        .route("/v1/connect/{provider}/{user}", post(connect))
        .route("/v1/conversations/{conversation}", get(conversation))
        .route(
            "/v1/conversations/{conversation}/refresh",
            post(refresh_conversation),
        )
        .route(
            "/v1/conversations/{conversation}/resume",
            post(resume_conversation),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/healthz", get(health))
        .route("/readyz", get(ready))
        // The user's browser, with no key: the sealed state is the proof.
        .route(CONNECT_CALLBACK, get(connect_callback))
        .merge(keyed)
        .fallback(|| async { ApiError::no_route() })
        .method_not_allowed_fallback(|| async { ApiError::wrong_method() })
        .with_state(state)
}

/// Checks the request's key (`Authorization: Bearer KEY`): 401 and nothing
/// else when it is missing or wrong. The rest of the request runs as that
/// key's caller, which the audit log records.
async fn authenticate(State(state): Shared, mut req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, key) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
        });
    let keys = state.keys.read().unwrap_or_else(|p| p.into_inner()).clone();
    let Some(key) = presented.and_then(|k| keys.authenticate(k)).cloned() else {
        return ApiError::unauthorized().into_response();
    };
    tracing::Span::current().record("key", key.name.as_str());
    let name = key.name.clone();
    req.extensions_mut().insert(key);
    tokenkeep_host::audit::as_caller(&name, next.run(req)).await
}

/// The key the request was authenticated with.
pub struct Caller(pub ApiKey);

impl FromRequestParts<Arc<ApiState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &Arc<ApiState>) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<ApiKey>()
            .cloned()
            .map(Caller)
            .ok_or_else(ApiError::unauthorized)
    }
}

impl Caller {
    /// 403 unless this key reaches (provider, user id). A machine client's
    /// token belongs to no user: user patterns cannot partition it, so a
    /// key limited to users never reaches it.
    fn may(&self, state: &ApiState, provider: &str, user_id: &str) -> Result<(), ApiError> {
        if self.reaches(state, provider, user_id) {
            Ok(())
        } else {
            Err(ApiError::forbidden(&format!("{provider}/{user_id}")))
        }
    }

    fn reaches(&self, state: &ApiState, provider: &str, user_id: &str) -> bool {
        let machine = state
            .keeper
            .config()
            .providers
            .get(provider)
            .is_some_and(|p| p.grant == tokenkeep_host::config::Grant::ClientCredentials);
        self.0.allows(provider, user_id) && !(machine && self.0.limited_to_users())
    }
}

/// The (provider, user) of a `/v1/tokens/{provider}/{user}…` path,
/// percent-decoded, that the request's key may reach (403 otherwise).
pub struct TokenRow {
    pub provider: String,
    pub user: String,
}

impl FromRequestParts<Arc<ApiState>> for TokenRow {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, ApiError> {
        let p = Path::<(String, String)>::from_request_parts(parts, state).await;
        let (provider, user) = path(p)?;
        Caller::from_request_parts(parts, state)
            .await?
            .may(state, &provider, &user)?;
        Ok(TokenRow { provider, user })
    }
}

/// A JSON body, at most the configured size, parsed into `T`.
pub struct Body<T>(pub T);

impl<T: serde::de::DeserializeOwned> FromRequest<Arc<ApiState>> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<ApiState>) -> Result<Self, ApiError> {
        let limit = state.max_body_bytes;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(ApiError::too_large(limit));
        }
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|_| ApiError::too_large(limit))?;
        if state.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ApiError::stopping());
        }
        serde_json::from_slice(&bytes).map(Body).map_err(|e| {
            ApiError::bad_request(format!(
                "the body is not the JSON expected: {}",
                json_error(&e)
            ))
        })
    }
}

/// Where a body failed to parse, without quoting it (it may hold tokens).
fn json_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Io | Category::Eof => "it ends early",
        Category::Syntax => "it is not valid JSON",
        Category::Data => "a field is missing or of the wrong type",
    };
    format!("{what} (line {}, column {})", e.line(), e.column())
}

/// Path parameters, percent-decoded; a bad one is a JSON 400.
fn path<T>(p: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    p.map(|Path(t)| t)
        .map_err(|e| ApiError::bad_request(format!("bad path: {}", e.body_text())))
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t)
        .map_err(|e| ApiError::bad_request(format!("bad query: {}", e.body_text())))
}

/// No token stored for (provider, user).
fn not_found(provider: String, user_id: String) -> ApiError {
    Error::NotFound { provider, user_id }.into()
}

/// A JSON answer that no cache may keep (it may hold a token).
fn no_store(status: StatusCode, body: Value) -> Response {
    let mut response = (status, Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn health() -> Response {
    no_store(StatusCode::OK, json!({ "status": "ok" }))
}

/// Ready when the database answers.
async fn ready(State(state): Shared) -> Result<Response, ApiError> {
    state.keeper.check_database().await?;
    Ok(no_store(StatusCode::OK, json!({ "status": "ready" })))
}

async fn openapi(_: Caller) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        OPENAPI,
    )
        .into_response()
}

/// The Prometheus text format: what this process counted.
async fn metrics(State(state): Shared, _: Caller) -> Response {
    tokenkeep_host::metrics::pool_use(state.keeper.pool_use());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        state.metrics.render(),
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessQuery {
    /// Seconds the token must stay valid.
    min_remaining: Option<u32>,
    /// With the row's DPoP proof key (a provider with `dpop = true`).
    #[serde(default)]
    dpop: bool,
}

async fn access_token(
    State(state): Shared,
    TokenRow { provider, user }: TokenRow,
    q: Result<Query<AccessQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let min_remaining = q.min_remaining.unwrap_or(0);
    let body = if q.dpop {
        state
            .keeper
            .ensure_fresh_bound(&provider, &user, min_remaining)
            .await?
            .json()?
    } else {
        grant_json(
            &state
                .keeper
                .ensure_fresh_for(&provider, &user, min_remaining)
                .await?,
        )
    };
    Ok(no_store(StatusCode::OK, body))
}

async fn token_state(
    State(state): Shared,
    TokenRow { provider, user }: TokenRow,
) -> Result<Response, ApiError> {
    match state.keeper.token_summary(&provider, &user).await? {
        Some(s) => Ok(no_store(StatusCode::OK, summary_json(&s))),
        None => Err(not_found(provider, user)),
    }
}

async fn store_tokens(
    State(state): Shared,
    TokenRow { provider, user }: TokenRow,
    Body(response): Body<Value>,
) -> Result<Response, ApiError> {
    // Lifetimes count on the keeper's clock (the database's).
    let body =
        serde_json::to_vec(&response).map_err(|_| ApiError::bad_request("unreadable body"))?;
    let tokens = tokenkeep_host::token_response::token_set(&body, state.keeper.now())?;
    let record = state.keeper.store_tokens(&provider, &user, &tokens).await?;
    let summary = state.keeper.token_summary(&provider, &user).await?;
    let body = match summary {
        Some(s) => summary_json(&s),
        None => json!({ "provider": provider, "user_id": user, "generation": record.generation }),
    };
    Ok(no_store(StatusCode::OK, body))
}

/// Deletes, and revokes at the provider: 204 when nothing may still be
/// valid there, 200 with what was not revoked otherwise.
async fn delete_tokens(
    State(state): Shared,
    TokenRow { provider, user }: TokenRow,
) -> Result<Response, ApiError> {
    let deletion = state.keeper.delete_and_revoke(&provider, &user).await?;
    if !deletion.deleted {
        return Err(not_found(provider, user));
    }
    let failed: Vec<Value> = deletion
        .not_revoked()
        .into_iter()
        .map(|(token, why)| json!({ "token": token, "error": why }))
        .collect();
    if failed.is_empty() {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Ok(no_store(
            StatusCode::OK,
            json!({ "deleted": true, "not_revoked": failed }),
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectQuery {
    /// Space-separated scopes (default: the provider's).
    scope: Option<String>,
}

/// Starts connecting a user's account: the URL to send the user to. The
/// provider's answer comes back to `GET /v1/connect/callback`, on any
/// instance of the service. A machine client gets its token at once.
async fn connect(
    State(state): Shared,
    TokenRow { provider, user }: TokenRow,
    q: Result<Query<ConnectQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let p = state
        .keeper
        .prepare_with_redirect(&provider, state.connect_redirect.as_deref())
        .await?;
    if p.grant.is_host_grant() {
        state.keeper.obtain_host_grant(&provider, &user).await?;
        let summary = state.keeper.token_summary(&provider, &user).await?;
        return Ok(no_store(
            StatusCode::OK,
            json!({ "connected": summary.as_ref().map(summary_json) }),
        ));
    }
    let Some(redirect) = &state.connect_redirect else {
        return Err(Error::Config(
            "set [serve] public_url: the provider sends the user back there".into(),
        )
        .into());
    };
    let scopes: Option<Vec<String>> = q
        .scope
        .map(|s| s.split_whitespace().map(str::to_owned).collect());
    let url = state.keeper.sealed_authorization_request(
        &provider,
        &user,
        redirect,
        scopes.as_deref(),
        CONNECT_SECONDS,
    )?;
    Ok(no_store(
        StatusCode::OK,
        json!({
            "authorization_url": url,
            "redirect_uri": redirect,
            "expires_at": state.keeper.now() + i64::from(CONNECT_SECONDS),
        }),
    ))
}

/// The user's browser, back from the provider: completes the
/// authorisation and says so in a page (no names: the query is anyone's).
async fn connect_callback(State(state): Shared, uri: axum::http::Uri) -> Response {
    let callback = tokenkeep_host::grants::Callback::from_query(uri.query().unwrap_or(""));
    let done = tokenkeep_host::audit::as_caller(
        "connect-callback",
        state.keeper.complete_sealed_authorization(callback),
    )
    .await;
    let (status, text) = match &done {
        Ok(_) => (
            StatusCode::OK,
            "Connected. You can close this window.".to_string(),
        ),
        Err(e) => {
            tracing::info!(class = e.class(), "connect callback failed");
            (
                StatusCode::BAD_REQUEST,
                format!(
                    "The account was not connected ({}). You can close this window.",
                    e.class()
                ),
            )
        }
    };
    let mut response = (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        format!("<!doctype html><title>tokenkeep</title><p>{text}"),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    after_provider: Option<String>,
    after_user: Option<String>,
    limit: Option<u32>,
}

/// A page of token states the key may reach: `limit` of them, and `next`
/// (null once the listing has ended) where the next page starts.
async fn list_tokens(
    State(state): Shared,
    caller: Caller,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let after = match (q.after_provider, q.after_user) {
        (Some(provider), Some(user_id)) => Some(RowKey { provider, user_id }),
        (None, None) => None,
        _ => {
            return Err(ApiError::bad_request(
                "give both after_provider and after_user, or neither",
            ));
        }
    };
    let limit = q.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    // A key limited to some tokens reads on past the rows it may not see
    // until its page is full or the listing ends: `next` is always a row
    // it may see, never one of another tenant's.
    let mut tokens: Vec<Value> = Vec::new();
    let mut next = None;
    let mut after = after;
    // Read in the largest pages when most rows may be another tenant's.
    let read = if caller.0.unlimited() {
        limit
    } else {
        MAX_PAGE
    };
    loop {
        let page = state.keeper.list_tokens_page(after, read).await?;
        let full = page.len() == read as usize;
        for s in &page {
            if caller.reaches(&state, &s.provider, &s.user_id) {
                tokens.push(summary_json(s));
                if tokens.len() == limit as usize {
                    next = Some(json!({ "after_provider": s.provider, "after_user": s.user_id }));
                    break;
                }
            }
        }
        if next.is_some() || !full {
            break;
        }
        after = page.last().map(summary_key);
    }
    // A full last page: the next one may be empty, which says the end.
    Ok(no_store(
        StatusCode::OK,
        json!({ "tokens": tokens, "next": next }),
    ))
}

async fn conversation(
    State(state): Shared,
    caller: Caller,
    p: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let conversation = path(p)?;
    let entries = may_reach_conversation(&state, &caller, &conversation).await?;
    let entries: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({
                "provider": e.provider,
                "user_id": e.user_id,
                "scopes": e.scopes,
                "generation": e.generation,
                "updated_at": e.updated_at,
            })
        })
        .collect();
    Ok(no_store(
        StatusCode::OK,
        json!({ "conversation_id": conversation, "entries": entries }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshBody {
    user_id: String,
    /// `{"provider_tokens": {...}}`, the seed's shape.
    settings: Value,
    /// Return what could be refreshed and list the failures, instead of
    /// failing the whole call.
    #[serde(default)]
    partial: bool,
}

async fn refresh_conversation(
    State(state): Shared,
    caller: Caller,
    p: Result<Path<String>, PathRejection>,
    Body(body): Body<RefreshBody>,
) -> Result<Response, ApiError> {
    let conversation = path(p)?;
    let text = serde_json::to_vec(&body.settings)
        .map_err(|_| ApiError::bad_request("unreadable settings"))?;
    let settings = ConversationSettings::from_json(&text)?;
    for t in &settings.provider_tokens {
        caller.may(&state, &t.provider, &body.user_id)?;
    }
    // Nor may it take over a conversation whose tokens it may not reach.
    may_reach_conversation(&state, &caller, &conversation).await?;
    if body.partial {
        let r = state
            .keeper
            .refresh_provider_tokens_partial(&settings, &conversation, &body.user_id)
            .await?;
        let failures: Vec<Value> = r
            .failures
            .iter()
            .map(|f| {
                let e = ApiError::from(f.error.clone());
                json!({ "provider": f.provider, "error": e.class, "message": e.message })
            })
            .collect();
        return Ok(no_store(
            StatusCode::OK,
            json!({ "settings": settings_json(&r.settings)?, "failures": failures }),
        ));
    }
    let refreshed = state
        .keeper
        .refresh_provider_tokens(&settings, &conversation, &body.user_id)
        .await
        .map_err(conversation_error)?;
    Ok(no_store(StatusCode::OK, settings_json(&refreshed)?))
}

async fn resume_conversation(
    State(state): Shared,
    caller: Caller,
    p: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let conversation = path(p)?;
    may_reach_conversation(&state, &caller, &conversation).await?;
    let resumed = state
        .keeper
        .resume(&conversation)
        .await
        .map_err(conversation_error)?;
    // Checked again after: the entries it resumed are the ones checked
    // (a conversation rebound meanwhile answers nothing).
    may_reach_conversation(&state, &caller, &conversation).await?;
    match resumed {
        Some(settings) => Ok(no_store(StatusCode::OK, settings_json(&settings)?)),
        None => Err(Error::NotFound {
            provider: "-".into(),
            user_id: format!("conversation {conversation}"),
        }
        .into()),
    }
}

/// The conversation's entries, if the key reaches every token they name;
/// 403 (naming none of them) if not.
async fn may_reach_conversation(
    state: &ApiState,
    caller: &Caller,
    conversation: &str,
) -> Result<Vec<tokenkeep_host::ConversationEntry>, ApiError> {
    let entries = state.keeper.conversation_entries(conversation).await?;
    if entries
        .iter()
        .all(|e| caller.reaches(state, &e.provider, &e.user_id))
    {
        Ok(entries)
    } else {
        Err(ApiError::forbidden("this conversation"))
    }
}

fn settings_json(s: &ConversationSettings) -> Result<Value, ApiError> {
    serde_json::from_str(&s.to_json())
        .map_err(|_| Error::Sandbox("settings did not serialise".into()).into())
}

/// A conversation's failure, with the provider it is about.
fn conversation_error(e: ConversationError) -> ApiError {
    let mut api = ApiError::from(e.error);
    if !e.provider.is_empty() {
        api.message = format!("provider {}: {}", e.provider, api.message);
    }
    api
}
