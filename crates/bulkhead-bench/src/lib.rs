//! Nothing to link: see `src/bin/stream_load.rs`, run by `bench/run`.
