//! Bindings generated from the WIT contract: the host implements the
//! `storage`, `keyring` and `providers` imports and calls `token-store`.
//! WASI and `wasi:http` come from wasmtime-wasi(-http) through the linker.

wasmtime::component::bindgen!({
    world: "keeper-core",
    path: "../wit",
    imports: { default: async | trappable },
    exports: { default: async },
    with: {
        "tokenkeep:oauth/storage.transaction": crate::storage::TxnSlot,
    },
});
