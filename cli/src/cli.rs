//! The `tokenkeep` command line: parsing, wiring and printing only; every
//! decision is the [`Keeper`]'s.

use clap::{Parser, Subcommand};
use secrecy::{ExposeSecret, SecretString};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use tokenkeep_host::audit;
use tokenkeep_host::clock::utc;
use tokenkeep_host::keeper::{error_class_name, summary_json, summary_key, token_state_name};
use tokenkeep_host::storage::{Store, StoreOptions};
use tokenkeep_host::{
    Config, ConversationError, ConversationSettings, Error, Keeper, Keyring, Options,
    SandboxLimits, TokenSummary,
};
use tokenkeep_service::{Listen, ServeSettings, Server};

/// Rows fetched per page by `tokens list`.
const LIST_PAGE: u32 = 1000;

/// Largest token response accepted on standard input.
const MAX_STDIN_BYTES: u64 = 1 << 20;

#[derive(Parser, Debug)]
#[command(
    name = "tokenkeep",
    version,
    about = "Keeps OAuth tokens valid for agent runtimes"
)]
pub struct Cli {
    /// Database URL: postgres://… or sqlite:PATH (default: sqlite in the data directory).
    #[arg(long, global = true, env = "TOKENKEEP_DATABASE")]
    database: Option<String>,
    /// Provider configuration (TOML).
    #[arg(long, global = true, env = "TOKENKEEP_CONFIG")]
    config: Option<PathBuf>,
    /// Key file: lines of id=base64(32 bytes), the first is active. TOKENKEEP_KEYS may hold the same inline.
    #[arg(long, global = true, env = "TOKENKEEP_KEYS_FILE")]
    keys: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Store, read and list tokens.
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Conversation settings: refresh, resume, show.
    #[command(subcommand)]
    Conversations(ConversationsCommand),
    /// Connect a user's account: authorise in a browser (PKCE with a
    /// loopback redirect) or, with --device, on any device with a code; the
    /// tokens are stored for USER. For a machine client (grant =
    /// "client-credentials") or a token exchange (grant = "token-exchange")
    /// this gets its token.
    Connect(ConnectArgs),
    /// Encryption keys: status and rotation.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The audit log: every token read, refresh, store and delete, oldest
    /// first (one JSON object per line with --json).
    Audit(AuditArgs),
    /// Bring the database's schema up to date and print its version (every
    /// other command migrates too); a schema newer than this build is refused.
    Migrate,
    /// Serve the HTTP API (see /v1/openapi.json) on a Unix socket or a
    /// loopback port until SIGTERM or SIGINT; prints one `listening on`
    /// line per listener on standard output once it answers.
    Serve {
        /// unix:PATH or tcp:127.0.0.1:PORT, repeatable or comma-separated
        /// (default: [serve] listen in the configuration, else
        /// unix:$XDG_RUNTIME_DIR/tokenkeep/api.sock).
        #[arg(long, env = "TOKENKEEP_LISTEN", value_delimiter = ',')]
        listen: Vec<String>,
    },
    /// Watch several runtimes share one expiring token (SQLite, local test provider).
    Demo {
        /// How many runtime processes ask at once.
        #[arg(long, default_value_t = 8)]
        runtimes: usize,
    },
}

#[derive(clap::Args, Debug)]
struct ConnectArgs {
    provider: String,
    user: String,
    /// The device authorisation grant (RFC 8628), for a machine without a
    /// browser: prints a URL and a code to confirm elsewhere.
    #[arg(long)]
    device: bool,
    /// A scope to ask for, repeatable (default: the provider's `scopes`).
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// The loopback port of the redirect URI (default: any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Print the URL without opening a browser ($BROWSER, else the desktop's).
    #[arg(long)]
    no_browser: bool,
    /// Give up when the user has not authorised within this long.
    #[arg(long, value_parser = parse_duration, default_value = "10m")]
    timeout: u32,
}

