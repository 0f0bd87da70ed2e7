//! A DynaKV node and the `dynakv` tool.
pub mod proto;
