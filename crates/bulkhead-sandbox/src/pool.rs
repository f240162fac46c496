//! Sandboxes held by key (a session; a scope and an id in sandboxd): made
//! once on first use, destroyed when released, after sitting idle, or all at
//! once at shutdown. Never one that an operation is using.

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, OnceCell};

use crate::{Sandbox, SandboxError};

/// One key's sandbox; concurrent first uses wait for the same creation
/// instead of racing to make two.
struct Slot {
    sandbox: OnceCell<Arc<dyn Sandbox>>,
    last_used: std::sync::Mutex<Instant>,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            sandbox: OnceCell::new(),
            last_used: std::sync::Mutex::new(Instant::now()),
        }
    }

    fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn idle_for(&self) -> Duration {
        self.last_used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }

    /// Nobody but the pool holds the slot or its sandbox: no creation and
    /// no operation is under way.
    fn unused(self: &Arc<Slot>) -> bool {
        Arc::strong_count(self) == 1
            && self
                .sandbox
                .get()
                .is_none_or(|sandbox| Arc::strong_count(sandbox) == 1)
    }
}

pub struct SandboxPool<K> {
    slots: Mutex<HashMap<K, Arc<Slot>>>,
}

impl<K> Default for SandboxPool<K> {
    fn default() -> Self {
        SandboxPool {
            slots: Mutex::new(HashMap::new()),
        }
    }
}

impl<K> Debug for SandboxPool<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxPool").finish_non_exhaustive()
    }
}

impl<K: Eq + Hash + Clone + Debug> SandboxPool<K> {
    pub fn new() -> Self {
        Self::default()
    }

    /// The key's sandbox, made by `create` if the pool holds none. It is
    /// made outside the pool's lock (a container takes a while to start,
    /// and other keys must not wait for it); a creation that fails leaves
    /// nothing behind, so the next use tries again.
    pub async fn get_or_create<F, Fut>(
        &self,
        key: K,
        create: F,
    ) -> Result<Arc<dyn Sandbox>, SandboxError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Arc<dyn Sandbox>, SandboxError>>,
    {
        let slot = Arc::clone(
            self.slots
                .lock()
                .await
                .entry(key.clone())
                .or_insert_with(|| Arc::new(Slot::new())),
        );
        slot.touch();
        match slot.sandbox.get_or_try_init(create).await {
            Ok(sandbox) => {
                slot.touch();
                Ok(Arc::clone(sandbox))
            }
            Err(e) => {
                let mut slots = self.slots.lock().await;
                if slots.get(&key).is_some_and(|held| Arc::ptr_eq(held, &slot)) {
                    slots.remove(&key);
                }
                Err(e)
            }
        }
    }

    /// Takes the key's sandbox out of the pool, if it holds one made; the
    /// caller destroys it.
    pub async fn take(&self, key: &K) -> Option<Arc<dyn Sandbox>> {
        let slot = self.slots.lock().await.remove(key)?;
        slot.sandbox.get().cloned()
    }

    /// Destroys the key's sandbox and its workspace, if the pool holds one.
    pub async fn release(&self, key: &K) {
        if let Some(sandbox) = self.take(key).await
            && let Err(e) = sandbox.destroy().await
        {
            tracing::warn!(?key, error = %e, "could not destroy a sandbox");
        }
    }

    /// Forgets, without destroying, the sandboxes whose key `forget` picks
    /// (their backend removes them another way).
    pub async fn forget(&self, forget: impl Fn(&K) -> bool) {
        self.slots.lock().await.retain(|key, _| !forget(key));
    }

