//! Per-key limits: requests per minute, runs in flight, model tokens per
//! day. In this process when there is one replica; in Redis when
//! `REDIS_URL` is set, so that every replica counts against the same
//! numbers.
//!
//! Requests per minute is GCRA in both places: `governor` here, and the same
//! algorithm as a Redis script there (governor keeps its state in memory
//! only), so a key is limited the same way whether one replica serves it or
//! ten. A Redis that does not answer lets requests through (logged and
//! counted): keys still authenticate, and an outage of the counters should
//! not become an outage of the API.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulkhead_agent::RunAccount;
use bulkhead_store::ApiKey;
use governor::clock::{Clock, MonotonicClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::observability::metrics::LIMIT_ERRORS;

/// Which limit a request ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    RequestsPerMinute,
    ConcurrentRuns,
    TokensPerDay,
}

impl Limit {
    /// As errors, headers and the `limit` metric label name it.
    pub fn name(self) -> &'static str {
        match self {
            Limit::RequestsPerMinute => "requests_per_minute",
            Limit::ConcurrentRuns => "concurrent_runs",
            Limit::TokensPerDay => "tokens_per_day",
        }
    }
}

/// A limit reached: what it allows and when to try again.
#[derive(Debug, Clone, Copy)]
pub struct Over {
    pub limit: Limit,
    pub allowed: u64,
    pub retry_after: Duration,
}

/// Where a key stands on its request rate, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy)]
pub struct Standing {
    pub limit: u64,
    pub remaining: u64,
    /// Until the key has its whole allowance back.
    pub reset: Duration,
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, MonotonicClock, StateInformationMiddleware>;

/// The counters of every key.
pub enum Counters {
    Local(Arc<Local>),
    Shared(Arc<Shared>),
}

impl Counters {
    pub fn local() -> Counters {
        Counters::Local(Arc::new(Local::default()))
    }

    /// Counters in Redis; a run's place lapses `place_ttl` after its
    /// replica stopped renewing it (the runs' lease, so that a replica that
    /// dies gives its places back when its runs are ended).
    pub fn shared(client: redis::Client, place_ttl: Duration) -> Counters {
        Counters::Shared(Arc::new(Shared::new(client, place_ttl)))
    }

    /// Counts a request against the key's rate.
    pub async fn request(&self, key: &ApiKey) -> Result<Option<Standing>, Over> {
        let Some(rpm) = positive(key.requests_per_minute) else {
            return Ok(None);
        };
        match self {
            Counters::Local(local) => local.request(&key.id, rpm),
            Counters::Shared(shared) => shared.request(&key.id, rpm).await,
        }
    }

    /// Lets a run start, or says which limit stops it. The account that
    /// comes back holds the run's place until it is dropped.
    pub async fn admit_run(&self, key: &ApiKey) -> Result<Box<dyn RunAccount>, Over> {
        let max_runs = positive(key.max_concurrent_runs);
        let tokens_per_day = positive(key.tokens_per_day);
        match self {
            Counters::Local(local) => Local::admit_run(local, &key.id, max_runs, tokens_per_day),
            Counters::Shared(shared) => {
                Shared::admit_run(shared, &key.id, max_runs, tokens_per_day).await
            }
        }
    }
}

fn positive(limit: Option<i64>) -> Option<u64> {
    limit.filter(|l| *l > 0).map(|l| l as u64)
}

/// The UTC day a token is spent on, and how long until the next one.
fn utc_day() -> (i64, Duration) {
    let now = bulkhead_agent::now_ms();
    let day_ms = 86_400_000;
    let day = now.div_euclid(day_ms);
    let next = (day + 1) * day_ms;
    (day, Duration::from_millis((next - now) as u64))
}

#[derive(Default)]
pub struct Local {
    requests: Mutex<HashMap<String, (u64, Arc<Limiter>)>>,
    runs: Mutex<HashMap<String, u64>>,
    /// Tokens spent per key on the UTC day it names.
    tokens: Mutex<HashMap<String, (i64, u64)>>,
}

impl Local {
    fn request(&self, id: &str, rpm: u64) -> Result<Option<Standing>, Over> {
        let limiter = {
            let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
            match requests.get(id) {
                // A key's limit can change only by making a new key, but a
                // stale entry must not outlive a different rate.
                Some((limit, limiter)) if *limit == rpm => Arc::clone(limiter),
                _ => {
                    let burst =
                        NonZeroU32::new(rpm.min(u32::MAX as u64) as u32).unwrap_or(NonZeroU32::MIN);
                    let limiter = Arc::new(
                        RateLimiter::direct_with_clock(Quota::per_minute(burst), MonotonicClock)
                            .with_middleware::<StateInformationMiddleware>(),
                    );
                    requests.insert(id.to_string(), (rpm, Arc::clone(&limiter)));
                    limiter
                }
            }
        };
        let interval = Duration::from_secs(60) / rpm.clamp(1, u32::MAX as u64) as u32;
        match limiter.check() {
            Ok(snapshot) => {
                let remaining = u64::from(snapshot.remaining_burst_capacity());
                Ok(Some(Standing {
                    limit: rpm,
                    remaining,
                    reset: interval * (rpm - remaining) as u32,
                }))
            }
            Err(not_until) => Err(Over {
                limit: Limit::RequestsPerMinute,
                allowed: rpm,
                retry_after: not_until.wait_time_from(MonotonicClock.now()),
            }),
        }
    }

