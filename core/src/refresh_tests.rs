//! The refresh state machine through a fake host: rows in a map, a clock
//! the test sets, a token endpoint that answers from a script, and a hook
//! that lets "another runtime" act while this one waits for the row lock.

use super::*;
use crate::model::ConversationEntry;
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

const T0: i64 = 1_900_000_000;

type Key = (String, String);
type Hook = Box<dyn FnOnce(&mut State)>;

#[derive(Default)]
struct State {
    rows: BTreeMap<Key, SealedRow>,
    now: i64,
    answers: VecDeque<Result<HttpAnswer, RequestError>>,
    /// Token requests made, and the refresh token each would have spent.
    requests: Vec<String>,
    /// Refresh starts recorded: (provider, user, generation) -> at.
    starts: BTreeMap<Key, (u64, i64)>,
    sleeps: Vec<u64>,
    monotonic: u64,
    /// Runs when a row lock is granted: what another runtime committed meanwhile.
    on_lock: Option<Hook>,
    /// Another runtime holds the row lock (a try-lock gets none).
    held_elsewhere: bool,
    /// Try-locks made.
    try_locks: u32,
}

#[derive(Clone, Default)]
struct Fake(Rc<RefCell<State>>);

struct FakeTxn {
    host: Fake,
    locked: RefCell<Option<Key>>,
}

/// The fake's sealing: readable, but bound to row and field like the real one.
fn seal_one(provider: &str, user_id: &str, field: Field, plain: &str) -> Vec<u8> {
    format!("{provider}|{user_id}|{field:?}|{plain}").into_bytes()
}

fn open_one(provider: &str, user_id: &str, field: Field, sealed: &[u8]) -> Option<String> {
    let text = String::from_utf8(sealed.to_vec()).ok()?;
    text.strip_prefix(&format!("{provider}|{user_id}|{field:?}|"))
        .map(str::to_string)
}

fn config() -> ProviderConfig {
    ProviderConfig {
        name: "acme".into(),
        refresh_threshold_seconds: 600,
        timeout_ms: 1_000,
        max_response_bytes: 64 * 1024,
        kind: "custom".into(),
        error_codes: Vec::new(),
        default_expires_in: None,
        default_refresh_token_expires_in: None,
        rotates_refresh_tokens: true,
        max_attempts: 3,
        retry_budget_ms: 30_000,
        bare_4xx_is_refusal: true,
        reuse_leeway_seconds: 0,
        host_grant: false,
    }
}

impl Host for Fake {
    type Txn = FakeTxn;

