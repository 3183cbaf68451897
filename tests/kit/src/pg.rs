//! A throwaway Postgres cluster: initdb and pg_ctl on a free port in a
//! temporary directory, as the `postgres` user when the tests run as root,
//! stopped by a watchdog when the test process exits. Or an existing server
//! named by `DATABASE_URL`.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

struct Cluster {
    /// URL of the maintenance database.
    admin_url: String,
    /// The data directory and the `postgres` options, when this harness
    /// started the cluster (so that it can stop and start it again).
    own: Option<(PathBuf, PathBuf, String)>,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

fn as_postgres(program: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", program]);
        c
    } else {
        Command::new(program)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run(mut cmd: Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn start() -> Cluster {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        return Cluster {
            admin_url: url,
            own: None,
        };
    }
    let dir = PathBuf::from(format!("/tmp/tokenkeep-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    if is_root() {
        run(
            {
                let mut c = Command::new("chown");
                c.arg("postgres:").arg(&dir);
                c
            },
            "chown",
        );
    }
    let data = dir.join("data");
    let mut initdb = as_postgres("initdb");
    initdb
        .args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
            "-D",
        ])
        .arg(&data);
    run(initdb, "initdb");
    let port = free_port();
    let options = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300",
        dir.display()
    );
    pg_ctl_start(&data, &dir.join("log"), &options);
    // Stop the cluster when this test process ends, however it ends. The
    // watchdog outlives us on purpose, so it is never waited for.
    let stop = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {runuser} pg_ctl -D {data} -m immediate stop >/dev/null 2>&1; rm -rf {dir}",
        pid = std::process::id(),
        runuser = if is_root() {
            "runuser -u postgres --"
        } else {
            ""
        },
        data = data.display(),
        dir = dir.display(),
    );
    #[allow(clippy::zombie_processes)]
    Command::new("sh")
        .args(["-c", &stop])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Cluster {
        admin_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        own: Some((data, dir.join("log"), options)),
    }
}

fn pg_ctl_start(data: &std::path::Path, log: &std::path::Path, options: &str) {
    let mut ctl = as_postgres("pg_ctl");
    ctl.arg("-D")
        .arg(data)
        .arg("-l")
        .arg(log)
        .arg("-o")
        .arg(options)
        .args(["-w", "start"]);
    run(ctl, "pg_ctl start");
}

/// Stops the harness's cluster (fast shutdown: sessions are terminated),
/// and returns a function that starts it again on the same port.
pub fn stop() -> impl FnOnce() {
    let cluster = CLUSTER.get_or_init(start);
    let (data, log, options) = cluster
        .own
        .clone()
        .expect("restart tests need the harness's own cluster, not DATABASE_URL");
    let mut ctl = as_postgres("pg_ctl");
    ctl.arg("-D").arg(&data).args(["-m", "fast", "-w", "stop"]);
    run(ctl, "pg_ctl stop");
    move || pg_ctl_start(&data, &log, &options)
}

/// A new, empty database on the cluster.
pub async fn fresh_database() -> String {
    use sqlx::Connection;
    static N: AtomicU32 = AtomicU32::new(0);
    let cluster = CLUSTER.get_or_init(start);
    let name = format!(
        "tk_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    let mut c = sqlx::PgConnection::connect(&cluster.admin_url)
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut c)
        .await
        .unwrap();
    let base = cluster.admin_url.rsplit_once('/').unwrap().0;
    format!("{base}/{name}")
}

/// The maintenance database's URL.
pub fn admin_url() -> String {
    CLUSTER.get_or_init(start).admin_url.clone()
}
