//! One integration-test binary; every test gets its own store in a temp directory.

mod asl_file;
mod cli;
mod concurrency;
mod events;
mod helpers;
mod workflow;
