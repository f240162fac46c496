//! API keys: their form, how one is made, and how a presented key is
//! checked against the store.
//!
//! A key reads `bk_<id>_<secret>`: a prefix that secret scanners and people
//! recognise, a public id (16 hex digits, what `keys list` shows and
//! `keys revoke` takes), and 192 random bits. Only the SHA-256 of the whole
//! key is stored: keys are random, so a slow password hash would add
//! nothing but latency to every request.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bulkhead_store::{ApiKey, Store, StoreError};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const KEY_PREFIX: &str = "bk_";
const ID_HEX: usize = 16;
const SECRET_HEX: usize = 48;

/// How long a key looked up in the store is trusted before it is read
/// again: a revocation made on another replica (or by the CLI) takes
/// effect within this. The replica that revokes forgets the key at once.
const KEY_CACHE_TTL: Duration = Duration::from_millis(500);
/// `last_used_at` is a write; it is made at most this often per key.
const TOUCH_EVERY: Duration = Duration::from_secs(60);
/// Past this many cached ids (most would be made-up ones), the cache starts
/// over rather than grow.
const CACHE_CAP: usize = 10_000;

/// What to make a key with.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub name: String,
    /// Keys of one tenant share their sessions; a new tenant by default.
    pub tenant: Option<String>,
    pub requests_per_minute: Option<u32>,
    pub max_concurrent_runs: Option<u32>,
    pub tokens_per_day: Option<u64>,
}

/// Why a key could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NewKeyError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Makes a key, stores its digest and returns the record with the key
/// itself: the only time the key exists outside its holder.
pub async fn create(store: &Store, new: NewKey, now: i64) -> Result<(ApiKey, String), NewKeyError> {
    // What the document's pattern says: not blank, no control character.
    let name = new.name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(NewKeyError::Invalid(
            "the key's name must be 1 to 100 printable characters".into(),
        ));
    }
    if let Some(tenant) = &new.tenant
        && (tenant.is_empty()
            || tenant.len() > 100
            || !tenant
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
    {
        return Err(NewKeyError::Invalid(
            "the tenant must be 1 to 100 letters, digits, '-', '_' or '.'".into(),
        ));
    }
    for (what, value) in [
        (
            "requests per minute",
            new.requests_per_minute.map(u64::from),
        ),
        (
            "max concurrent runs",
            new.max_concurrent_runs.map(u64::from),
        ),
        ("tokens per day", new.tokens_per_day),
    ] {
        if value == Some(0) || value.is_some_and(|v| v > i64::MAX as u64) {
            return Err(NewKeyError::Invalid(format!(
                "{what} must be at least 1 (leave it out for no limit)"
            )));
        }
    }
    let id = random_hex(ID_HEX / 2);
    let key = format!("{KEY_PREFIX}{id}_{}", random_hex(SECRET_HEX / 2));
    let record = ApiKey {
        tenant: new.tenant.clone().unwrap_or_else(|| id.clone()),
        id,
        name: name.to_string(),
        digest: digest(&key),
        created_at: now,
        last_used_at: None,
        revoked_at: None,
        requests_per_minute: new.requests_per_minute.map(i64::from),
        max_concurrent_runs: new.max_concurrent_runs.map(i64::from),
        tokens_per_day: new.tokens_per_day.map(|t| t as i64),
    };
    store.insert_api_key(&record).await?;
    Ok((record, key))
}

fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    getrandom::fill(&mut buffer).expect("the operating system's random source");
    hex::encode(buffer)
}

fn digest(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The id of a key of the right form; `None` for anything else.
pub fn parse(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let lower_hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    (lower_hex(id, ID_HEX) && lower_hex(secret, SECRET_HEX)).then_some(id)
}

/// Why a presented key was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Missing,
    Malformed,
    Unknown,
    Revoked,
}

impl Refused {
    /// The `reason` label of `bulkhead_auth_failures_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::Missing => "missing",
            Refused::Malformed => "malformed",
            Refused::Unknown => "unknown",
            Refused::Revoked => "revoked",
        }
    }
}

struct Cached {
    read_at: Instant,
    key: Option<ApiKey>,
    touched_at: Option<Instant>,
}

/// Checks presented keys, reading each from the store at most once per
/// [`KEY_CACHE_TTL`].
pub struct KeyBook {
    store: Store,
    cache: Mutex<HashMap<String, Cached>>,
}

impl KeyBook {
    pub fn new(store: Store) -> KeyBook {
        KeyBook {
            store,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The stored key that `presented` is, if it is one and not revoked.
    pub async fn check(&self, presented: &str) -> Result<Result<ApiKey, Refused>, StoreError> {
        let Some(id) = parse(presented) else {
            return Ok(Err(Refused::Malformed));
        };
        let key = match self.cached(id) {
            Some(key) => key,
            None => {
                let key = self.store.api_key(id).await?;
                let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                if cache.len() >= CACHE_CAP {
                    cache.clear();
                }
                let touched_at = cache.get(id).and_then(|c| c.touched_at);
                cache.insert(
                    id.to_string(),
                    Cached {
                        read_at: Instant::now(),
                        key: key.clone(),
                        touched_at,
                    },
                );
                key
            }
        };
        let Some(key) = key else {
            return Ok(Err(Refused::Unknown));
        };
        let matches: bool = digest(presented)
            .as_bytes()
            .ct_eq(key.digest.as_bytes())
            .into();
        if !matches {
            return Ok(Err(Refused::Unknown));
        }
        if key.revoked_at.is_some() {
            return Ok(Err(Refused::Revoked));
        }
        self.touch(&key.id);
        Ok(Ok(key))
    }

    fn cached(&self, id: &str) -> Option<Option<ApiKey>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(id)
            .filter(|c| c.read_at.elapsed() < KEY_CACHE_TTL)
            .map(|c| c.key.clone())
    }

    /// Records the use, without making the request wait for the write.
    fn touch(&self, id: &str) {
        {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            let Some(entry) = cache.get_mut(id) else {
                return;
            };
            if entry.touched_at.is_some_and(|t| t.elapsed() < TOUCH_EVERY) {
                return;
            }
            entry.touched_at = Some(Instant::now());
        }
        let store = self.store.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            if let Err(e) = store.touch_api_key(&id, bulkhead_agent::now_ms()).await {
                tracing::warn!(key_id = %id, error = %e, "could not record a key's last use");
            }
        });
    }

    /// Forgets a key at once (it was just revoked here).
    pub fn forget(&self, id: &str) {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_keys_of_the_right_form_parse() {
        let id = "0123456789abcdef";
        let secret = "a".repeat(SECRET_HEX);
        assert_eq!(parse(&format!("bk_{id}_{secret}")), Some(id));
        for bad in [
            String::new(),
            format!("bk_{id}{secret}"),
            format!("xx_{id}_{secret}"),
            format!("bk_{}_{secret}", id.to_uppercase()),
            format!("bk_{id}_{}", &secret[1..]),
            format!("bk_{id}_{secret}a"),
            format!("bk_{id}_{secret} "),
            format!("bk_{id}_{}", "g".repeat(SECRET_HEX)),
        ] {
            assert_eq!(parse(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn made_keys_parse_and_differ() {
        let a = format!("{KEY_PREFIX}{}_{}", random_hex(8), random_hex(24));
        let b = format!("{KEY_PREFIX}{}_{}", random_hex(8), random_hex(24));
        assert!(parse(&a).is_some() && parse(&b).is_some());
        assert_ne!(a, b);
        assert_ne!(digest(&a), digest(&b));
        assert_eq!(digest(&a).len(), 64);
    }
}
