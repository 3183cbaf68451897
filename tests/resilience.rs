//! tokenkeep when things go wrong: many runtime processes at once, runtimes
//! killed while they hold a row lock, provider faults, hostile input, and the
//! secrets that must never show in any output along the way.

mod common;

use common::{Backend, KEYS, World, token_set};
use secrecy::{ExposeSecret, SecretString};
use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokenkeep_host::{Clock, Config, Error, Keeper, Keyring, Options, SandboxLimits};
use tokenkeep_testkit::devprovider::Behaviour;

on_both_backends!(
    single_flight_holds_for_four_processes_of_sixty_four_tasks_over_two_hundred_tokens,
    a_lock_holder_killed_at_any_point_loses_no_row_and_the_outcome_is_explicit,
    hostile_names_and_ids_are_stored_verbatim_or_refused,
);

/// Scale of the load test; `just soak` raises them.
fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const PROCESSES: usize = 4;
const TASKS: usize = 64;
/// Each token is asked for by this many tasks of every process.
const CALLERS_PER_TOKEN: usize = 8;

/// A runtime process: this test binary re-run as `load_worker`.
struct Worker {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Worker {
    fn spawn(w: &World, tokens: usize) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "load_worker", "--ignored", "--nocapture"])
            .env("TOKENKEEP_LOAD_DATABASE", &w.database_url)
            .env("TOKENKEEP_LOAD_CONFIG", &w.config_path)
            .env("TOKENKEEP_LOAD_TOKENS", tokens.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(report) = line.strip_prefix("LOAD ") {
                    let _ = tx.send(report.to_string());
                }
            }
        });
        Worker { child, lines }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    fn report(&self) -> BTreeMap<String, String> {
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(300))
            .expect("a worker reports each round");
        line.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing stdin ends a healthy worker; a stuck one is killed.
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child side of the load test: one runtime process with 64 tasks.
/// Runs only when the parent test starts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a runtime process started by the single-flight load test"]
async fn load_worker() {
    let database_url = std::env::var("TOKENKEEP_LOAD_DATABASE").expect("started by the load test");
    let config = std::env::var("TOKENKEEP_LOAD_CONFIG").unwrap();
    let tokens: usize = std::env::var("TOKENKEEP_LOAD_TOKENS")
        .unwrap()
        .parse()
        .unwrap();
    let keeper = Keeper::open(Options {
        database_url,
        config: Config::load(std::path::Path::new(&config)).unwrap(),
        keyring: Keyring::parse(&SecretString::from(KEYS.to_string())).unwrap(),
        limits: SandboxLimits::default(),
        max_connections: 16,
        clock: Clock::System,
        grant_cache: false,
        audit_as: None,
    })
    .await
    .unwrap();
    let (tx, mut rounds) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while rounds.recv().await.is_some() {
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let keeper = keeper.clone();
            tasks.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut errors = Vec::new();
                let mut stale = 0;
                for i in
                    (t % (TASKS / CALLERS_PER_TOKEN)..tokens).step_by(TASKS / CALLERS_PER_TOKEN)
                {
                    match keeper.ensure_fresh("acme", &format!("user-{i}")).await {
                        Ok(r) => {
                            if r.expires_at <= Some(common::now()) {
                                stale += 1;
                            }
                            seen.push((i, r.access_token.expose_secret().to_string()));
                        }
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                (seen, errors, stale)
            }));
        }
        let mut per_token: BTreeMap<usize, HashSet<String>> = BTreeMap::new();
        let (mut ok, mut stale, mut errors) = (0, 0, Vec::new());
        for t in tasks {
            let (seen, errs, st) = t.await.unwrap();
            ok += seen.len();
            stale += st;
            errors.extend(errs);
            for (i, token) in seen {
                per_token.entry(i).or_default().insert(token);
            }
        }
        let split = per_token.values().filter(|s| s.len() > 1).count();
        // A digest of which token each user got, to compare across processes.
        let digest = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            for (i, set) in &per_token {
                (i, set.iter().collect::<Vec<_>>()).hash(&mut h);
            }
            h.finish()
        };
        let first_error = errors
            .first()
            .cloned()
            .unwrap_or_default()
            .replace(' ', "_");
        println!(
            "LOAD ok={ok} stale={stale} errors={} split={split} digest={digest:x} first_error={first_error}",
            errors.len()
        );
    }
}

