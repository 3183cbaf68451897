//! `just bench`: what tokenkeep costs, each figure as a ratio against a
//! baseline measured in the same run, written to `docs/benchmarks.md`.
//!
//! Baselines: a bare prepared SELECT by (provider, user_id) on dedicated
//! tokio-postgres connections; a point read through the SQLite C library
//! (rusqlite); a bare `BEGIN; SELECT … FOR UPDATE; UPDATE; COMMIT`; the
//! same validity check called natively; `true` for process start. Every
//! figure is the median of several runs after a warm-up, with the spread
//! (lowest to highest run) beside it. Postgres is a throwaway cluster the
//! harness starts (or `DATABASE_URL`); the provider is the loopback test
//! endpoint.

use secrecy::SecretString;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenkeep_host::{Clock, Config, Keeper, Keyring, Options, SandboxLimits, TokenSet};
use tokenkeep_testkit::devprovider::{Behaviour, DevProvider};

const KEYS: &str = "k1=AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
/// Runs of each measurement; the table shows their median and spread.
const RUNS: usize = 5;
/// Operations per latency run, after a warm-up of a tenth as many.
const OPS: usize = 2_000;
/// How long each throughput run lasts.
const WINDOW: Duration = Duration::from_millis(700);
/// Latency samples kept per caller and throughput run.
const MAX_SAMPLES: usize = 50_000;
/// Concurrent callers (or connections) of the "8" rows.
const CALLERS: usize = 8;
/// Refreshes per caller in each refresh-throughput run.
const REFRESHES_PER_CALLER: usize = 60;

/// The median and spread of several runs of one figure.
#[derive(Clone, Copy)]
struct Figure {
    median: f64,
    low: f64,
    high: f64,
}

impl Figure {
    fn of(mut runs: Vec<f64>) -> Self {
        runs.sort_by(f64::total_cmp);
        Self {
            median: runs[runs.len() / 2],
            low: runs[0],
            high: runs[runs.len() - 1],
        }
    }
}

/// Latency percentiles of one run, in microseconds.
fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

/// p50 and p99 of `op`, one caller: each a figure over [`RUNS`] runs.
async fn latency(mut op: impl AsyncFnMut()) -> (Figure, Figure) {
    let (mut p50, mut p99) = (Vec::new(), Vec::new());
    for _ in 0..OPS / 10 {
        op().await;
    }
    for _ in 0..RUNS {
        let mut samples = Vec::with_capacity(OPS);
        for _ in 0..OPS {
            let start = Instant::now();
            op().await;
            samples.push(start.elapsed());
        }
        samples.sort();
        p50.push(percentile(&samples, 0.5));
        p99.push(percentile(&samples, 0.99));
    }
    (Figure::of(p50), Figure::of(p99))
}

/// Operations per second with `callers` concurrent callers, and their p50
/// and p99 latencies (µs).
async fn throughput<F, Fut>(callers: usize, op: F) -> (Figure, Figure, Figure)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let (mut rates, mut p50, mut p99) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..=RUNS {
        let start = Instant::now();
        let tasks: Vec<_> = (0..callers)
            .map(|caller| {
                let op = op.clone();
                tokio::spawn(async move {
                    // Every operation counts; latencies are a uniform
                    // sample of them (reservoir), so that a fast path does
                    // not fill memory (the peak memory note is ours).
                    let (mut ops, mut samples) = (0usize, Vec::new());
                    let mut seed = 0x9e37_79b9_7f4a_7c15_u64 ^ caller as u64;
                    while start.elapsed() < WINDOW {
                        let t = Instant::now();
                        op(caller).await;
                        let took = t.elapsed();
                        ops += 1;
                        if samples.len() < MAX_SAMPLES {
                            samples.push(took);
                        } else {
                            seed ^= seed << 13;
                            seed ^= seed >> 7;
                            seed ^= seed << 17;
                            let i = (seed % ops as u64) as usize;
                            if i < MAX_SAMPLES {
                                samples[i] = took;
                            }
                        }
                        // Callers take turns as in a server, where every
                        // request yields (a cached read never does itself).
                        tokio::task::yield_now().await;
                    }
                    (ops, samples)
                })
            })
            .collect();
        let (mut ops, mut samples) = (0, Vec::new());
        for t in tasks {
            let (n, s) = t.await.expect("caller");
            ops += n;
            samples.extend(s);
        }
        let elapsed = start.elapsed();
        // Run 0 warms up.
        if run == 0 {
            continue;
        }
        samples.sort();
        rates.push(ops as f64 / elapsed.as_secs_f64());
        p50.push(percentile(&samples, 0.5));
        p99.push(percentile(&samples, 0.99));
    }
    (Figure::of(rates), Figure::of(p50), Figure::of(p99))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn tokens(access: &str, refresh: &str, expires_in: i64) -> TokenSet {
    TokenSet {
        access_token: access.to_string().into(),
        refresh_token: Some(refresh.to_string().into()),
        access_token_expires_at: Some(now() + expires_in),
        refresh_token_expires_at: None,
        scopes: vec!["repo".into()],
    }
}