    fn admit_run(
        this: &Arc<Local>,
        id: &str,
        max_runs: Option<u64>,
        tokens_per_day: Option<u64>,
    ) -> Result<Box<dyn RunAccount>, Over> {
        if let Some(allowed) = tokens_per_day {
            let (day, until_tomorrow) = utc_day();
            let tokens = this.tokens.lock().unwrap_or_else(|e| e.into_inner());
            let spent = match tokens.get(id) {
                Some((d, spent)) if *d == day => *spent,
                _ => 0,
            };
            if spent >= allowed {
                return Err(Over {
                    limit: Limit::TokensPerDay,
                    allowed,
                    retry_after: until_tomorrow,
                });
            }
        }
        if let Some(allowed) = max_runs {
            let mut runs = this.runs.lock().unwrap_or_else(|e| e.into_inner());
            let running = runs.entry(id.to_string()).or_default();
            if *running >= allowed {
                return Err(Over {
                    limit: Limit::ConcurrentRuns,
                    allowed,
                    // A run's length is unknown: a second is a polite retry.
                    retry_after: Duration::from_secs(1),
                });
            }
            *running += 1;
        }
        Ok(Box::new(LocalAccount {
            counters: Arc::clone(this),
            id: id.to_string(),
            holds_run: max_runs.is_some(),
        }))
    }
}

struct LocalAccount {
    counters: Arc<Local>,
    id: String,
    holds_run: bool,
}

impl RunAccount for LocalAccount {
    fn tokens_spent(&self, input: u64, output: u64) {
        let (day, _) = utc_day();
        let mut tokens = self
            .counters
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let entry = tokens.entry(self.id.clone()).or_insert((day, 0));
        if entry.0 != day {
            *entry = (day, 0);
        }
        entry.1 = entry.1.saturating_add(input + output);
    }
}

impl Drop for LocalAccount {
    fn drop(&mut self) {
        if !self.holds_run {
            return;
        }
        let mut runs = self.counters.runs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(running) = runs.get_mut(&self.id) {
            *running = running.saturating_sub(1);
            if *running == 0 {
                runs.remove(&self.id);
            }
        }
    }
}

/// GCRA over Redis' clock: `KEYS[1]` holds the key's theoretical arrival
/// time in milliseconds. Answers `{allowed, retry_after_ms, remaining,
/// reset_ms}`.
const REQUEST_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if allow_at > now then
  return {0, allow_at - now, 0, tat - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.max(1, new_tat - now))
return {1, 0, math.floor((now - allow_at) / interval), new_tat - now}
";

/// A run's place among its key's runs in flight: a sorted set of run
/// places scored by when each lapses, so that a replica that dies holding
/// places frees them within the places' lifetime. Answers 1 when admitted.
const ADMIT_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
";

/// Keeps a live run's place: moves its lapse time forward.
const RENEW_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
";

const REDIS_TIMEOUT: Duration = Duration::from_secs(1);
const KEY_PREFIX: &str = "bulkhead:limits";

/// After Redis fails, it is left alone this long: requests go through at
/// once instead of each waiting out [`REDIS_TIMEOUT`].
const REDIS_BACKOFF: Duration = Duration::from_secs(5);

pub struct Shared {
    client: redis::Client,
    /// Until when Redis is not asked, after a failure.
    resting_until: Mutex<Option<std::time::Instant>>,
    connection: tokio::sync::OnceCell<redis::aio::ConnectionManager>,
    request: redis::Script,
    admit: redis::Script,
    renew: redis::Script,
    /// How long a run's place outlives its last renewal.
    place_ttl: Duration,
}

impl Shared {
    fn new(client: redis::Client, place_ttl: Duration) -> Shared {
        Shared {
            client,
            place_ttl,
            resting_until: Mutex::new(None),
            connection: tokio::sync::OnceCell::new(),
            request: redis::Script::new(REQUEST_SCRIPT),
            admit: redis::Script::new(ADMIT_SCRIPT),
            renew: redis::Script::new(RENEW_SCRIPT),
        }
    }

