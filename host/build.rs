//! Builds the guest component for wasm32-wasip2 and hands its path to the
//! host crate, so `cargo build`, `cargo run` and `cargo test` need nothing else.
//!
//! The guest is built by a nested cargo into its own target directory
//! (`target/wasm`): the outer cargo holds the lock on `target/`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .expect("host/ lives in the workspace")
        .to_path_buf();
    for watched in [
        "core/src",
        "core/Cargo.toml",
        "component/src",
        "component/Cargo.toml",
        "component/build.rs",
        "wit",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=TOKENKEEP_COMPONENT");

    // A prebuilt component (e.g. from CI's artifact cache) can be supplied.
    if let Ok(path) = std::env::var("TOKENKEEP_COMPONENT") {
        println!("cargo:rustc-env=TOKENKEEP_COMPONENT_PATH={path}");
        return;
    }

    ensure_wasm_target();
    let target_dir = root.join("target").join("wasm");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args([
            "build",
            "-p",
            "tokenkeep-component",
            "--target",
            "wasm32-wasip2",
            "--profile",
            "component",
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    // Flags meant for the host build must not leak into the guest build.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
    ] {
        cmd.env_remove(var);
    }
    for (key, _) in std::env::vars() {
        if key.starts_with("CARGO_FEATURE_")
            || key.starts_with("CARGO_CFG_")
            || key.starts_with("DEP_")
        {
            cmd.env_remove(key);
        }
    }
    let status = cmd
        .status()
        .expect("failed to run cargo for the guest component");
    if !status.success() {
        panic!(
            "building the guest component failed; is the target installed? \
             run `rustup target add wasm32-wasip2`"
        );
    }
    let wasm = target_dir.join("wasm32-wasip2/component/tokenkeep_component.wasm");
    println!(
        "cargo:rustc-env=TOKENKEEP_COMPONENT_PATH={}",
        wasm.display()
    );
}

/// The guest needs the wasm32-wasip2 standard library. rust-toolchain.toml
/// names the target, but rustup adds it only when it installs the toolchain
/// (and never with RUSTUP_AUTO_INSTALL=0), so add it here if it is missing.
fn ensure_wasm_target() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| PathBuf::from(s.trim()));
    let installed = sysroot
        .as_ref()
        .is_some_and(|s| s.join("lib/rustlib/wasm32-wasip2").exists());
    if installed {
        return;
    }
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "1.95.0".into());
    println!(
        "cargo:warning=adding the wasm32-wasip2 target to {toolchain} (rustup target add wasm32-wasip2)"
    );
    let added = Command::new("rustup")
        .args(["target", "add", "wasm32-wasip2", "--toolchain", &toolchain])
        .status()
        .is_ok_and(|s| s.success());
    if !added {
        panic!("the wasm32-wasip2 target is missing: run `rustup target add wasm32-wasip2`");
    }
}