    fn now(&self) -> i64 {
        self.0.borrow().now
    }
    fn random_u64(&self) -> u64 {
        7
    }
    fn provider(&self, name: &str) -> Option<ProviderConfig> {
        (name == "acme").then(config)
    }
    fn seal(&self, p: &str, u: &str, t: &TokenSet) -> Result<SealedTokens, SealingError> {
        Ok(SealedTokens {
            key_id: "k1".into(),
            access_token: seal_one(p, u, Field::AccessToken, t.access_token.expose_secret()),
            refresh_token: t
                .refresh_token
                .as_ref()
                .map(|r| seal_one(p, u, Field::RefreshToken, r.expose_secret())),
        })
    }
    fn open(
        &self,
        p: &str,
        u: &str,
        field: Field,
        _key_id: &str,
        sealed: &[u8],
    ) -> Result<SecretString, SealingError> {
        open_one(p, u, field, sealed)
            .map(SecretString::from)
            .ok_or_else(|| SealingError::Undecryptable("moved".into()))
    }
    fn read(&self, p: &str, u: &str) -> Result<RowRead, StorageError> {
        let s = self.0.borrow();
        Ok(RowRead {
            row: s.rows.get(&(p.into(), u.into())).cloned(),
            now: s.now,
        })
    }
    fn list(&self, after: Option<&RowKey>, limit: u32) -> Result<Vec<SealedRow>, StorageError> {
        let s = self.0.borrow();
        Ok(s.rows
            .values()
            .filter(|r| after.is_none_or(|a| r.key() > *a))
            .take(limit as usize)
            .cloned()
            .collect())
    }
    fn upsert(&self, row: &SealedRow) -> Result<u64, StorageError> {
        let mut s = self.0.borrow_mut();
        let key = (row.provider.clone(), row.user_id.clone());
        let generation = s.rows.get(&key).map_or(1, |r| r.generation + 1);
        s.rows.insert(
            key,
            SealedRow {
                generation,
                ..row.clone()
            },
        );
        Ok(generation)
    }
    fn insert(&self, row: &SealedRow) -> Result<bool, StorageError> {
        let mut s = self.0.borrow_mut();
        let key = (row.provider.clone(), row.user_id.clone());
        if s.rows.contains_key(&key) {
            return Ok(false);
        }
        s.rows.insert(
            key,
            SealedRow {
                generation: 1,
                ..row.clone()
            },
        );
        Ok(true)
    }
    fn delete(&self, p: &str, u: &str) -> Result<bool, StorageError> {
        Ok(self
            .0
            .borrow_mut()
            .rows
            .remove(&(p.into(), u.into()))
            .is_some())
    }
    fn begin(&self) -> Result<FakeTxn, StorageError> {
        Ok(FakeTxn {
            host: self.clone(),
            locked: RefCell::new(None),
        })
    }
    fn conversation_entries(&self, _: &str) -> Result<Vec<ConversationEntry>, StorageError> {
        Ok(Vec::new())
    }
    fn put_conversation_entry(&self, _: &ConversationEntry) -> Result<(), StorageError> {
        Ok(())
    }
    fn request_refresh(&self, locked: &FakeTxn) -> Result<HttpAnswer, RequestError> {
        let key = locked
            .locked
            .borrow()
            .clone()
            .ok_or_else(|| RequestError::Denied("no locked row".into()))?;
        let mut s = self.0.borrow_mut();
        let row = s.rows.get(&key).cloned().expect("the locked row exists");
        let spent = row
            .refresh_token
            .as_deref()
            .and_then(|r| open_one(&key.0, &key.1, Field::RefreshToken, r))
            .ok_or_else(|| RequestError::Denied("no refresh token".into()))?;
        let now = s.now;
        s.starts.insert(key, (row.generation, now));
        s.requests.push(spent);
        s.answers
            .pop_front()
            .expect("the test scripted an answer for every request")
    }
    fn monotonic_ms(&self) -> u64 {
        self.0.borrow().monotonic
    }
    fn sleep_ms(&self, ms: u64) {
        let mut s = self.0.borrow_mut();
        s.sleeps.push(ms);
        s.monotonic += ms;
    }
}

impl Transaction for FakeTxn {
    fn load_for_update(&self, p: &str, u: &str) -> Result<RowRead, StorageError> {
        let hook = self.host.0.borrow_mut().on_lock.take();
        if let Some(hook) = hook {
            hook(&mut self.host.0.borrow_mut());
        }
        let key: Key = (p.into(), u.into());
        *self.locked.borrow_mut() = Some(key.clone());
        let s = self.host.0.borrow();
        let row = s.rows.get(&key).cloned().map(|mut row| {
            row.health.refresh_started_at = s
                .starts
                .get(&key)
                .filter(|(generation, _)| *generation == row.generation)
                .map(|(_, at)| *at);
            row
        });
        Ok(RowRead { row, now: s.now })
    }
    fn try_load_for_update(&self, p: &str, u: &str) -> Result<Option<RowRead>, StorageError> {
        let held = {
            let mut s = self.host.0.borrow_mut();
            s.try_locks += 1;
            s.held_elsewhere
        };
        if held {
            return Ok(None);
        }
        self.load_for_update(p, u).map(Some)
    }
    fn compare_and_set(&self, row: &SealedRow, expected: u64) -> Result<bool, StorageError> {
        let mut s = self.host.0.borrow_mut();
        let key = (row.provider.clone(), row.user_id.clone());
        match s.rows.get(&key) {
            Some(current) if current.generation == expected => {
                s.rows.insert(key, row.clone());
                Ok(true)
            }
            _ => Ok(false),
        }
    }
    fn commit(self) -> Result<(), StorageError> {
        Ok(())
    }
}

/// A keeper over a fake holding alice's token: obtained an hour before it
/// expires `expires_in` seconds after T0, refresh token `rt-1`.
fn world(expires_in: i64) -> (Keeper<Fake>, Fake) {
    let fake = Fake::default();
    fake.0.borrow_mut().now = T0;
    fake.0.borrow_mut().rows.insert(
        ("acme".into(), "alice".into()),
        stored_row("at-1", "rt-1", T0 + expires_in - 3600, T0 + expires_in, 1),
    );
    (Keeper::new(fake.clone()), fake)
}