    /// Destroys the sandboxes unused for `idle` or longer, never one in
    /// use; returns their keys.
    pub async fn reap_idle(&self, idle: Duration) -> Vec<K> {
        let expired: Vec<(K, Arc<Slot>)> = {
            let mut slots = self.slots.lock().await;
            let keys: Vec<K> = slots
                .iter()
                .filter(|(_, slot)| slot.idle_for() >= idle && slot.unused())
                .map(|(key, _)| key.clone())
                .collect();
            keys.into_iter()
                .filter_map(|key| slots.remove(&key).map(|slot| (key, slot)))
                .collect()
        };
        let mut reaped = Vec::with_capacity(expired.len());
        for (key, slot) in expired {
            if let Some(sandbox) = slot.sandbox.get() {
                tracing::info!(?key, "destroying an idle sandbox");
                if let Err(e) = sandbox.destroy().await {
                    tracing::warn!(?key, error = %e, "could not destroy a sandbox");
                }
            }
            reaped.push(key);
        }
        reaped
    }

    /// Destroys every sandbox (at shutdown).
    pub async fn destroy_all(&self) {
        let all: Vec<Arc<Slot>> = self
            .slots
            .lock()
            .await
            .drain()
            .map(|(_, slot)| slot)
            .collect();
        for slot in all {
            if let Some(sandbox) = slot.sandbox.get() {
                let _ = sandbox.destroy().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures_util::future::BoxFuture;

    use super::*;
    use crate::{ExecResult, Limits, Operation};

    struct Counted {
        limits: Limits,
        destroyed: Arc<AtomicUsize>,
    }

    impl Sandbox for Counted {
        fn backend(&self) -> &'static str {
            "counted"
        }
        fn limits(&self) -> &Limits {
            &self.limits
        }
        fn run<'a>(&'a self, _: &'a Operation) -> BoxFuture<'a, Result<ExecResult, SandboxError>> {
            Box::pin(async { Err(SandboxError::Invalid("not here".into())) })
        }
        fn destroy(&self) -> BoxFuture<'_, Result<(), SandboxError>> {
            self.destroyed.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(()) })
        }
    }

    fn counted(made: &AtomicUsize, destroyed: &Arc<AtomicUsize>) -> Arc<dyn Sandbox> {
        made.fetch_add(1, Ordering::SeqCst);
        Arc::new(Counted {
            limits: Limits::default(),
            destroyed: Arc::clone(destroyed),
        })
    }

    #[tokio::test]
    async fn a_key_gets_one_sandbox_and_a_failed_creation_leaves_nothing() {
        let pool = SandboxPool::<String>::new();
        let (made, destroyed) = (AtomicUsize::new(0), Arc::new(AtomicUsize::new(0)));
        let failed = pool
            .get_or_create("a".to_string(), || async {
                Err(SandboxError::Unavailable("engine down".into()))
            })
            .await;
        assert!(failed.is_err());
        let (first, second) = tokio::join!(
            pool.get_or_create("a".to_string(), || async { Ok(counted(&made, &destroyed)) }),
            pool.get_or_create("a".to_string(), || async { Ok(counted(&made, &destroyed)) }),
        );
        assert!(Arc::ptr_eq(&first.unwrap(), &second.unwrap()));
        assert_eq!(made.load(Ordering::SeqCst), 1, "made once");
        pool.release(&"a".to_string()).await;
        assert_eq!(destroyed.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn idle_sandboxes_are_reaped_but_never_one_in_use() {
        let pool = SandboxPool::<String>::new();
        let (made, destroyed) = (AtomicUsize::new(0), Arc::new(AtomicUsize::new(0)));
        let held = pool
            .get_or_create("busy".to_string(), || async {
                Ok(counted(&made, &destroyed))
            })
            .await
            .unwrap();
        drop(
            pool.get_or_create("idle".to_string(), || async {
                Ok(counted(&made, &destroyed))
            })
            .await
            .unwrap(),
        );
        assert!(pool.reap_idle(Duration::from_secs(60)).await.is_empty());
        assert_eq!(
            pool.reap_idle(Duration::ZERO).await,
            vec!["idle".to_string()]
        );
        assert_eq!(
            destroyed.load(Ordering::SeqCst),
            1,
            "the one in use is kept"
        );
        drop(held);
        pool.destroy_all().await;
        assert_eq!(destroyed.load(Ordering::SeqCst), 2);
    }
}
