//! The `tokenkeep` command line and its demo: parsing, wiring and printing
//! over [`tokenkeep_host::Keeper`].

pub mod cli;
pub mod demo;