async fn keeper(
    url: &str,
    token_url: &str,
    limits: SandboxLimits,
    grant_cache: bool,
) -> Arc<Keeper> {
    let config = Config::parse(&format!(
        "[providers.bench]\ntoken_url = \"{token_url}\"\nclient_id = \"dev-client\"\nclient_secret = \"dev-secret\"\n"
    ))
    .expect("config");
    Keeper::open(Options {
        database_url: url.to_string(),
        config,
        keyring: Keyring::parse(&SecretString::from(KEYS.to_string())).expect("keys"),
        limits,
        max_connections: 16,
        clock: Clock::System,
        grant_cache,
        audit_as: None,
    })
    .await
    .expect("keeper")
}

/// One row of the table.
struct Row {
    what: String,
    ours: String,
    baseline: String,
    ratio: String,
    target: String,
}

fn us(f: Figure) -> String {
    format!("{:.0} µs ({:.0}–{:.0})", f.median, f.low, f.high)
}

fn per_s(f: Figure) -> String {
    format!("{:.0}/s ({:.0}–{:.0})", f.median, f.low, f.high)
}

fn row(what: &str, ours: String, baseline: String, ratio: f64, target: &str) -> Row {
    Row {
        what: what.into(),
        ours,
        baseline,
        ratio: format!("{ratio:.2}x"),
        target: target.into(),
    }
}

/// The hot path against the bare read, on one backend.
async fn hot_path(
    rows: &mut Vec<Row>,
    backend: &str,
    keeper: Arc<Keeper>,
    bare_one: impl AsyncFnMut() -> (),
    bare_many: impl Fn(usize) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
    + Send
    + Sync
    + 'static,
    targets: [&str; 3],
) -> (Figure, Figure) {
    let (base50, base99) = latency(bare_one).await;
    let k = keeper.clone();
    let (ours50, ours99) = latency(|| {
        let k = k.clone();
        async move {
            k.ensure_fresh("bench", "fresh").await.expect("fresh");
        }
    })
    .await;
    rows.push(row(
        &format!("{backend}: hot path p50, 1 caller (uncached)"),
        us(ours50),
        us(base50),
        ours50.median / base50.median,
        targets[0],
    ));
    rows.push(row(
        &format!("{backend}: hot path p99, 1 caller (uncached)"),
        us(ours99),
        us(base99),
        ours99.median / base99.median,
        "",
    ));
    let (base_rate, _, _) = throughput(CALLERS, bare_many).await;
    let k = keeper.clone();
    let (rate, p50, p99) = throughput(CALLERS, move |_| {
        let k = k.clone();
        async move {
            k.ensure_fresh("bench", "fresh").await.expect("fresh");
        }
    })
    .await;
    rows.push(row(
        &format!("{backend}: hot path throughput, {CALLERS} callers (uncached)"),
        per_s(rate),
        per_s(base_rate),
        rate.median / base_rate.median,
        targets[1],
    ));
    rows.push(row(
        &format!("{backend}: hot path p99 / p50, {CALLERS} callers"),
        format!("{} / {}", us(p99), us(p50)),
        String::new(),
        p99.median / p50.median,
        targets[2],
    ));
    (base50, base_rate)
}

