//! Nothing to link: this crate holds the tests of what we ship outside the
//! binary (the image, and later the Compose stacks and Kubernetes
//! manifests), run against the real Docker Engine `scripts/test` starts.
