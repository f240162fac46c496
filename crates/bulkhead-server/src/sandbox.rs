//! Choosing and building the sandbox backend from the configuration.

use std::sync::Arc;

use bulkhead_sandbox::Backend;
use bulkhead_sandbox::docker::{DockerBackend, DockerConfig};
use bulkhead_sandbox::egress::EgressProxy;
use bulkhead_sandbox::namespace::{NamespaceBackend, NamespaceConfig};

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
        std::fs::create_dir_all(&config.root)
            .map_err(|e| format!("cannot create {}: {e}", config.root.display()))?;
        let root = config
            .root
            .canonicalize()
            .map_err(|e| format!("{}: {e}", config.root.display()))?;
        let proxy = EgressProxy::start(&root.join(".egress.sock"), Arc::new(config.egress.clone()))
            .map_err(|e| format!("cannot start the egress proxy: {e}"))?;
        Some(proxy)
    };
    let socket = proxy.as_ref().map(|p| p.path().to_path_buf());
    let backend = build(kind, config, socket)?;
    Ok((backend, proxy))
}

fn build(
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
            egress_socket,
        }))),
    }
}