#[derive(clap::Args, Debug)]
struct AuditArgs {
    #[arg(long)]
    provider: Option<String>,
    #[arg(long)]
    user: Option<String>,
    /// An API key's name, `cli`, or a library caller's name.
    #[arg(long)]
    caller: Option<String>,
    /// At or after: seconds since the epoch, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (UTC).
    #[arg(long, value_parser = parse_time)]
    since: Option<i64>,
    /// Before: the same forms as --since.
    #[arg(long, value_parser = parse_time)]
    until: Option<i64>,
    /// At most this many entries.
    #[arg(long)]
    limit: Option<u64>,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum ConversationsCommand {
    /// Read settings JSON ({"provider_tokens": {...}}) on standard input, print the refreshed copy.
    Refresh {
        conversation: String,
        user: String,
        /// Return what could be refreshed and list failures on stderr, instead of failing.
        #[arg(long)]
        partial: bool,
    },
    /// Print the conversation's persisted settings, refreshed first.
    Resume { conversation: String },
    /// Show what is persisted for a conversation, without secrets.
    Show { conversation: String },
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Re-encrypt every row sealed with an older key to the active key (online, resumable).
    Rotate {
        /// Rows per batch.
        #[arg(long, default_value_t = 200)]
        batch: u32,
    },
    /// Show the active key and how many rows each key seals.
    Status {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum TokensCommand {
    /// Store a provider's token response (RFC 6749 section 5.1 JSON) read from standard input.
    Put { provider: String, user: String },
    /// Print a valid access token, refreshing it first if needed.
    Get {
        provider: String,
        user: String,
        /// Refresh first unless the token stays valid this long (seconds,
        /// or with s, m, h or d): a long step never starts with a token
        /// about to die. More than the provider's lifetime allows is
        /// invalid-input.
        #[arg(long, value_parser = parse_duration)]
        min_valid: Option<u32>,
        /// For a provider with dpop = true: print one JSON object with the
        /// token, its type (DPoP) and the row's private proof key (a JWK),
        /// to sign a proof for each request (RFC 9449).
        #[arg(long)]
        dpop: bool,
    },
    /// List stored tokens without secrets.
    List {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete a user's tokens for a provider, and revoke them at the
    /// provider where it has a revocation endpoint (refresh token first).
    /// Exit 17: deleted, but a token could not be revoked (one line each).
    Delete { provider: String, user: String },
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokenkeep: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(Finished::Done) => ExitCode::SUCCESS,
        Ok(Finished::NotRevoked) => ExitCode::from(NOT_REVOKED),
        Ok(Finished::Interrupted(signal)) => {
            eprintln!("tokenkeep: interrupted: refreshes in flight were saved first");
            ExitCode::from(128 + signal)
        }
        Err(e) => {
            // One line: the class, then the message without a repeat of it.
            let message = e.to_string();
            let prefix = format!("{}: ", e.class());
            let message = message.strip_prefix(&prefix).unwrap_or(&message);
            eprintln!("tokenkeep: {}: {message}", e.class());
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn init_logging() {
    use std::io::IsTerminal;
    // sqlx's "slow statement" notes are for its own debugging: a waiter on a
    // row lock is not a failure, so they stay out of the default output.
    // tokio-postgres logs statements with their parameters (sealed tokens)
    // at debug level: never shown, whatever the level asked for.
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOKENKEEP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sqlx::query=error"));
    let filter = match "tokio_postgres=warn".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // One JSON object per line, spans included, for log collectors.
    let _ = if std::env::var("TOKENKEEP_LOG_FORMAT").is_ok_and(|f| f == "json") {
        log.json().try_init()
    } else {
        log.with_ansi(std::io::stderr().is_terminal()).try_init()
    };
}

/// The exit code of `tokens delete` when a token may still be valid at the
/// provider.
const NOT_REVOKED: u8 = 17;

/// How a command ended, when it did not fail.
enum Finished {
    Done,
    /// Deleted, but a token could not be revoked at the provider.
    NotRevoked,
    /// By this signal, after the refreshes in flight were saved.
    Interrupted(u8),
}

async fn run(cli: Cli) -> Result<Finished, Error> {
    if let Command::Demo { runtimes } = &cli.command {
        return crate::demo::run(*runtimes).await.map(|()| Finished::Done);
    }
    if let Command::Migrate = &cli.command {
        return migrate(&cli).await.map(|()| Finished::Done);
    }
    if let Command::Serve { listen } = &cli.command {
        return serve(&cli, listen).await;
    }
    // Before anything is in flight: from here on, SIGTERM and SIGINT wait
    // for refreshes to commit (a provider may already have rotated the
    // token); before the keeper is open (a connect, a migration waiting for
    // another process), and on a second signal, they stop at once.
    let mut signals = Signals::new()?;
    let opened: std::sync::OnceLock<Arc<Keeper>> = std::sync::OnceLock::new();
    let work = async {
        let keeper = open(&cli).await?;
        let keeper = opened.get_or_init(|| keeper);
        let done = match &cli.command {
            Command::Demo { .. } | Command::Migrate | Command::Serve { .. } => Ok(Finished::Done),
            Command::Tokens(cmd) => tokens(keeper, cmd).await,
            Command::Connect(args) => connect(keeper, args).await.map(|()| Finished::Done),
            Command::Keys(cmd) => keys(keeper, cmd).await.map(|()| Finished::Done),
            Command::Conversations(cmd) => {
                conversations(keeper, cmd).await.map(|()| Finished::Done)
            }
            Command::Audit(cmd) => audit(keeper, cmd).await.map(|()| Finished::Done),
        };
        // The audit entries of this command are written before it exits.
        keeper.shutdown().await;
        done
    };
    tokio::select! {
        done = work => done,
        signal = signals.next() => {
            if let Some(keeper) = opened.get() {
                tokio::select! {
                    () = keeper.shutdown() => {}
                    _ = signals.next() => {}
                }
            }
            Ok(Finished::Interrupted(signal))
        }
    }
}

/// SIGTERM and SIGINT, caught rather than fatal.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self, Error> {
        use tokio::signal::unix::{SignalKind, signal};
        let catch = |kind: SignalKind| {
            signal(kind).map_err(|e| Error::Config(format!("cannot catch signals: {e}")))
        };
        Ok(Self {
            terminate: catch(SignalKind::terminate())?,
            interrupt: catch(SignalKind::interrupt())?,
        })
    }

    /// The number of the first signal to arrive.
    async fn next(&mut self) -> u8 {
        tokio::select! {
            _ = self.terminate.recv() => 15,
            _ = self.interrupt.recv() => 2,
        }
    }
}

async fn tokens(keeper: &Keeper, cmd: &TokensCommand) -> Result<Finished, Error> {
    match cmd {
        TokensCommand::Put { provider, user } => {
            // Lifetimes count on the keeper's clock (the database's).
            let tokens = tokenkeep_host::token_response::token_set(
                read_stdin()?.expose_secret(),
                keeper.now(),
            )?;
            let record = keeper.store_tokens(provider, user, &tokens).await?;
            eprintln!(
                "stored {provider}/{user} (generation {})",
                record.generation
            );
        }
        TokensCommand::Get {
            provider,
            user,
            min_valid,
            dpop,
        } => {
            let min_valid = min_valid.unwrap_or(0);
            let line = if *dpop {
                let bound = keeper.ensure_fresh_bound(provider, user, min_valid).await?;
                SecretString::from(bound.json()?.to_string())
            } else {
                let record = keeper.ensure_fresh_for(provider, user, min_valid).await?;
                SecretString::from(record.access_token.expose_secret().to_string())
            };
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", line.expose_secret())
                .and_then(|()| out.flush())
                .map_err(|e| Error::Config(format!("cannot write to standard output: {e}")))?;
        }
        TokensCommand::List { json } => {
            // Page by page: a listing of any size streams.
            let now = keeper.now();
            let mut after = None;
            let mut first = true;
            loop {
                let page = keeper.list_tokens_page(after, LIST_PAGE).await?;
                print_list(&page, *json, now, first);
                first = false;
                match page.last() {
                    Some(last) if page.len() == LIST_PAGE as usize => {
                        after = Some(summary_key(last));
                    }
                    _ => break,
                }
            }
        }
        TokensCommand::Delete { provider, user } => {
            let deletion = keeper.delete_and_revoke(provider, user).await?;
            if !deletion.deleted {
                return Err(Error::NotFound {
                    provider: provider.clone(),
                    user_id: user.clone(),
                });
            }
            eprintln!("deleted {provider}/{user}");
            let mut finished = Finished::Done;
            for (token, why) in deletion.not_revoked() {
                eprintln!("tokenkeep: not-revoked: {provider}/{user}: {token}: {why}");
                finished = Finished::NotRevoked;
            }
            return Ok(finished);
        }
    }
    Ok(Finished::Done)
}

/// `connect`: the browser flow, the device flow, or the provider's host
/// grant (client credentials, token exchange).
async fn connect(keeper: &Keeper, args: &ConnectArgs) -> Result<(), Error> {
    let scopes = (!args.scopes.is_empty()).then_some(args.scopes.as_slice());
    let (provider, user) = (&args.provider, &args.user);
    // An MCP server's provider is discovered and registered first.
    let host_grant = keeper.prepare(provider).await?.grant.is_host_grant();
    let waiting = std::time::Duration::from_secs(u64::from(args.timeout));
    let timed_out = || {
        Error::ReauthorizationRequired(format!(
            "not authorised within {} s; run connect again",
            args.timeout
        ))
    };
    let record = if host_grant {
        keeper.obtain_host_grant(provider, user).await?
    } else if args.device {
        let device = keeper.device_authorization(provider, scopes).await?;
        let url = device
            .verification_uri_complete
            .clone()
            .unwrap_or_else(|| device.verification_uri.clone());
        eprintln!(
            "tokenkeep: open {url} and confirm the code {} (expires in {} s)",
            device.user_code, device.expires_in
        );
        tokio::time::timeout(waiting, keeper.await_device_authorization(device, user))
            .await
            .map_err(|_| timed_out())??
    } else {
        let loopback = tokenkeep_host::loopback::Loopback::bind(args.port).await?;
        let pending = keeper.authorization_request(provider, loopback.redirect_uri(), scopes)?;
        eprintln!(
            "tokenkeep: open {} to authorise {provider} for {user}",
            pending.url
        );
        if !args.no_browser {
            open_browser(&pending.url);
        }
        let callback = tokio::time::timeout(waiting, loopback.receive(|s| pending.is_for(s)))
            .await
            .map_err(|_| timed_out())??;
        keeper
            .complete_authorization(pending, user, callback)
            .await?
    };
    eprintln!(
        "connected {provider}/{user} (generation {}, scopes: {})",
        record.generation,
        record.tokens.scopes.join(" ")
    );
    Ok(())
}

/// Opens `url` in the user's browser: `$BROWSER` (a command, the URL
/// appended), else the desktop's opener. Best effort: the URL is printed
/// either way.
fn open_browser(url: &str) {
    let mut command = match std::env::var("BROWSER") {
        Ok(browser) if !browser.trim().is_empty() => {
            let mut words = browser.split_whitespace();
            let Some(program) = words.next() else { return };
            let mut c = std::process::Command::new(program);
            c.args(words);
            c
        }
        _ if cfg!(target_os = "macos") => std::process::Command::new("open"),
        _ if std::env::var_os("DISPLAY").is_some()
            || std::env::var_os("WAYLAND_DISPLAY").is_some() =>
        {
            std::process::Command::new("xdg-open")
        }
        _ => return,
    };
    let _ = command
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn();
}

async fn conversations(keeper: &Keeper, cmd: &ConversationsCommand) -> Result<(), Error> {
    let named = |e: ConversationError| {
        if e.provider.is_empty() {
            e.error
        } else {
            // Keep the class (and exit code); name the provider in the message.
            prefix_provider(e.error, &e.provider)
        }
    };
    match cmd {
        ConversationsCommand::Refresh {
            conversation,
            user,
            partial,
        } => {
            let settings = ConversationSettings::from_json(read_stdin()?.expose_secret())?;
            let refreshed = if *partial {
                let r = keeper
                    .refresh_provider_tokens_partial(&settings, conversation, user)
                    .await?;
                for f in &r.failures {
                    eprintln!("tokenkeep: {}: {f}", f.error.class());
                }
                r.settings
            } else {
                keeper
                    .refresh_provider_tokens(&settings, conversation, user)
                    .await
                    .map_err(named)?
            };
            print_stdout(&refreshed.to_json())?;
        }
        ConversationsCommand::Resume { conversation } => {
            let settings = keeper
                .resume(conversation)
                .await
                .map_err(named)?
                .ok_or_else(|| Error::NotFound {
                    provider: "-".into(),
                    user_id: format!("conversation {conversation}"),
                })?;
            print_stdout(&settings.to_json())?;
        }
        ConversationsCommand::Show { conversation } => {
            let entries = keeper.conversation_entries(conversation).await?;
            let mut out = std::io::stdout().lock();
            for e in entries {
                let line = serde_json::json!({
                    "conversation_id": e.conversation_id,
                    "provider": e.provider,
                    "user_id": e.user_id,
                    "scopes": e.scopes,
                    "generation": e.generation,
                    "updated_at": e.updated_at,
                });
                let _ = writeln!(out, "{line}");
            }
        }
    }
    Ok(())
}

/// Prints the audit log page by page: a log of any size streams.
async fn audit(keeper: &Keeper, args: &AuditArgs) -> Result<(), Error> {
    let mut filter = audit::Filter {
        provider: args.provider.clone(),
        user_id: args.user.clone(),
        caller: args.caller.clone(),
        since: args.since,
        until: args.until,
        after_id: None,
    };
    let mut left = args.limit.unwrap_or(u64::MAX);
    let mut out = std::io::stdout().lock();
    if !args.json {
        let _ = writeln!(
            out,
            "{:<20} {:<16} {:<8} {:<12} {:<24} {:>4} OUTCOME",
            "AT", "CALLER", "ACTION", "PROVIDER", "USER", "GEN"
        );
    }
    while left > 0 {
        let page_size = left.min(u64::from(audit::MAX_PAGE)) as u32;
        let page = keeper.audit_page(&filter, page_size).await?;
        for e in &page {
            let line = if args.json {
                serde_json::json!({
                    "id": e.id,
                    "at": e.at,
                    "caller": e.caller,
                    "action": e.action.name(),
                    "provider": e.provider,
                    "user_id": e.user_id,
                    "generation": e.generation,
                    "outcome": e.outcome,
                })
                .to_string()
            } else {
                format!(
                    "{:<20} {:<16} {:<8} {:<12} {:<24} {:>4} {}",
                    utc(e.at),
                    e.caller,
                    e.action.name(),
                    e.provider,
                    e.user_id,
                    e.generation.map_or("-".into(), |g| g.to_string()),
                    e.outcome
                )
            };
            writeln!(out, "{line}")
                .map_err(|e| Error::Config(format!("cannot write to standard output: {e}")))?;
        }
        left = left.saturating_sub(page.len() as u64);
        match page.last() {
            Some(last) if page.len() == page_size as usize => filter.after_id = Some(last.id),
            _ => break,
        }
    }
    Ok(())
}

/// A duration: seconds, or a number with `s`, `m`, `h` or `d`.
fn parse_duration(text: &str) -> Result<u32, String> {
    let bad = || format!("{text:?} is not a duration such as 900, 90s, 30m, 2h or 1d");
    let (digits, unit) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&text[..i], c),
        _ => (text, 's'),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let scale = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(scale)
        .and_then(|s| u32::try_from(s).ok())
        .ok_or_else(bad)
}

/// Seconds since the epoch, `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM:SSZ` (UTC).
fn parse_time(text: &str) -> Result<i64, String> {
    if let Ok(secs) = text.parse::<i64>() {
        return Ok(secs);
    }
    let bad =
        || format!("{text:?} is not seconds since the epoch, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ");
    let (date, time) = match text.split_once('T') {
        Some((d, t)) => (d, Some(t.strip_suffix('Z').ok_or_else(bad)?)),
        None => (text, None),
    };
    let mut d = date.split('-').map(|p| p.parse::<i64>().map_err(|_| bad()));
    let (y, m, day) = match (d.next(), d.next(), d.next(), d.next()) {
        (Some(y), Some(m), Some(day), None) => (y?, m?, day?),
        _ => return Err(bad()),
    };
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return Err(bad());
    }
    let secs = match time {
        None => 0,
        Some(t) => {
            let mut t = t.split(':').map(|p| p.parse::<i64>().map_err(|_| bad()));
            match (t.next(), t.next(), t.next(), t.next()) {
                (Some(h), Some(mi), Some(s), None) => {
                    let (h, mi, s) = (h?, mi?, s?);
                    if h > 23 || mi > 59 || s > 60 {
                        return Err(bad());
                    }
                    h * 3600 + mi * 60 + s
                }
                _ => return Err(bad()),
            }
        }
    };
    // Days from the civil date (proleptic Gregorian), the inverse of `utc`.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Ok((era * 146_097 + doe - 719_468) * 86_400 + secs)
}

/// The same error class, with the provider named in its message.
fn prefix_provider(e: Error, provider: &str) -> Error {
    let p = |m: String| format!("provider {provider}: {m}");
    match e {
        Error::ReauthorizationRequired(m) => Error::ReauthorizationRequired(p(m)),
        Error::ProviderUnavailable(m) => Error::ProviderUnavailable(p(m)),
        Error::ProviderRejectedClient(m) => Error::ProviderRejectedClient(p(m)),
        Error::ScopeMismatch(m) => {
            Error::ScopeMismatch(m.into_iter().map(|s| format!("{provider}:{s}")).collect())
        }
        Error::Storage(m) => Error::Storage(p(m)),
        Error::Decryption(m) => Error::Decryption(p(m)),
        Error::InvalidProviderResponse(m) => Error::InvalidProviderResponse(p(m)),
        Error::InvalidInput(m) => Error::InvalidInput(p(m)),
        other => other,
    }
}

fn print_stdout(text: &str) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .map_err(|e| Error::Config(format!("cannot write to standard output: {e}")))
}

async fn keys(keeper: &Keeper, cmd: &KeysCommand) -> Result<(), Error> {
    match cmd {
        KeysCommand::Rotate { batch } => {
            let r = keeper.rotate_keys(*batch).await?;
            println!(
                "examined {} rows, re-encrypted {} to the active key",
                r.examined, r.resealed
            );
            if !r.undecryptable.is_empty() {
                for (provider, user) in &r.undecryptable {
                    println!("undecryptable, left as it was: {provider}/{user}");
                }
                return Err(Error::Decryption(format!(
                    "{} rows did not decrypt and were not re-encrypted",
                    r.undecryptable.len()
                )));
            }
        }
        KeysCommand::Status { json } => {
            let s = keeper.key_status().await?;
            if *json {
                let v = serde_json::json!({
                    "active": s.active,
                    "rows_per_key": s.rows_per_key,
                    "missing_keys": s.missing_keys,
                });
                println!("{v}");
                return Ok(());
            }
            println!("active key: {}", s.active);
            for (id, rows) in &s.rows_per_key {
                let note = if *id == s.active {
                    " (active)"
                } else if s.missing_keys.contains(id) {
                    " (NOT IN KEYRING: unreadable)"
                } else {
                    " (rotate to move these to the active key)"
                };
                println!("{id}: {rows} rows{note}");
            }
        }
    }
    Ok(())
}

/// Reads standard input (tokens: kept secret), at most 1 MiB.
fn read_stdin() -> Result<secrecy::SecretSlice<u8>, Error> {
    let mut raw = Vec::new();
    std::io::stdin()
        .take(MAX_STDIN_BYTES + 1)
        .read_to_end(&mut raw)
        .map_err(|e| Error::InvalidInput(format!("cannot read standard input: {e}")))?;
    if raw.len() as u64 > MAX_STDIN_BYTES {
        return Err(Error::InvalidInput("standard input exceeds 1 MiB".into()));
    }
    Ok(raw.into())
}

fn print_list(list: &[TokenSummary], json: bool, now: i64, header: bool) {
    let mut out = std::io::stdout().lock();
    if !json && header {
        let _ = writeln!(
            out,
            "{:<12} {:<24} {:<26} {:<34} {:<34} {:>4} {:<6} LAST FAILURE",
            "PROVIDER", "USER", "STATE", "ACCESS EXPIRES", "REFRESH EXPIRES", "GEN", "KEY"
        );
    }
    for s in list {
        let state = token_state_name(s.state);
        if json {
            let v = summary_json(s);
            let _ = writeln!(out, "{v}");
        } else {
            let failure = match (s.health.last_failure, s.health.last_failure_at) {
                (Some(class), Some(at)) => format!(
                    "{} {} ({} attempts)",
                    error_class_name(class),
                    relative(at, now),
                    s.health.failed_attempts
                ),
                _ => "-".into(),
            };
            let refresh = if s.has_refresh_token {
                when(s.refresh_token_expires_at, now)
            } else {
                "no refresh token".into()
            };
            let _ = writeln!(
                out,
                "{:<12} {:<24} {:<26} {:<34} {:<34} {:>4} {:<6} {}",
                s.provider,
                s.user_id,
                state,
                when(s.access_token_expires_at, now),
                refresh,
                s.generation,
                s.key_id,
                failure
            );
        }
    }
}

fn when(at: Option<i64>, now: i64) -> String {
    match at {
        None => "never".into(),
        Some(at) => format!("{} ({})", utc(at), relative(at, now)),
    }
}

fn relative(at: i64, now: i64) -> String {
    let d = at - now;
    let a = d.unsigned_abs();
    let span = if a < 120 {
        format!("{a}s")
    } else if a < 7200 {
        format!("{}m", a / 60)
    } else if a < 172_800 {
        format!("{}h", a / 3600)
    } else {
        format!("{}d", a / 86_400)
    };
    if d >= 0 {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

/// Where the embedded default keeps its database and key.
fn data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TOKENKEEP_HOME") {
        return PathBuf::from(d);
    }
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("tokenkeep")
}

/// `--database`, or SQLite in the data directory.
fn database_url(cli: &Cli) -> String {
    cli.database
        .clone()
        .unwrap_or_else(|| format!("sqlite:{}", data_dir().join("tokenkeep.db").display()))
}

/// Opening the store migrates it (or refuses a newer schema); no keys or
/// provider configuration are needed for that.
async fn migrate(cli: &Cli) -> Result<(), Error> {
    let store = Store::open(
        &database_url(cli),
        StoreOptions::default(),
        Default::default(),
    )
    .await?;
    println!("schema at version {}", store.schema_version());
    Ok(())
}

/// The configuration file's text: `--config`, or `config.toml` in the data
/// directory if there is one.
fn config_text(cli: &Cli) -> Result<Option<String>, Error> {
    let path = match &cli.config {
        Some(path) => path.clone(),
        None => {
            let default = data_dir().join("config.toml");
            if !default.exists() {
                return Ok(None);
            }
            default
        }
    };
    std::fs::read_to_string(&path)
        .map(Some)
        .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))
}

