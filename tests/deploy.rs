//! deploy/: the systemd unit verifies with systemd's own checker against
//! the built binary, and the container file is well formed and builds
//! where a Docker daemon runs.

use std::path::Path;
use std::process::Command;

fn deploy(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_systemd_unit_verifies_cleanly_against_the_built_binary() {
    let unit = deploy("tokenkeep.service");
    assert!(unit.contains("ExecStart=/usr/local/bin/tokenkeep serve"));
    assert!(unit.contains("KillSignal=SIGTERM"));
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze is not installed: the unit was not verified");
        return;
    }
    let dir = std::env::temp_dir().join(format!("tokenkeep-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenkeep.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/tokenkeep", env!("CARGO_BIN_EXE_tokenkeep")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    // It exits 0 for unknown keys and typos, and says so: both must be quiet.
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

/// The container file's instructions: (keyword, arguments), continuation
/// lines joined, comments and parser directives left out.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let line = line.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                pending.push_str(part);
                pending.push(' ');
            }
            None => {
                pending.push_str(line);
                let (keyword, args) = pending.split_once(' ').unwrap_or((&pending, ""));
                out.push((keyword.to_ascii_uppercase(), args.trim().to_string()));
                pending.clear();
            }
        }
    }
    assert!(pending.is_empty(), "a continuation runs off the end");
    out
}

#[test]
fn the_container_file_is_well_formed_and_builds_where_docker_runs() {
    let text = deploy("Dockerfile");
    let known = [
        "FROM",
        "RUN",
        "CMD",
        "LABEL",
        "EXPOSE",
        "ENV",
        "ADD",
        "COPY",
        "ENTRYPOINT",
        "VOLUME",
        "USER",
        "WORKDIR",
        "ARG",
        "ONBUILD",
        "STOPSIGNAL",
        "HEALTHCHECK",
        "SHELL",
    ];
    let steps = instructions(&text);
    for (keyword, args) in &steps {
        assert!(
            known.contains(&keyword.as_str()),
            "unknown instruction {keyword}"
        );
        assert!(!args.is_empty(), "{keyword} without arguments");
    }
    let of = |k: &str| -> Vec<&str> {
        steps
            .iter()
            .filter(|(kw, _)| kw == k)
            .map(|(_, a)| a.as_str())
            .collect()
    };
    assert_eq!(
        of("FROM").len(),
        2,
        "a build stage and a slim runtime stage"
    );
    assert!(of("FROM")[0].ends_with(" AS build"));
    assert!(of("COPY").iter().any(|c| c.starts_with("--from=build ")));
    let user = of("USER");
    assert!(
        !user.is_empty() && user.iter().all(|u| *u != "root" && *u != "0"),
        "not root"
    );
    assert_eq!(of("STOPSIGNAL"), ["SIGTERM"]);
    for json in of("ENTRYPOINT").into_iter().chain(of("CMD")) {
        let parsed: Vec<String> = serde_json::from_str(json).expect("exec form");
        assert!(!parsed.is_empty());
    }
    // Build it where the machine allows: a reachable Docker daemon.
    let daemon = Command::new("docker")
        .arg("info")
        .output()
        .is_ok_and(|o| o.status.success());
    if !daemon {
        eprintln!("no Docker daemon here: the container was not built");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let built = Command::new("docker")
        .args([
            "build",
            "-q",
            "-f",
            "deploy/Dockerfile",
            "-t",
            "tokenkeep-ci",
            ".",
        ])
        .current_dir(&root)
        .status()
        .unwrap();
    assert!(built.success(), "docker build");
    let help = Command::new("docker")
        .args(["run", "--rm", "tokenkeep-ci", "--version"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).starts_with("tokenkeep "));
}
