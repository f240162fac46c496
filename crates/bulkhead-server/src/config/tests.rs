use std::path::Path;

use super::*;

fn load(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let mut pairs: Vec<(&str, &str)> = pairs.to_vec();
    let secrets = dir.path().to_str().unwrap().to_string();
    pairs.push(("SECRETS_DIR", &secrets));
    Config::from_env(&Environment::from_pairs(pairs))
}

#[test]
fn defaults_match_the_tutorials() {
    let config = load(&[]).unwrap();
    assert_eq!(config.mode, AgentMode::Development);
    assert_eq!(config.port, 8000);
    // Development has no authentication by default, so it listens on
    // loopback until HOST says otherwise.
    assert_eq!(config.auth_mode, AuthMode::None);
    assert_eq!(config.host.to_string(), "127.0.0.1");
    assert!(config.loopback_by_default);
    assert_eq!(config.model.name, "gpt-4o-mini");
    assert_eq!(config.model.temperature, 0.7);
    assert_eq!(config.model.max_tokens, 4096);
    assert_eq!(config.max_steps, 8);
    assert_eq!(config.shutdown_grace, Duration::from_secs(8));
    assert_eq!(config.max_body_bytes, 1 << 20);
    assert!(config.enable_streaming);
    assert!(config.uses_mock_model());
    assert_eq!(
        config.database_url.expose_secret(),
        "sqlite://data/bulkhead.db"
    );
    assert_eq!(config.sandbox.backend, SandboxBackendKind::Namespace);
    assert_eq!(config.sandbox.limits, bulkhead_sandbox::Limits::default());
}

#[test]
fn production_requires_keys_unless_told_otherwise() {
    let production = [
        ("AGENT_MODE", "production"),
        ("MODEL_ENDPOINT", "https://api.openai.com/v1"),
    ];
    let config = load(&production).unwrap();
    assert_eq!(config.auth_mode, AuthMode::Keys);
    assert_eq!(config.host.to_string(), "0.0.0.0");
    assert!(!config.loopback_by_default);

    let mut explicit = production.to_vec();
    explicit.push(("AUTH_MODE", "none"));
    let config = load(&explicit).unwrap();
    assert_eq!(config.auth_mode, AuthMode::None);
    assert_eq!(
        config.host.to_string(),
        "127.0.0.1",
        "no HOST: loopback only"
    );

    explicit.push(("HOST", "0.0.0.0"));
    let config = load(&explicit).unwrap();
    assert_eq!(
        config.host.to_string(),
        "0.0.0.0",
        "an explicit HOST is obeyed"
    );
    assert!(!config.loopback_by_default);

    let config = load(&[("AUTH_MODE", "KEYS")]).unwrap();
    assert_eq!(config.auth_mode, AuthMode::Keys);
    assert_eq!(config.host.to_string(), "0.0.0.0");

    let error = load(&[("AUTH_MODE", "basic")]).unwrap_err();
    assert_eq!(error.variable, "AUTH_MODE");
    assert!(error.message.contains("keys or none"), "{error}");
}

#[test]
fn the_admin_token_is_a_long_real_secret() {
    let error = load(&[("ADMIN_TOKEN", "short")]).unwrap_err();
    assert_eq!(error.variable, "ADMIN_TOKEN");
    assert!(error.message.contains("24"), "{error}");
    assert!(
        !error.to_string().contains("short"),
        "the token is not echoed: {error}"
    );
    let error = load(&[("ADMIN_TOKEN", "REPLACE-ME-REPLACE-ME-REPLACE-ME")]).unwrap_err();
    assert_eq!(error.variable, "ADMIN_TOKEN");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("admin_token"), "a".repeat(40) + "\n").unwrap();
    let secrets = dir.path().to_str().unwrap().to_string();
    let config = Config::from_env(&Environment::from_pairs([(
        "SECRETS_DIR",
        secrets.as_str(),
    )]))
    .unwrap();
    assert_eq!(
        config.admin_token.as_ref().map(|t| t.expose_secret().len()),
        Some(40),
        "read from the secrets folder, trimmed"
    );
}