async fn open(cli: &Cli) -> Result<Arc<Keeper>, Error> {
    let config = match config_text(cli)? {
        Some(text) => Config::parse(&text)?,
        None => Config::default(),
    };
    open_with(cli, config, false, "cli").await
}

/// The keeper of a command (`caller`: its name in the audit log).
async fn open_with(
    cli: &Cli,
    config: Config,
    grant_cache: bool,
    caller: &str,
) -> Result<Arc<Keeper>, Error> {
    let database_url = database_url(cli);
    let keyring = keyring(cli, &database_url)?;
    Keeper::open(Options {
        database_url,
        config,
        keyring,
        limits: SandboxLimits::default(),
        max_connections: 16,
        clock: Default::default(),
        grant_cache,
        audit_as: Some(caller.to_string()),
    })
    .await
}

/// SIGHUP: the configuration file read again; its providers and API keys
/// replace the running ones. A file that does not parse changes nothing
/// (one line on standard error says why).
fn reload(cli: &Cli, listen: &[String], reloader: &tokenkeep_service::server::Reloader) {
    let reloaded = config_text(cli).and_then(|text| {
        let text = text.unwrap_or_default();
        reloader.reload(
            Config::parse(&text)?,
            ServeSettings::parse(&text, listen, default_socket())?,
        )
    });
    match reloaded {
        Ok(()) => tracing::info!("configuration reloaded"),
        // Through the log: one line, in the log's format.
        Err(e) => tracing::error!(
            class = e.class(),
            "reload refused, the running configuration stays: {e}"
        ),
    }
}