fn stored_row(
    access: &str,
    refresh: &str,
    obtained_at: i64,
    expires_at: i64,
    generation: u64,
) -> SealedRow {
    SealedRow {
        provider: "acme".into(),
        user_id: "alice".into(),
        key_id: "k1".into(),
        access_token: seal_one("acme", "alice", Field::AccessToken, access),
        refresh_token: Some(seal_one("acme", "alice", Field::RefreshToken, refresh)),
        access_token_expires_at: Some(expires_at),
        refresh_token_expires_at: None,
        scopes: vec!["repo".into()],
        baseline_scopes: vec!["repo".into()],
        obtained_at,
        generation,
        health: Health::default(),
    }
}

fn answer(status: u16, body: &str) -> Result<HttpAnswer, RequestError> {
    Ok(HttpAnswer {
        status,
        content_type: Some("application/json".into()),
        retry_after: None,
        body: body.as_bytes().to_vec().into(),
    })
}

fn granted(access: &str, refresh: &str) -> Result<HttpAnswer, RequestError> {
    answer(
        200,
        &format!(
            r#"{{"access_token":"{access}","refresh_token":"{refresh}","expires_in":3600,"scope":"repo"}}"#
        ),
    )
}

/// Another runtime refreshed alice's row to `row` while we waited.
fn refreshed_meanwhile(row: SealedRow) -> Hook {
    Box::new(move |s: &mut State| {
        s.rows.insert(("acme".into(), "alice".into()), row);
    })
}

/// Another runtime's refresh of alice's row failed while we waited.
fn failed_meanwhile(class: ErrorClass) -> Hook {
    Box::new(move |s: &mut State| {
        let r = s.rows.get_mut(&("acme".into(), "alice".into())).unwrap();
        r.health.failed_attempts = 1;
        r.health.last_failure_at = Some(T0);
        r.health.last_failure = Some(class);
    })
}

fn row(fake: &Fake) -> SealedRow {
    fake.0.borrow().rows[&("acme".to_string(), "alice".to_string())].clone()
}

fn refresh_token_of(fake: &Fake) -> String {
    let r = row(fake);
    open_one(
        "acme",
        "alice",
        Field::RefreshToken,
        r.refresh_token.as_deref().unwrap(),
    )
    .unwrap()
}

#[test]
fn fresh_a_valid_token_is_served_from_one_read_without_a_lock_or_a_request() {
    let (keeper, fake) = world(7200);
    let grant = keeper.ensure_fresh("acme", "alice").unwrap();
    assert_eq!(grant.access_token.expose_secret(), "at-1");
    assert_eq!((grant.generation, grant.expires_at), (1, Some(T0 + 7200)));
    assert!(fake.0.borrow().requests.is_empty());
}

#[test]
fn due_a_token_inside_its_window_is_refreshed_once_and_the_rotation_kept() {
    let (keeper, fake) = world(300);
    fake.0
        .borrow_mut()
        .answers
        .push_back(granted("at-2", "rt-2"));
    let grant = keeper.ensure_fresh("acme", "alice").unwrap();
    assert_eq!(grant.access_token.expose_secret(), "at-2");
    assert_eq!(grant.generation, 2);
    assert_eq!(
        grant.expires_at,
        Some(T0 + 3600),
        "counted from when it was sent"
    );
    assert_eq!(fake.0.borrow().requests, ["rt-1"]);
    assert_eq!(refresh_token_of(&fake), "rt-2");
    assert_eq!(row(&fake).health.last_success_at, Some(T0));
}

#[test]
fn waiter_after_success_reads_the_token_another_runtime_committed() {
    let (keeper, fake) = world(-10);
    // While we wait for the lock, another runtime refreshes and commits.
    fake.0.borrow_mut().on_lock = Some(refreshed_meanwhile(stored_row(
        "at-theirs",
        "rt-theirs",
        T0,
        T0 + 3600,
        2,
    )));
    let grant = keeper.ensure_fresh("acme", "alice").unwrap();
    assert_eq!(grant.access_token.expose_secret(), "at-theirs");
    assert!(
        fake.0.borrow().requests.is_empty(),
        "no second provider call"
    );
}