#[test]
fn sandbox_sizes_take_units() {
    let config = load(&[
        ("SANDBOX_MEMORY", "512m"),
        ("SANDBOX_DISK", "1g"),
        ("SANDBOX_OUTPUT_LIMIT", "16k"),
    ])
    .unwrap();
    assert_eq!(config.sandbox.limits.memory_bytes, 512 << 20);
    assert_eq!(config.sandbox.limits.disk_bytes, 1 << 30);
    assert_eq!(config.sandbox.limits.output_bytes, 16 << 10);
}

#[test]
fn production_needs_a_model_endpoint() {
    let error = load(&[("AGENT_MODE", "production")]).unwrap_err();
    assert_eq!(error.variable, "MODEL_ENDPOINT");
    let config = load(&[
        ("AGENT_MODE", "production"),
        ("MODEL_ENDPOINT", "https://api.openai.com/v1"),
    ])
    .unwrap();
    assert_eq!(config.log_format, LogFormat::Json);
}

#[test]
fn invalid_values_name_their_variable() {
    for (name, value) in [
        ("TEMPERATURE", "hot"),
        ("TEMPERATURE", "3"),
        ("MAX_TOKENS", "0"),
        ("PORT", "70000"),
        ("HOST", "not an ip"),
        ("AGENT_MODE", "staging"),
        ("ENABLE_STREAMING", "maybe"),
        ("MAX_STEPS", "0"),
        ("DATABASE_URL", "mysql://x"),
        ("MODEL_ENDPOINT", "api.openai.com"),
        ("LOG_LEVEL", "loud"),
        ("SHUTDOWN_GRACE_SECONDS", "-1"),
        ("SANDBOX_BACKEND", "chroot"),
        ("SANDBOX_MEMORY", "lots"),
        ("SANDBOX_MEMORY", "1k"),
        ("SANDBOX_EGRESS_ALLOW", "http://example.com/"),
        ("SANDBOX_PIDS", "0"),
    ] {
        let error = load(&[(name, value)]).unwrap_err();
        assert_eq!(error.variable, name, "{name}={value}: {error}");
    }
}

#[test]
fn secrets_come_from_env_file_or_secrets_dir_and_are_never_described() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "sk-from-file\n").unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    std::fs::write(secrets.join("openai_api_key"), "sk-from-secrets-dir").unwrap();
    let secrets_dir = secrets.to_str().unwrap();
    let key_path = key_file.to_str().unwrap();

    let from_file = Config::from_env(&Environment::from_pairs([
        ("OPENAI_API_KEY_FILE", key_path),
        ("SECRETS_DIR", secrets_dir),
    ]))
    .unwrap();
    assert_eq!(
        from_file.model.api_key.as_ref().unwrap().expose_secret(),
        "sk-from-file"
    );

    let from_dir =
        Config::from_env(&Environment::from_pairs([("SECRETS_DIR", secrets_dir)])).unwrap();
    assert_eq!(
        from_dir.model.api_key.as_ref().unwrap().expose_secret(),
        "sk-from-secrets-dir"
    );

    let both = Config::from_env(&Environment::from_pairs([
        ("OPENAI_API_KEY", "sk-env"),
        ("OPENAI_API_KEY_FILE", key_path),
        ("SECRETS_DIR", secrets_dir),
    ]))
    .unwrap_err();
    assert_eq!(both.variable, "OPENAI_API_KEY");
    assert!(!both.to_string().contains("sk-env"));

    let described = format!("{:?}", from_file.describe());
    assert!(!described.contains("sk-from-file"), "{described}");
    assert!(described.contains("[redacted]"));
    let debug = format!("{from_file:?}");
    assert!(
        !debug.contains("sk-from-file"),
        "Debug leaks the key: {debug}"
    );
}

