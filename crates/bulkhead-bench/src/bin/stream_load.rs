//! Starts N streaming runs at once (`POST /agent` with `"stream": true`)
//! and reads each stream to its end. Prints one JSON object: how many
//! completed, the errors by kind, the wall time and latency percentiles.
//!
//!   stream-load http://127.0.0.1:8000 10000 [timeout_seconds]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;

#[derive(Debug)]
enum Outcome {
    Completed(Duration),
    Failed(String),
}

async fn one_run(client: reqwest::Client, url: String, index: usize) -> Outcome {
    let started = Instant::now();
    let response = match client
        .post(&url)
        .json(&json!({"message": format!("run {index}"), "stream": true}))
        .send()
        .await
    {
        Ok(response) => response,
        Err(e) if e.is_timeout() => return Outcome::Failed("timeout".into()),
        Err(e) if e.is_connect() => return Outcome::Failed("connect".into()),
        Err(_) => return Outcome::Failed("request".into()),
    };
    if !response.status().is_success() {
        return Outcome::Failed(format!("status {}", response.status().as_u16()));
    }
    let mut body = response.bytes_stream();
    let mut tail: Vec<u8> = Vec::new();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(bytes) => {
                tail.extend_from_slice(&bytes);
                // Only the end matters: keep the last few hundred bytes.
                if tail.len() > 4096 {
                    tail.drain(..tail.len() - 1024);
                }
            }
            Err(_) => return Outcome::Failed("stream broke".into()),
        }
    }
    let tail = String::from_utf8_lossy(&tail);
    if tail.contains("event: run_completed") {
        Outcome::Completed(started.elapsed())
    } else if tail.contains("event: run_failed") {
        Outcome::Failed("run_failed".into())
    } else {
        Outcome::Failed("stream ended early".into())
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let base = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "http://127.0.0.1:8000".into());
    let runs: usize = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(10_000);
    let timeout = Duration::from_secs(args.get(3).and_then(|n| n.parse().ok()).unwrap_or(120));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let report = runtime.block_on(async move {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .pool_max_idle_per_host(0)
            .no_proxy()
            .build()
            .expect("an HTTP client");
        let url = format!("{}/agent", base.trim_end_matches('/'));
        let started = Instant::now();
        let tasks: Vec<_> = (0..runs)
            .map(|index| tokio::spawn(one_run(client.clone(), url.clone(), index)))
            .collect();
        let mut latencies = Vec::with_capacity(runs);
        let mut errors: BTreeMap<String, usize> = BTreeMap::new();
        for task in tasks {
            match task.await {
                Ok(Outcome::Completed(latency)) => latencies.push(latency),
                Ok(Outcome::Failed(kind)) => *errors.entry(kind).or_default() += 1,
                Err(_) => *errors.entry("panic".into()).or_default() += 1,
            }
        }
        let wall = started.elapsed();
        latencies.sort();
        json!({
            "runs": runs,
            "completed": latencies.len(),
            "errors": errors.values().sum::<usize>(),
            "error_kinds": errors,
            "wall_ms": wall.as_millis() as u64,
            "p50_ms": percentile(&latencies, 0.50),
            "p99_ms": percentile(&latencies, 0.99),
            "max_ms": latencies.last().map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0),
        })
    });
    println!("{report}");
}
