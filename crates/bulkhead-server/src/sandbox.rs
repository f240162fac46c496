//! Choosing and building the sandbox backend from the configuration.

use std::sync::Arc;

use bulkhead_sandbox::Backend;
use bulkhead_sandbox::docker::{DockerBackend, DockerConfig};
use bulkhead_sandbox::egress::EgressProxy;
use bulkhead_sandbox::namespace::{NamespaceBackend, NamespaceConfig};
use bulkhead_sandbox_remote::client::{RemoteBackend, RemoteConfig};
use bulkhead_sandbox_remote::server::BackendFactory;

use crate::config::{SandboxBackendKind, SandboxConfig};

/// The backend, with the egress proxy its sandboxes reach the allowed
/// destinations through (none when nothing is allowed).
pub fn backend(
    kind: SandboxBackendKind,
    config: &SandboxConfig,
) -> Result<Arc<dyn Backend>, String> {
    let proxy = egress_proxy(config)?;
    build(kind, config, proxy)
}

/// The proxy, its gates made in `SANDBOX_EGRESS_DIR` (default
/// `$SANDBOX_ROOT/.egress`).
fn egress_proxy(config: &SandboxConfig) -> Result<Option<Arc<EgressProxy>>, String> {
    if config.egress.is_empty() {
        return Ok(None);
    }
    let folder = match &config.egress_dir {
        Some(folder) => folder.clone(),
        None => {
            std::fs::create_dir_all(&config.root)
                .map_err(|e| format!("cannot create {}: {e}", config.root.display()))?;
            config
                .root
                .canonicalize()
                .map_err(|e| format!("{}: {e}", config.root.display()))?
                .join(".egress")
        }
    };
    let proxy = EgressProxy::new(&folder, Arc::new(config.egress.clone()))
        .map_err(|e| format!("cannot make the egress folder {}: {e}", folder.display()))?;
    Ok(Some(Arc::new(proxy)))
}

/// The backend alone; `egress` is the proxy, if any.
pub fn build(
    kind: SandboxBackendKind,
    config: &SandboxConfig,
    egress: Option<Arc<EgressProxy>>,
) -> Result<Arc<dyn Backend>, String> {
    match kind {
        SandboxBackendKind::Namespace => {
            let mut namespace =
                NamespaceConfig::with_helper(config.helper.clone(), config.root.clone()).map_err(
                    |e| format!("cannot find the bulkhead executable for the sandbox helper: {e}"),
                )?;
            namespace.host_uid = config.host_uid;
            namespace.host_gid = config.host_uid;
            namespace.cgroup = config.cgroup.clone();
            namespace.egress = egress;
            Ok(Arc::new(NamespaceBackend::new(namespace)))
        }
        SandboxBackendKind::Docker => Ok(Arc::new(DockerBackend::new(DockerConfig {
            image: config.image.clone(),
            runtime: config.runtime.clone(),
            socket: config.docker_host.clone(),
            scope: config.scope.clone(),
            // A volume, when named, carries the gates: the host path of a
            // socket made inside a container means nothing to the engine.
            egress,
            egress_volume: config.egress_volume.clone(),
        }))),
        SandboxBackendKind::Remote => {
            let (Some(url), Some(token)) = (&config.remote_url, &config.sandboxd_token) else {
                return Err(
                    "the remote backend needs SANDBOX_REMOTE_URL and SANDBOXD_TOKEN".into(),
                );
            };
            Ok(Arc::new(RemoteBackend::new(RemoteConfig {
                url: url.clone(),
                token: token.clone(),
                scope: config.scope.clone(),
                egress,
            })?))
        }
    }
}

/// What `bulkhead sandboxd` serves: a backend per client scope, made on
/// first use from `config` with the scope's label (docker) or folder
/// (namespace), all sharing one egress proxy (sandboxd's own, when it has
/// `SANDBOX_EGRESS_ALLOW`; otherwise its docker sandboxes mount the gates
/// their clients open in `SANDBOX_EGRESS_VOLUME`).
pub fn sandboxd_factory(config: &SandboxConfig) -> Result<BackendFactory, String> {
    let kind = config.backend;
    if kind == SandboxBackendKind::Remote {
        return Err("sandboxd makes sandboxes itself: choose namespace or docker".into());
    }
    // Made once here so that a bad setting fails at start, not at the
    // first client's request.
    let proxy = egress_proxy(config)?;
    build(kind, config, proxy.clone())?;
    let config = config.clone();
    let factory: BackendFactory = Box::new(move |scope: &str| {
        let mut scoped = config.clone();
        scoped.scope = scope.to_string();
        scoped.root = config.root.join(scope);
        build(kind, &scoped, proxy.clone())
    });
    Ok(factory)
}