#[test]
fn url_passwords_are_redacted() {
    assert_eq!(
        redact_url_password("postgres://bulkhead:s3cret@db:5432/bulkhead"),
        "postgres://bulkhead:[redacted]@db:5432/bulkhead"
    );
    assert_eq!(
        redact_url_password("sqlite://data/bulkhead.db"),
        "sqlite://data/bulkhead.db"
    );
    assert_eq!(
        redact_url_password("redis://:pw@redis:6379/0"),
        "redis://:[redacted]@redis:6379/0"
    );
}

#[test]
fn the_database_password_can_be_a_secret_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("database_password"), "p@ss/word\n").unwrap();
    let secrets_dir = dir.path().to_str().unwrap();
    let config = Config::from_env(&Environment::from_pairs([
        ("DATABASE_URL", "postgres://bulkhead@db:5432/bulkhead"),
        ("SECRETS_DIR", secrets_dir),
    ]))
    .unwrap();
    assert_eq!(
        config.database_url.expose_secret(),
        "postgres://bulkhead:p%40ss%2Fword@db:5432/bulkhead"
    );
    let described = format!("{:?}", config.describe());
    assert!(!described.contains("p%40ss"), "{described}");

    for (url, expected) in [
        (
            "postgres://bulkhead:other@db/bulkhead",
            "keep it in one place",
        ),
        ("postgres://db/bulkhead", "names no user"),
        ("sqlite://data/bulkhead.db", "postgres://"),
    ] {
        let error = Config::from_env(&Environment::from_pairs([
            ("DATABASE_URL", url),
            ("SECRETS_DIR", secrets_dir),
        ]))
        .unwrap_err();
        assert_eq!(error.variable, "DATABASE_PASSWORD");
        assert!(error.message.contains(expected), "{error}");
        assert!(!error.to_string().contains("p@ss"), "{error}");
    }
}

