//! `bulkhead keys`: API keys, made, listed and revoked in the database the
//! server uses (`DATABASE_URL`), so they hold on every replica at once.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use bulkhead_server::Config;
use bulkhead_server::door::keys::{self, NewKey, NewKeyError};
use bulkhead_store::{ApiKey, RevokeOutcome, Store, StoreOptions};
use clap::Subcommand;
use secrecy::ExposeSecret;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a key and print it (once: only its digest is stored).
    ///
    /// The key goes to stdout alone, so `KEY=$(bulkhead keys create --name ci)`
    /// works; what it is goes to stderr.
    Create {
        /// What the key is for, as `keys list` shows it.
        #[arg(long)]
        name: String,
        /// Requests per minute (none: unlimited).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        rpm: Option<u32>,
        /// Runs in flight at once (none: unlimited).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        max_concurrent_runs: Option<u32>,
        /// Model tokens per UTC day, input and output (none: unlimited).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        tokens_per_day: Option<u64>,
        /// Share sessions with the other keys of this tenant (to rotate a
        /// key: make one in its tenant, move clients, revoke the old one).
        /// Default: a tenant of its own.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// List the keys: id, name, tenant, created, last used, limits, revoked.
    List {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by its id: it stops working at once on this database's
    /// servers (within 2 s on those that checked it just before).
    Revoke {
        /// The key's id (the `id` column of `keys list`).
        id: String,
    },
}

pub async fn run(command: KeysCommand, config: &Config) -> ExitCode {
    match execute(command, config).await {
        Ok(code) => code,
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "bulkhead: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(command: KeysCommand, config: &Config) -> anyhow::Result<ExitCode> {
    let store = Store::connect(
        config.database_url.expose_secret(),
        &StoreOptions::default(),
    )
    .await
    .context("could not connect to the database (DATABASE_URL)")?;
    // Keys may be made before the server has ever started on this database.
    store
        .migrate()
        .await
        .context("could not bring the database's schema up to date")?;
    let code = match command {
        KeysCommand::Create {
            name,
            rpm,
            max_concurrent_runs,
            tokens_per_day,
            tenant,
        } => {
            let new = NewKey {
                name,
                tenant,
                requests_per_minute: rpm,
                max_concurrent_runs,
                tokens_per_day,
            };
            match keys::create(&store, new, bulkhead_server::now_ms()).await {
                Ok((record, key)) => {
                    println!("{key}");
                    let _ = writeln!(
                        std::io::stderr(),
                        "created key {} ({}, tenant {}; limits: {}). It is shown this once: store it now.",
                        record.id,
                        record.name,
                        record.tenant,
                        limits(&record)
                    );
                    ExitCode::SUCCESS
                }
                Err(NewKeyError::Invalid(message)) => {
                    let _ = writeln!(std::io::stderr(), "bulkhead: {message}");
                    ExitCode::from(2)
                }
                Err(NewKeyError::Store(e)) => return Err(e.into()),
            }
        }
        KeysCommand::List { json } => {
            let all = store.api_keys().await?;
            if json {
                let keys: Vec<_> = all.iter().map(bulkhead_server::door::key_json).collect();
                println!("{}", serde_json::json!({ "keys": keys }));
            } else {
                print_table(&all);
            }
            ExitCode::SUCCESS
        }
        KeysCommand::Revoke { id } => {
            match store.revoke_api_key(&id, bulkhead_server::now_ms()).await? {
                RevokeOutcome::Revoked => {
                    println!("revoked key {id}");
                    ExitCode::SUCCESS
                }
                RevokeOutcome::AlreadyRevoked => {
                    println!("key {id} was already revoked");
                    ExitCode::SUCCESS
                }
                RevokeOutcome::NotFound => {
                    let _ = writeln!(
                        std::io::stderr(),
                        "bulkhead: no key has the id {id:?} (see `bulkhead keys list`)"
                    );
                    ExitCode::from(2)
                }
            }
        }
    };
    store.close().await;
    Ok(code)
}

fn limits(key: &ApiKey) -> String {
    let parts: Vec<String> = [
        key.requests_per_minute.map(|n| format!("{n} requests/min")),
        key.max_concurrent_runs
            .map(|n| format!("{n} runs in flight")),
        key.tokens_per_day.map(|n| format!("{n} tokens/day")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

fn print_table(keys: &[ApiKey]) {
    let date = |ms: Option<i64>| ms.map_or("-".to_string(), bulkhead_server::timestamp);
    println!(
        "{:<16}  {:<20}  {:<16}  {:<24}  {:<24}  {:<24}  LIMITS",
        "ID", "NAME", "TENANT", "CREATED", "LAST USED", "REVOKED"
    );
    for key in keys {
        println!(
            "{:<16}  {:<20}  {:<16}  {:<24}  {:<24}  {:<24}  {}",
            key.id,
            key.name,
            key.tenant,
            date(Some(key.created_at)),
            date(key.last_used_at),
            date(key.revoked_at),
            limits(key)
        );
    }
}