#[test]
fn waiter_after_success_takes_a_short_lived_token_that_is_due_again() {
    let (keeper, fake) = world(-10);
    // Another runtime's refresh got a 3-second token, due again at once by
    // the time we hold the lock: it is still ours, not a second refresh.
    fake.0.borrow_mut().on_lock = Some(refreshed_meanwhile(stored_row(
        "at-short",
        "rt-short",
        T0 - 2,
        T0 + 1,
        2,
    )));
    let grant = keeper.ensure_fresh("acme", "alice").unwrap();
    assert_eq!(grant.access_token.expose_secret(), "at-short");
    assert!(fake.0.borrow().requests.is_empty());
}

#[test]
fn waiter_after_failure_gets_the_recorded_failure_without_a_request() {
    let (keeper, fake) = world(-10);
    fake.0.borrow_mut().on_lock = Some(failed_meanwhile(ErrorClass::ProviderUnavailable));
    let e = keeper.ensure_fresh("acme", "alice").unwrap_err();
    assert_eq!(e.class(), ErrorClass::ProviderUnavailable);
    assert!(fake.0.borrow().requests.is_empty());

    // The same failure with a still-valid token: the token is served.
    let (keeper, fake) = world(300);
    fake.0.borrow_mut().on_lock = Some(failed_meanwhile(ErrorClass::ProviderUnavailable));
    let grant = keeper.ensure_fresh("acme", "alice").unwrap();
    assert_eq!(grant.access_token.expose_secret(), "at-1");
    assert!(fake.0.borrow().requests.is_empty());
}