#[test]
fn remote_sandboxes_and_sandboxd_need_a_url_and_a_strong_token() {
    let no_secrets = [("SECRETS_DIR", "/nonexistent")];
    let env = |pairs: &[(&'static str, &'static str)]| {
        Environment::from_pairs(no_secrets.iter().chain(pairs).copied())
    };
    let error = Config::from_env(&env(&[("SANDBOX_BACKEND", "remote")])).unwrap_err();
    assert_eq!(error.variable, "SANDBOX_REMOTE_URL");
    let error = Config::from_env(&env(&[
        ("SANDBOX_BACKEND", "remote"),
        ("SANDBOX_REMOTE_URL", "http://sandboxd:7070"),
    ]))
    .unwrap_err();
    assert_eq!(error.variable, "SANDBOXD_TOKEN");
    let error = Config::from_env(&env(&[
        ("SANDBOX_BACKEND", "remote"),
        ("SANDBOX_REMOTE_URL", "ftp://sandboxd"),
    ]))
    .unwrap_err();
    assert_eq!(error.variable, "SANDBOX_REMOTE_URL");
    let config = Config::from_env(&env(&[
        ("SANDBOX_BACKEND", "remote"),
        ("SANDBOX_REMOTE_URL", "http://sandboxd:7070"),
        ("SANDBOXD_TOKEN", "0123456789abcdef0123456789abcdef"),
    ]))
    .unwrap();
    let described = format!("{:?}", config.describe());
    assert!(!described.contains("0123456789abcdef"), "{described}");
    let error = Config::from_env(&env(&[("SANDBOX_SCOPE", "a/b")])).unwrap_err();
    assert_eq!(error.variable, "SANDBOX_SCOPE");
    let remote = [
        ("SANDBOX_BACKEND", "remote"),
        ("SANDBOX_REMOTE_URL", "http://sandboxd:7070"),
        ("SANDBOXD_TOKEN", "0123456789abcdef0123456789abcdef"),
        ("SANDBOX_EGRESS_ALLOW", "api.github.com"),
    ];
    let error = Config::from_env(&env(&remote)).unwrap_err();
    assert_eq!(error.variable, "SANDBOX_EGRESS_DIR", "{error}");
    let with_dir: Vec<_> = remote
        .iter()
        .copied()
        .chain([("SANDBOX_EGRESS_DIR", "/run/bulkhead-egress")])
        .collect();
    let config = Config::from_env(&env(&with_dir)).unwrap();
    assert_eq!(
        config.sandbox.egress_dir.as_deref(),
        Some(Path::new("/run/bulkhead-egress"))
    );
    // The older spelling names a socket in that folder.
    let with_socket: Vec<_> = remote
        .iter()
        .copied()
        .chain([("SANDBOX_EGRESS_SOCKET", "/run/bulkhead-egress/egress.sock")])
        .collect();
    let config = Config::from_env(&env(&with_socket)).unwrap();
    assert_eq!(
        config.sandbox.egress_dir.as_deref(),
        Some(Path::new("/run/bulkhead-egress"))
    );
    let error = Config::from_env(&env(&[("SANDBOX_EGRESS_SOCKET", "/tmp/proxy")])).unwrap_err();
    assert_eq!(error.variable, "SANDBOX_EGRESS_SOCKET");
    let error = Config::from_env(&env(&[("SANDBOX_EGRESS_DIR", "egress")])).unwrap_err();
    assert_eq!(error.variable, "SANDBOX_EGRESS_DIR");
    let error = Config::from_env(&env(&[("SANDBOX_EGRESS_VOLUME", "../x")])).unwrap_err();
    assert_eq!(error.variable, "SANDBOX_EGRESS_VOLUME");

    let error = SandboxdConfig::from_env(&env(&[])).unwrap_err();
    assert_eq!(error.variable, "SANDBOXD_TOKEN");
    let error = SandboxdConfig::from_env(&env(&[("SANDBOXD_TOKEN", "short")])).unwrap_err();
    assert!(error.message.contains("at least 24"), "{error}");
    assert!(!error.to_string().contains("short"), "{error}");
    let error = SandboxdConfig::from_env(&env(&[
        ("SANDBOXD_TOKEN", "0123456789abcdef0123456789abcdef"),
        ("SANDBOX_BACKEND", "remote"),
    ]))
    .unwrap_err();
    assert_eq!(error.variable, "SANDBOX_BACKEND");
    let sandboxd = SandboxdConfig::from_env(&env(&[
        ("SANDBOXD_TOKEN", "0123456789abcdef0123456789abcdef"),
        ("SANDBOX_BACKEND", "docker"),
        ("SANDBOXD_PORT", "7171"),
    ]))
    .unwrap();
    assert_eq!(sandboxd.port, 7171);
    assert_eq!(sandboxd.sandbox.backend, SandboxBackendKind::Docker);
}

/// The README's Configuration tables (`| variable | default | meaning |`)
/// as (name, default, meaning).
fn readme_settings() -> Vec<(String, String, String)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("the README");
    let mut rows = Vec::new();
    let mut in_table = false;
    for line in readme.lines() {
        if line.trim() == "| variable | default | meaning |" {
            in_table = true;
            continue;
        }
        if !line.starts_with('|') {
            in_table = false;
        }
        if !in_table || line.starts_with("|---") {
            continue;
        }
        let cells: Vec<&str> = line
            .trim()
            .trim_matches('|')
            .split(" | ")
            .map(str::trim)
            .collect();
        assert_eq!(
            cells.len(),
            3,
            "a README settings row of three cells: {line}"
        );
        let name = cells[0]
            .strip_prefix('`')
            .and_then(|n| n.strip_suffix('`'))
            .filter(|n| !n.contains('`'))
            .unwrap_or_else(|| panic!("one `NAME` per README row: {line}"));
        rows.push((name.to_string(), cells[1].to_string(), cells[2].to_string()));
    }
    rows
}

