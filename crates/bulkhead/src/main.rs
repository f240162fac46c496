//! `bulkhead`: the one binary. Each subcommand is a thin edge over the
//! library crates; this is the only place that turns errors into exit codes.

mod chat;
mod keys;
mod logging;
mod sandbox;

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bulkhead_model::MockModel;
use bulkhead_server::{Config, Environment, Server};
use clap::{Parser, Subcommand};
use secrecy::ExposeSecret;

#[derive(Debug, Parser)]
#[command(
    name = "bulkhead",
    version,
    about = "A container-native AI agent server",
    long_about = "A container-native AI agent server. Configuration comes from the environment \
                  (and .env, and secret files); run `bulkhead config` to see it."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the agent API (POST /agent, /health, /ready, sessions, runs).
    ///
    /// Configured by the environment: `--help` lists every setting.
    Serve,
    /// Serve the mock model: an OpenAI-compatible API that echoes.
    MockModel {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// Port to listen on (0 picks a free one; the address is printed).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Delay before each answer, in milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
    },
    /// Serve sandboxes to agent servers over HTTP (the `remote` backend):
    /// the only process that needs the engine socket or sandbox privileges.
    ///
    /// Configured by the environment: `--help` lists every setting.
    Sandboxd,
    /// Exit 0 if the server on 127.0.0.1:$PORT answers /health, 1 if not.
    Healthcheck {
        /// Port to check (default: $PORT, else 8000).
        #[arg(long, conflicts_with = "url")]
        port: Option<u16>,
        /// Check this URL instead (any 2xx answer is healthy).
        #[arg(long)]
        url: Option<String>,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Apply the database migrations, then exit.
    Migrate,
    /// Make, list and revoke API keys (in the database DATABASE_URL names).
    Keys {
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// Print the effective configuration, secrets redacted; fail on any invalid value.
    Config {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run commands in a sandbox, as the agent's tools do.
    Sandbox {
        #[command(subcommand)]
        command: sandbox::SandboxCommand,
    },
    /// The namespace sandbox's per-operation helper (internal).
    #[command(name = "__sandbox-helper", hide = true)]
    SandboxHelper,
    /// Talk to a running server from the terminal, with streamed replies.
    Chat {
        /// Base URL of the server (default: http://127.0.0.1:$PORT).
        #[arg(long)]
        url: Option<String>,
        /// Continue this session instead of starting a new one.
        #[arg(long)]
        session: Option<String>,
        /// The API key to send (`Authorization: Bearer`), when the server
        /// requires one.
        #[arg(long, env = "BULKHEAD_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// The agent new sessions belong to (`GET /agents`); default: the
        /// server's default agent.
        #[arg(long)]
        agent: Option<String>,
    },
}

/// The command line, with `serve --help` and `sandboxd --help` listing
/// every setting from the settings table.
fn parse_cli() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    let settings = bulkhead_server::config::settings::help;
    let command = Cli::command()
        .mut_subcommand("serve", |c| c.after_long_help(settings(false, 100)))
        .mut_subcommand("sandboxd", |c| c.after_long_help(settings(true, 100)));
    Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit())
}

fn main() -> ExitCode {
    let cli = parse_cli();
    match cli.command {
        Command::Serve => serve(),
        Command::MockModel {
            host,
            port,
            latency_ms,
        } => runtime(true).block_on(mock_model(
            SocketAddr::new(host, port),
            Duration::from_millis(latency_ms),
        )),
        Command::Sandboxd => sandboxd(),
        Command::Healthcheck {
            port,
            url,
            timeout_ms,
        } => runtime(false).block_on(healthcheck(port, url, Duration::from_millis(timeout_ms))),
        Command::Migrate => migrate(),
        Command::Keys { command } => {
            let config = match load_config() {
                Ok(config) => config,
                Err(code) => return code,
            };
            runtime(false).block_on(keys::run(command, &config))
        }
        Command::Config { json } => print_config(json),
        Command::Chat {
            url,
            session,
            api_key,
            agent,
        } => {
            let runtime = runtime(false);
            let code = runtime.block_on(chat::run(url, session, api_key, agent));
            // A read of stdin still pending (chat quit on Ctrl-C at the
            // prompt) holds a blocking thread until a line comes: not waited for.
            runtime.shutdown_background();
            code
        }
        Command::Sandbox { command } => {
            let config = match load_config() {
                Ok(config) => config,
                Err(code) => return code,
            };
            runtime(false).block_on(sandbox::run(command, &config))
        }
        // Must not start a runtime: the helper forks.
        Command::SandboxHelper => bulkhead_sandbox::namespace::helper_main(),
    }
}

fn runtime(multi_thread: bool) -> tokio::runtime::Runtime {
    let mut builder = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    builder
        .enable_all()
        .build()
        .expect("starting the async runtime")
}

/// The configuration, or one line on stderr naming what is wrong.
fn load_config() -> Result<Config, ExitCode> {
    Environment::from_process()
        .and_then(|env| Config::from_env(&env))
        .map_err(|e| {
            eprintln!("bulkhead: invalid configuration: {e}");
            ExitCode::from(2)
        })
}

fn fail(error: &anyhow::Error) -> ExitCode {
    tracing::error!(error = format!("{error:#}"), "fatal");
    // Not `eprintln!`: it panics when stderr is a pipe that has closed.
    let _ = writeln!(std::io::stderr(), "bulkhead: {error:#}");
    ExitCode::FAILURE
}