#[test]
fn definitive_refusal_is_recorded_and_stands_without_further_requests() {
    let (keeper, fake) = world(-10);
    fake.0
        .borrow_mut()
        .answers
        .push_back(answer(400, r#"{"error":"invalid_grant"}"#));
    let e = keeper.ensure_fresh("acme", "alice").unwrap_err();
    assert_eq!(e.class(), ErrorClass::ReauthorizationRequired);
    let r = row(&fake);
    assert_eq!(r.generation, 1, "the row is kept, not deleted");
    assert_eq!(
        r.health.last_failure,
        Some(ErrorClass::ReauthorizationRequired)
    );
    let again = keeper.ensure_fresh("acme", "alice").unwrap_err();
    assert_eq!(again.class(), ErrorClass::ReauthorizationRequired);
    assert_eq!(fake.0.borrow().requests.len(), 1, "the refusal stands");
}

#[test]
fn an_expired_refresh_token_is_offered_to_the_provider_not_refused_by_the_clock() {
    let (keeper, fake) = world(-10);
    fake.0
        .borrow_mut()
        .rows
        .get_mut(&("acme".into(), "alice".into()))
        .unwrap()
        .refresh_token_expires_at = Some(T0 - 86_400);
    fake.0
        .borrow_mut()
        .answers
        .push_back(granted("at-2", "rt-2"));
    let grant = keeper.ensure_fresh("acme", "alice").unwrap();
    assert_eq!(grant.access_token.expose_secret(), "at-2");
    assert_eq!(fake.0.borrow().requests.len(), 1);
    assert_eq!(row(&fake).health.last_failure, None);
}

#[test]
fn transient_failures_are_retried_with_backoff_within_the_budget() {
    let (keeper, fake) = world(-10);
    {
        let mut s = fake.0.borrow_mut();
        s.answers.push_back(answer(503, ""));
        s.answers
            .push_back(Err(RequestError::NotSent("refused".into())));
        s.answers.push_back(granted("at-2", "rt-2"));
    }
    let grant = keeper.ensure_fresh("acme", "alice").unwrap();
    assert_eq!(grant.access_token.expose_secret(), "at-2");
    let s = fake.0.borrow();
    assert_eq!(s.requests.len(), 3);
    assert_eq!(s.sleeps.len(), 2);
    assert!(s.sleeps[0] >= 200 && s.sleeps[1] >= 400, "{:?}", s.sleeps);
}

#[test]
fn a_request_of_unknown_fate_is_never_repeated_to_a_rotating_provider() {
    let (keeper, fake) = world(-10);
    fake.0
        .borrow_mut()
        .answers
        .push_back(Err(RequestError::NoAnswer("timed out".into())));
    let e = keeper.ensure_fresh("acme", "alice").unwrap_err();
    assert_eq!(e.class(), ErrorClass::ProviderUnavailable);
    assert_eq!(fake.0.borrow().requests.len(), 1);
    assert_eq!(row(&fake).health.failed_attempts, 1);
}

#[test]
fn a_denied_request_is_a_typed_egress_error() {
    let (keeper, fake) = world(-10);
    fake.0
        .borrow_mut()
        .answers
        .push_back(Err(RequestError::Denied("not configured".into())));
    let e = keeper.ensure_fresh("acme", "alice").unwrap_err();
    assert_eq!(e.class(), ErrorClass::EgressDenied);
}

#[test]
fn lost_rotation_an_interrupted_refresh_is_named_when_the_provider_refuses() {
    let (keeper, fake) = world(-10);
    // A runtime recorded a refresh start from generation 1 and died.
    fake.0
        .borrow_mut()
        .starts
        .insert(("acme".into(), "alice".into()), (1, T0 - 5));
    fake.0
        .borrow_mut()
        .answers
        .push_back(answer(400, r#"{"error":"invalid_grant"}"#));
    let e = keeper.ensure_fresh("acme", "alice").unwrap_err();
    assert!(
        matches!(&e, RefreshError::ReauthorizationRequired(m) if m.contains("interrupted refresh")),
        "{e}"
    );
}

#[test]
fn salvage_an_unusable_answer_that_rotated_keeps_the_new_refresh_token() {
    let (keeper, fake) = world(-10);
    fake.0.borrow_mut().answers.push_back(answer(
        200,
        r#"{"access_token":42,"refresh_token":"rt-salvaged"}"#,
    ));
    let e = keeper.ensure_fresh("acme", "alice").unwrap_err();
    assert_eq!(e.class(), ErrorClass::InvalidProviderResponse);
    assert_eq!(refresh_token_of(&fake), "rt-salvaged");
    let r = row(&fake);
    assert_eq!(r.generation, 2);
    assert_eq!(
        r.health.last_failure,
        Some(ErrorClass::InvalidProviderResponse)
    );
    // The next refresh, after the backoff, spends the salvaged token.
    assert_eq!(r.health.retry_not_before, Some(T0 + 5));
    fake.0.borrow_mut().now = T0 + 5;
    fake.0
        .borrow_mut()
        .answers
        .push_back(granted("at-3", "rt-3"));
    let grant = keeper.ensure_fresh("acme", "alice").unwrap();
    assert_eq!(grant.access_token.expose_secret(), "at-3");
    assert_eq!(fake.0.borrow().requests, ["rt-1", "rt-salvaged"]);
}

#[test]
fn no_refresh_token_is_reauthorisation_and_records_nothing() {
    let (keeper, fake) = world(-10);
    fake.0
        .borrow_mut()
        .rows
        .get_mut(&("acme".into(), "alice".into()))
        .unwrap()
        .refresh_token = None;
    let e = keeper.ensure_fresh("acme", "alice").unwrap_err();
    assert_eq!(e.class(), ErrorClass::ReauthorizationRequired);
    assert_eq!(row(&fake).health, Health::default());
    assert!(fake.0.borrow().requests.is_empty());
}

#[test]
fn a_valid_token_is_served_without_waiting_while_another_runtime_refreshes_it() {
    let (keeper, fake) = world(300);
    fake.0.borrow_mut().held_elsewhere = true;
    let grant = keeper.ensure_fresh("acme", "alice").unwrap();
    assert_eq!(grant.access_token.expose_secret(), "at-1");
    let s = fake.0.borrow();
    assert_eq!(s.try_locks, 1, "it tried the lock without waiting");
    assert!(s.requests.is_empty());
}

#[test]
fn an_expired_token_waits_for_the_lock_whoever_holds_it() {
    let (keeper, fake) = world(30);
    fake.0.borrow_mut().held_elsewhere = true;
    // Inside the skew: not valid enough to serve, so it waits (the fake
    // grants the lock once the holder is done) and refreshes.
    fake.0
        .borrow_mut()
        .answers
        .push_back(granted("at-2", "rt-2"));
    let grant = keeper.ensure_fresh("acme", "alice").unwrap();
    assert_eq!(grant.access_token.expose_secret(), "at-2");
    assert_eq!(fake.0.borrow().try_locks, 0);
}

#[test]
fn a_definitive_refusal_serves_a_still_valid_token_and_records_the_failure() {
    let (keeper, fake) = world(300);
    fake.0
        .borrow_mut()
        .answers
        .push_back(answer(400, r#"{"error":"invalid_grant"}"#));
    let grant = keeper.ensure_fresh("acme", "alice").unwrap();
    assert_eq!(grant.access_token.expose_secret(), "at-1");
    assert_eq!(
        row(&fake).health.last_failure,
        Some(ErrorClass::ReauthorizationRequired),
        "nothing silent: the row records the refusal"
    );
    // The refusal stands: later callers are served without a request ...
    let again = keeper.ensure_fresh("acme", "alice").unwrap();
    assert_eq!(again.access_token.expose_secret(), "at-1");
    // ... until the token is no longer valid beyond the skew.
    fake.0.borrow_mut().now = T0 + 300 - 59;
    let e = keeper.ensure_fresh("acme", "alice").unwrap_err();
    assert_eq!(e.class(), ErrorClass::ReauthorizationRequired);
    assert_eq!(fake.0.borrow().requests.len(), 1);
}

#[test]
fn after_a_failure_callers_leave_the_provider_alone_until_the_backoff_ends() {
    let (keeper, fake) = world(-10);
    fake.0
        .borrow_mut()
        .answers
        .push_back(answer(503, r#"{"error":"temporarily_unavailable"}"#));
    fake.0.borrow_mut().answers.push_back(Ok(HttpAnswer {
        status: 503,
        content_type: None,
        retry_after: Some(120),
        body: Vec::new().into(),
    }));
    fake.0.borrow_mut().answers.push_back(answer(503, ""));
    let e = keeper.ensure_fresh("acme", "alice").unwrap_err();
    assert_eq!(e.class(), ErrorClass::ProviderUnavailable);
    let requests = fake.0.borrow().requests.len();
    // The provider said when to come back: new callers do not ask before.
    assert_eq!(row(&fake).health.retry_not_before, Some(T0 + 120));
    for at in [T0 + 1, T0 + 60, T0 + 119] {
        fake.0.borrow_mut().now = at;
        let e = keeper.ensure_fresh("acme", "alice").unwrap_err();
        assert_eq!(e.class(), ErrorClass::ProviderUnavailable);
    }
    assert_eq!(fake.0.borrow().requests.len(), requests, "no stampede");
    fake.0.borrow_mut().now = T0 + 120;
    fake.0
        .borrow_mut()
        .answers
        .push_back(granted("at-2", "rt-2"));
    let grant = keeper.ensure_fresh("acme", "alice").unwrap();
    assert_eq!(grant.access_token.expose_secret(), "at-2");
    assert_eq!(row(&fake).health.retry_not_before, None);
}

#[test]
fn the_backoff_grows_with_the_failures_and_is_bounded() {
    assert_eq!(
        [1, 2, 3, 4, 10, 40].map(|n| backoff_seconds(n, None)),
        [5, 10, 20, 40, 300, 300]
    );
    assert_eq!(backoff_seconds(1, Some(60)), 60);
    assert_eq!(
        backoff_seconds(1, Some(86_400)),
        300,
        "a Retry-After is bounded"
    );
}

#[test]
fn a_token_narrowed_below_what_the_user_authorised_is_served_to_no_one() {
    let (keeper, fake) = world(-10);
    fake.0.borrow_mut().answers.push_back(answer(
        200,
        r#"{"access_token":"at-narrow","refresh_token":"rt-2","expires_in":3600,"scope":"read"}"#,
    ));
    let e = keeper.ensure_fresh("acme", "alice").unwrap_err();
    assert_eq!(e, RefreshError::ScopeMismatch(vec!["repo".into()]));
    // The narrowed token is fresh, but no later caller gets it either.
    for _ in 0..2 {
        let e = keeper.ensure_fresh("acme", "alice").unwrap_err();
        assert_eq!(e, RefreshError::ScopeMismatch(vec!["repo".into()]));
    }
    let r = row(&fake);
    assert_eq!(
        (r.scopes, r.baseline_scopes),
        (vec!["read".to_string()], vec!["repo".to_string()])
    );
    assert_eq!(fake.0.borrow().requests.len(), 1);
}

#[test]
fn a_minimum_lifetime_refreshes_a_token_its_window_would_still_serve() {
    // Half an hour left of an hour: outside the 10-minute window.
    let (keeper, fake) = world(1800);
    assert_eq!(
        keeper
            .ensure_fresh("acme", "alice")
            .unwrap()
            .access_token
            .expose_secret(),
        "at-1"
    );
    fake.0
        .borrow_mut()
        .answers
        .push_back(granted("at-2", "rt-2"));
    let grant = keeper.ensure_fresh_for("acme", "alice", 2400).unwrap();
    assert_eq!(grant.access_token.expose_secret(), "at-2");
    assert_eq!(grant.expires_at, Some(T0 + 3600));
    // The new token meets the minimum: the next caller is served it.
    let again = keeper.ensure_fresh_for("acme", "alice", 2400).unwrap();
    assert_eq!(again.access_token.expose_secret(), "at-2");
    assert_eq!(fake.0.borrow().requests, ["rt-1"]);
}

#[test]
fn a_minimum_within_the_refresh_window_of_the_tokens_lifetime_is_invalid_input() {
    let (keeper, fake) = world(1800);
    for too_long in [7200, 3600, 3001] {
        let e = keeper
            .ensure_fresh_for("acme", "alice", too_long)
            .unwrap_err();
        assert_eq!(e.class(), ErrorClass::InvalidInput);
        assert!(e.to_string().contains("at most 3000 s"), "{e}");
    }
    assert!(fake.0.borrow().requests.is_empty());
}

#[test]
fn a_refreshed_token_shorter_than_the_minimum_is_kept_and_the_minimum_refused() {
    let (keeper, fake) = world(1800);
    fake.0.borrow_mut().answers.push_back(answer(
        200,
        r#"{"access_token":"at-2","refresh_token":"rt-2","expires_in":2000}"#,
    ));
    let e = keeper.ensure_fresh_for("acme", "alice", 2400).unwrap_err();
    assert_eq!(e.class(), ErrorClass::InvalidInput);
    assert!(e.to_string().contains("lives 2000 s"), "{e}");
    assert_eq!(refresh_token_of(&fake), "rt-2", "the rotation is kept");
    // From then on refused without a request; the token itself is served.
    let e = keeper.ensure_fresh_for("acme", "alice", 2400).unwrap_err();
    assert_eq!(e.class(), ErrorClass::InvalidInput);
    assert_eq!(fake.0.borrow().requests, ["rt-1"]);
    let grant = keeper.ensure_fresh("acme", "alice").unwrap();
    assert_eq!(grant.access_token.expose_secret(), "at-2");
}

#[test]
fn a_token_stored_after_its_expiry_is_still_refreshed_without_a_minimum() {
    let (keeper, fake) = world(-10);
    fake.0
        .borrow_mut()
        .rows
        .get_mut(&("acme".into(), "alice".into()))
        .unwrap()
        .obtained_at = T0;
    fake.0
        .borrow_mut()
        .answers
        .push_back(granted("at-2", "rt-2"));
    let grant = keeper.ensure_fresh("acme", "alice").unwrap();
    assert_eq!(grant.access_token.expose_secret(), "at-2");
}

#[test]
fn a_token_short_of_the_minimum_is_not_served_when_its_refresh_fails() {
    let (keeper, fake) = world(1800);
    fake.0.borrow_mut().held_elsewhere = true;
    fake.0
        .borrow_mut()
        .answers
        .push_back(answer(400, r#"{"error":"invalid_grant"}"#));
    let e = keeper.ensure_fresh_for("acme", "alice", 2400).unwrap_err();
    assert_eq!(e.class(), ErrorClass::ReauthorizationRequired);
    let s = fake.0.borrow();
    assert_eq!(
        s.try_locks, 0,
        "short of the minimum: it waits for the lock"
    );
    assert_eq!(s.requests, ["rt-1"]);
    drop(s);
    // Without a minimum, the same token is still served.
    let grant = keeper.ensure_fresh("acme", "alice").unwrap();
    assert_eq!(grant.access_token.expose_secret(), "at-1");
}