/// Where `serve` listens when nothing says: a socket in the runtime
/// directory (per user, cleared at logout), else beside the database.
fn default_socket() -> Listen {
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(|d| PathBuf::from(d).join("tokenkeep"))
        .unwrap_or_else(data_dir);
    Listen::Unix(dir.join("api.sock"))
}

/// `tokenkeep serve`: the keeper (with its grant cache) behind the HTTP
/// API until SIGTERM or SIGINT; a second signal stops at once.
async fn serve(cli: &Cli, listen: &[String]) -> Result<Finished, Error> {
    let mut signals = Signals::new()?;
    // Caught from the start: a reload while the keeper opens is applied once
    // it answers, never the default (which ends the process).
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| Error::Config(format!("cannot catch signals: {e}")))?;
    let text = config_text(cli)?.unwrap_or_default();
    let config = Config::parse(&text)?;
    let settings = ServeSettings::parse(&text, listen, default_socket())?;
    let keeper = open_with(cli, config, true, "serve").await?;
    let server = Server::bind(keeper, settings).await?;
    let reloader = server.reloader();
    let mut lines = String::new();
    for address in server.addresses() {
        lines.push_str(&format!("listening on {address}\n"));
    }
    print_stdout(lines.trim_end())?;
    let (first, stop) = tokio::sync::oneshot::channel::<u8>();
    let running = tokio::spawn(server.run(async move {
        let _ = stop.await;
    }));
    let signal = loop {
        tokio::select! {
            signal = signals.next() => break signal,
            _ = hangups.recv() => reload(cli, listen, &reloader),
        }
    };
    let _ = first.send(signal);
    tracing::info!(
        signal,
        "stopping: finishing requests and refreshes in flight"
    );
    tokio::select! {
        done = running => match done {
            Ok(Ok(())) => Ok(Finished::Done),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Sandbox("the service's task panicked".into())),
        },
        _ = signals.next() => Ok(Finished::Interrupted(signal)),
    }
}

