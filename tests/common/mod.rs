//! Shared test harness: a real Postgres cluster started by the tests, SQLite
//! files, the loopback token endpoint and keepers wired to them.
#![allow(dead_code)]

pub use tokenkeep_testkit::pg;

pub mod node;
pub mod service;

use secrecy::SecretString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokenkeep_host::{Clock, Config, Keeper, Keyring, Options, SandboxLimits, TokenSet};
use tokenkeep_testkit::devprovider::{Behaviour, DevProvider};

/// Fixed test keys: k1 active, k0 an older key.
pub const KEYS: &str = "k1=AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\nk0=AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

pub use tokenkeep_testkit::Scratch;

/// Everything one test needs: a database, a provider, a config and a keeper.
pub struct World {
    pub scratch: Scratch,
    pub database_url: String,
    pub provider: DevProvider,
    pub config_path: PathBuf,
    pub keys_path: PathBuf,
    pub clock: Clock,
    pub keeper: Arc<Keeper>,
}

impl World {
    pub async fn new(backend: Backend, name: &str) -> Self {
        Self::with(backend, name, Behaviour::default(), "").await
    }

    /// A world whose provider answers after `delay`, to widen race windows.
    pub async fn with_delay(backend: Backend, name: &str, delay: std::time::Duration) -> Self {
        Self::with(
            backend,
            name,
            Behaviour {
                delay,
                ..Default::default()
            },
            "",
        )
        .await
    }

    /// A world whose provider config gets `extra` TOML lines.
    pub async fn with(backend: Backend, name: &str, behaviour: Behaviour, extra: &str) -> Self {
        Self::build(backend, name, behaviour, extra, Clock::System).await
    }