/// The hot path served from the grant cache of `k`, against the uncached
/// baselines of the same backend.
async fn cached_rows(
    rows: &mut Vec<Row>,
    backend: &str,
    k: Arc<Keeper>,
    bare50: Figure,
    bare_rate: Figure,
    target_rate: &str,
) {
    // Until the cache is ready (a listener heard) and a read has filled it.
    while k.cached_grants() < Some(1) {
        k.ensure_fresh("bench", "fresh").await.expect("fresh");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let c = k.clone();
    let (ours50, ours99) = latency(|| {
        let k = c.clone();
        async move {
            k.ensure_fresh("bench", "fresh").await.expect("fresh");
        }
    })
    .await;
    rows.push(row(
        &format!("{backend}: hot path p50, 1 caller (cached)"),
        format!(
            "{:.2} µs ({:.2}–{:.2})",
            ours50.median, ours50.low, ours50.high
        ),
        us(bare50),
        ours50.median / bare50.median,
        "",
    ));
    rows.push(row(
        &format!("{backend}: hot path p99, 1 caller (cached)"),
        format!(
            "{:.2} µs ({:.2}–{:.2})",
            ours99.median, ours99.low, ours99.high
        ),
        String::new(),
        ours99.median / ours50.median,
        "(ratio: p99 / p50)",
    ));
    let c = k.clone();
    let (rate, _, _) = throughput(CALLERS, move |_| {
        let k = c.clone();
        async move {
            k.ensure_fresh("bench", "fresh").await.expect("fresh");
        }
    })
    .await;
    rows.push(row(
        &format!("{backend}: hot path throughput, {CALLERS} callers (cached)"),
        per_s(rate),
        per_s(bare_rate),
        rate.median / bare_rate.median,
        target_rate,
    ));
}

/// The bench's API key (its name in the audit log: `bench`).
const API_KEY: &str = "bench-api-key-0123456789";

/// One keep-alive HTTP/1.1 connection to `serve`'s Unix socket.
struct ApiConnection {
    stream: tokio::io::BufReader<tokio::net::UnixStream>,
    line: String,
    body: Vec<u8>,
}

impl ApiConnection {
    async fn open(socket: &std::path::Path) -> Self {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .expect("connect to serve");
        Self {
            stream: tokio::io::BufReader::new(stream),
            line: String::new(),
            body: Vec::new(),
        }
    }

    /// Sends `request` and reads the whole answer: its status.
    async fn ask(&mut self, request: &[u8]) -> u16 {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        self.stream
            .get_mut()
            .write_all(request)
            .await
            .expect("send");
        let mut status = 0;
        let mut length = 0;
        loop {
            self.line.clear();
            self.stream.read_line(&mut self.line).await.expect("answer");
            let l = self.line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some(code) = l.strip_prefix("HTTP/1.1 ") {
                status = code[..3].parse().expect("status");
            } else if let Some((name, value)) = l.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().expect("length");
            }
        }
        self.body.resize(length, 0);
        self.stream.read_exact(&mut self.body).await.expect("body");
        status
    }
}

/// `tokenkeep serve`'s token reads over its Unix socket (keep-alive
/// connections, one per client) against the library call on the same
/// keeper (grant cache and audit log on, as `serve` runs it), in one run.
async fn api(
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
    pg_url: &str,
    provider: &DevProvider,
    scratch: &std::path::Path,
) {
    use tokenkeep_service::{ApiKey, ApiKeys, Listen, ServeSettings, Server};
    let config = Config::parse(&format!(
        "[providers.bench]\ntoken_url = \"{}\"\nclient_id = \"dev-client\"\nclient_secret = \"dev-secret\"\n",
        provider.token_url()
    ))
    .expect("config");
    let k = Keeper::open(Options {
        database_url: pg_url.to_string(),
        config,
        keyring: Keyring::parse(&SecretString::from(KEYS.to_string())).expect("keys"),
        limits: SandboxLimits::default(),
        max_connections: 16,
        clock: Clock::System,
        grant_cache: true,
        audit_as: Some("bench".into()),
    })
    .await
    .expect("keeper");
    let socket = scratch.join("api.sock");
    let settings = ServeSettings {
        listen: vec![Listen::Unix(socket.clone())],
        keys: ApiKeys::new(vec![ApiKey::with_secret(
            "bench",
            &SecretString::from(API_KEY.to_string()),
            None,
            None,
        )]),
        max_body_bytes: 65_536,
        refresher: None,
        webhooks: Vec::new(),
        event_retention_days: None,
        drain: std::time::Duration::from_secs(30),
        public_url: None,
    };
    let server = Server::bind(k.clone(), settings).await.expect("bind");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    while k.cached_grants() < Some(1) {
        k.ensure_fresh("bench", "fresh").await.expect("fresh");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let c = k.clone();
    let (lib_rate, lib50, lib99) = throughput(CALLERS, move |_| {
        let k = c.clone();
        async move {
            k.ensure_fresh("bench", "fresh").await.expect("fresh");
        }
    })
    .await;
    let mut connections = Vec::new();
    for _ in 0..CALLERS {
        connections.push(tokio::sync::Mutex::new(ApiConnection::open(&socket).await));
    }
    let connections = Arc::new(connections);
    let request: &'static [u8] = Box::leak(
        format!(
            "GET /v1/tokens/bench/fresh/access-token HTTP/1.1\r\nHost: localhost\r\n\
             Authorization: Bearer {API_KEY}\r\n\r\n"
        )
        .into_bytes()
        .into_boxed_slice(),
    );
    let (rate, p50, p99) = throughput(CALLERS, move |caller| {
        let connections = connections.clone();
        async move {
            let status = connections[caller].lock().await.ask(request).await;
            assert_eq!(status, 200, "an API read");
        }
    })
    .await;
    rows.push(row(
        &format!("API: token reads, {CALLERS} clients (Unix socket, keep-alive)"),
        per_s(rate),
        per_s(lib_rate),
        rate.median / lib_rate.median,
        "(baseline: the library call)",
    ));
    rows.push(row(
        &format!("API: read p50, {CALLERS} clients"),
        us(p50),
        format!("{:.2} µs", lib50.median),
        p50.median / lib50.median,
        "",
    ));
    rows.push(row(
        &format!("API: read p99, {CALLERS} clients"),
        us(p99),
        format!("{:.2} µs", lib99.median),
        p99.median / lib99.median,
        "",
    ));
    notes.push(format!(
        "API: `tokenkeep serve`'s router and keeper in the bench's process, {CALLERS} clients \
         each on its own keep-alive connection to the Unix socket, reading one token; baseline: \
         `Keeper::ensure_fresh` on the same keeper, {CALLERS} callers. Both with the grant cache \
         and the audit log on, as `serve` runs."
    ));
    let _ = stop.send(());
    let _ = serving.await;
}

