//! Nothing to ship: this crate holds the tests of what we deliver outside
//! the binary (the image, the Compose stacks, the Kubernetes manifests),
//! run against the real Docker Engine `scripts/test` starts, and the few
//! helpers those tests share.

use std::path::PathBuf;
use std::process::Command;

/// The image the tests run, built from the root Dockerfile.
pub const IMAGE: &str = "bulkhead:test";

/// Runs the docker CLI and returns its stdout; panics with stderr if it
/// fails.
pub fn docker(args: &[&str]) -> String {
    let output = Command::new("docker")
        .args(args)
        .output()
        .expect("the docker CLI runs");
    assert!(
        output.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// The repository's root folder.
pub fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds the image from the Dockerfile as a user would (cached layers make
/// a repeated build quick).
pub fn build_image() {
    let status = Command::new("docker")
        .args(["build", "-q", "-t", IMAGE, "."])
        .current_dir(repository())
        .stdout(std::process::Stdio::null())
        .status()
        .expect("docker build runs");
    assert!(status.success(), "the Dockerfile builds");
}

/// Secret files as a user puts them beside the kustomizations (values that
/// look like real ones).
pub const KUBERNETES_SECRET_FILES: &[(&str, &str)] = &[
    ("openai_api_key", "sk-proj-3f9c1e7a5b2d4c6e8f0a1b3c5d7e9f1a"),
    ("database_password", "9d2b7c4e1f6a8b3c5d0e2f4a6b8c1d3e"),
    ("sandboxd_token", "c1f5a9e3b7d2c6f0a4e8b2d6f1a5c9e3"),
];

/// A copy of `deploy/kubernetes/` in a temporary folder, with the secret
/// files in place when `with_secrets`; returns the folder holding the
/// copy's `kubernetes/`.
pub fn kubernetes_copy(with_secrets: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let status = Command::new("cp")
        .arg("-r")
        .arg(repository().join("deploy/kubernetes"))
        .arg(dir.path())
        .status()
        .expect("cp runs");
    assert!(status.success(), "copying deploy/kubernetes");
    if with_secrets {
        for folder in ["secrets", "sandboxd/secrets"] {
            let folder = dir.path().join("kubernetes").join(folder);
            std::fs::create_dir_all(&folder).unwrap();
            for (name, value) in KUBERNETES_SECRET_FILES {
                std::fs::write(folder.join(name), value).unwrap();
            }
        }
    }
    dir
}

/// `kustomize build` of `sub` (`""` or `"sandboxd"`) in a copy with the
/// secret files: the rendered YAML.
pub fn kustomize_build(sub: &str) -> String {
    let copy = kubernetes_copy(true);
    let output = Command::new("kustomize")
        .arg("build")
        .arg(copy.path().join("kubernetes").join(sub))
        .output()
        .expect("kustomize runs (scripts/test puts scripts/ensure-tools' bin folder on PATH)");
    assert!(
        output.status.success(),
        "kustomize build {sub}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).to_string()
}

/// The sandbox image `scripts/ensure-images` built.
pub fn sandbox_image() -> String {
    std::env::var("SANDBOX_IMAGE").unwrap_or_else(|_| "bulkhead-sandbox:0.1".into())
}

/// A name no other test run uses at the same time.
pub fn unique_suffix() -> String {
    format!(
        "{}{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )
}

/// A TCP port free on loopback right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A Compose project made for one test from the repository's files, with
/// its secrets in a folder of its own; `down -v` when dropped.
pub struct Compose {
    pub project: String,
    files: Vec<String>,
    env: Vec<(String, String)>,
    pub secrets: tempfile::TempDir,
}

impl Compose {
    /// `files` are relative to the repository; `env` adds to the variables
    /// the files read (`BULKHEAD_IMAGE`, `BULKHEAD_SECRETS_DIR`,
    /// `SANDBOX_IMAGE` and a `BULKHEAD_EGRESS_VOLUME` of the project's own
    /// are set here).
    pub fn new(files: &[&str], env: &[(&str, &str)]) -> Compose {
        let secrets = tempfile::tempdir().expect("a temporary folder");
        for (name, value) in [
            ("openai_api_key", "sk-compose-test-canary".to_string()),
            ("database_password", format!("pw-{}", unique_suffix())),
            (
                "sandboxd_token",
                format!("token-{}-{}", unique_suffix(), unique_suffix()),
            ),
        ] {
            let path = secrets.path().join(name);
            std::fs::write(&path, value).expect("writing a secret");
            // Read by the containers' own users, as the README says.
            let mut permissions = std::fs::metadata(&path).unwrap().permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o644);
            std::fs::set_permissions(&path, permissions).unwrap();
        }
        // The temporary folder itself is 0700; the containers' users must
        // traverse it.
        let mut permissions = std::fs::metadata(secrets.path()).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
        std::fs::set_permissions(secrets.path(), permissions).unwrap();

        let project = format!("bhtest{}", unique_suffix());
        let mut all_env: Vec<(String, String)> = vec![
            ("BULKHEAD_EGRESS_VOLUME".into(), format!("{project}-egress")),
            ("BULKHEAD_IMAGE".into(), IMAGE.into()),
            (
                "BULKHEAD_SECRETS_DIR".into(),
                secrets.path().display().to_string(),
            ),
            ("SANDBOX_IMAGE".into(), sandbox_image()),
        ];
        all_env.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Compose {
            project,
            files: files.iter().map(|f| f.to_string()).collect(),
            env: all_env,
            secrets,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("docker-compose");
        command
            .current_dir(repository())
            .env_remove("COMPOSE_FILE")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(["--no-ansi", "-p", &self.project]);
        for file in &self.files {
            command.args(["-f", file]);
        }
        command.args(args);
        command
    }

    /// Runs `docker-compose <args>`; panics with its output if it fails.
    pub fn run(&self, args: &[&str]) -> String {
        let output = self
            .command(args)
            .output()
            .expect("docker-compose runs (scripts/ensure-docker installs it)");
        assert!(
            output.status.success(),
            "docker-compose {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// The container of a service.
    pub fn container(&self, service: &str) -> String {
        let id = self.run(&["ps", "-q", service]);
        assert!(!id.is_empty(), "{service} has a container");
        id
    }

    /// Waits until every listed service's container reports `healthy`.
    pub fn wait_healthy(&self, services: &[&str], within: std::time::Duration) {
        let started = std::time::Instant::now();
        loop {
            let states: Vec<(String, String)> = services
                .iter()
                .map(|s| {
                    let id = self.run(&["ps", "-q", s]);
                    let health = if id.is_empty() {
                        "absent".to_string()
                    } else {
                        docker(&["inspect", "-f", "{{.State.Health.Status}}", &id])
                    };
                    (s.to_string(), health)
                })
                .collect();
            if states.iter().all(|(_, h)| h == "healthy") {
                return;
            }
            if started.elapsed() > within {
                let logs = self.command(&["logs", "--tail", "30"]).output().unwrap();
                panic!(
                    "not all healthy within {within:?}: {states:?}\n{}",
                    String::from_utf8_lossy(&logs.stdout)
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        let _ = self
            .command(&["down", "-v", "--remove-orphans", "-t", "5"])
            .output();
    }
}

/// A client that sends `key` as `Authorization: Bearer` on every request:
/// what a caller of a server in production mode (keys required) holds.
pub fn client_with_key(key: &str) -> reqwest::Client {
    assert!(key.starts_with("bk_"), "not an API key: {key:?}");
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {key}")
            .parse()
            .expect("a key is a header value"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("an HTTP client")
}
