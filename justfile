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
    cargo clippy -p tokenkeep-component --target wasm32-wasip2 --target-dir target/wasm -- -D warnings

# Show the built component's world (needs `cargo install wasm-tools`).
wit: build
    wasm-tools component wit target/wasm/wasm32-wasip2/component/tokenkeep_component.wasm

# Size of the built component in bytes.
size: build
    wc -c target/wasm/wasm32-wasip2/component/tokenkeep_component.wasm

# Hot-path cost as ratios to a raw storage read measured in the same run
# (SQLite; set DATABASE_URL=postgres://... for Postgres).
bench:
    cargo run -p tokenkeep --example bench
