//! Kubernetes' path: CheckpointContainer and a restore through CreateContainer + StartContainer,
//! on containerd's CRI with handlers `runc` (the Go shim) and `custom`, interleaved, on a CRI host
//! of its own (integration::cri: the CRI plugin, a loopback registry, a local pause image).

use std::time::{Duration, Instant};

use integration::cri::{CriHost, PidMode};
use integration::Runtime;

use super::scenarios::{check_interrupted, log, ms, order, settle_disk, Bench};

const CRI_TIMEOUT: Duration = Duration::from_secs(600);

impl Bench<'_> {
    pub fn cri(&mut self) -> Result<(), String> {
        let (mib, rounds) = self.cfg.cri;
        let g = "Kubernetes: containerd's CRI, handlers runc and custom";
        let r = &mut self.res;
        let what = |s: &str| format!("{mib} MiB: {s}");
        r.group(g)
            .lower(
                "cri_checkpoint",
                "CRI (ms)",
                what("CheckpointContainer (archive written)"),
                "ms",
            )
            .lower(
                "cri_restore_create",
                "CRI (ms)",
                what("CreateContainer from the archive"),
                "ms",
            )
            .lower(
                "cri_restore_start",
                "CRI (ms)",
                what("StartContainer (CRIU restore)"),
                "ms",
            )
            .lower(
                "cri_restore_total",
                "CRI (ms)",
                what("restore (CreateContainer + StartContainer)"),
                "ms",
            );
        let host = CriHost::start();
        for round in 0..rounds {
            log(format!(
                "CRI checkpoint + restore {mib} MiB, round {}/{rounds}",
                round + 1
            ));
            for rt in order(round) {
                check_interrupted()?;
                settle_disk();
                let (ckpt, create, start) = cri_round(&host, rt, mib, round)?;
                self.res.add("cri_checkpoint", rt, ckpt);
                self.res.add("cri_restore_create", rt, create);
                self.res.add("cri_restore_start", rt, start);
                self.res.add("cri_restore_total", rt, create + start);
            }
        }
        Ok(())
    }
}

/// One container holding `mib` MiB checkpointed, then restored in a new pod: (CheckpointContainer
/// ms, CreateContainer ms, StartContainer ms). Both pods are removed.
fn cri_round(
    host: &CriHost,
    rt: Runtime,
    mib: u64,
    round: usize,
) -> Result<(f64, f64, f64), String> {
    let name = format!("{}-{round}", integration::cri::handler(rt));
    let bytes = mib << 20;
    let pod = host.run_pod(&format!("{name}-src"), rt, PidMode::Container);
    let hold = format!("(head -c {bytes} /dev/zero; sleep 100000) | tail -c {bytes} > /dev/null");
    let id = host.run(&pod, "held", &["sh", "-c", &hold]);
    let ready = Instant::now();
    loop {
        let rss = host
            .exec_sync(&id, &["sh", "-c", "grep VmRSS /proc/$(pidof tail)/status"])
            .ok()
            .and_then(|(_, out, _)| out.split_whitespace().nth(1)?.parse::<u64>().ok());
        if rss.is_some_and(|kb| kb >= (mib << 10) * 9 / 10) {
            break;
        }
        if ready.elapsed() > CRI_TIMEOUT {
            return Err(format!("{name}: the workload did not fill {mib} MiB"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let archive = host.containerd().dir().join(format!("{name}.tar"));
    let t = Instant::now();
    host.checkpoint(&id, &archive, CRI_TIMEOUT)
        .map_err(|e| format!("{name}: CheckpointContainer: {e}"))?;
    let ckpt = ms(t.elapsed());
    let pod2 = host.run_pod(&format!("{name}-dst"), rt, PidMode::Container);
    let archive_str = archive.to_string_lossy().into_owned();
    let t = Instant::now();
    let restored = host
        .create(&pod2, host.container_config("held", &archive_str, &[]))
        .map_err(|e| format!("{name}: CreateContainer from the archive: {e}"))?;
    let create = ms(t.elapsed());
    let t = Instant::now();
    host.start_container(&restored)
        .map_err(|e| format!("{name}: StartContainer (restore): {e}"))?;
    let start = ms(t.elapsed());
    for p in [&pod, &pod2] {
        host.remove_pod(p)
            .map_err(|e| format!("{name}: remove pod: {e}"))?;
    }
    let _ = std::fs::remove_file(&archive);
    Ok((ckpt, create, start))
}
