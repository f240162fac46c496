//! The README's Deploy section, run as a newcomer runs it: its commands,
//! read from the README itself, in a fresh copy of the repository (the
//! tracked files only: no secrets, no `.env`), with image tags no test has
//! built, on docker-compose 1.29 and the real engine.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bulkhead_deploy::{docker, free_port, repository, unique_suffix};

/// The commands of the first ```sh block after `heading`, without comments.
fn readme_commands(heading: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(repository().join("README.md")).unwrap();
    let section = &readme[readme
        .find(heading)
        .unwrap_or_else(|| panic!("README has {heading:?}"))..];
    let block = &section[section.find("```sh\n").unwrap() + 6..];
    let block = &block[..block.find("```").unwrap()];
    block
        .lines()
        .map(|line| line.split(" #").next().unwrap().trim().to_string())
        .filter(|line| !line.is_empty())
        .collect()
}

/// The inline command of the README that runs `needle`.
fn readme_inline_command(needle: &str) -> String {
    let readme = std::fs::read_to_string(repository().join("README.md")).unwrap();
    readme
        .split('`')
        .find(|code| code.starts_with("docker-compose") && code.contains(needle))
        .unwrap_or_else(|| panic!("README shows a command with {needle:?}"))
        .to_string()
}

/// The repository's tracked files, as a clone has them.
fn fresh_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "git ls-files -z | tar --null -T - -cf - | tar -xf - -C '{}'",
            dir.path().display()
        ))
        .current_dir(repository())
        .status()
        .unwrap();
    assert!(status.success(), "copying the tracked files");
    dir
}

/// A shell in the copy with the variables a user might set, and nothing of
/// the test environment's.
struct Newcomer {
    dir: PathBuf,
    env: Vec<(String, String)>,
}