#[test]
fn the_readme_documents_exactly_the_settings_table() {
    let readme = readme_settings();
    assert!(
        readme.len() > 40,
        "the README's tables were not found: {readme:?}"
    );
    for (name, default, meaning) in &readme {
        let setting = settings::find(name).unwrap_or_else(|| {
            panic!("the README documents {name}, which the settings table lacks")
        });
        assert_eq!(&setting.default.markdown(), default, "{name}'s default");
        assert_eq!(setting.meaning, meaning, "{name}'s meaning");
    }
    for setting in settings::SETTINGS {
        assert!(
            readme.iter().any(|(name, ..)| name == setting.name),
            "{} is in the settings table but not in the README's Configuration tables",
            setting.name
        );
    }
}

#[test]
fn every_setting_is_read_and_described() {
    let config = load(&[]).unwrap();
    let described = config.describe();
    assert_eq!(described.len(), settings::SETTINGS.len());
    for setting in settings::SETTINGS.iter().filter(|s| s.scope.server()) {
        assert!(
            config.sources.contains_key(setting.name),
            "{} is in the table for serve but Config::from_env does not read it",
            setting.name
        );
    }
    let help = settings::help(false, 100);
    let sandboxd_help = settings::help(true, 100);
    for setting in settings::SETTINGS {
        assert_eq!(
            help.contains(&format!("\n  {}  ", setting.name)),
            setting.scope.server()
        );
        assert_eq!(
            sandboxd_help.contains(&format!("\n  {}  ", setting.name)),
            setting.scope.sandboxd()
        );
    }
}

#[test]
fn described_values_are_typed() {
    let config = load(&[("TEMPERATURE", "0.3"), ("ENABLE_TRACING", "yes")]).unwrap();
    let value = |name: &str| {
        config
            .describe()
            .into_iter()
            .find(|d| d.setting.name == name)
            .unwrap()
    };
    assert_eq!(value("PORT").value, serde_json::json!(8000));
    assert_eq!(value("TEMPERATURE").value, serde_json::json!(0.3));
    assert_eq!(value("TEMPERATURE").source, Source::Environment);
    assert_eq!(value("ENABLE_TRACING").value, serde_json::json!(true));
    assert_eq!(value("SANDBOX_MEMORY").value, serde_json::json!(256 << 20));
    assert_eq!(value("MODEL_ENDPOINT").value, serde_json::Value::Null);
    assert_eq!(value("OPENAI_API_KEY").value, serde_json::Value::Null);
    assert_eq!(value("SANDBOX_RUNTIME").text(), "(engine default)");
}

#[test]
fn dotenv_values_are_labelled_and_the_environment_wins() {
    let map = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let env = Environment::layered(
        map(&[("PORT", "9000"), ("SECRETS_DIR", "/nonexistent")]),
        map(&[("PORT", "7000"), ("MODEL_NAME", "llama3")]),
    );
    let config = Config::from_env(&env).unwrap();
    assert_eq!(config.port, 9000);
    assert_eq!(config.sources["PORT"], Source::Environment);
    assert_eq!(config.model.name, "llama3");
    assert_eq!(config.sources["MODEL_NAME"], Source::DotEnv);
    assert_eq!(config.sources["MODEL_NAME"].to_string(), ".env");
}

#[test]
fn a_chat_completions_url_is_cut_back_to_its_base_with_a_warning() {
    for (given, base) in [
        (
            "http://127.0.0.1:8080/v1/chat/completions",
            "http://127.0.0.1:8080/v1",
        ),
        (
            "https://api.example.com/v1/chat/completions/",
            "https://api.example.com/v1",
        ),
        (
            "http://localhost:11434/v1/models",
            "http://localhost:11434/v1",
        ),
        ("http://localhost:11434/v1/", "http://localhost:11434/v1"),
    ] {
        let config = load(&[("MODEL_ENDPOINT", given)]).unwrap();
        assert_eq!(config.model.endpoint.as_deref(), Some(base), "{given}");
        let warned = config
            .warnings
            .iter()
            .any(|w| w.variable == "MODEL_ENDPOINT");
        assert_eq!(
            warned,
            given.trim_end_matches('/') != base,
            "{given}: {:?}",
            config.warnings
        );
        if warned {
            assert!(
                config.warnings.iter().any(|w| w.message.contains(base)),
                "{:?}",
                config.warnings
            );
        }
    }
    let config = load(&[(
        "MODEL_ENDPOINT",
        "https://user:s3cretpass@llm.example.com/v1/chat/completions",
    )])
    .unwrap();
    assert!(!format!("{:?}", config.warnings).contains("s3cretpass"));
}

