//! The guest's shadow stack: 128 KiB instead of Rust's 1 MiB default. A call
//! needs far less (JSON nesting is capped by serde_json's recursion limit),
//! an overflow traps (the stack sits below the data, at the bottom of
//! linear memory), and a small stack keeps what a call touches within the
//! memory a pooled slot keeps resident and resets with one short `memset`.
fn main() {
    // Only for the guest: a native build of this crate (`cargo build
    // --workspace`) links with the host's linker, which may not know it.
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("wasm32") {
        println!("cargo:rustc-link-arg=-zstack-size=131072");
    }
}
