//! containerd-shim-custom-v2: a containerd shim v2 (runtime `io.containerd.custom.v2`) that runs
//! containers through runc and takes consistent, complete checkpoints.

mod cgroup;
mod checkpoint;
mod container;
mod error;
mod events;
mod info;
mod io;
mod options;
mod owned;
mod reaper;
mod runtime;
mod service;
mod shim;
mod test_hooks;

/// The runtime name containerd knows this shim by.
pub const RUNTIME_NAME: &str = "io.containerd.custom.v2";

fn main() {
    // CRIU runs the shim as its action script, several times a restore (see
    // checkpoint/loopback.rs): that answer comes before anything else is set up.
    if checkpoint::loopback::is_action() {
        std::process::exit(checkpoint::loopback::run_action());
    }
    let args: Vec<String> = std::env::args().collect();
    if args
        .iter()
        .skip(1)
        .any(|a| a == "-v" || a == "--version" || a == "-version")
    {
        println!("containerd-shim-custom-v2:");
        println!("  Version:  {}", env!("CARGO_PKG_VERSION"));
        println!("  Runtime:  {RUNTIME_NAME}");
        println!("  Revision: {}", env!("SHIM_GIT_REVISION"));
        return;
    }
    // One thread: a shim is mostly idle, and every thread costs memory. Blocking work
    // (freezing, the rootfs diff) goes to the blocking pool.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("containerd-shim-custom-v2: cannot start its runtime: {e}");
            std::process::exit(1);
        }
    };
    runtime.block_on(containerd_shim::asynchronous::run::<shim::CustomShim>(
        RUNTIME_NAME,
        None,
    ));
    // Images of a restore still being removed are not left half-removed.
    checkpoint::wait_for_removals();
}