/// Keys from TOKENKEEP_KEYS, a key file, or (SQLite only) a key file created
/// beside the database on first use.
fn keyring(cli: &Cli, database_url: &str) -> Result<Keyring, Error> {
    if let Ok(inline) = std::env::var("TOKENKEEP_KEYS") {
        return Keyring::parse(&SecretString::from(inline));
    }
    if let Some(path) = &cli.keys {
        return Keyring::load(path);
    }
    let Some(db) = database_url
        .strip_prefix("sqlite://")
        .or_else(|| database_url.strip_prefix("sqlite:"))
    else {
        return Err(Error::Config(
            "Postgres needs a configured key: --keys FILE, TOKENKEEP_KEYS_FILE or TOKENKEEP_KEYS"
                .into(),
        ));
    };
    let path = Path::new(db).with_extension("key");
    if path.exists() {
        return Keyring::load(&path);
    }
    let ring = Keyring::create(&path)?;
    eprintln!(
        "tokenkeep: created encryption key {} (mode 0600); back it up: without it the stored tokens cannot be read",
        path.display()
    );
    Ok(ring)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_back_from_what_the_listings_print() {
        for ts in [0, 951_782_400, 1_700_000_000, 1_900_000_000, 4_107_542_399] {
            assert_eq!(parse_time(&utc(ts)), Ok(ts), "{}", utc(ts));
        }
        assert_eq!(parse_time("2026-11-24"), Ok(1_795_478_400));
        assert_eq!(parse_time("1700000000"), Ok(1_700_000_000));
        for bad in [
            "2026-13-01",
            "2026-11-24T25:00:00Z",
            "2026-11-24T10:00:00",
            "yesterday",
            "",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_take_seconds_or_a_unit() {
        for (text, secs) in [
            ("900", 900),
            ("90s", 90),
            ("30m", 1800),
            ("2h", 7200),
            ("1d", 86_400),
        ] {
            assert_eq!(parse_duration(text), Ok(secs), "{text}");
        }
        for bad in ["", "m", "1.5h", "-5", "10w", "99999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
