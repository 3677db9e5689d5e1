//! One integration-test binary; every test gets its own store in a temp directory.

mod concurrency;
mod helpers;
mod workflow;