#[test]
fn near_misses_of_settings_are_warned_about_by_name_only() {
    let env = Environment::from_pairs([
        ("MODEL_NAM", "secret-looking-value"),
        ("SANDBOX_MEMROY", "1g"),
        ("model_name", "x"),
        ("HOME", "/root"),
        ("MODEL_ENDPOINT_URL_TOTALLY_DIFFERENT", "x"),
        ("OPENAI_API_KEY_FILE", "/nonexistent"),
        ("SANDBOX_EGRESS_SOCKET", "/x/egress.sock"),
    ]);
    let warnings = env.unknown_variables();
    let messages: Vec<&str> = warnings.iter().map(|w| w.message.as_str()).collect();
    assert_eq!(
        messages,
        [
            "MODEL_NAM is not a Bulkhead setting; did you mean MODEL_NAME?",
            "SANDBOX_MEMROY is not a Bulkhead setting; did you mean SANDBOX_MEMORY?",
            "model_name is not a Bulkhead setting; did you mean MODEL_NAME?",
        ]
    );
    assert!(!format!("{warnings:?}").contains("secret-looking-value"));
}

#[test]
fn a_keyed_provider_without_a_key_is_a_warning_not_an_error() {
    let config = load(&[("MODEL_ENDPOINT", "https://api.openai.com/v1")]).unwrap();
    assert!(
        config
            .warnings
            .iter()
            .any(|w| w.variable == "OPENAI_API_KEY" && w.message.contains("api.openai.com")),
        "{:?}",
        config.warnings
    );
    let config = load(&[
        ("MODEL_ENDPOINT", "https://api.openai.com/v1"),
        ("OPENAI_API_KEY", "sk-test"),
    ])
    .unwrap();
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    let config = load(&[("MODEL_ENDPOINT", "http://localhost:11434/v1")]).unwrap();
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
}

#[test]
fn production_refuses_placeholder_secrets_and_sandboxd_always_does() {
    let production = [
        ("AGENT_MODE", "production"),
        ("MODEL_ENDPOINT", "https://api.openai.com/v1"),
        ("DATABASE_URL", "postgres://bulkhead@db:5432/bulkhead"),
    ];
    for (name, value) in [
        ("OPENAI_API_KEY", "sk-REPLACE-ME"),
        ("DATABASE_PASSWORD", "changeme123"),
        ("SANDBOXD_TOKEN", "REPLACE-ME-WITH-AT-LEAST-24-CHARACTERS"),
        ("OPENAI_API_KEY", "<your-openai-key>"),
    ] {
        let pairs: Vec<_> = production.iter().copied().chain([(name, value)]).collect();
        let error = load(&pairs).unwrap_err();
        assert_eq!(error.variable, name, "{error}");
        assert!(error.message.contains("placeholder"), "{error}");
        assert!(
            !error.to_string().contains(value),
            "the value is never repeated: {error}"
        );
        // Development takes it: a laptop's .env may hold anything.
        let pairs: Vec<_> = pairs
            .into_iter()
            .filter(|(k, _)| *k != "AGENT_MODE")
            .collect();
        load(&pairs).unwrap();
    }
    // Real-looking secrets pass.
    let pairs: Vec<_> = production
        .iter()
        .copied()
        .chain([("OPENAI_API_KEY", "sk-proj-3f9c1e7a5b2d4c6e8f0a1b3c")])
        .collect();
    load(&pairs).unwrap();

    let error = SandboxdConfig::from_env(&Environment::from_map(
        [(
            "SANDBOXD_TOKEN".to_string(),
            "REPLACE-ME-WITH-AT-LEAST-24-CHARACTERS".to_string(),
        )]
        .into(),
    ))
    .unwrap_err();
    assert_eq!(error.variable, "SANDBOXD_TOKEN");
    assert!(error.message.contains("placeholder"), "{error}");
}

