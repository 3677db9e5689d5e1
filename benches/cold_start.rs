//! Cold start of each step function: time from process start to the first invocation
//! answered, against a Lambda Runtime API emulated on 127.0.0.1 (the same HTTP contract
//! `cargo lambda watch` and Lambda serve: `GET .../invocation/next`, `POST .../response` or
//! `.../error`).
//!
//! The event is one the step refuses before touching the store (no idempotency key), so the
//! figure is the function's own start-up — runtime, configuration, AWS configuration, clients —
//! and one answer, with no network call to wait for.
//!
//!     cargo build --release -p check-idempotency -p check-spend -p process-payment \
//!         -p record-ledger -p compensate
//!     cargo bench --bench cold_start [-- BIN_DIR [RUNS]]      # BIN_DIR default target/release
//!
//! Native binaries (this machine is x86_64; the deployed ones are arm64 builds of the same code).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const FUNCTIONS: [&str; 5] = ["check-idempotency", "check-spend", "process-payment", "record-ledger", "compensate"];
const EVENT: &str = r#"{"request": {}, "executionId": "cold-start"}"#;
/// A start that takes longer than this is a hang, not a figure.
const GIVE_UP: Duration = Duration::from_secs(20);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let dir = PathBuf::from(args.first().cloned().unwrap_or_else(|| "target/release".into()));
    let runs: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(20);
    println!("cold start: process start -> first invocation answered ({runs} runs each, {})", dir.display());
    println!("  {:<18} {:>9} {:>9} {:>9}", "function", "median", "p90", "max");
    for function in FUNCTIONS {
        let binary = dir.join(function);
        assert!(
            binary.exists(),
            "{} is missing: build the functions in release first (see the header)",
            binary.display()
        );
        let mut times: Vec<Duration> = (0..runs).map(|_| cold_start(&binary, function)).collect();
        times.sort();
        let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
        println!(
            "  {:<18} {:>7.1}ms {:>7.1}ms {:>7.1}ms",
            function,
            ms(at(0.5)),
            ms(at(0.9)),
            ms(*times.last().unwrap())
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One start: a fresh emulator, the binary spawned, the clock stopped when its answer arrives.
fn cold_start(binary: &Path, function: &str) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let (answered, answer) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let answered = answered.clone();
            std::thread::spawn(move || serve(stream.unwrap(), answered));
        }
    });
    let started = Instant::now();
    let mut child = Command::new(binary)
        .env_clear()
        .env("AWS_LAMBDA_RUNTIME_API", address.to_string())
        .env("AWS_LAMBDA_FUNCTION_NAME", format!("agentpay-bench-{function}"))
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/bench")
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "bench")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "bench")
        .env("AWS_SECRET_ACCESS_KEY", "bench")
        // Unroutable on purpose: the event never reaches the store.
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .env("AGENTPAY_IDEMPOTENCY_TABLE", "bench-idempotency")
        .env("AGENTPAY_LEDGER_TABLE", "bench-ledger")
        .env("AGENTPAY_DEV_WALLET_KEY", "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let outcome = answer.recv_timeout(GIVE_UP);
    let elapsed = started.elapsed();
    let _ = child.kill();
    let output = child.wait_with_output().unwrap();
    match outcome {
        Ok(path) => {
            assert!(path.ends_with("/error"), "{function} answered {path}, expected the InvalidPaymentRequest error");
            elapsed
        }
        Err(_) => panic!("{function} answered nothing within {GIVE_UP:?}: {}", String::from_utf8_lossy(&output.stderr)),
    }
}

/// The runtime API: the first `next` gets the event, later ones wait (the process is killed);
/// a response or error reports its path and is acknowledged.
fn serve(stream: TcpStream, answered: mpsc::Sender<String>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut served_event = false;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let path = request_line.split_whitespace().nth(1).unwrap_or_default().to_owned();
        if path.ends_with("/invocation/next") {
            if served_event {
                std::thread::sleep(GIVE_UP);
                return;
            }
            served_event = true;
            let deadline =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() + 15_000;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nLambda-Runtime-Aws-Request-Id: bench-1\r\nLambda-Runtime-Deadline-Ms: {deadline}\r\nLambda-Runtime-Invoked-Function-Arn: arn:aws:lambda:us-east-1:000000000000:function:bench\r\nContent-Length: {}\r\n\r\n",
                EVENT.len()
            );
            let _ = writer.write_all(head.as_bytes()).and_then(|_| writer.write_all(EVENT.as_bytes()));
        } else {
            let _ = writer.write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{}");
            let _ = answered.send(path);
        }
    }
}
