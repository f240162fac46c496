//! Starting `bulkhead serve` the ways people do: interrupted before it
//! serves.

mod support;

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use support::{Process, bulkhead};

/// Ctrl-C or SIGTERM while start-up waits for a database ends the process
/// at once, with the shell's code for that signal.
#[test]
fn a_signal_during_start_up_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("postgres://bulkhead@127.0.0.1:{}/bulkhead", closed_port());
    for (signal, code) in [(Signal::SIGTERM, 143), (Signal::SIGINT, 130)] {
        let mut command = bulkhead(dir.path());
        command
            .arg("serve")
            .env("LOG_FORMAT", "json")
            .env("PORT", "0")
            .env("DATABASE_URL", &url)
            .env("DATABASE_CONNECT_TIMEOUT_SECONDS", "60");
        let mut process = Process::spawn(command);
        process.wait_for("a retry", |line| {
            line.contains("database not reachable yet").then_some(())
        });
        std::thread::sleep(Duration::from_millis(700));
        let sent = Instant::now();
        process.signal(signal);
        let status = process.wait_exit(Duration::from_millis(1500));
        assert!(sent.elapsed() < Duration::from_millis(1500));
        assert_eq!(status.code(), Some(code), "{}", process.all_output());
        assert!(
            !process.all_output().contains("listening"),
            "{}",
            process.all_output()
        );
    }
}

fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
