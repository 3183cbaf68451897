//! The Node.js host (hosts/node: the same tokenkeep.wasm through jco) as
//! the tests run it: its `get` command, one process per caller.

use super::World;
use std::path::{Path, PathBuf};

/// What a caller got: the access token, or the error class.
#[derive(serde::Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok(String),
    Error(String),
    /// Expected only: any of these tokens (callers that did not wait for
    /// the refresh get the still-valid token).
    #[serde(rename = "one_of")]
    OneOf(Vec<String>),
}

impl Outcome {
    pub fn admits(&self, got: &Outcome) -> bool {
        match (self, got) {
            (Outcome::OneOf(tokens), Outcome::Ok(t)) => tokens.contains(t),
            (want, got) => want == got,
        }
    }
}

/// The Node.js host's command, its packages installed from the registry
/// when they are missing and its build (jco's transpilation of the
/// component this tree builds) brought up to date, once per test binary.
pub fn host() -> PathBuf {
    static READY: std::sync::Once = std::sync::Once::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hosts/node");
    READY.call_once(|| {
        let run = |what: &str, c: &mut std::process::Command| {
            let out = c.current_dir(&root).output().unwrap_or_else(|e| {
                panic!("{what}: {e} (the Node host's tests need node and npm)")
            });
            assert!(
                out.status.success(),
                "{what} in hosts/node failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        if !root.join("node_modules").exists() {
            run("npm ci", std::process::Command::new("npm").arg("ci"));
        }
        run(
            "the build",
            std::process::Command::new("node").args(["scripts/build.js", "--if-stale"]),
        );
    });
    root.join("bin/tokenkeep-node.js")
}

/// The Node host's `get`, as a command to run.
pub fn get(w: &World, provider: &str, user: &str, min_remaining: u32) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("node");
    c.arg(host())
        .args(["get", provider, user])
        .arg("--database")
        .arg(&w.database_url)
        .arg("--config")
        .arg(&w.config_path)
        .arg("--keys")
        .arg(&w.keys_path)
        .kill_on_drop(true);
    if min_remaining > 0 {
        c.arg("--min-remaining").arg(min_remaining.to_string());
    }
    c
}

/// A `tokens get`-style run: the token on stdout, or one line
/// `tokenkeep: CLASS: message` on stderr.
pub fn outcome(out: &std::process::Output) -> Outcome {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        assert_eq!(stderr, "", "quiet on success");
        return Outcome::Ok(stdout.trim_end().to_string());
    }
    assert_eq!(stdout, "", "nothing on stdout on failure");
    let line = stderr.trim_end();
    assert_eq!(line.lines().count(), 1, "one line: {stderr}");
    let class = line
        .strip_prefix("tokenkeep: ")
        .and_then(|l| l.split(':').next())
        .unwrap_or_else(|| panic!("not a tokenkeep error line: {line}"));
    Outcome::Error(class.to_string())
}