fn serve() -> ExitCode {
    let config = match load_config() {
        Ok(config) => config,
        Err(code) => return code,
    };
    logging::init_serve(
        &config.log_level,
        config.log_format,
        config.enable_tracing,
        &config.observability,
    );
    let result = runtime(true).block_on(async move {
        let signal = bulkhead_server::termination_signal().context("installing signal handlers")?;
        let shutdown = bulkhead_server::shutdown_signal().context("installing signal handlers")?;
        // Start-up can wait a long time (a database that is not up yet);
        // a signal then means "give up", not "serve and stop at once".
        let server = tokio::select! {
            server = Server::bind(config) => server?,
            number = signal => return Ok(Some(number)),
        };
        server.run(shutdown).await.map(|()| None)
    });
    // Spans still queued (a short run's) leave before the process does.
    bulkhead_server::observability::traces::shutdown();
    match result {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(signal)) => {
            tracing::info!(signal, "start-up interrupted; nothing was served");
            // What a shell reports for a process its signal ended.
            ExitCode::from(128 + signal as u8)
        }
        Err(error) => fail(&error),
    }
}

async fn mock_model(address: SocketAddr, latency: Duration) -> ExitCode {
    logging::init("info", bulkhead_server::config::LogFormat::Text, false);
    let result = async {
        let shutdown = bulkhead_server::shutdown_signal().context("installing signal handlers")?;
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("could not listen on {address}"))?;
        println!(
            "mock model listening on http://{}/v1",
            listener.local_addr()?
        );
        std::io::stdout().flush()?;
        bulkhead_model::mock::serve(listener, Arc::new(MockModel::new(latency)), shutdown).await?;
        anyhow::Ok(())
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&error),
    }
}

async fn healthcheck(port: Option<u16>, url: Option<String>, timeout: Duration) -> ExitCode {
    let client = match reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
    {
        Ok(client) => client,
        Err(_) => return ExitCode::FAILURE,
    };
    let url = url.unwrap_or_else(|| {
        let port = port
            .or_else(|| {
                std::env::var("PORT")
                    .ok()
                    .and_then(|p| p.trim().parse().ok())
            })
            .unwrap_or(8000);
        format!("http://127.0.0.1:{port}/health")
    });
    match client.get(&url).send().await {
        Ok(response) if response.status().is_success() => ExitCode::SUCCESS,
        Ok(response) => {
            eprintln!("unhealthy: {url} answered {}", response.status());
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("unhealthy: {url}: {}", error.without_url());
            ExitCode::FAILURE
        }
    }
}

fn sandboxd() -> ExitCode {
    let config = match Environment::from_process()
        .and_then(|env| bulkhead_server::config::SandboxdConfig::from_env(&env))
    {
        Ok(config) => config,
        Err(e) => {
            eprintln!("bulkhead: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    logging::init(&config.log_level, config.log_format, false);
    for warning in &config.warnings {
        tracing::warn!(variable = %warning.variable, "{}", warning.message);
    }
    let result = runtime(true).block_on(async move {
        let shutdown = bulkhead_server::shutdown_signal().context("installing signal handlers")?;
        let factory = bulkhead_server::sandbox::sandboxd_factory(&config.sandbox)
            .map_err(|e| anyhow::anyhow!("sandbox: {e}"))?;
        let daemon = bulkhead_sandbox_remote::server::Daemon::new(
            &config.token,
            config.sandbox.limits.clone(),
            factory,
        );
        let address = SocketAddr::new(config.host, config.port);
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("could not listen on {address}"))?;
        tracing::info!(
            address = %listener.local_addr()?,
            backend = config.sandbox.backend.as_str(),
            ceilings = ?config.sandbox.limits,
            "sandboxd listening"
        );
        bulkhead_sandbox_remote::server::serve(listener, daemon, config.sandbox.idle, shutdown)
            .await?;
        tracing::info!("sandboxd stopped; its sandboxes are removed");
        anyhow::Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&error),
    }
}

fn migrate() -> ExitCode {
    let config = match load_config() {
        Ok(config) => config,
        Err(code) => return code,
    };
    logging::init(&config.log_level, config.log_format, false);
    let result = runtime(false).block_on(async {
        let store = bulkhead_store::Store::connect(
            config.database_url.expose_secret(),
            &bulkhead_store::StoreOptions::default(),
        )
        .await
        .context("could not connect to the database")?;
        let count = store.migrate().await?;
        store.close().await;
        anyhow::Ok((store.backend(), count))
    });
    match result {
        Ok((backend, count)) => {
            println!(
                "database ({}) is up to date: {count} migration(s) applied",
                backend.as_str()
            );
            ExitCode::SUCCESS
        }
        Err(error) => fail(&error),
    }
}

fn print_config(json: bool) -> ExitCode {
    let config = match load_config() {
        Ok(config) => config,
        Err(code) => return code,
    };
    for warning in &config.warnings {
        eprintln!("bulkhead: warning: {}", warning.message);
    }
    let rows = config.describe();
    if json {
        let object: serde_json::Map<String, serde_json::Value> = rows
            .into_iter()
            .map(|row| {
                (
                    row.setting.name.to_string(),
                    serde_json::json!({"value": row.value, "source": row.source.to_string()}),
                )
            })
            .collect();
        println!("{}", serde_json::Value::Object(object));
    } else {
        let width = rows
            .iter()
            .map(|row| row.setting.name.len())
            .max()
            .unwrap_or(0);
        for row in rows {
            println!(
                "{:<width$}  {}  ({})",
                row.setting.name,
                row.text(),
                row.source
            );
        }
    }
    ExitCode::SUCCESS
}
