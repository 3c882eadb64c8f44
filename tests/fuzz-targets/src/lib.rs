//! The bodies of skiff's fuzz targets: one function per place that parses untrusted bytes.
//!
//! Each `pub fn NAME(data: &[u8])` must return normally for every input: a panic is a bug in the
//! code under test (the VMM must never panic on guest, peer or network input). `fuzz/` wraps each
//! function in a libFuzzer target of the same name; `tests/regressions.rs` replays the inputs
//! under `fuzz/regressions/NAME/` and `fuzz/seeds/NAME/` through the same functions, so every
//! crash found stays fixed.

pub mod api;
pub mod migration_files;
pub mod migration_stream;
pub mod seeds;
pub mod testdev_server;
pub mod vfio_user;
pub mod virtio;

/// A fuzz target: its name (the libFuzzer binary and the folders under `fuzz/`) and body.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, by name.
pub const TARGETS: &[Target] = &[
    ("virtio_blk", virtio::blk),
    ("virtio_net", virtio::net),
    ("virtio_console", virtio::console),
    ("virtio_rng", virtio::rng),
    ("virtio_iommu", virtio::iommu),
    ("api_request", api::request),
    ("vm_config", api::vm_config),
    ("snapshot_state", migration_files::snapshot_state),
    ("memory_file", migration_files::memory_file),
    ("migration_stream", migration_stream::receive),
    ("vfio_user_client", vfio_user::client),
    ("testdev_request", testdev_server::request),
];

/// Ignore SIGPIPE as a Rust `main` does (libFuzzer's `main` does not): a peer closing a socket
/// must give `EPIPE`, not kill the process.
pub fn ignore_sigpipe() {
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}