#[test]
fn observability_settings() {
    let config = load(&[]).unwrap();
    let o = &config.observability;
    assert!(o.enable_metrics && o.metrics_token.is_none() && !o.capture_content);
    assert_eq!(o.traces_endpoint(), None);
    assert_eq!(o.service_name, "bulkhead");

    // The base gets the signal's path; the signal's own URL is used as it is.
    let base = load(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")]).unwrap();
    assert_eq!(
        base.observability.traces_endpoint().as_deref(),
        Some("http://collector:4318/v1/traces")
    );
    let own = load(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
        (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://tempo:4318/otlp/traces",
        ),
    ])
    .unwrap();
    assert_eq!(
        own.observability.traces_endpoint().as_deref(),
        Some("http://tempo:4318/otlp/traces")
    );
    let error = load(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")]).unwrap_err();
    assert_eq!(error.variable, "OTEL_EXPORTER_OTLP_ENDPOINT");
    let error = load(&[(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "https://user:collector-password@collector/v1/traces",
    )])
    .unwrap_err();
    assert_eq!(error.variable, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    assert!(!error.to_string().contains("collector-password"), "{error}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("metrics_token"),
        "token-from-the-secrets-folder\n",
    )
    .unwrap();
    let secrets_dir = dir.path().to_str().unwrap();
    let config = Config::from_env(&Environment::from_pairs([
        ("SECRETS_DIR", secrets_dir),
        ("ENABLE_METRICS", "false"),
        ("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true"),
    ]))
    .unwrap();
    let o = &config.observability;
    assert_eq!(
        o.metrics_token.as_ref().unwrap().expose_secret(),
        "token-from-the-secrets-folder"
    );
    assert!(!o.enable_metrics && o.capture_content);
    let shown = config
        .describe()
        .into_iter()
        .find(|d| d.setting.name == "METRICS_TOKEN")
        .unwrap();
    assert_eq!(shown.value, serde_json::json!("[redacted]"));

    let error = load(&[
        ("AGENT_MODE", "production"),
        ("MODEL_ENDPOINT", "http://model:8080/v1"),
        ("METRICS_TOKEN", "REPLACE-ME"),
    ])
    .unwrap_err();
    assert_eq!(error.variable, "METRICS_TOKEN");
}

/// Loads an agents file; the error's one line, if it is refused.
fn agents_error(yaml: &str, extra: &[(&str, &str)]) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agents.yaml");
    std::fs::write(&path, yaml).unwrap();
    let path = path.display().to_string();
    let mut pairs = vec![("AGENTS_FILE", path.as_str()), ("SANDBOX_MEMORY", "256m")];
    pairs.extend_from_slice(extra);
    let error = load(&pairs).expect_err("the file is refused").to_string();
    (path, error)
}

#[test]
fn a_bad_agents_file_is_refused_in_one_line_naming_the_file_the_agent_and_the_field() {
    let cases: &[(&str, &str)] = &[
        (
            "agents:\n  - id: support\n    model:\n      temprature: 0.2\n",
            "agent \"support\": model.temprature: unknown field `temprature`, expected one of",
        ),
        (
            "agents:\n  - id: support\n    model:\n      temperature: 5\n",
            "agent \"support\": model.temperature: expected a number from 0 to 2",
        ),
        (
            "agents:\n  - id: support\n    tools: [shell, nope]\n",
            "agent \"support\": tools: no built-in tool is called \"nope\"",
        ),
        (
            "agents:\n  - id: support\n    sandbox:\n      memory_mb: 1024\n",
            "agent \"support\": sandbox.memory_mb: 1024 is not above 0 and within the server's SANDBOX_MEMORY (256 MB)",
        ),
        (
            "agents:\n  - id: support\n    approval:\n      tools:\n        shell: sometimes\n",
            "agent \"support\": approval.tools.shell: expected auto, ask or deny, got \"sometimes\"",
        ),
        (
            "agents:\n  - id: support\n    mcp_servers:\n      - name: time\n",
            "agent \"support\": mcp_servers[0].command: give `command`",
        ),
        (
            "agents:\n  - id: support\n    mcp_servers:\n      - name: Bad__Name\n        command: [x]\n",
            "agent \"support\": mcp_servers[0].name: \"Bad__Name\" is not a valid MCP server name",
        ),
        (
            "agents:\n  - id: support\n    model:\n      api_key_secret: MISSING_KEY\n",
            "agent \"support\": model.api_key_secret: no secret \"MISSING_KEY\" is set",
        ),
        (
            "agents:\n  - id: a\n  - id: a\n",
            "agent \"a\": id: another agent has this id",
        ),
        (
            "agents:\n  - name: nameless\n",
            "agent #1: missing field `id`",
        ),
        ("agents: []\n", "`agents` is empty"),
        ("agents: [", "not an agents file"),
    ];
    for (yaml, expected) in cases {
        let (path, error) = agents_error(yaml, &[]);
        assert!(
            error.starts_with(&format!("AGENTS_FILE: {path}: ")),
            "{yaml:?}: {error}"
        );
        assert!(error.contains(expected), "{yaml:?}: {error}");
        assert!(!error.contains('\n'), "one line: {error:?}");
    }
    let (_, error) = agents_error(
        "agents:\n  - id: x\n",
        &[("AGENTS_FILE", "/nonexistent/agents.yaml")],
    );
    assert!(error.contains("cannot read it"), "{error}");
}

#[test]
fn an_agent_inherits_what_it_does_not_set_and_never_another_providers_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agents.yaml");
    std::fs::write(
        &path,
        "agents:\n  - id: same\n  - id: other\n    model:\n      endpoint: https://api.example.com/v1\n  - id: keyed\n    model:\n      endpoint: https://api.example.com/v1\n      api_key_secret: EXAMPLE_KEY\n    sandbox:\n      memory_mb: 64\n      pids: 16\n    max_steps: 2\n",
    )
    .unwrap();
    let path = path.display().to_string();
    let config = load(&[
        ("AGENTS_FILE", &path),
        ("MODEL_ENDPOINT", "https://api.openai.com/v1"),
        ("OPENAI_API_KEY", "sk-server-key-1234"),
        ("EXAMPLE_KEY", "ex-key-5678"),
        ("SYSTEM_PROMPT", "Be brief."),
    ])
    .unwrap();
    let [same, other, keyed] = &config.agents[..] else {
        panic!("{:?}", config.agents);
    };
    assert_eq!(
        same.model.endpoint.as_deref(),
        Some("https://api.openai.com/v1")
    );
    assert_eq!(
        same.model.api_key.as_ref().unwrap().expose_secret(),
        "sk-server-key-1234"
    );
    assert_eq!(same.system_prompt.as_deref(), Some("Be brief."));
    assert_eq!(same.max_steps, 8);
    assert!(
        other.model.api_key.is_none(),
        "the server's key stays with its endpoint"
    );
    assert_eq!(
        keyed.model.api_key.as_ref().unwrap().expose_secret(),
        "ex-key-5678"
    );
    assert_eq!(keyed.limits.memory_bytes, 64 << 20);
    assert_eq!(keyed.limits.pids, 16);
    assert_eq!(keyed.limits.cpus, config.sandbox.limits.cpus);
    assert_eq!(keyed.max_steps, 2);
}