async fn single_flight_holds_for_four_processes_of_sixty_four_tasks_over_two_hundred_tokens(
    b: Backend,
) {
    let tokens = knob("TOKENKEEP_LOAD_TOKENS", 200);
    // On Postgres the provider answers after 2 seconds, so that callers
    // pile up behind every refresh. SQLite refreshes one token at a time
    // (its write lock is the file's): 200 slow refreshes would take minutes.
    let delay = match b {
        Backend::Postgres => knob("TOKENKEEP_LOAD_PROVIDER_DELAY_MS", 2000),
        Backend::Sqlite => 0,
    };
    let rounds = knob("TOKENKEEP_LOAD_ROUNDS", if delay > 0 { 2 } else { 3 });
    let w = World::new(b, "scale").await;
    w.provider
        .set(|p| p.delay = Duration::from_millis(delay as u64));
    // One authorisation per user, each a rotating chain with reuse detection.
    w.store_chains(tokens, -10).await;
    let mut workers: Vec<Worker> = (0..PROCESSES).map(|_| Worker::spawn(&w, tokens)).collect();
    let per_process = TASKS / (TASKS / CALLERS_PER_TOKEN) * tokens;
    for round in 1..=rounds {
        if round > 1 {
            // Every token expires again between rounds.
            common::raw_sql(
                &w.database_url,
                &format!(
                    "UPDATE tokenkeep_tokens SET access_token_expires_at = {}",
                    common::now() - 10
                ),
            )
            .await;
        }
        let started = Instant::now();
        for worker in &mut workers {
            worker.send("go");
        }
        let reports: Vec<_> = workers.iter().map(Worker::report).collect();
        let elapsed = started.elapsed();
        for r in &reports {
            assert_eq!(r["errors"], "0", "round {round}: {r:?}");
            assert_eq!(r["stale"], "0", "round {round}: {r:?}");
            assert_eq!(r["split"], "0", "round {round}: {r:?}");
            assert_eq!(r["ok"], per_process.to_string(), "round {round}: {r:?}");
        }
        let digests: HashSet<_> = reports.iter().map(|r| r["digest"].clone()).collect();
        assert_eq!(
            digests.len(),
            1,
            "round {round}: every process got the same token for every user"
        );
        assert_eq!(
            w.provider.calls() as usize,
            tokens * round,
            "round {round}: exactly one provider call per token"
        );
        assert_eq!(w.provider.reuses(), 0);
        assert_eq!(w.provider.revoked_chains(), 0);
        eprintln!(
            "{b:?} round {round}: {} callers' requests, {tokens} provider calls \
             answering after {delay} ms, {elapsed:?}",
            PROCESSES * per_process
        );
    }
    assert!(
        w.provider
            .issued_per_chain()
            .iter()
            .all(|&n| n as usize == rounds)
    );
}

/// Where a lock holder dies.
#[derive(Debug, Clone, Copy)]
enum KillPoint {
    /// While its request stalls before the provider processes it.
    BeforeTheProviderProcessedIt,
    /// After the provider rotated the token, before the answer arrived.
    AfterTheProviderRotated,
    /// At a spread of moments: before the request (0-99: a quarter of that
    /// in ms after start-up; the CLI reaches the provider in about 30 ms), then 0-300 ms after the request arrived at a provider that
    /// answers 150 ms after rotating (100-399), so the kill lands before the
    /// call, while the answer is pending, and around the commit.
    Anywhere(u64),
}

