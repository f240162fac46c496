//! Workspace paths, checked the same way by every backend before anything
//! touches the filesystem.

use std::path::{Component, Path, PathBuf};

/// Where the session's workspace is, inside every sandbox.
pub(crate) const WORKSPACE: &str = "/workspace";

/// A workspace path, resolved without touching the filesystem: relative to
/// the workspace, `..` may not climb out of it.
pub(crate) fn workspace_path(path: &str) -> Result<PathBuf, String> {
    let joined = Path::new(WORKSPACE).join(path);
    let mut resolved = PathBuf::from("/");
    for component in joined.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                resolved.pop();
            }
            Component::Normal(part) => resolved.push(part),
            Component::Prefix(_) => return Err(format!("{path}: unsupported path")),
        }
    }
    if resolved.starts_with(WORKSPACE) {
        Ok(resolved)
    } else {
        Err(format!("{path}: outside the workspace"))
    }
}
