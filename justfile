# Everyday recipes. `just --list` shows them.

# Build the component and the host.
build:
    cargo build --workspace

# Watch several runtimes share one expiring token (SQLite, local test provider).
demo:
    cargo run -p tokenkeep -- demo

# The whole test suite (starts its own Postgres cluster).
test:
    cargo test --workspace

# Formatting and lints, as CI would want them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    cargo clippy -p tokenkeep-component -p tokenkeep-rogue --target wasm32-wasip2 --target-dir target/wasm -- -D warnings

# Show the built component's world (needs `cargo install wasm-tools`).
wit: build
    wasm-tools component wit target/wasm/wasm32-wasip2/component/tokenkeep_component.wasm

# Check that the built component imports and exports exactly wit/'s keeper-core.
contract:
    cargo test -p tokenkeep --test contract

# Size of the built component in bytes.
size: build
    wc -c target/wasm/wasm32-wasip2/component/tokenkeep_component.wasm

# What tokenkeep costs, as ratios to baselines measured in the same run
# (a bare prepared SELECT, a SQLite C-library read, a bare locked
# transaction, `true`), written to docs/benchmarks.md. Starts its own
# Postgres cluster unless DATABASE_URL names one.
bench:
    cargo build --release -p tokenkeep --bin tokenkeep --example bench
    target/release/examples/bench

# Longer resilience runs than CI's: 20 expiry rounds of the 4 x 64 x 200 load
# test, 40 kill trials per kill point, on Postgres and SQLite.
soak:
    TOKENKEEP_LOAD_ROUNDS=20 TOKENKEEP_KILL_TRIALS=40 cargo test -p tokenkeep --test resilience -- --nocapture

# Fuzz one target for a while (needs `cargo install cargo-fuzz` and a nightly
# toolchain): just fuzz provider_response 600   or   just fuzz sealed_row 600
fuzz target="provider_response" seconds="300":
    cd core && cargo +nightly fuzz run {{target}} fuzz/corpus/{{target}} -- -max_total_time={{seconds}}

# The SQLite hot path against the previous main's build, in one run: builds
# the commit before the performance work in a worktree under target/, with a
# target directory of its own (a shared one mixes the two trees' build-script
# outputs: one build then embeds the other's component), runs the same probe
# from both, and writes docs/benchmarks-vs-main.md. The first run builds
# wasmtime a second time (about 6 minutes on 2 cores).
bench-vs-main base="2ba7246":
    #!/usr/bin/env bash
    set -euo pipefail
    root="$PWD"
    tree="$root/target/previous-main"
    git worktree prune
    if [ ! -d "$tree" ]; then git worktree add --detach "$tree" {{base}}; fi
    git -C "$tree" checkout -q --detach {{base}}
    sed '/previous main: none/d' cli/examples/sqlite_hot_path.rs > "$tree/cli/examples/sqlite_hot_path.rs"
    (cd "$tree" && CARGO_TARGET_DIR="$root/target/previous-main-target" cargo build --release -p tokenkeep --example sqlite_hot_path)
    cp target/previous-main-target/release/examples/sqlite_hot_path target/sqlite_hot_path-previous
    cargo build --release -p tokenkeep --example sqlite_hot_path --example bench
    target/release/examples/bench vs-main {{base}} target/sqlite_hot_path-previous target/release/examples/sqlite_hot_path
