//! The one place the host's bindings are generated from the WIT contract.
//! The host implements `clock`, `storage`, `sealing`, `providers` and
//! `token-endpoint` ([`crate::linker`]) and calls `token-store` and
//! `conversations`; WASI comes from wasmtime-wasi through the linker.

wasmtime::component::bindgen!({
    world: "keeper-core",
    path: "../wit",
    imports: { default: async | trappable },
    exports: { default: async },
    with: {
        "tokenkeep:oauth/storage.transaction": crate::linker::LockedTxn,
        "wasi:io": wasmtime_wasi::p2::bindings::io,
        "wasi:clocks": wasmtime_wasi::p2::bindings::clocks,
        "wasi:random": wasmtime_wasi::p2::bindings::random,
        "wasi:cli": wasmtime_wasi::p2::bindings::cli,
    },
});