    /// One connection, made on first use and remade by the manager when
    /// Redis comes back.
    async fn connection(&self) -> redis::RedisResult<redis::aio::ConnectionManager> {
        self.connection
            .get_or_try_init(|| async {
                redis::aio::ConnectionManager::new(self.client.clone()).await
            })
            .await
            .cloned()
    }

    /// Runs `work` with a deadline; a Redis that fails or is slow gives
    /// `None`, logged without the error's text (it may quote the URL).
    async fn call<T>(
        &self,
        what: &'static str,
        work: impl AsyncFnOnce(redis::aio::ConnectionManager) -> redis::RedisResult<T>,
    ) -> Option<T> {
        let resting = |until: &Option<std::time::Instant>| {
            until.is_some_and(|t| std::time::Instant::now() < t)
        };
        if resting(&self.resting_until.lock().unwrap_or_else(|e| e.into_inner())) {
            metrics::counter!(LIMIT_ERRORS).increment(1);
            return None;
        }
        let attempt = async {
            let connection = self.connection().await?;
            work(connection).await
        };
        let failure = match tokio::time::timeout(REDIS_TIMEOUT, attempt).await {
            Ok(Ok(value)) => return Some(value),
            Ok(Err(e)) => format!("{:?}", e.kind()),
            Err(_) => "no answer in time".to_string(),
        };
        metrics::counter!(LIMIT_ERRORS).increment(1);
        let mut until = self.resting_until.lock().unwrap_or_else(|e| e.into_inner());
        if !resting(&until) {
            // Once per rest, not once per request.
            tracing::warn!(
                what,
                failure,
                retry_in_s = REDIS_BACKOFF.as_secs(),
                "limits: redis failed; requests go through uncounted until it answers"
            );
            *until = Some(std::time::Instant::now() + REDIS_BACKOFF);
        }
        None
    }

    async fn request(&self, id: &str, rpm: u64) -> Result<Option<Standing>, Over> {
        let interval_ms = (60_000 / rpm).max(1);
        let key = format!("{KEY_PREFIX}:rpm:{id}");
        let answer: Option<(i64, i64, i64, i64)> = self
            .call("requests", async |mut c| {
                self.request
                    .key(&key)
                    .arg(interval_ms)
                    .arg(rpm)
                    .invoke_async(&mut c)
                    .await
            })
            .await;
        let Some((allowed, retry_after_ms, remaining, reset_ms)) = answer else {
            return Ok(None);
        };
        if allowed == 1 {
            Ok(Some(Standing {
                limit: rpm,
                remaining: remaining.max(0) as u64,
                reset: Duration::from_millis(reset_ms.max(0) as u64),
            }))
        } else {
            Err(Over {
                limit: Limit::RequestsPerMinute,
                allowed: rpm,
                retry_after: Duration::from_millis(retry_after_ms.max(0) as u64),
            })
        }
    }

