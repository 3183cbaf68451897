//! What tokenkeep's tests run against, none of it part of the product: a
//! loopback token endpoint with scriptable faults ([`devprovider`]), a
//! throwaway Postgres cluster run as an unprivileged user ([`pg`]), and
//! django-oauth-toolkit as a real OAuth server ([`oauth_server`]).

pub mod devprovider;
pub mod oauth_server;
pub mod oidc_server;
pub mod pg;
pub mod proxy;
pub mod tls;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// A scratch directory removed at the end of the test.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tokenkeep-test-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("a scratch directory under the temp dir");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