/// The grant cache: the hot path served from memory, and how long another
/// host's change takes to reach it.
async fn cached(
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
    pg_url: &str,
    provider: &DevProvider,
    writer: Arc<Keeper>,
    bare50: Figure,
    bare_rate: Figure,
) {
    let k = keeper(
        pg_url,
        &provider.token_url(),
        SandboxLimits::default(),
        true,
    )
    .await;
    cached_rows(rows, "Postgres", k.clone(), bare50, bare_rate, "≥ 5x").await;

    // Another host stores a new token; the time until this host's cache
    // answers it (its notification's way through Postgres).
    let mut lags = Vec::new();
    for i in 0..20 {
        let access = format!("at-propagated-{i}");
        writer
            .store_tokens("bench", "moving", &tokens(&access, "rt-moving", 86_400))
            .await
            .expect("store");
        let committed = Instant::now();
        loop {
            let grant = k.ensure_fresh("bench", "moving").await.expect("moving");
            if secrecy::ExposeSecret::expose_secret(&grant.access_token) == access {
                break;
            }
            tokio::task::yield_now().await;
        }
        lags.push(committed.elapsed().as_secs_f64() * 1e3);
        // Cached again before the next change.
        while k.ensure_fresh("bench", "moving").await.is_ok() && k.cached_grants() < Some(2) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    lags.sort_by(f64::total_cmp);
    notes.push(format!(
        "Cache staleness: another host's store reached this host's cache after {:.2} ms at the \
         median and {:.2} ms at worst (20 changes). The bound the cache enforces when its \
         listening connection stalls or breaks is {} ms (`STALENESS_BOUND`; heartbeat every {} \
         ms), tested with a black-holed connection in tests/grant_cache.rs.",
        lags[lags.len() / 2],
        lags[lags.len() - 1],
        tokenkeep_host::grant_cache::STALENESS_BOUND.as_millis(),
        tokenkeep_host::grant_cache::HEARTBEAT.as_millis(),
    ));
}

/// Callers per process, and processes, of the convergence run.
const CONVERGING_CALLERS: usize = 64;
const CONVERGING_PROCESSES: usize = 4;
/// How long the provider takes to answer in the convergence run.
const SLOW_PROVIDER: Duration = Duration::from_millis(500);

/// 256 callers over 4 processes on one expired token, with a provider that
/// answers after 500 ms: how many provider calls, and how long until the
/// last caller has its token.
async fn convergence(rows: &mut Vec<Row>, pg_url: &str) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let slow = DevProvider::start(
        Behaviour {
            delay: SLOW_PROVIDER,
            ..Default::default()
        },
        "rt-converge-0",
    )
    .await
    .expect("provider");
    let (mut calls, mut ratios) = (Vec::new(), Vec::new());
    let writer = keeper(pg_url, &slow.token_url(), SandboxLimits::default(), false).await;
    for run in 0..RUNS {
        // Fresh names on every invocation: DATABASE_URL may be reused.
        let user = format!("converge-{}-{run}", std::process::id());
        let refresh = format!("rt-converge-{run}");
        slow.add_chain(&refresh);
        writer
            .store_tokens("bench", &user, &tokens("at-old", &refresh, -10))
            .await
            .expect("store");
        let before = slow.calls();
        let mut children = Vec::new();
        for _ in 0..CONVERGING_PROCESSES {
            let mut child = tokio::process::Command::new(std::env::current_exe().expect("exe"))
                .args(["converge", pg_url, &slow.token_url(), &user])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("spawn");
            let mut out = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
            assert_eq!(
                out.next_line().await.expect("read").as_deref(),
                Some("ready")
            );
            children.push((child, out));
        }
        let start = Instant::now();
        for (child, _) in &mut children {
            child
                .stdin
                .as_mut()
                .expect("stdin")
                .write_all(b"go\n")
                .await
                .expect("go");
        }
        for (_, out) in &mut children {
            assert_eq!(
                out.next_line().await.expect("read").as_deref(),
                Some("done")
            );
        }
        ratios.push(start.elapsed().as_secs_f64() / SLOW_PROVIDER.as_secs_f64());
        calls.push((slow.calls() - before) as f64);
    }
    let (calls, ratio) = (Figure::of(calls), Figure::of(ratios));
    rows.push(row(
        &format!(
            "Convergence: {} callers over {CONVERGING_PROCESSES} processes on one expired token, \
             provider answers after {} ms: provider calls",
            CONVERGING_CALLERS * CONVERGING_PROCESSES,
            SLOW_PROVIDER.as_millis()
        ),
        format!("{:.0} ({:.0}–{:.0})", calls.median, calls.low, calls.high),
        "1".into(),
        calls.median,
        "1x",
    ));
    rows.push(row(
        "Convergence: until the last caller has its token",
        {
            let ms = SLOW_PROVIDER.as_secs_f64() * 1e3;
            format!(
                "{:.0} ms ({:.0}–{:.0})",
                ratio.median * ms,
                ratio.low * ms,
                ratio.high * ms
            )
        },
        format!("{} ms (the provider)", SLOW_PROVIDER.as_millis()),
        ratio.median,
        "≤ 1.2x",
    ));
}

