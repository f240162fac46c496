//! API keys as stored: a public id, a name, the tenant whose sessions the key
//! reaches, a digest of the secret (never the secret), and the key's limits.

use rusqlite::params;
use serde::Serialize;
use sqlx::FromRow;

use crate::{Pools, Store, StoreError};

#[derive(Debug, Clone, FromRow, Serialize, PartialEq, Eq)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    pub tenant: String,
    /// Hex SHA-256 of the whole key; not serialised.
    #[serde(skip)]
    pub digest: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub requests_per_minute: Option<i64>,
    pub max_concurrent_runs: Option<i64>,
    pub tokens_per_day: Option<i64>,
}

const KEY_COLUMNS: &str = "id, name, tenant, digest, created_at, last_used_at, revoked_at, \
    requests_per_minute, max_concurrent_runs, tokens_per_day";

/// What revoking a key found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeOutcome {
    Revoked,
    AlreadyRevoked,
    NotFound,
}

impl Store {
    pub async fn insert_api_key(&self, key: &ApiKey) -> Result<(), StoreError> {
        match &self.pools {
            Pools::Sqlite { writer, .. } => {
                let key = key.clone();
                writer
                    .write(move |c| {
                        c.prepare_cached(
                            "INSERT INTO api_keys (id, name, tenant, digest, created_at, \
                             requests_per_minute, max_concurrent_runs, tokens_per_day) \
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                        )?
                        .execute(params![
                            key.id,
                            key.name,
                            key.tenant,
                            key.digest,
                            key.created_at,
                            key.requests_per_minute,
                            key.max_concurrent_runs,
                            key.tokens_per_day
                        ])?;
                        Ok::<(), StoreError>(())
                    })
                    .await
            }
            Pools::Postgres(pool) => {
                sqlx::query(
                    "INSERT INTO api_keys (id, name, tenant, digest, created_at, \
                     requests_per_minute, max_concurrent_runs, tokens_per_day) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&key.id)
                .bind(&key.name)
                .bind(&key.tenant)
                .bind(&key.digest)
                .bind(key.created_at)
                .bind(key.requests_per_minute)
                .bind(key.max_concurrent_runs)
                .bind(key.tokens_per_day)
                .execute(pool)
                .await?;
                Ok(())
            }
        }
    }

    /// Every key, revoked ones included, oldest first.
    pub async fn api_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        with_reader!(self, |pool| {
            Ok(sqlx::query_as::<_, ApiKey>(&format!(
                "SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, id"
            ))
            .fetch_all(pool)
            .await?)
        })
    }

    pub async fn api_key(&self, id: &str) -> Result<Option<ApiKey>, StoreError> {
        with_reader!(self, |pool| {
            Ok(sqlx::query_as::<_, ApiKey>(&format!(
                "SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"
            ))
            .bind(id)
            .fetch_optional(pool)
            .await?)
        })
    }

    pub async fn revoke_api_key(&self, id: &str, now: i64) -> Result<RevokeOutcome, StoreError> {
        let revoked = match &self.pools {
            Pools::Sqlite { writer, .. } => {
                let id = id.to_owned();
                writer
                    .write(move |c| {
                        Ok::<usize, StoreError>(
                            c.prepare_cached(
                                "UPDATE api_keys SET revoked_at = ?1 \
                                 WHERE id = ?2 AND revoked_at IS NULL",
                            )?
                            .execute(params![now, id])?,
                        )
                    })
                    .await? as u64
            }
            Pools::Postgres(pool) => sqlx::query(
                "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
            )
            .bind(now)
            .bind(id)
            .execute(pool)
            .await?
            .rows_affected(),
        };
        if revoked == 1 {
            return Ok(RevokeOutcome::Revoked);
        }
        Ok(match self.api_key(id).await? {
            Some(_) => RevokeOutcome::AlreadyRevoked,
            None => RevokeOutcome::NotFound,
        })
    }

    /// Notes that a key was used. Callers throttle this: it is a write.
    pub async fn touch_api_key(&self, id: &str, now: i64) -> Result<(), StoreError> {
        match &self.pools {
            Pools::Sqlite { writer, .. } => {
                let id = id.to_owned();
                writer
                    .write(move |c| {
                        c.prepare_cached("UPDATE api_keys SET last_used_at = ?1 WHERE id = ?2")?
                            .execute(params![now, id])?;
                        Ok::<(), StoreError>(())
                    })
                    .await
            }
            Pools::Postgres(pool) => {
                sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
                    .bind(now)
                    .bind(id)
                    .execute(pool)
                    .await?;
                Ok(())
            }
        }
    }
}
