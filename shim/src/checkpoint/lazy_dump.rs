//! The lazy dump: CRIU ready with every image but the memory pages, the pages served from the
//! frozen container until the destination has them all.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use log::{info, warn};

use super::{
    criu_failure, criu_version, dir_size, layout::DUMP_LOG, lazy, ms, thaw, write_metadata,
    LazyRecord, Metadata, Phases, Target,
};
use crate::{
    cgroup::{FreezeGuard, Freezer},
    error::{Error, Result},
    options::CheckpointOptions,
    runtime::runc::CheckpointOpts,
};

/// The lazy dump up to CRIU's ready: what is left runs in [`LazyRest`].
#[allow(clippy::too_many_arguments)]
pub(super) async fn lazy_dump(
    t: &Target<'_>,
    image: &Path,
    work: &Path,
    mut criu: CheckpointOpts,
    relay: lazy::PageRelay,
    opts: &CheckpointOptions,
    (guard, frozen_before): (Option<FreezeGuard>, bool),
    mut metadata: Metadata,
    mut phases: Phases,
    started: Instant,
) -> Result<LazyRest> {
    let t0 = Instant::now();
    criu.leave_running = false;
    criu.page_server = Some(relay.criu_page_server());
    let config = relay.write_config(work)?;
    let mut relay = relay;
    let mut dump = t.runc.checkpoint_lazy(t.id, &criu, &config)?;
    let ready = tokio::time::timeout(t.runc.criu_timeout, dump.ready()).await;
    let failed = match ready {
        // CRIU's one connection is taken at once: nobody else gets at the pages.
        Ok(Ok(true)) => match relay.connect_criu().await {
            Ok(()) => None,
            Err(e) => {
                dump.kill();
                let _ = dump.wait().await;
                Some(e)
            }
        },
        Ok(Ok(false)) => Some(match dump.wait().await {
            Err(e) => criu_failure("dump", e, work, DUMP_LOG, t.bundle),
            Ok(()) => Error::Internal("runc checkpoint ended without saying ready".into()),
        }),
        Ok(Err(e)) => {
            dump.kill();
            let _ = dump.wait().await;
            Some(e)
        }
        Err(_) => {
            dump.kill();
            let _ = dump.wait().await;
            Some(criu_failure(
                "dump",
                Error::DeadlineExceeded(format!(
                    "runc checkpoint was not ready within {:?} (the runtime option CriuTimeout sets this bound); it was killed with its CRIU",
                    t.runc.criu_timeout
                )),
                work,
                DUMP_LOG,
                t.bundle,
            ))
        }
    };
    let mut rest = LazyRest {
        dump,
        relay: Some(relay),
        guard,
        metadata: Metadata {
            lazy: None,
            ..metadata.clone()
        },
        peer: opts.lazy_peer.parse().ok(),
        connect_timeout: match opts.lazy_connect_timeout {
            0 => crate::options::DEFAULT_LAZY_CONNECT_TIMEOUT,
            s => Duration::from_secs(s),
        },
        transfer_timeout: t.runc.criu_timeout,
        work: work.to_path_buf(),
        frozen_before,
        freezer: None,
    };
    if let Some(e) = failed {
        // runc and CRIU are gone; CRIU may have locked the network first.
        return Err(rest.put_back(t, e).await);
    }
    phases.dump_ms = ms(t0.elapsed());
    phases.total_ms = ms(started.elapsed());
    metadata.phases = phases;
    metadata.criu_version = criu_version(&work.join(DUMP_LOG));
    metadata.images_bytes = dir_size(image);
    metadata.complete = true;
    metadata.lazy = Some(LazyRecord {
        state: "serving",
        error: None,
        bytes: 0,
        connect_ms: 0.0,
        transfer_ms: 0.0,
    });
    info!(
        "container {} checkpointed lazily, serving its pages: {:?}",
        t.id, metadata.phases
    );
    write_metadata(image, &metadata)?;
    rest.metadata = metadata;
    // CRIU thawed the cgroup once it had the processes stopped: frozen again, it holds anything
    // that joins it (an exec) until the transfer ends.
    match t.freezer().and_then(|f| f.freeze().map(|()| f)) {
        Ok(f) => rest.freezer = Some(f),
        Err(e) => warn!("container {}: freeze while the pages are served: {e}", t.id),
    }
    Ok(rest)
}

