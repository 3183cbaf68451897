//! The contract is `wit/`: the built component imports and exports exactly
//! the `keeper-core` world (what `wasm-tools component wit` prints, read with
//! the same library), so a host in another language can be written from
//! `wit/` alone, and no import hands the component key material.

use std::collections::BTreeSet;
use std::path::Path;
use wit_parser::{Resolve, WorldId, WorldItem};

/// What a world imports and exports: each interface (`ns:pkg/iface@version`)
/// with each of its functions and their parameter and result names.
fn surface(resolve: &Resolve, world: WorldId) -> (BTreeSet<String>, BTreeSet<String>) {
    let names = |items: &wit_parser::IndexMap<wit_parser::WorldKey, WorldItem>| {
        let mut out = BTreeSet::new();
        for (key, item) in items {
            let WorldItem::Interface { id, .. } = item else {
                continue;
            };
            let name = resolve.name_world_key(key);
            for (f, func) in &resolve.interfaces[*id].functions {
                let params: Vec<_> = func.params.iter().map(|p| p.name.as_str()).collect();
                out.insert(format!(
                    "{name}#{f}({}) -> {}",
                    params.join(", "),
                    func.result.is_some()
                ));
            }
            out.insert(name);
        }
        out
    };
    let w = &resolve.worlds[world];
    (names(&w.imports), names(&w.exports))
}

fn contract() -> (Resolve, WorldId) {
    let mut resolve = Resolve::default();
    let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit");
    let (pkg, _) = resolve.push_dir(&wit).expect("wit/ parses");
    let world = resolve
        .select_world(&[pkg], Some("keeper-core"))
        .expect("wit/ defines keeper-core");
    (resolve, world)
}

fn built() -> (Resolve, WorldId) {
    match wit_component::decode(tokenkeep_host::COMPONENT).expect("the component decodes") {
        wit_component::DecodedWasm::Component(resolve, world) => (resolve, world),
        wit_component::DecodedWasm::WitPackage(..) => panic!("a component, not a WIT package"),
    }
}

#[test]
fn the_built_component_imports_and_exports_exactly_keeper_core() {
    let (resolve, world) = contract();
    let (want_imports, want_exports) = surface(&resolve, world);
    let (resolve, world) = built();
    let (got_imports, got_exports) = surface(&resolve, world);
    // tokenkeep's own interfaces whole; of WASI's, the interfaces, and
    // functions the contract has (a component imports only those it calls).
    let ours = |set: &BTreeSet<String>| -> BTreeSet<String> {
        set.iter()
            .filter(|s| s.starts_with("tokenkeep:") || !s.contains('#'))
            .cloned()
            .collect()
    };
    assert_eq!(
        ours(&got_imports),
        ours(&want_imports),
        "wit/tokenkeep.wit's keeper-core must list what the component imports"
    );
    assert!(
        got_imports.is_subset(&want_imports),
        "{:?}",
        got_imports.difference(&want_imports).collect::<Vec<_>>()
    );
    assert_eq!(got_exports, want_exports);
}

#[test]
fn no_import_hands_the_component_keys_network_files_or_environment() {
    let (resolve, world) = built();
    let (imports, _) = surface(&resolve, world);
    for forbidden in ["keyring", "wasi:http", "wasi:sockets", "wasi:filesystem"] {
        assert!(
            imports.iter().all(|i| !i.contains(forbidden)),
            "{forbidden} imported: {imports:?}"
        );
    }
    // Every function of tokenkeep's own imports, and what it returns: none
    // returns bytes except what opening a sealed field or sealing yields.
    let w = &resolve.worlds[world];
    let mut functions = BTreeSet::new();
    for (key, item) in &w.imports {
        let WorldItem::Interface { id, .. } = item else {
            continue;
        };
        let name = resolve.name_world_key(key);
        if !name.starts_with("tokenkeep:oauth/") {
            continue;
        }
        for f in resolve.interfaces[*id].functions.keys() {
            functions.insert(format!("{name}#{f}"));
        }
    }
    let sealing: Vec<_> = functions
        .iter()
        .filter(|f| f.contains("/sealing@"))
        .map(|f| f.split('#').nth(1).unwrap_or_default().to_string())
        .collect();
    assert_eq!(sealing, ["open", "seal-tokens"], "{functions:?}");
    assert!(
        functions
            .iter()
            .all(|f| !f.contains("key(") && !f.ends_with("#key") && !f.ends_with("#active-key-id")),
        "{functions:?}"
    );
}
