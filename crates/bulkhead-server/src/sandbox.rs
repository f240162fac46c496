//! Choosing and building the sandbox backend from the configuration.

use std::sync::Arc;

use bulkhead_sandbox::Backend;
use bulkhead_sandbox::docker::{DockerBackend, DockerConfig};
use bulkhead_sandbox::egress::EgressProxy;
use bulkhead_sandbox::namespace::{NamespaceBackend, NamespaceConfig};
use bulkhead_sandbox_remote::client::{RemoteBackend, RemoteConfig};
use bulkhead_sandbox_remote::server::BackendFactory;

use crate::config::{SandboxBackendKind, SandboxConfig};

/// The backend, and the egress proxy its sandboxes reach the allowed hosts
/// through (none when no host is allowed). Keep the proxy alive as long as
/// the backend.
pub fn backend(
    kind: SandboxBackendKind,
    config: &SandboxConfig,
) -> Result<(Arc<dyn Backend>, Option<EgressProxy>), String> {
    let proxy = if config.egress.is_empty() {
        None
    } else {
        let socket = match &config.egress_socket {
            Some(socket) => socket.clone(),
            None => {
                std::fs::create_dir_all(&config.root)
                    .map_err(|e| format!("cannot create {}: {e}", config.root.display()))?;
                config
                    .root
                    .canonicalize()
                    .map_err(|e| format!("{}: {e}", config.root.display()))?
                    .join(".egress.sock")
            }
        };
        let proxy = EgressProxy::start(&socket, Arc::new(config.egress.clone()))
            .map_err(|e| format!("cannot start the egress proxy at {}: {e}", socket.display()))?;
        Some(proxy)
    };
    let socket = proxy.as_ref().map(|p| p.path().to_path_buf());
    let backend = build(kind, config, socket)?;
    Ok((backend, proxy))
}

/// The backend alone; `egress_socket` is the proxy's socket, if any.
pub fn build(
    kind: SandboxBackendKind,
    config: &SandboxConfig,
    egress_socket: Option<std::path::PathBuf>,
) -> Result<Arc<dyn Backend>, String> {
    match kind {
        SandboxBackendKind::Namespace => {
            let mut namespace =
                NamespaceConfig::with_helper(config.helper.clone(), config.root.clone()).map_err(
                    |e| format!("cannot find the bulkhead executable for the sandbox helper: {e}"),
                )?;
            namespace.host_uid = config.host_uid;
            namespace.host_gid = config.host_uid;
            namespace.egress_socket = egress_socket;
            Ok(Arc::new(NamespaceBackend::new(namespace)))
        }
        SandboxBackendKind::Docker => Ok(Arc::new(DockerBackend::new(DockerConfig {
            image: config.image.clone(),
            runtime: config.runtime.clone(),
            socket: config.docker_host.clone(),
            scope: config.scope.clone(),
            // A volume, when named, carries the socket: the host path of a
            // socket made inside a container means nothing to the engine.
            egress_socket: egress_socket.filter(|_| config.egress_volume.is_none()),
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
            })?))
        }
    }
}

/// What `bulkhead sandboxd` serves: a backend per client scope, made on
/// first use from `config` with the scope's label (docker) or folder
/// (namespace), all sharing one egress proxy.
pub fn sandboxd_factory(
    config: &SandboxConfig,
) -> Result<(BackendFactory, Option<EgressProxy>), String> {
    let kind = config.backend;
    if kind == SandboxBackendKind::Remote {
        return Err("sandboxd makes sandboxes itself: choose namespace or docker".into());
    }
    // Made once here so that a bad setting fails at start, not at the
    // first client's request.
    let (_, proxy) = backend(kind, config)?;
    let socket = proxy.as_ref().map(|p| p.path().to_path_buf());
    let config = config.clone();
    let factory: BackendFactory = Box::new(move |scope: &str| {
        let mut scoped = config.clone();
        scoped.scope = scope.to_string();
        scoped.root = config.root.join(scope);
        build(kind, &scoped, socket.clone())
    });
    Ok((factory, proxy))
}
