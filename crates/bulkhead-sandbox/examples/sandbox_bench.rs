//! Sandbox latency per backend: p50/p99 of `true` in a warm sandbox, of a
//! 1 MB output, and of a fresh sandbox's first command. Prints a table and
//! writes JSON. The docker backend is measured when an engine and the
//! sandbox image are there.
//!
//! cargo run --release -p bulkhead-sandbox --example sandbox_bench -- <helper> <out.json> [iterations]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bulkhead_sandbox::docker::{DockerBackend, DockerConfig};
use bulkhead_sandbox::namespace::{NamespaceBackend, NamespaceConfig};
use bulkhead_sandbox::{Backend, Limits, Operation};

type Row = (&'static str, String, f64, f64);

fn percentile(samples: &mut [Duration], p: f64) -> f64 {
    samples.sort();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index].as_secs_f64() * 1000.0
}

fn exec(argv: &[&str]) -> Operation {
    Operation::Exec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        timeout: None,
    }
}

async fn measure(backend: &dyn Backend, iterations: usize, rows: &mut Vec<Row>) {
    let limits = Limits::default();
    let sandbox = backend.create("bench", &limits).await.unwrap();
    for (name, operation) in [
        ("true (warm)", exec(&["true"])),
        ("1 MB output", exec(&["head", "-c", "1048576", "/dev/zero"])),
    ] {
        let mut samples = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let started = Instant::now();
            let result = sandbox.run(&operation).await.unwrap();
            samples.push(started.elapsed());
            assert_eq!(result.exit_code, Some(0), "{result:?}");
        }
        rows.push((
            backend.name(),
            name.to_string(),
            percentile(&mut samples, 0.5),
            percentile(&mut samples, 0.99),
        ));
    }
    let _ = sandbox.destroy().await;
    let mut samples = Vec::new();
    for i in 0..iterations.min(50) {
        let started = Instant::now();
        let fresh = backend
            .create(&format!("fresh-{i}"), &limits)
            .await
            .unwrap();
        fresh.run(&exec(&["true"])).await.unwrap();
        samples.push(started.elapsed());
        let _ = fresh.destroy().await;
    }
    rows.push((
        backend.name(),
        "fresh sandbox, first command (cold)".into(),
        percentile(&mut samples, 0.5),
        percentile(&mut samples, 0.99),
    ));
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let helper = PathBuf::from(args.next().expect("helper path"));
    let out = PathBuf::from(args.next().expect("output JSON path"));
    let iterations: usize = args.next().map_or(200, |n| n.parse().expect("iterations"));
    let dir = tempfile::tempdir().unwrap();
    let namespace = NamespaceBackend::new(NamespaceConfig {
        helper,
        helper_args: vec!["__sandbox-helper".into()],
        root: dir.path().to_path_buf(),
        host_uid: 100_000,
        cgroup: bulkhead_sandbox::namespace::DEFAULT_CGROUP.into(),
        host_gid: 100_000,
        egress: None,
    });
    namespace
        .probe()
        .await
        .expect("the namespace sandbox is available");
    let mut rows = Vec::new();
    measure(&namespace, iterations, &mut rows).await;

    let docker = DockerBackend::new(DockerConfig {
        image: std::env::var("SANDBOX_IMAGE").unwrap_or_else(|_| "bulkhead-sandbox:0.1".into()),
        runtime: None,
        socket: None,
        scope: "bench".into(),
        egress: None,
        egress_volume: None,
    });
    match docker.probe().await {
        Ok(_) => measure(&docker, iterations, &mut rows).await,
        Err(e) => eprintln!("docker backend not measured: {e}"),
    }

    println!("| backend | operation | p50 ms | p99 ms |");
    println!("|---|---|---:|---:|");
    for (backend, name, p50, p99) in &rows {
        println!("| {backend} | {name} | {p50:.2} | {p99:.2} |");
    }
    let json = serde_json::json!({
        "iterations": iterations,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "results": rows
            .iter()
            .map(|(backend, name, p50, p99)| serde_json::json!({
                "backend": backend, "operation": name, "p50_ms": p50, "p99_ms": p99
            }))
            .collect::<Vec<_>>(),
    });
    std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap()).unwrap();
}