/// A convergence process: opens a keeper, says `ready`, and on a line on
/// stdin runs its callers at once; says `done` when all have the token.
async fn converge_worker(pg_url: &str, token_url: &str, user: &str) {
    let k = keeper(pg_url, token_url, SandboxLimits::default(), false).await;
    println!("ready");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).expect("go");
    let callers: Vec<_> = (0..CONVERGING_CALLERS)
        .map(|_| {
            let (k, user) = (k.clone(), user.to_string());
            tokio::spawn(async move { k.ensure_fresh("bench", &user).await.expect("converged") })
        })
        .collect();
    for c in callers {
        assert_eq!(c.await.expect("caller").generation, 2);
    }
    println!("done");
}

/// The date, the CPU model and the number of cores, for the page's header.
fn machine() -> (String, String, usize) {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    (date, model, cores)
}

/// `just bench-vs-main`: the SQLite hot path probe built from the previous
/// main (`previous`, at commit `base`) and from this tree (`current`), each
/// in a process of its own on a database of its own, taking turns, written
/// to `docs/benchmarks-vs-main.md`.
fn versus_previous_main(base: &str, previous: &str, current: &str) {
    let scratch = std::env::temp_dir().join(format!("tokenkeep-vs-main-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("scratch directory");
    let (mut old_rates, mut new_rates, mut cached_rates) = (Vec::new(), Vec::new(), Vec::new());
    // Two turns each, alternating, so that a slow spell of the machine
    // does not land on one side only.
    for turn in 0..2 {
        for (probe, rates, name, cached) in [
            (previous, &mut old_rates, "previous", false),
            (current, &mut new_rates, "current", false),
            (current, &mut cached_rates, "cached", true),
        ] {
            let db = scratch.join(format!("{name}-{turn}.db"));
            let mut command = std::process::Command::new(probe);
            command.arg(&db).arg(RUNS.to_string());
            if cached {
                command.arg("cached");
            }
            let out = command.output().expect("run the probe");
            assert!(
                out.status.success(),
                "{probe}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            rates.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .map(|l| l.trim().parse::<f64>().expect("a rate")),
            );
        }
    }
    let (old, new, cached) = (
        Figure::of(old_rates),
        Figure::of(new_rates),
        Figure::of(cached_rates),
    );
    let (date, model, cores) = machine();
    let mut out = String::new();
    let _ = writeln!(out, "# The SQLite hot path against the previous main\n");
    let _ = writeln!(
        out,
        "Written by `just bench-vs-main` on {date}: {model}, {cores} cores. The same probe \
         (`cli/examples/sqlite_hot_path.rs`: `ensure_fresh` on a fresh token, {CALLERS} callers, \
         runs of {} ms) built from the previous main ({base}, the head before the performance \
         issue) and from this tree, each in its own process on its own database file, taking \
         turns; each figure is the median of {} runs with the lowest and highest in brackets.\n",
        WINDOW.as_millis(),
        2 * RUNS,
    );
    let _ = writeln!(
        out,
        "| Measure | tokenkeep | Previous main | Ratio | Target |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    let _ = writeln!(
        out,
        "| SQLite: hot path throughput, {CALLERS} callers (uncached) | {} | {} | {:.2}x | ≥ 5x |",
        per_s(new),
        per_s(old),
        new.median / old.median
    );
    let _ = writeln!(
        out,
        "| SQLite: hot path throughput, {CALLERS} callers (grant cache; the previous main had \
         none) | {} | {} | {:.2}x |  |",
        per_s(cached),
        per_s(old),
        cached.median / old.median
    );
    print!("{out}");
    let docs =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks-vs-main.md");
    std::fs::write(&docs, out).expect("docs/benchmarks-vs-main.md");
    let _ = std::fs::remove_dir_all(&scratch);
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let [_, mode, pg_url, token_url, user] = &args[..]
        && mode == "converge"
    {
        return converge_worker(pg_url, token_url, user).await;
    }
    if let [_, mode, base, previous, current] = &args[..]
        && mode == "vs-main"
    {
        return versus_previous_main(base, previous, current);
    }
    let started = Instant::now();
    let scratch = std::env::temp_dir().join(format!("tokenkeep-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("scratch directory");
    let provider = DevProvider::start(Behaviour::default(), "rt-0")
        .await
        .expect("provider");
    let mut rows = Vec::new();
    let mut notes = Vec::new();

    // Postgres.
    let pg_url = match std::env::var("DATABASE_URL") {
        Ok(url) => url,
        Err(_) => tokenkeep_testkit::pg::fresh_database().await,
    };
    let pg = keeper(
        &pg_url,
        &provider.token_url(),
        SandboxLimits::default(),
        false,
    )
    .await;
    pg.store_tokens(
        "bench",
        "fresh",
        &tokens(&"a".repeat(40), &"r".repeat(40), 86_400),
    )
    .await
    .expect("store");
    let select = "SELECT key_id, access_token, refresh_token, access_token_expires_at, \
                  generation FROM tokenkeep_tokens WHERE provider = $1 AND user_id = $2";
    let mut dedicated = Vec::new();
    for _ in 0..CALLERS {
        let (client, connection) = tokio_postgres::connect(&pg_url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(connection);
        let statement = client.prepare(select).await.expect("prepare");
        dedicated.push(Arc::new((client, statement)));
    }
    let one = dedicated[0].clone();
    let many = Arc::new(dedicated.clone());
    let (bare50, bare_rate) = hot_path(
        &mut rows,
        "Postgres",
        pg.clone(),
        async || {
            one.0
                .query_one(&one.1, &[&"bench", &"fresh"])
                .await
                .expect("select");
        },
        move |caller| {
            let c = many[caller].clone();
            Box::pin(async move {
                c.0.query_one(&c.1, &[&"bench", &"fresh"])
                    .await
                    .expect("select");
            })
        },
        ["≤ 1.3x", "≥ 0.50x", "≤ 3x"],
    )
    .await;
    cached(
        &mut rows,
        &mut notes,
        &pg_url,
        &provider,
        pg.clone(),
        bare50,
        bare_rate,
    )
    .await;
    convergence(&mut rows, &pg_url).await;

    // The drivers we chose between, on the same statement: sqlx on a
    // dedicated connection, and through its pool (which pings a connection
    // on acquire and on release).
    {
        use sqlx::Connection as _;
        let (bare50, _) = latency(|| {
            let c = one.clone();
            async move {
                c.0.query_one(&c.1, &[&"bench", &"fresh"])
                    .await
                    .expect("select");
            }
        })
        .await;
        let conn = Arc::new(tokio::sync::Mutex::new(
            sqlx::PgConnection::connect(&pg_url)
                .await
                .expect("sqlx connect"),
        ));
        let (sqlx50, _) = latency(|| {
            let conn = conn.clone();
            async move {
                let mut c = conn.lock().await;
                sqlx::query(select)
                    .bind("bench")
                    .bind("fresh")
                    .fetch_one(&mut *c)
                    .await
                    .expect("sqlx select");
            }
        })
        .await;
        let pool = sqlx::PgPool::connect(&pg_url).await.expect("sqlx pool");
        let (pooled50, _) = latency(|| {
            let pool = pool.clone();
            async move {
                sqlx::query(select)
                    .bind("bench")
                    .bind("fresh")
                    .fetch_one(&pool)
                    .await
                    .expect("sqlx select");
            }
        })
        .await;
        rows.push(row(
            "Driver: sqlx, dedicated connection, p50",
            us(sqlx50),
            us(bare50),
            sqlx50.median / bare50.median,
            "(baseline: tokio-postgres)",
        ));
        rows.push(row(
            "Driver: sqlx through its pool, p50",
            us(pooled50),
            us(bare50),
            pooled50.median / bare50.median,
            "(baseline: tokio-postgres)",
        ));
    }

    // Refreshes of distinct expired tokens, 8 callers, a zero-latency
    // provider, against the bare locked transaction with 8 connections.
    let users = CALLERS * REFRESHES_PER_CALLER;
    let mut refresh_rates = Vec::new();
    for run in 0..=RUNS {
        for u in 0..users {
            let refresh = format!("rt-{run}-{u}");
            provider.add_chain(&refresh);
            pg.store_tokens(
                "bench",
                &format!("r{run}-{u}"),
                &tokens("at-old", &refresh, -10),
            )
            .await
            .expect("store");
        }
        let start = Instant::now();
        let tasks: Vec<_> = (0..CALLERS)
            .map(|caller| {
                let pg = pg.clone();
                tokio::spawn(async move {
                    for i in 0..REFRESHES_PER_CALLER {
                        let user = format!("r{run}-{}", caller * REFRESHES_PER_CALLER + i);
                        let grant = pg.ensure_fresh("bench", &user).await.expect("refresh");
                        assert_eq!(grant.generation, 2);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("refresher");
        }
        if run > 0 {
            refresh_rates.push(users as f64 / start.elapsed().as_secs_f64());
        }
    }
    let refresh_rate = Figure::of(refresh_rates);
    for c in &dedicated {
        c.0.batch_execute(
            "CREATE TABLE IF NOT EXISTS bench_locked (id INT PRIMARY KEY, n BIGINT NOT NULL)",
        )
        .await
        .expect("table");
    }
    for id in 0..CALLERS as i32 {
        dedicated[0]
            .0
            .execute(
                "INSERT INTO bench_locked VALUES ($1, 0) ON CONFLICT DO NOTHING",
                &[&id],
            )
            .await
            .expect("row");
    }
    let many = Arc::new(dedicated.clone());
    let (locked_rate, _, _) = throughput(CALLERS, move |caller| {
        let c = many[caller].clone();
        async move {
            let id = caller as i32;
            c.0.batch_execute("BEGIN").await.expect("begin");
            c.0.query_one(
                "SELECT n FROM bench_locked WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await
            .expect("lock");
            c.0.execute("UPDATE bench_locked SET n = n + 1 WHERE id = $1", &[&id])
                .await
                .expect("update");
            c.0.batch_execute("COMMIT").await.expect("commit");
        }
    })
    .await;
    rows.push(row(
        &format!("Postgres: refreshes of distinct tokens, {CALLERS} callers"),
        per_s(refresh_rate),
        per_s(locked_rate),
        refresh_rate.median / locked_rate.median,
        "≥ 0.35x",
    ));
    notes.push(format!(
        "Refreshes: {users} distinct expired tokens per run; baseline: `BEGIN; SELECT … FOR UPDATE; \
         UPDATE; COMMIT` on {CALLERS} dedicated connections, each on its own row. Database round \
         trips per refresh: 4 (counted by tests/performance.rs)."
    ));

    api(&mut rows, &mut notes, &pg_url, &provider, &scratch).await;

    // SQLite.
    let path = scratch.join("bench.db");
    let sqlite_url = format!("sqlite:{}", path.display());
    let lite = keeper(
        &sqlite_url,
        &provider.token_url(),
        SandboxLimits::default(),
        false,
    )
    .await;
    lite.store_tokens(
        "bench",
        "fresh",
        &tokens(&"a".repeat(40), &"r".repeat(40), 86_400),
    )
    .await
    .expect("store");
    let sql = "SELECT key_id, access_token, refresh_token, access_token_expires_at, generation \
               FROM tokenkeep_tokens WHERE provider = ?1 AND user_id = ?2";
    let point_read = |conn: &rusqlite::Connection| {
        let mut statement = conn.prepare_cached(sql).expect("prepare");
        statement
            .query_row(["bench", "fresh"], |r| r.get::<_, i64>(4))
            .expect("read");
    };
    let conns: Vec<_> = (0..CALLERS)
        .map(|_| {
            Arc::new(std::sync::Mutex::new(
                rusqlite::Connection::open(&path).expect("open"),
            ))
        })
        .collect();
    let one = conns[0].clone();
    let many = Arc::new(conns.clone());
    let (lite50, lite_rate) = hot_path(
        &mut rows,
        "SQLite",
        lite.clone(),
        async || point_read(&one.lock().expect("connection")),
        move |caller| {
            let c = many[caller].clone();
            Box::pin(async move {
                // The C library blocks: on a blocking thread, as a server would.
                tokio::task::spawn_blocking(move || {
                    let conn = c.lock().expect("connection");
                    let mut statement = conn.prepare_cached(sql).expect("prepare");
                    statement
                        .query_row(["bench", "fresh"], |r| r.get::<_, i64>(4))
                        .expect("read");
                })
                .await
                .expect("reader");
            })
        },
        ["", "", "≤ 3x"],
    )
    .await;
    let lite_cached = keeper(
        &sqlite_url,
        &provider.token_url(),
        SandboxLimits::default(),
        true,
    )
    .await;
    cached_rows(&mut rows, "SQLite", lite_cached, lite50, lite_rate, "").await;

    // Instances: pooled against allocated on demand, and a call into the
    // component against the same check in native code.
    let on_demand = keeper(
        &sqlite_url,
        &provider.token_url(),
        SandboxLimits {
            pooled_instances: 0,
            ..Default::default()
        },
        false,
    )
    .await;
    let record = lite
        .load_tokens("bench", "fresh", false)
        .await
        .expect("load")
        .expect("row");
    let (pooled, _) = latency(|| {
        let (k, r) = (lite.clone(), record.clone());
        async move {
            assert!(k.is_access_token_valid(&r, 60).await.expect("valid"));
        }
    })
    .await;
    let (demand, _) = latency(|| {
        let (k, r) = (on_demand.clone(), record.clone());
        async move {
            assert!(k.is_access_token_valid(&r, 60).await.expect("valid"));
        }
    })
    .await;
    let expires = record.tokens.access_token_expires_at;
    let (native, _) = latency(|| async move {
        assert!(std::hint::black_box(
            tokenkeep_core::validity::is_access_token_valid(
                std::hint::black_box(expires),
                now(),
                60
            )
        ));
    })
    .await;
    rows.push(row(
        "Instance: pooled, instantiate + a validity call, p50",
        us(pooled),
        us(demand),
        pooled.median / demand.median,
        "(baseline: on demand)",
    ));
    rows.push(row(
        "Call into the component vs the same check natively, p50",
        us(pooled),
        format!("{:.2} µs", native.median),
        pooled.median / native.median.max(0.01),
        "",
    ));

    // The CLI on a fresh token against process start alone.
    let cli = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent()?.parent().map(|d| d.join("tokenkeep")))
        .filter(|p| p.exists());
    if let Some(cli) = cli {
        let config = scratch.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[providers.bench]\ntoken_url = \"{}\"\nclient_id = \"dev-client\"\nclient_secret = \"dev-secret\"\n",
                provider.token_url()
            ),
        )
        .expect("config");
        let keys = scratch.join("keys");
        std::fs::write(&keys, KEYS).expect("keys");
        let run = |program: &std::path::Path, args: &[&str]| {
            let start = Instant::now();
            let status = std::process::Command::new(program)
                .args(args)
                .env("TOKENKEEP_DATABASE", &sqlite_url)
                .env("TOKENKEEP_CONFIG", &config)
                .env("TOKENKEEP_KEYS_FILE", &keys)
                .stdout(std::process::Stdio::null())
                .status()
                .expect("spawn");
            assert!(status.success(), "{} failed", program.display());
            start.elapsed()
        };
        let truth = std::path::Path::new("/bin/true");
        let (mut cli_runs, mut true_runs) = (Vec::new(), Vec::new());
        for i in 0..=10 {
            let c = run(&cli, &["tokens", "get", "bench", "fresh"]);
            let t = run(truth, &[]);
            if i > 0 {
                cli_runs.push(c.as_secs_f64() * 1e3);
                true_runs.push(t.as_secs_f64() * 1e3);
            }
        }
        let (c, t) = (Figure::of(cli_runs), Figure::of(true_runs));
        rows.push(row(
            "CLI `tokens get` on a fresh token (SQLite), start to exit",
            format!("{:.1} ms ({:.1}–{:.1})", c.median, c.low, c.high),
            format!("{:.2} ms (`true`)", t.median),
            c.median / t.median,
            "",
        ));
    } else {
        notes.push("The CLI was not built next to the bench: its row is missing.".into());
    }

    // Size and memory.
    let size = tokenkeep_host::COMPONENT.len();
    rows.push(row(
        "Component size",
        format!("{} KiB", size / 1024),
        "512 KiB".into(),
        size as f64 / (512.0 * 1024.0),
        "≤ 1x",
    ));
    let peak = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.trim_start_matches("VmHWM:").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    notes.push(format!(
        "Peak resident memory of this process (five keepers, pools warm, 8 Postgres and 8 SQLite \
         baseline connections, the loopback provider): {peak}."
    ));
    notes.push(
        "The SQLite hot path against the previous main's build (which `just bench` does not \
         build): `just bench-vs-main`, in [benchmarks-vs-main.md](benchmarks-vs-main.md)."
            .into(),
    );

    let mut out = String::new();
    let (date, machine, cores) = machine();
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "Written by `just bench` on {date}: {machine}, {cores} cores, Postgres 15 on loopback. \
         Each figure is the median of {RUNS} runs after a warm-up, with the lowest and highest run \
         in brackets; every ratio is against the baseline measured in the same run. Absolute \
         times vary from machine to machine; the ratios are what to compare.\n",
    );
    let _ = writeln!(out, "| Measure | tokenkeep | Baseline | Ratio | Target |");
    let _ = writeln!(out, "|---|---|---|---|---|");
    for r in &rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            r.what, r.ours, r.baseline, r.ratio, r.target
        );
    }
    let _ = writeln!(out);
    for n in &notes {
        let _ = writeln!(out, "- {n}");
    }
    let _ = writeln!(
        out,
        "\nThe whole run took {:.0} s.",
        started.elapsed().as_secs_f64()
    );
    print!("{out}");
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks.md");
    std::fs::write(&docs, out).expect("docs/benchmarks.md");
    let _ = std::fs::remove_dir_all(&scratch);
}
