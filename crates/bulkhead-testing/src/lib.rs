//! Test support: a fresh, real database per test (an SQLite file in a
//! temporary folder, or a new PostgreSQL database on the server that
//! `scripts/test` starts), and the mock model served on a loopback port.

use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    Sqlite,
    Postgres,
}

/// A database that exists for one test.
#[derive(Debug)]
pub struct TestDb {
    pub kind: DbKind,
    pub url: String,
    /// Holds the SQLite file's folder; also a scratch folder for the test.
    pub dir: tempfile::TempDir,
    postgres: Option<(String, String)>,
}

/// The PostgreSQL server to create test databases on. `scripts/test` sets
/// it; without it PostgreSQL tests fail rather than pass unseen.
pub fn postgres_admin_url() -> String {
    std::env::var("TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "TEST_POSTGRES_URL is not set: run the suite with scripts/test, which installs and starts PostgreSQL"
        )
    })
}

impl TestDb {
    pub async fn new(kind: DbKind) -> TestDb {
        let dir = tempfile::tempdir().expect("creating a temporary folder");
        match kind {
            DbKind::Sqlite => TestDb {
                kind,
                url: format!("sqlite://{}/bulkhead.db", dir.path().display()),
                dir,
                postgres: None,
            },
            DbKind::Postgres => {
                let admin = postgres_admin_url();
                let name = format!("bulkhead_t_{}", uuid::Uuid::new_v4().simple());
                let mut connection = sqlx::PgConnection::connect(&admin)
                    .await
                    .expect("connecting to the test PostgreSQL server");
                sqlx::query(&format!("CREATE DATABASE \"{name}\""))
                    .execute(&mut connection)
                    .await
                    .expect("creating a test database");
                let _ = connection.close().await;
                let base = admin
                    .rsplit_once('/')
                    .map_or(admin.as_str(), |(base, _)| base);
                TestDb {
                    kind,
                    url: format!("{base}/{name}"),
                    dir,
                    postgres: Some((admin.clone(), name)),
                }
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((admin, name)) = self.postgres.take() else {
            return;
        };
        // Drop runs outside any runtime we may block on; use a thread.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut connection = sqlx::PgConnection::connect(&admin).await.ok()?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut connection)
                    .await
                    .ok()?;
                connection.close().await.ok()
            })
        })
        .join();
    }
}

/// Generates one `#[tokio::test]` per database for each named
/// `async fn name(db: DbKind)` in scope.
#[macro_export]
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::DbKind::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::DbKind::Postgres).await
                }
            )*
        }
    };
}

/// Generates one test per sandbox backend for each `async fn name(kind:
/// Kind)` of the calling module, whose `Kind` has `Namespace` and `Docker`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod namespace_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Kind::Namespace).await
                }
            )*
        }
        mod docker_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Kind::Docker).await
                }
            )*
        }
    };
}

/// Serves the mock model on a loopback port of the current runtime and
/// returns its base URL (`http://127.0.0.1:port/v1`).
pub async fn spawn_mock_model(latency: Duration) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding the mock model");
    let address = listener.local_addr().expect("mock model address");
    let mock = Arc::new(bulkhead_model::MockModel::new(latency));
    tokio::spawn(bulkhead_model::mock::serve(
        listener,
        mock,
        std::future::pending(),
    ));
    format!("http://{address}/v1")
}

/// The namespace sandbox's helper executable, built beside the test
/// binaries by `cargo nextest run --workspace` (as `scripts/test` does).
pub fn sandbox_helper() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let helper = profile.join("bulkhead-sandbox-helper");
    assert!(
        helper.exists(),
        "{} is missing: build the workspace (scripts/test does) before running this test",
        helper.display()
    );
    helper
}

/// A non-loopback IPv4 address of this machine, for a listener that the
/// egress proxy may reach once the allowlist names it (it refuses
/// loopback whatever the list says).
pub fn outside_address() -> std::net::Ipv4Addr {
    let output = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .expect("ip (iproute2) lists the addresses");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| {
            let cidr = line
                .split_whitespace()
                .skip_while(|w| *w != "inet")
                .nth(1)?;
            cidr.split('/').next()?.parse().ok()
        })
        .expect("this machine has a non-loopback IPv4 address")
}