impl Newcomer {
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .current_dir(&self.dir)
            .env_remove("OPENAI_API_KEY")
            .env_remove("COMPOSE_FILE")
            .env_remove("BULKHEAD_SECRETS_DIR")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    /// Runs a README line with `sh -c`, as typed; returns its output.
    fn run(&self, line: &str) -> String {
        let output = self.command("sh").arg("-c").arg(line).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "`{line}` failed:\n{text}");
        text
    }

    fn compose(&self, files: &[&str], args: &[&str]) -> String {
        let mut command = self.command("docker-compose");
        for file in files {
            command.args(["-f", file]);
        }
        let output = command.args(args).output().unwrap();
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    fn wait_healthy(&self, files: &[&str], services: &[&str], within: Duration) {
        let started = Instant::now();
        loop {
            let states: Vec<String> = services
                .iter()
                .map(|service| {
                    let id = self.compose(files, &["ps", "-q", service]);
                    if id.is_empty() {
                        "absent".into()
                    } else {
                        docker(&["inspect", "-f", "{{.State.Health.Status}}", &id])
                    }
                })
                .collect();
            if states.iter().all(|s| s == "healthy") {
                return;
            }
            assert!(
                started.elapsed() < within,
                "not healthy within {within:?}: {services:?} {states:?}\n{}",
                self.compose(files, &["logs", "--tail", "20"])
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn down(&self, files: &[&str]) {
        self.compose(files, &["down", "-v", "--remove-orphans", "-t", "5"]);
    }
}

fn image_exists(tag: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", tag])
        .output()
        .unwrap()
        .status
        .success()
}

fn file(dir: &Path, name: &str) -> (String, std::fs::Metadata) {
    let path = dir.join(name);
    (
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        std::fs::metadata(&path).unwrap(),
    )
}

async fn get(url: &str) -> (u16, serde_json::Value) {
    match reqwest::get(url).await {
        Ok(response) => (
            response.status().as_u16(),
            response.json().await.unwrap_or_default(),
        ),
        Err(_) => (0, serde_json::Value::Null),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_deploy_commands_bring_the_stacks_up_from_a_fresh_clone() {
    let copy = fresh_copy();
    let unique = unique_suffix();
    let bulkhead_image = format!("bulkhead-readme-{unique}:test");
    let sandbox_image = format!("bulkhead-sandbox-readme-{unique}:test");
    assert!(!image_exists(&bulkhead_image) && !image_exists(&sandbox_image));
    let port = free_port();
    let newcomer = Newcomer {
        dir: copy.path().to_path_buf(),
        env: vec![
            ("COMPOSE_PROJECT_NAME".into(), format!("bhreadme{unique}")),
            ("BULKHEAD_IMAGE".into(), bulkhead_image.clone()),
            ("SANDBOX_IMAGE".into(), sandbox_image.clone()),
            ("BULKHEAD_PORT".into(), port.to_string()),
            (
                "BULKHEAD_EGRESS_VOLUME".into(),
                format!("bhreadme{unique}-egress"),
            ),
        ],
    };
    struct Cleanup<'a>(&'a Newcomer, Vec<String>);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            self.0
                .down(&["compose.yaml", "deploy/compose/mock-model.yaml"]);
            self.0.down(&["deploy/compose/multi-agent.yaml"]);
            for tag in &self.1 {
                let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
            }
        }
    }
    let _cleanup = Cleanup(
        &newcomer,
        vec![bulkhead_image.clone(), sandbox_image.clone()],
    );

    let commands = readme_commands("### Compose: Bulkhead, PostgreSQL and sandboxd");
    assert_eq!(commands.len(), 5, "{commands:?}");
    let (setup, up, ready) = (&commands[0], &commands[1], &commands[2]);
    let (make_key, ask) = (&commands[3], &commands[4]);
    assert!(
        make_key.starts_with("KEY=$(docker-compose exec -T bulkhead"),
        "{make_key}"
    );
    assert_eq!(setup, "deploy/compose/setup");
    assert!(ready.starts_with("curl -s localhost:8000/ready"), "{ready}");

    // The set-up step makes what is missing, and a second run keeps it all.
    let said = newcomer.run(setup);
    for made in [
        "secrets/database_password",
        "secrets/sandboxd_token",
        "secrets/openai_api_key",
        ".env",
    ] {
        assert!(
            said.contains(&format!("made ./{made}")) || said.contains(&format!("made {made}")),
            "{said}"
        );
    }
    let before: Vec<_> = [
        "secrets/database_password",
        "secrets/sandboxd_token",
        ".env",
    ]
    .iter()
    .map(|name| file(copy.path(), name))
    .collect();
    assert_eq!(before[0].0.len(), 48, "24 random bytes as hex");
    std::fs::write(
        copy.path().join(".env"),
        format!("{}\n# mine\n", before[2].0),
    )
    .unwrap();
    let said = newcomer.run(setup);
    assert!(!said.contains("made"), "nothing made twice: {said}");
    assert_eq!(
        file(copy.path(), "secrets/database_password").0,
        before[0].0
    );
    assert_eq!(file(copy.path(), "secrets/sandboxd_token").0, before[1].0);
    assert!(
        file(copy.path(), ".env").0.ends_with("# mine\n"),
        "the user's .env is kept"
    );

    // `up --build` with no image of ours present: it builds, pulls nothing
    // of ours, and the stack comes up healthy.
    newcomer.run(up);
    assert!(image_exists(&bulkhead_image) && image_exists(&sandbox_image));
    let main = ["compose.yaml"];
    newcomer.wait_healthy(
        &main,
        &["bulkhead", "sandboxd", "postgres"],
        Duration::from_secs(120),
    );
    // The README's model is OpenAI's, which this machine cannot reach: the
    // rest of the stack is ready.
    let base = format!("http://127.0.0.1:{port}");
    let (_, body) = get(&format!("{base}/ready")).await;
    assert_eq!(body["checks"]["database"]["status"], "ok", "{body}");
    assert_eq!(body["checks"]["sandbox"]["status"], "ok", "{body}");

    // No key at hand: the mock-model line, as the README shows it.
    let mock = readme_inline_command("mock-model.yaml up");
    newcomer.run(&mock);
    let both = ["compose.yaml", "deploy/compose/mock-model.yaml"];
    newcomer.wait_healthy(&both, &["bulkhead", "model"], Duration::from_secs(120));
    let started = Instant::now();
    loop {
        let (status, body) = get(&format!("{base}/ready")).await;
        if status == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The README's two lines: a key made in the container, then /agent
    // with it (one shell, as a user types them).
    // The stack is published on the test's own port, not 8000.
    let ask = ask.replace("localhost:8000", &format!("127.0.0.1:{port}"));
    // curl's answer has no newline of its own: the key goes on a line after it.
    let said = newcomer.run(&format!(
        "set -e\n{make_key}\n{ask}\necho\necho \"key:$KEY\""
    ));
    assert!(said.contains("echo: hello"), "{said}");
    let key = said
        .lines()
        .find_map(|line| line.strip_prefix("key:"))
        .unwrap()
        .to_string();
    assert!(key.starts_with("bk_"), "{said}");
    let anonymous = reqwest::Client::new()
        .post(format!("{base}/agent"))
        .json(&serde_json::json!({"message": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401, "the stack requires keys");
    let answer: serde_json::Value = reqwest::Client::new()
        .post(format!("{base}/agent"))
        .bearer_auth(&key)
        .json(&serde_json::json!({"message": "tool:shell {\"command\": \"id -u\"}"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        answer["response"]
            .as_str()
            .unwrap_or_default()
            .contains("1000"),
        "a tool call ran in a sandbox of the image the stack built: {answer}"
    );
    // What an operator opens next: the metrics (open in the stack) show the
    // run and the refused request, and the API's page is served offline.
    let metrics = reqwest::get(format!("{base}/metrics")).await.unwrap();
    assert_eq!(metrics.status(), 200);
    let metrics = metrics.text().await.unwrap();
    for line in [
        "bulkhead_runs_total{status=\"completed\"}",
        "bulkhead_auth_failures_total{reason=\"missing\"}",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    let docs = reqwest::get(format!("{base}/docs")).await.unwrap();
    assert_eq!(docs.status(), 200);
    assert!(docs.text().await.unwrap().contains("openapi.json"));
    newcomer.down(&both);

    // The multi-agent stack, from its own README block.
    let commands = readme_commands("### Several agents: planner, executor, critic");
    assert_eq!(commands[0], "deploy/compose/setup");
    let said = newcomer.run(&commands[0]);
    assert!(!said.contains("made"), "{said}");
    let team = Newcomer {
        dir: newcomer.dir.clone(),
        env: newcomer
            .env
            .iter()
            .map(|(k, v)| match k.as_str() {
                "COMPOSE_PROJECT_NAME" => (k.clone(), format!("bhteam{unique}")),
                "BULKHEAD_EGRESS_VOLUME" => (k.clone(), format!("bhteam{unique}-egress")),
                _ => (k.clone(), v.clone()),
            })
            .collect(),
    };
    struct TeamDown<'a>(&'a Newcomer);
    impl Drop for TeamDown<'_> {
        fn drop(&mut self) {
            self.0.down(&["deploy/compose/multi-agent.yaml"]);
        }
    }
    let _team_down = TeamDown(&team);
    team.run(&commands[1]);
    team.wait_healthy(
        &["deploy/compose/multi-agent.yaml"],
        &["planner", "executor", "critic", "model", "sandboxd"],
        Duration::from_secs(120),
    );
}