async fn a_lock_holder_killed_at_any_point_loses_no_row_and_the_outcome_is_explicit(b: Backend) {
    let trials = knob("TOKENKEEP_KILL_TRIALS", 8);
    let w = World::new(b, "kill").await;
    let mut points = Vec::new();
    for i in 0..trials {
        points.push(KillPoint::BeforeTheProviderProcessedIt);
        points.push(KillPoint::AfterTheProviderRotated);
        points.push(KillPoint::Anywhere((i as u64 * 137 + 11) % 400));
    }
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut longest_wait = Duration::ZERO;
    let other_runtime = w.another_keeper().await;
    for (n, point) in points.iter().enumerate() {
        let user = format!("victim-{n}");
        let refresh = format!("rt-victim-{n}");
        w.provider.reset_chain(&refresh);
        w.provider.set(|b| {
            b.delay = Duration::ZERO;
            b.answer_delay = Duration::ZERO;
            match point {
                KillPoint::BeforeTheProviderProcessedIt => b.delay = Duration::from_secs(30),
                KillPoint::AfterTheProviderRotated => b.answer_delay = Duration::from_secs(30),
                KillPoint::Anywhere(_) => b.answer_delay = Duration::from_millis(150),
            }
        });
        w.keeper
            .store_tokens(
                "acme",
                &user,
                &token_set("at-old", Some(&refresh), Some(w.now() - 10)),
            )
            .await
            .unwrap();
        let arrived = w.provider.arrived();
        let mut victim = w
            .cli()
            .args(["tokens", "get", "acme", &user])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let calls = w.provider.calls();
        let deadline = Instant::now() + Duration::from_secs(30);
        let at_the_provider = async || {
            // Its request is at the provider: it holds the row lock.
            while w.provider.arrived() == arrived {
                assert!(
                    Instant::now() < deadline,
                    "trial {n}: the victim never called"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        let rotated_by_the_provider = async || {
            while w.provider.calls() == calls {
                assert!(
                    Instant::now() < deadline,
                    "trial {n}: the provider never acted"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        match point {
            KillPoint::Anywhere(at) if *at < 100 => {
                tokio::time::sleep(Duration::from_millis(at / 4)).await
            }
            KillPoint::Anywhere(at) => {
                at_the_provider().await;
                tokio::time::sleep(Duration::from_millis(at - 100)).await
            }
            KillPoint::AfterTheProviderRotated => rotated_by_the_provider().await,
            KillPoint::BeforeTheProviderProcessedIt => at_the_provider().await,
        }
        // A waiter queues on the lock the victim holds...
        let waiter = {
            let (k, user) = (other_runtime.clone(), user.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                (k.ensure_fresh("acme", &user).await, started.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        w.provider.set(|b| {
            b.delay = Duration::ZERO;
            b.answer_delay = Duration::ZERO;
        });
        // ...and the victim dies holding it.
        let _ = victim.kill();
        victim.wait().unwrap();
        let (outcome, waited) = waiter.await.unwrap();
        longest_wait = longest_wait.max(waited);
        assert!(
            waited < Duration::from_secs(20),
            "trial {n} ({point:?}): the waiter proceeded after {waited:?}"
        );
        let row = w.keeper.load_tokens("acme", &user, false).await;
        let row = row
            .unwrap_or_else(|e| panic!("trial {n}: the row must decrypt: {e}"))
            .unwrap_or_else(|| panic!("trial {n}: the row must survive"));
        let label = match (&outcome, point) {
            // Refreshed by the waiter, or by the victim before it died.
            (Ok(r), _) => {
                assert!(r.expires_at > Some(w.now()));
                assert_eq!(row.generation, r.generation);
                "fresh token"
            }
            (Err(Error::ReauthorizationRequired(m)), _) if m.contains("interrupted refresh") => {
                // The provider rotated and the answer died with the victim:
                // named as a lost rotation, the row kept for the operator.
                assert_eq!(row.generation, 1, "trial {n}");
                assert_eq!(row.tokens.access_token.expose_secret(), "at-old");
                "lost rotation, named"
            }
            (Err(e), point) => panic!("trial {n} ({point:?}): unexpected {e}"),
        };
        if matches!(point, KillPoint::BeforeTheProviderProcessedIt) {
            assert_eq!(label, "fresh token", "trial {n}");
        }
        if matches!(point, KillPoint::AfterTheProviderRotated) {
            assert_eq!(label, "lost rotation, named", "trial {n}");
        }
        if std::env::var_os("TOKENKEEP_KILL_VERBOSE").is_some() {
            eprintln!("trial {n} {point:?}: {label}");
        }
        let kind = format!("{point:?}").replace(|c: char| c.is_ascii_digit(), "");
        *outcomes.entry(format!("{kind}: {label}")).or_default() += 1;
    }
    // Every row of every trial is still there and opens.
    let rows = w.keeper.list_tokens().await.unwrap();
    assert_eq!(rows.len(), points.len());
    eprintln!(
        "{b:?}: {} trials, longest wait behind a killed holder {longest_wait:?}: {outcomes:?}",
        points.len()
    );
}

async fn hostile_names_and_ids_are_stored_verbatim_or_refused(b: Backend) {
    let w = World::new(b, "hostile").await;
    let long = "x".repeat(100_000);
    let accepted = [
        "'; DROP TABLE tokenkeep_tokens; --",
        "robert'); DELETE FROM tokenkeep_tokens WHERE ('1'='1",
        "%_\\%",
        "ユーザー😀",
        "e\u{301}te\u{301}",
        "../../etc/passwd",
        " leading and trailing ",
    ];
    for user in accepted {
        w.store(user, "at-h", Some("rt-h"), 3600).await;
        let got = w.stored(user).await;
        assert_eq!(got.user_id, user);
        assert_eq!(got.tokens.access_token.expose_secret(), "at-h");
    }
    let listed: HashSet<String> = w
        .keeper
        .list_tokens()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.user_id)
        .collect();
    for user in accepted {
        assert!(listed.contains(user), "{user:?} listed verbatim");
    }
    for refused in ["", "nul\0byte", "line\nbreak", long.as_str()] {
        let e = w
            .keeper
            .store_tokens("acme", refused, &token_set("a", Some("r"), None))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidInput(_)), "{e}");
        assert!(!e.to_string().contains(refused) || refused.is_empty());
        let e = w.keeper.ensure_fresh("acme", refused).await.unwrap_err();
        assert!(matches!(e, Error::InvalidInput(_)), "{e}");
    }
    for provider in ["'; DROP TABLE x; --", "", "ü", long.as_str(), "nope"] {
        let e = w.keeper.ensure_fresh(provider, "alice").await.unwrap_err();
        assert!(
            matches!(e, Error::InvalidInput(_) | Error::UnknownProvider(_)),
            "{e}"
        );
    }
    // Nothing was harmed: every accepted row is still there.
    assert_eq!(w.keeper.list_tokens().await.unwrap().len(), accepted.len());
}

/// A provider fault: how the endpoint misbehaves and the exit code it must give.
struct Fault {
    name: &'static str,
    set: fn(&mut Behaviour),
    exit: i32,
}

fn raw(bytes: &str) -> Option<Vec<u8>> {
    Some(bytes.as_bytes().to_vec())
}

const FAULTS: &[Fault] = &[
    Fault {
        name: "HTTP 500 with an HTML page",
        set: |b| b.canned = Some((500, "text/html".into(), "<h1>oops rt-LEAK-500</h1>".into())),
        exit: 5,
    },
    Fault {
        name: "HTTP 503 with Retry-After",
        set: |b| {
            b.raw = raw(
                "HTTP/1.1 503 Service Unavailable\r\nretry-after: 30\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
        },
        exit: 5,
    },
    Fault {
        name: "HTTP 429",
        set: |b| {
            b.canned = Some((
                429,
                "application/json".into(),
                r#"{"message":"slow down"}"#.into(),
            ))
        },
        exit: 5,
    },
    Fault {
        name: "a stall longer than the timeout before any answer",
        set: |b| b.delay = Duration::from_secs(3),
        exit: 5,
    },
    Fault {
        name: "a stall longer than the timeout in the middle of the body",
        set: |b| {
            b.raw = raw(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 300\r\n\r\n{\"access_token\":\"at-LEAK-STALL\"",
            );
            b.answer_delay = Duration::from_secs(3);
        },
        exit: 11,
    },
    Fault {
        name: "a body trickled a byte at a time, each well within the timeout",
        set: |b| {
            b.raw = raw(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 56\r\n\r\n{\"access_token\":\"at-LEAK-TRICKLE\",\"token_type\":\"bearer\"}",
            );
            b.trickle = Duration::from_millis(100);
        },
        exit: 11,
    },
    Fault {
        name: "a truncated body",
        set: |b| {
            b.raw = raw(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 400\r\nconnection: close\r\n\r\n{\"access_token\":\"at-LEAK-TRUNC\",\"refr",
            )
        },
        exit: 11,
    },
    Fault {
        name: "not HTTP at all",
        set: |b| b.raw = raw("SSH-2.0-OpenSSH_9.6 rt-LEAK-PROTO\r\n\r\n"),
        exit: 5,
    },
    Fault {
        name: "a garbage body",
        set: |b| {
            b.canned = Some((
                200,
                "application/json".into(),
                "\u{1}\u{2}garbage rt-LEAK-GARBAGE \u{ff}".into(),
            ))
        },
        exit: 11,
    },
    Fault {
        name: "an empty body",
        set: |b| b.canned = Some((200, "application/json".into(), String::new())),
        exit: 11,
    },
    Fault {
        name: "an HTML login page with HTTP 200",
        set: |b| {
            b.canned = Some((
                200,
                "text/html".into(),
                "<html><form>sign in rt-LEAK-HTML</form></html>".into(),
            ))
        },
        exit: 11,
    },
    Fault {
        name: "JSON that is not an object",
        set: |b| {
            b.canned = Some((
                200,
                "application/json".into(),
                r#"["at-LEAK-ARRAY"]"#.into(),
            ))
        },
        exit: 11,
    },
    Fault {
        name: "an access token of the wrong type",
        set: |b| {
            b.canned = Some((
                200,
                "application/json".into(),
                r#"{"access_token":42,"refresh_token":"rt-salvaged"}"#.into(),
            ))
        },
        exit: 11,
    },
    Fault {
        name: "an oversized body",
        set: |b| {
            let padding = "x".repeat(200 * 1024);
            b.canned = Some((
                200,
                "application/json".into(),
                format!(r#"{{"access_token":"at-LEAK-BIG","pad":"{padding}"}}"#),
            ))
        },
        exit: 11,
    },
    Fault {
        name: "HTTP 200 carrying an OAuth error",
        set: |b| {
            b.canned = Some((
                200,
                "application/json".into(),
                r#"{"error":"temporarily_unavailable","error_description":"rt-LEAK-DESC"}"#.into(),
            ))
        },
        exit: 5,
    },
    Fault {
        name: "a valid answer under a wrong content type",
        set: |b| {
            b.canned = Some((
                200,
                "text/plain".into(),
                r#"{"access_token":"at-plain-ok","expires_in":3600}"#.into(),
            ))
        },
        exit: 0,
    },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn provider_faults_and_other_failure_paths_give_typed_errors_keep_tokens_and_leak_nothing() {
    let mut w = World::new(Backend::Sqlite, "faults").await;
    let p = w
        .add_provider_toml(
            "faulty",
            Behaviour::default(),
            "token_url = \"{loopback}/token\"\ntimeout_ms = 500\nmax_attempts = 1\n",
        )
        .await;
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    w.add_config(&format!(
        "\n[providers.gone]\ntoken_url = \"http://127.0.0.1:{closed_port}/token\"\nclient_id = \"dev-client\"\nclient_secret = \"dev-secret\"\ntimeout_ms = 500\n"
    ))
    .await;
    let mut output = String::new();
    let mut run = |args: &[&str], stdin: &str| {
        let (code, stdout, stderr) = w.cli_traced(args, stdin);
        output.push_str(&stdout);
        output.push_str(&stderr);
        code
    };
    let mut cli = |provider: &str, user: &str| run(&["tokens", "get", provider, user], "");
    let mut secrets = vec!["dev-secret".to_string()];
    secrets.extend(
        KEYS.lines()
            .map(|l| l.split_once('=').unwrap().1.to_string()),
    );

    for (i, fault) in FAULTS.iter().enumerate() {
        let user = format!("user-{i}");
        let (access, refresh) = (format!("at-SECRET-{i}"), format!("rt-SECRET-{i}"));
        secrets.extend([access.clone(), refresh.clone()]);
        p.add_chain(&refresh);
        w.keeper
            .store_tokens(
                "faulty",
                &user,
                &token_set(&access, Some(&refresh), Some(w.now() - 10)),
            )
            .await
            .unwrap();
        p.set(|b| *b = Behaviour::default());
        p.set(fault.set);
        let code = cli("faulty", &user);
        p.set(|b| *b = Behaviour::default());
        assert_eq!(code, fault.exit, "{}", fault.name);
        let row = w.keeper.load_tokens("faulty", &user, false).await.unwrap();
        let row = row.unwrap_or_else(|| panic!("{}: the row is kept", fault.name));
        if fault.exit == 0 {
            assert_eq!(row.generation, 2, "{}", fault.name);
            continue;
        }
        assert_eq!(row.tokens.access_token.expose_secret(), access);
        let rotated = row.tokens.refresh_token.as_ref().unwrap().expose_secret();
        if rotated == "rt-salvaged" {
            // The unusable answer did carry a new refresh token: kept, since
            // the provider has spent the old one.
            assert_eq!(row.generation, 2, "{}", fault.name);
            p.add_chain("rt-salvaged");
        } else {
            assert_eq!(row.generation, 1, "{}: the token is untouched", fault.name);
            assert_eq!(rotated, refresh);
        }
        // Not disabled: once the provider behaves (and the backoff is
        // over), the same token refreshes.
        w.backoff_over().await;
        let again = w.keeper.ensure_fresh("faulty", &user).await;
        assert!(again.is_ok(), "{}: {again:?}", fault.name);
    }
    // A provider that is not listening at all.
    w.keeper
        .store_tokens(
            "gone",
            "u",
            &token_set("at-SECRET-gone", Some("rt-SECRET-gone"), Some(w.now() - 10)),
        )
        .await
        .unwrap();
    secrets.extend(["at-SECRET-gone".into(), "rt-SECRET-gone".into()]);
    assert_eq!(cli("gone", "u"), 5, "connection refused");
    assert_eq!(
        w.keeper
            .load_tokens("gone", "u", false)
            .await
            .unwrap()
            .unwrap()
            .generation,
        1
    );

    // The other failure paths, at the same log level.
    common::raw_sql(
        &w.database_url,
        "UPDATE tokenkeep_tokens SET access_token = substr(access_token, 1, 20) || X'00' || substr(access_token, 22) WHERE user_id = 'user-0'",
    )
    .await;
    assert_eq!(
        run(&["tokens", "get", "faulty", "user-0"], ""),
        10,
        "tampered"
    );
    assert_eq!(
        run(&["tokens", "get", "nope", "user-0"], ""),
        12,
        "unknown provider"
    );
    assert_eq!(
        run(&["tokens", "get", "faulty", ""], ""),
        13,
        "empty user id"
    );
    assert_eq!(run(&["tokens", "list"], ""), 0);
    assert_eq!(run(&["keys", "status"], ""), 0);
    run(&["keys", "rotate"], "");
    p.set(|b| b.canned = Some((500, "text/plain".into(), "rt-LEAK-CONV".into())));
    let settings = format!(
        r#"{{"provider_tokens":{{"faulty":{{"token":"at-CONV-SECRET","refresh_token":"rt-CONV-SECRET","expires_at":{}}}}}}}"#,
        w.now() - 10
    );
    secrets.extend(["at-CONV-SECRET".into(), "rt-CONV-SECRET".into()]);
    assert_eq!(
        run(&["conversations", "refresh", "conv-1", "carol"], &settings),
        5,
        "a conversation whose provider is down"
    );
    assert_eq!(run(&["conversations", "show", "conv-1"], ""), 0);

    // (at-plain-ok is not here: a successful `tokens get` prints the access
    // token it was asked for.)
    secrets.push("rt-salvaged".into());
    assert!(output.contains("TRACE") || output.contains("DEBUG"));
    for secret in &secrets {
        assert!(!output.contains(secret.as_str()), "{secret} leaked");
    }
    assert!(!output.contains("LEAK"), "a provider body was echoed");
}