    /// A world whose component sees `clock`.
    pub async fn build(
        backend: Backend,
        name: &str,
        behaviour: Behaviour,
        extra: &str,
        clock: Clock,
    ) -> Self {
        if let Ok(filter) = std::env::var("TOKENKEEP_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let scratch = Scratch::new(name);
        let database_url = match backend {
            Backend::Postgres => pg::fresh_database().await,
            Backend::Sqlite => format!("sqlite:{}", scratch.0.join("tokens.db").display()),
        };
        let provider = DevProvider::start(behaviour, "rt-0").await.unwrap();
        let config_path = scratch.0.join("config.toml");
        std::fs::write(
            &config_path,
            format!(
                "[providers.acme]\ntoken_url = \"{}\"\nclient_id = \"dev-client\"\nclient_secret = \"dev-secret\"\n{extra}",
                provider.token_url()
            ),
        )
        .unwrap();
        let keys_path = scratch.0.join("keys");
        std::fs::write(&keys_path, KEYS).unwrap();
        let keeper = open_keeper(&database_url, &config_path, KEYS, clock.clone()).await;
        World {
            scratch,
            database_url,
            provider,
            config_path,
            keys_path,
            clock,
            keeper,
        }
    }

    /// Adds a provider `name` served by a new loopback endpoint whose chain
    /// starts at `rt-0`, and reopens the keeper with it.
    pub async fn add_provider(&mut self, name: &str, behaviour: Behaviour) -> DevProvider {
        let provider = DevProvider::start(behaviour, "rt-0").await.unwrap();
        let mut config = std::fs::read_to_string(&self.config_path).unwrap();
        config.push_str(&format!(
            "\n[providers.{name}]\ntoken_url = \"{}\"\nclient_id = \"dev-client\"\nclient_secret = \"dev-secret\"\n",
            provider.token_url()
        ));
        std::fs::write(&self.config_path, config).unwrap();
        self.keeper = self.another_keeper().await;
        provider
    }

    /// Adds provider `name` configured by the TOML `lines` (`{loopback}`
    /// stands for a new loopback endpoint's base URL, whose chain starts at
    /// `rt-0`) plus the endpoint's client credentials, and reopens the keeper.
    pub async fn add_provider_toml(
        &mut self,
        name: &str,
        behaviour: Behaviour,
        lines: &str,
    ) -> DevProvider {
        let provider = DevProvider::start(behaviour, "rt-0").await.unwrap();
        let mut config = std::fs::read_to_string(&self.config_path).unwrap();
        config.push_str(&format!(
            "\n[providers.{name}]\nclient_id = \"dev-client\"\nclient_secret = \"dev-secret\"\n{}\n",
            lines.replace("{loopback}", &provider.base_url())
        ));
        std::fs::write(&self.config_path, config).unwrap();
        self.keeper = self.another_keeper().await;
        provider
    }

    /// Appends TOML to the configuration and reopens the keeper with it.
    pub async fn add_config(&mut self, toml: &str) {
        let mut config = std::fs::read_to_string(&self.config_path).unwrap();
        config.push_str(toml);
        std::fs::write(&self.config_path, config).unwrap();
        self.keeper = self.another_keeper().await;
    }

    /// Another runtime on the same database and configuration.
    pub async fn another_keeper(&self) -> Arc<Keeper> {
        self.keeper_with_keys(KEYS).await
    }

    /// Another runtime with its own keyring.
    pub async fn keeper_with_keys(&self, keys: &str) -> Arc<Keeper> {
        open_keeper(
            &self.database_url,
            &self.config_path,
            keys,
            self.clock.clone(),
        )
        .await
    }

    /// A proxy between the test and this world's Postgres database, which
    /// counts round trips and black-holes connections on demand.
    pub async fn proxy(&self) -> tokenkeep_testkit::proxy::BlackHoleProxy {
        let url = url::Url::parse(&self.database_url).unwrap();
        let database = format!("127.0.0.1:{}", url.port().unwrap());
        tokenkeep_testkit::proxy::BlackHoleProxy::start(database.parse().unwrap())
            .await
            .unwrap()
    }

    /// Another runtime with a grant cache, on `database_url` (this world's
    /// database, perhaps through a proxy).
    pub async fn caching_keeper(&self, database_url: &str) -> Arc<Keeper> {
        open_keeper_with(
            database_url,
            &self.config_path,
            KEYS,
            self.clock.clone(),
            true,
        )
        .await
        .unwrap()
    }

    /// Seconds since the epoch on this world's clock.
    pub fn now(&self) -> i64 {
        self.clock.now()
    }

    /// Stores tokens for acme/`user` whose access token expires in `expires_in` seconds.
    pub async fn store(&self, user: &str, access: &str, refresh: Option<&str>, expires_in: i64) {
        self.keeper
            .store_tokens(
                "acme",
                user,
                &token_set(access, refresh, Some(self.now() + expires_in)),
            )
            .await
            .unwrap();
    }

    /// Stores acme tokens for `user-0` … `user-{n-1}` (access `at-{i}`,
    /// expiring in `expires_in` seconds), each an authorisation of its own
    /// at the provider: a rotating chain starting at `rt-{i}`.
    pub async fn store_chains(&self, n: usize, expires_in: i64) {
        for i in 0..n {
            let refresh = format!("rt-{i}");
            if i == 0 {
                self.provider.reset_chain(&refresh);
            } else {
                self.provider.add_chain(&refresh);
            }
            self.store(
                &format!("user-{i}"),
                &format!("at-{i}"),
                Some(&refresh),
                expires_in,
            )
            .await;
        }
    }

    /// Time passes until every row's backoff after a failure is over (the
    /// provider may be asked again at once).
    pub async fn backoff_over(&self) {
        raw_sql(
            &self.database_url,
            "UPDATE tokenkeep_tokens SET retry_not_before = NULL",
        )
        .await;
    }

    /// The stored (decrypted) acme record of `user`, which must exist.
    pub async fn stored(&self, user: &str) -> tokenkeep_host::TokenRecord {
        self.keeper
            .load_tokens("acme", user, false)
            .await
            .unwrap()
            .unwrap()
    }

    /// Runs the CLI at trace log level with `stdin` and waits for it:
    /// (exit code, standard output, standard error).
    pub fn cli_traced(&self, args: &[&str], stdin: &str) -> (i32, String, String) {
        use std::io::Write;
        use std::process::Stdio;
        let mut child = self
            .cli()
            .env("TOKENKEEP_LOG", "trace")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let o = child.wait_with_output().unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    /// Runs `tokenkeep connect PROVIDER USER` with the oidc-provider test
    /// server's user at the browser, who approves, and waits for it.
    pub fn connect_in_browser(&self, provider: &str, user: &str) -> std::process::Output {
        self.cli()
            .env(
                "BROWSER",
                tokenkeep_testkit::oidc_server::OidcServer::browser(),
            )
            .args(["connect", provider, user])
            .output()
            .unwrap()
    }

    /// Runs `tokenkeep connect PROVIDER USER --device`, has the oidc-provider
    /// test server's user confirm the code it prints, and waits: the first
    /// line (the URL and code), the exit code, and the lines after it.
    pub fn connect_on_device(
        &self,
        provider: &str,
        user: &str,
    ) -> (String, Option<i32>, Vec<String>) {
        use std::io::BufRead;
        let mut child = self
            .cli()
            .args(["connect", provider, user, "--device"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        // "tokenkeep: open URL and confirm the code CODE (expires in N s)"
        let url = first
            .strip_prefix("tokenkeep: open ")
            .and_then(|rest| rest.split(' ').next())
            .unwrap_or_else(|| panic!("no verification URL in {first:?}"));
        tokenkeep_testkit::oidc_server::OidcServer::user_approves(url);
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        let code = child.wait().unwrap().code();
        (first, code, rest)
    }

    /// Runs the `tokenkeep` binary against this world.
    pub fn cli(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tokenkeep"));
        cmd.env("TOKENKEEP_DATABASE", &self.database_url)
            .env("TOKENKEEP_CONFIG", &self.config_path)
            .env("TOKENKEEP_KEYS_FILE", &self.keys_path)
            .env_remove("TOKENKEEP_KEYS")
            .env_remove("TOKENKEEP_LOG");
        cmd
    }
}

pub async fn open_keeper(
    database_url: &str,
    config_path: &Path,
    keys: &str,
    clock: Clock,
) -> Arc<Keeper> {
    open_keeper_with(database_url, config_path, keys, clock, false)
        .await
        .unwrap()
}

/// [`open_keeper`], with or without the grant cache, and its error.
pub async fn open_keeper_with(
    database_url: &str,
    config_path: &Path,
    keys: &str,
    clock: Clock,
    grant_cache: bool,
) -> Result<Arc<Keeper>, tokenkeep_host::Error> {
    Keeper::open(Options {
        database_url: database_url.into(),
        config: Config::load(config_path).unwrap(),
        keyring: Keyring::parse(&SecretString::from(keys.to_string())).unwrap(),
        limits: SandboxLimits::default(),
        max_connections: 8,
        clock,
        grant_cache,
        audit_as: None,
    })
    .await
}

pub fn token_set(access: &str, refresh: Option<&str>, expires_at: Option<i64>) -> TokenSet {
    TokenSet {
        access_token: access.to_string().into(),
        refresh_token: refresh.map(|r| SecretString::from(r.to_string())),
        access_token_expires_at: expires_at,
        refresh_token_expires_at: None,
        scopes: vec!["repo".into(), "read:user".into()],
    }
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Runs raw SQL against the test database (to tamper with rows as an attacker could).
pub async fn raw_sql(database_url: &str, sql: &str) {
    use sqlx::Connection;
    if database_url.starts_with("postgres") {
        let mut c = sqlx::PgConnection::connect(database_url).await.unwrap();
        sqlx::query(sql).execute(&mut c).await.unwrap();
    } else {
        let path = database_url.trim_start_matches("sqlite:");
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{path}"))
            .await
            .unwrap();
        sqlx::query(sql).execute(&mut c).await.unwrap();
    }
}

/// Expands one scenario into a Postgres test and a SQLite test.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::common::Backend::Postgres).await
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
            )*
        }
    };
}