/// A lazy checkpoint after CRIU's ready: the container frozen, CRIU serving
/// its pages behind the relay.
pub(super) struct LazyRest {
    dump: crate::runtime::runc::LazyDump,
    relay: Option<lazy::PageRelay>,
    guard: Option<FreezeGuard>,
    metadata: Metadata,
    peer: Option<std::net::IpAddr>,
    connect_timeout: Duration,
    transfer_timeout: Duration,
    work: PathBuf,
    /// Frozen before (paused by its user): CRIU thawed the cgroup it seized, and a killed CRIU
    /// does not freeze it again, so the shim does.
    frozen_before: bool,
    /// The container's freezer, frozen again once CRIU is ready (CRIU thaws the cgroup once the
    /// processes are ptrace-stopped: a new exec would run), thawed for CRIU's end.
    freezer: Option<Freezer>,
}

impl LazyRest {
    /// Serves the pages to the destination. When it has them all CRIU kills
    /// the container's processes (their exit is the task's exit); if not,
    /// they are put back as they were.
    pub(super) async fn finish(mut self, t: &Target<'_>, target: &Path) -> Result<()> {
        let Some(relay) = self.relay.take() else {
            return Err(Error::Internal("lazy checkpoint finished twice".into()));
        };
        let (dump, freezer) = (&self.dump, &self.freezer);
        let served = relay
            .serve(
                self.peer,
                self.connect_timeout,
                self.transfer_timeout,
                || dump.kill(),
                // CRIU kills the (ptrace-stopped) processes and waits for them to die.
                || {
                    if let Some(f) = freezer {
                        if let Err(e) = f.thaw() {
                            warn!("container {}: thaw for CRIU's end: {e}", t.id);
                        }
                    }
                },
            )
            .await;
        let (transfer, result) = match served {
            // The destination runs with every page: this copy must not run on, whatever CRIU
            // does now (it kills the processes; if it fails or hangs, the shim does).
            Ok(transfer) => {
                let waited = tokio::time::timeout(self.transfer_timeout, self.dump.wait()).await;
                if !matches!(waited, Ok(Ok(()))) {
                    let why = match waited {
                        Ok(Err(e)) => {
                            criu_failure("dump", e, &self.work, DUMP_LOG, t.bundle).to_string()
                        }
                        _ => format!("CRIU did not end within {:?}", self.transfer_timeout),
                    };
                    warn!(
                        "container {}: the destination has every page, but CRIU did not end the source ({why}); killing it",
                        t.id
                    );
                    self.dump.kill();
                    if let Some(f) = &self.freezer {
                        let _ = f.thaw();
                    }
                    if let Err(e) = t.runc.kill(t.id, libc::SIGKILL as u32, true).await {
                        warn!("container {}: kill: {e}", t.id);
                    }
                }
                (transfer, Ok(()))
            }
            Err(e) => {
                let _ = self.dump.wait().await;
                (Default::default(), Err(e))
            }
        };
        let mut record = LazyRecord {
            state: "complete",
            error: None,
            bytes: transfer.bytes,
            connect_ms: transfer.connect_ms,
            transfer_ms: transfer.transfer_ms,
        };
        let result = match result {
            Ok(()) => {
                // CRIU killed the processes and runc removed the cgroup.
                let _ = thaw(self.guard.take());
                info!(
                    "container {}: the destination has every page ({} bytes in {:.0} ms); the container exited",
                    t.id, transfer.bytes, transfer.transfer_ms
                );
                Ok(())
            }
            Err(e) => {
                record.state = "failed";
                record.error = Some(e.to_string());
                Err(self.put_back(t, e).await)
            }
        };
        let mut metadata = self.metadata.clone();
        metadata.lazy = Some(record);
        if let Err(e) = write_metadata(target, &metadata) {
            warn!("container {}: final checkpoint record: {e}", t.id);
        }
        result
    }

    /// CRIU is stopped before it served anything (the images could not be handed over).
    pub(super) async fn abort(self, t: &Target<'_>, e: Error) -> Result<()> {
        self.dump.kill();
        let mut this = self;
        let _ = this.dump.wait().await;
        Err(this.put_back(t, e).await)
    }

    /// The processes CRIU let go of run on: their network unlocked (CRIU
    /// does not after a lazy dump) and thawed, or paused if they were.
    pub(super) async fn put_back(&mut self, t: &Target<'_>, e: Error) -> Error {
        if t.init_pid > 0 {
            if let Err(u) = lazy::unlock_network(t.runc.reaper(), t.init_pid).await {
                warn!("container {}: unlock its network: {u}", t.id);
            }
        }
        if let Err(th) = thaw(self.guard.take()) {
            warn!(
                "container {}: thaw after the failed lazy checkpoint: {th}",
                t.id
            );
        }
        if self.frozen_before {
            if let Err(f) = t.freezer().and_then(|f| f.freeze()) {
                warn!("container {}: freeze it again, as it was: {f}", t.id);
            }
        }
        warn!(
            "container {}: lazy checkpoint failed, the container runs on: {e}",
            t.id
        );
        e
    }
}
