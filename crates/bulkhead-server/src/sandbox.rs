//! Choosing and building the sandbox backend from the configuration.

use std::sync::Arc;

use bulkhead_sandbox::Backend;
use bulkhead_sandbox::docker::{DockerBackend, DockerConfig};
use bulkhead_sandbox::namespace::{NamespaceBackend, NamespaceConfig};

use crate::config::{SandboxBackendKind, SandboxConfig};

pub fn backend(
    kind: SandboxBackendKind,
    config: &SandboxConfig,
) -> Result<Arc<dyn Backend>, String> {
    match kind {
        SandboxBackendKind::Namespace => {
            let mut namespace =
                NamespaceConfig::with_helper(config.helper.clone(), config.root.clone()).map_err(
                    |e| format!("cannot find the bulkhead executable for the sandbox helper: {e}"),
                )?;
            namespace.host_uid = config.host_uid;
            namespace.host_gid = config.host_uid;
            Ok(Arc::new(NamespaceBackend::new(namespace)))
        }
        SandboxBackendKind::Docker => Ok(Arc::new(DockerBackend::new(DockerConfig {
            image: config.image.clone(),
            runtime: config.runtime.clone(),
            socket: config.docker_host.clone(),
            scope: config.scope.clone(),
        }))),
    }
}
