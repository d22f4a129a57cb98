//! Container images for airgapped nodes: resolve references to digests and
//! pull them from OCI registries into archives containerd imports.