    async fn admit_run(
        this: &Arc<Shared>,
        id: &str,
        max_runs: Option<u64>,
        tokens_per_day: Option<u64>,
    ) -> Result<Box<dyn RunAccount>, Over> {
        let (day, until_tomorrow) = utc_day();
        let tokens_key = format!("{KEY_PREFIX}:tokens:{id}:{day}");
        if let Some(allowed) = tokens_per_day {
            let spent: Option<Option<u64>> = this
                .call("tokens", async |mut c| {
                    redis::cmd("GET").arg(&tokens_key).query_async(&mut c).await
                })
                .await;
            if spent.flatten().unwrap_or(0) >= allowed {
                return Err(Over {
                    limit: Limit::TokensPerDay,
                    allowed,
                    retry_after: until_tomorrow,
                });
            }
        }
        let runs_key = format!("{KEY_PREFIX}:runs:{id}");
        let place = bulkhead_agent::new_id();
        let mut renewal = None;
        if let Some(allowed) = max_runs {
            let ttl_ms = this.place_ttl.as_millis() as u64;
            let admitted: Option<i64> = this
                .call("runs", async |mut c| {
                    this.admit
                        .key(&runs_key)
                        .arg(&place)
                        .arg(allowed)
                        .arg(ttl_ms)
                        .invoke_async(&mut c)
                        .await
                })
                .await;
            if admitted == Some(0) {
                return Err(Over {
                    limit: Limit::ConcurrentRuns,
                    allowed,
                    retry_after: Duration::from_secs(1),
                });
            }
            if admitted.is_some() {
                renewal = Some(tokio::spawn({
                    let this = Arc::clone(this);
                    let (runs_key, place) = (runs_key.clone(), place.clone());
                    async move {
                        let mut tick = tokio::time::interval(this.place_ttl / 3);
                        tick.tick().await;
                        loop {
                            tick.tick().await;
                            let _: Option<i64> = this
                                .call("runs", async |mut c| {
                                    this.renew
                                        .key(&runs_key)
                                        .arg(&place)
                                        .arg(ttl_ms)
                                        .invoke_async(&mut c)
                                        .await
                                })
                                .await;
                        }
                    }
                }));
            }
        }
        Ok(Box::new(SharedAccount {
            counters: Arc::clone(this),
            tokens_key,
            runs_key,
            place,
            renewal,
        }))
    }
}

struct SharedAccount {
    counters: Arc<Shared>,
    tokens_key: String,
    runs_key: String,
    place: String,
    renewal: Option<tokio::task::JoinHandle<()>>,
}

impl RunAccount for SharedAccount {
    fn tokens_spent(&self, input: u64, output: u64) {
        let counters = Arc::clone(&self.counters);
        let key = self.tokens_key.clone();
        let spent = input + output;
        // Counting must not hold up the run; two days of history is plenty
        // for a counter of one.
        spawn_detached(async move {
            let _: Option<()> = counters
                .call("tokens", async |mut c| {
                    redis::pipe()
                        .atomic()
                        .cmd("INCRBY")
                        .arg(&key)
                        .arg(spent)
                        .ignore()
                        .cmd("EXPIRE")
                        .arg(&key)
                        .arg(2 * 86_400)
                        .ignore()
                        .query_async(&mut c)
                        .await
                })
                .await;
        });
    }
}

impl Drop for SharedAccount {
    fn drop(&mut self) {
        let Some(renewal) = self.renewal.take() else {
            return;
        };
        renewal.abort();
        let counters = Arc::clone(&self.counters);
        let (key, place) = (self.runs_key.clone(), self.place.clone());
        spawn_detached(async move {
            let _: Option<i64> = counters
                .call("runs", async |mut c| {
                    redis::cmd("ZREM")
                        .arg(&key)
                        .arg(&place)
                        .query_async(&mut c)
                        .await
                })
                .await;
        });
    }
}

/// Spawns on the current runtime, if there still is one: an account can be
/// dropped while the runtime shuts down, and the place then lapses by
/// itself.
fn spawn_detached(work: impl std::future::Future<Output = ()> + Send + 'static) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(work);
    }
}
