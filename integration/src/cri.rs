//! A private containerd with its CRI plugin, driven as the kubelet drives it: a CRI v1 gRPC client
//! (k8s-cri) on containerd's own socket.
//!
//! [`CriHost::start`] writes a config version 3 with the CRI plugins on, runtime handler `runc`
//! (io.containerd.runc.v2) in the config and handler `custom` registered by
//! scripts/register-runtime.sh — what `make install` does. The pod sandbox image is built locally
//! (scripts/build-test-image.sh --pause), imported into k8s.io and pinned. containerd's CRI pulls
//! a checkpoint's base image again by its repo digest at restore, so the test image is served by a
//! loopback registry ([`Registry`]) and pulled through the CRI ([`CriHost::image`]). Pods use the
//! host's network (no CNI) and the cgroup parent `/<tag>`, which the teardown removes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use containerd_client::tonic::{Code, Request, Status};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    CheckpointContainerRequest, ContainerConfig, ContainerMetadata, ContainerStatsRequest,
    ContainerStatus, ContainerStatusRequest, CreateContainerRequest, ExecSyncRequest, ImageSpec,
    LinuxContainerConfig, LinuxContainerResources, LinuxContainerSecurityContext,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, ListContainersRequest, NamespaceMode,
    NamespaceOption, PodSandboxConfig, PodSandboxMetadata, PullImageRequest,
    RemoveContainerRequest, RemovePodSandboxRequest, ReopenContainerLogRequest,
    RunPodSandboxRequest, StartContainerRequest, StopContainerRequest, StopPodSandboxRequest,
    UpdateContainerResourcesRequest,
};

use crate::containerd::Setup;
use crate::grpc::Client;
use crate::registry::Registry;
use crate::{built_image, Containerd, Runtime, IMAGE};

/// The sandbox image's name (from scripts/build-test-image.sh --pause).
pub const PAUSE_IMAGE: &str = "docker.io/library/shimtest-pause:latest";
/// How long one CRI call may take (the kubelet's default runtime request timeout is 2 min).
pub const CRI_TIMEOUT: Duration = Duration::from_secs(120);

/// The CRI runtime handler that runs on `rt` (the names `make install` and the config use).
pub fn handler(rt: Runtime) -> &'static str {
    match rt {
        Runtime::RuncV2 => "runc",
        Runtime::Custom => "custom",
    }
}

fn cri_config(dir: &Path) -> String {
    format!(
        r#"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{PAUSE_IMAGE}"
  [plugins.'io.containerd.cri.v1.images'.registry]
    config_path = "{certs}"

[plugins.'io.containerd.cri.v1.runtime']
  # runc cannot set the sandbox's oom_score_adj of -998 on this machine (no CAP_SYS_RESOURCE).
  restrict_oom_score_adj = true
  # containerd 2.3 refuses a restore through CreateContainer without it; 2.1 ignores the key.
  enable_experimental_restore_via_create = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["{cni}/bin"]
    conf_dir = "{cni}/conf"
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

[plugins.'io.containerd.grpc.v1.cri']
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"#,
        certs = dir.join("certs.d").display(),
        cni = dir.join("cni").display(),
    )
}

/// A pod the host ran: its id and the config CreateContainer needs again.
struct Pod {
    config: PodSandboxConfig,
}

/// How a pod shares the pid namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PidMode {
    /// Each container has its own (the default).
    Container,
    /// `shareProcessNamespace: true`: one for the pod, pause is pid 1.
    Pod,
}

/// A private containerd with the CRI on, a registry, and a CRI client; see the module doc.
pub struct CriHost {
    // Dropped first: containers go before the registry they pull from.
    cd: Containerd,
    registry: Registry,
    client: Client,
    image: String,
    pods: Mutex<HashMap<String, Pod>>,
}

impl CriHost {
    /// Starts the registry and containerd, imports the pause image, pushes the test image to the
    /// registry and pulls it through the CRI.
    pub fn start() -> CriHost {
        let pause = built_image("--pause").unwrap_or_else(|e| panic!("pause image: {e}"));
        let reg_dir = std::env::temp_dir().join(format!(
            "shimtest-registry-{}-{}",
            std::process::id(),
            crate::unique()
        ));
        let registry = Registry::start(&reg_dir);
        let reg_for_config = registry.addr().to_string();
        let cd = Containerd::start_with(Setup {
            cri: Some(Box::new(move |dir: &Path| {
                let certs = dir.join("certs.d");
                std::fs::create_dir_all(dir.join("cni").join("conf")).expect("create cni conf dir");
                std::fs::create_dir_all(dir.join("cni").join("bin")).expect("create cni bin dir");
                Registry::hosts_toml(&reg_for_config, &certs);
                cri_config(dir)
            })),
            ..Default::default()
        });
        cd.ctr_ok(["images", "import", pause.to_str().expect("utf-8 path")]);
        let image = format!("{}/shimtest:latest", registry.addr());
        cd.ctr_ok(["images", "tag", IMAGE, &image]);
        cd.ctr_ok(["images", "push", "--plain-http", &image]);
        // Pulled through the CRI, the image gets its repo digest (what a restore pulls again).
        cd.ctr_ok(["images", "rm", &image]);
        let client = Client::connect(cd.address(), cd.namespace(), cd.root_dir())
            .unwrap_or_else(|e| panic!("{e}"));
        let host = CriHost {
            cd,
            registry,
            client,
            image,
            pods: Mutex::new(HashMap::new()),
        };
        host.pull(&host.image.clone())
            .unwrap_or_else(|e| panic!("CRI PullImage {}: {e}", host.image));
        host
    }

    pub fn containerd(&self) -> &Containerd {
        &self.cd
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The test image as the CRI knows it (pulled from the registry).
    pub fn image(&self) -> &str {
        &self.image
    }

    fn request<T>(&self, msg: T, timeout: Duration) -> Request<T> {
        let mut r = Request::new(msg);
        r.set_timeout(timeout);
        r
    }

    fn rs(&self) -> RuntimeServiceClient<containerd_client::tonic::transport::Channel> {
        RuntimeServiceClient::new(self.client.channel()).max_decoding_message_size(64 << 20)
    }

    /// ImageService.PullImage; returns the image ref.
    pub fn pull(&self, image: &str) -> Result<String, Status> {
        let mut is = ImageServiceClient::new(self.client.channel());
        let req = self.request(
            PullImageRequest {
                image: Some(ImageSpec {
                    image: image.to_string(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            CRI_TIMEOUT,
        );
        let r = self.client.block_on(is.pull_image(req))?;
        Ok(r.into_inner().image_ref)
    }

    /// RunPodSandbox with host networking on `rt`'s handler; returns the pod id.
    pub fn run_pod(&self, name: &str, rt: Runtime, pid: PidMode) -> String {
        let logs = self.cd.dir().join("pods").join(name);
        std::fs::create_dir_all(&logs).expect("create pod log dir");
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.to_string(),
                uid: format!("uid-{name}-{}", crate::unique()),
                namespace: "default".to_string(),
                attempt: 0,
            }),
            log_directory: logs.to_string_lossy().into_owned(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: format!("/{}", self.cd.tag()),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Node as i32,
                        pid: match pid {
                            PidMode::Container => NamespaceMode::Container as i32,
                            PidMode::Pod => NamespaceMode::Pod as i32,
                        },
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let req = self.request(
            RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler(rt).to_string(),
            },
            CRI_TIMEOUT,
        );
        let id = self
            .client
            .block_on(self.rs().run_pod_sandbox(req))
            .unwrap_or_else(|e| panic!("RunPodSandbox {name} on {}: {e}", handler(rt)))
            .into_inner()
            .pod_sandbox_id;
        self.pods_lock().insert(id.clone(), Pod { config });
        id
    }

    fn pods_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pod>> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pod_config(&self, pod: &str) -> PodSandboxConfig {
        self.pods_lock()
            .get(pod)
            .map(|p| p.config.clone())
            .unwrap_or_else(|| panic!("pod {pod} was not run by this host"))
    }

    /// The container config the scenarios use: `image` (the test image unless a checkpoint is
    /// restored), `cmd` as the command, its log at `<pod log dir>/<name>.log`.
    pub fn container_config(&self, name: &str, image: &str, cmd: &[&str]) -> ContainerConfig {
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.to_string(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: image.to_string(),
                user_specified_image: image.to_string(),
                ..Default::default()
            }),
            command: cmd.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext::default()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// CreateContainer in `pod`. The container gets the pod's namespace options, as the kubelet
    /// gives them (a container left without any would share the pod's pid namespace).
    pub fn create(&self, pod: &str, mut config: ContainerConfig) -> Result<String, Status> {
        let pod_ns = self
            .pod_config(pod)
            .linux
            .and_then(|l| l.security_context)
            .and_then(|s| s.namespace_options);
        let sc = config
            .linux
            .get_or_insert_with(Default::default)
            .security_context
            .get_or_insert_with(Default::default);
        if sc.namespace_options.is_none() {
            sc.namespace_options = pod_ns;
        }
        let req = self.request(
            CreateContainerRequest {
                pod_sandbox_id: pod.to_string(),
                config: Some(config),
                sandbox_config: Some(self.pod_config(pod)),
            },
            CRI_TIMEOUT,
        );
        Ok(self
            .client
            .block_on(self.rs().create_container(req))?
            .into_inner()
            .container_id)
    }

    /// StartContainer (a restore when the container was created from a checkpoint).
    pub fn start_container(&self, id: &str) -> Result<(), Status> {
        let req = self.request(
            StartContainerRequest {
                container_id: id.to_string(),
            },
            CRI_TIMEOUT,
        );
        self.client.block_on(self.rs().start_container(req))?;
        Ok(())
    }

    /// CreateContainer + StartContainer of `cmd` on the test image; returns the container id.
    pub fn run(&self, pod: &str, name: &str, cmd: &[&str]) -> String {
        let id = self
            .create(pod, self.container_config(name, &self.image, cmd))
            .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}"));
        self.start_container(&id)
            .unwrap_or_else(|e| panic!("StartContainer {name}: {e}"));
        id
    }

    /// ExecSync: (exit code, stdout, stderr).
    pub fn exec_sync(&self, id: &str, cmd: &[&str]) -> Result<(i32, String, String), Status> {
        let req = self.request(
            ExecSyncRequest {
                container_id: id.to_string(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: 60,
            },
            CRI_TIMEOUT,
        );
        let r = self.client.block_on(self.rs().exec_sync(req))?.into_inner();
        Ok((
            r.exit_code,
            String::from_utf8_lossy(&r.stdout).into_owned(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
        ))
    }

    /// ExecSync that must succeed; returns stdout.
    pub fn exec_ok(&self, id: &str, cmd: &[&str]) -> String {
        match self.exec_sync(id, cmd) {
            Ok((0, out, _)) => out,
            Ok((code, out, err)) => {
                panic!("exec {cmd:?} in {id} exited {code}\nstdout: {out}\nstderr: {err}")
            }
            Err(e) => panic!("ExecSync {cmd:?} in {id}: {e}"),
        }
    }

    /// ContainerStatus (verbose: with containerd's info).
    pub fn status(&self, id: &str) -> Result<ContainerStatus, Status> {
        let req = self.request(
            ContainerStatusRequest {
                container_id: id.to_string(),
                verbose: true,
            },
            CRI_TIMEOUT,
        );
        let r = self.client.block_on(self.rs().container_status(req))?;
        r.into_inner()
            .status
            .ok_or_else(|| Status::new(Code::Internal, "ContainerStatus without a status"))
    }

    /// ContainerStats: (memory working set bytes, cpu usage core nanoseconds).
    pub fn stats(&self, id: &str) -> Result<(u64, u64), Status> {
        let req = self.request(
            ContainerStatsRequest {
                container_id: id.to_string(),
            },
            CRI_TIMEOUT,
        );
        let s = self
            .client
            .block_on(self.rs().container_stats(req))?
            .into_inner()
            .stats
            .ok_or_else(|| Status::new(Code::Internal, "ContainerStats without stats"))?;
        let mem = s
            .memory
            .and_then(|m| m.working_set_bytes)
            .map(|v| v.value)
            .unwrap_or(0);
        let cpu = s
            .cpu
            .and_then(|c| c.usage_core_nano_seconds)
            .map(|v| v.value)
            .unwrap_or(0);
        Ok((mem, cpu))
    }

    /// CheckpointContainer into the archive `location`, the call carrying `deadline`.
    pub fn checkpoint(&self, id: &str, location: &Path, deadline: Duration) -> Result<(), Status> {
        let req = self.request(
            CheckpointContainerRequest {
                container_id: id.to_string(),
                location: location.to_string_lossy().into_owned(),
                timeout: deadline.as_secs() as i64,
            },
            deadline,
        );
        self.client.block_on(self.rs().checkpoint_container(req))?;
        Ok(())
    }

    /// UpdateContainerResources with `linux`.
    pub fn update(&self, id: &str, linux: LinuxContainerResources) -> Result<(), Status> {
        let req = self.request(
            UpdateContainerResourcesRequest {
                container_id: id.to_string(),
                linux: Some(linux),
                ..Default::default()
            },
            CRI_TIMEOUT,
        );
        self.client
            .block_on(self.rs().update_container_resources(req))?;
        Ok(())
    }

    /// ReopenContainerLog (what the kubelet calls after rotating the log).
    pub fn reopen_log(&self, id: &str) -> Result<(), Status> {
        let req = self.request(
            ReopenContainerLogRequest {
                container_id: id.to_string(),
            },
            CRI_TIMEOUT,
        );
        self.client.block_on(self.rs().reopen_container_log(req))?;
        Ok(())
    }

    /// StopContainer with a grace period of `timeout` seconds.
    pub fn stop(&self, id: &str, timeout: i64) -> Result<(), Status> {
        let req = self.request(
            StopContainerRequest {
                container_id: id.to_string(),
                timeout,
            },
            CRI_TIMEOUT,
        );
        self.client.block_on(self.rs().stop_container(req))?;
        Ok(())
    }

    pub fn remove(&self, id: &str) -> Result<(), Status> {
        let req = self.request(
            RemoveContainerRequest {
                container_id: id.to_string(),
            },
            CRI_TIMEOUT,
        );
        self.client.block_on(self.rs().remove_container(req))?;
        Ok(())
    }

    /// StopPodSandbox then RemovePodSandbox.
    pub fn remove_pod(&self, pod: &str) -> Result<(), Status> {
        let stop = self.request(
            StopPodSandboxRequest {
                pod_sandbox_id: pod.to_string(),
            },
            CRI_TIMEOUT,
        );
        self.client.block_on(self.rs().stop_pod_sandbox(stop))?;
        let rm = self.request(
            RemovePodSandboxRequest {
                pod_sandbox_id: pod.to_string(),
            },
            CRI_TIMEOUT,
        );
        self.client.block_on(self.rs().remove_pod_sandbox(rm))?;
        self.pods_lock().remove(pod);
        Ok(())
    }

    /// Ids of the containers the CRI lists.
    pub fn containers(&self) -> Vec<String> {
        let req = self.request(ListContainersRequest { filter: None }, CRI_TIMEOUT);
        self.client
            .block_on(self.rs().list_containers(req))
            .map(|r| {
                r.into_inner()
                    .containers
                    .into_iter()
                    .map(|c| c.id)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The log file of container `name` in `pod` (CRI format: `<time> <stream> <tag> <line>`).
    pub fn log_path(&self, pod: &str, name: &str) -> PathBuf {
        PathBuf::from(self.pod_config(pod).log_directory).join(format!("{name}.log"))
    }

    /// The lines a container wrote, without the CRI log prefix.
    pub fn log_lines(&self, pod: &str, name: &str) -> Vec<String> {
        std::fs::read_to_string(self.log_path(pod, name))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.splitn(4, ' ').nth(3).map(str::to_string))
            .collect()
    }
}

impl Drop for CriHost {
    /// Pods still there go through the CRI first: a pod's shim lives until its sandbox is
    /// removed (containerd's sandbox controller shuts it down), which ctr cannot do.
    fn drop(&mut self) {
        let pods: Vec<String> = self.pods_lock().keys().cloned().collect();
        for pod in pods {
            if let Err(e) = self.remove_pod(&pod) {
                eprintln!("teardown: removing pod {pod}: {e}");
            }
        }
    }
}

/// Runs one CRI scenario on `rt`'s handler with a fresh [`CriHost`] (torn down afterwards).
pub fn run_scenario(rt: Runtime, scenario: impl FnOnce(Runtime, &CriHost)) {
    if rt == Runtime::Custom {
        if let Err(e) = crate::shim_binary() {
            panic!("{e}");
        }
    }
    let host = CriHost::start();
    scenario(rt, &host);
}

/// Writes a CRI scenario once, runs it on both handlers: `both_handlers!(name, |rt, host| {...})`
/// defines `name_runc` and `name_custom`.
#[macro_export]
macro_rules! both_handlers {
    ($(#[$meta:meta])* $name:ident, |$rt:ident, $host:ident| $body:block) => {
        $crate::paste::paste! {
            $(#[$meta])*
            #[test]
            fn [<$name _runc>]() {
                $crate::cri::run_scenario($crate::Runtime::RuncV2, |$rt: $crate::Runtime, $host: &$crate::cri::CriHost| $body);
            }

            $(#[$meta])*
            #[test]
            fn [<$name _custom>]() {
                $crate::cri::run_scenario($crate::Runtime::Custom, |$rt: $crate::Runtime, $host: &$crate::cri::CriHost| $body);
            }
        }
    };
}

/// The scenarios' workload: a token made at start and kept only in the shell's memory, a counter
/// it increments, both written to /state every 0.1 s; and file changes of every kind against the
/// test image (added, changed, deleted, a directory replaced by another). Writes /ready once the
/// files are changed.
pub const WORKLOAD: &str = "TOKEN=$(cat /proc/sys/kernel/random/uuid); i=0; \
    echo added > /data/added.txt; echo changed > /data/change.txt; rm /data/delete.txt; \
    rm -r /data/replace; mkdir /data/replace; echo new > /data/replace/new.txt; \
    touch /ready; \
    while :; do i=$((i+1)); echo \"$TOKEN $i\" > /state.new; mv /state.new /state; sleep 0.1; done";

/// (token, counter) the [`WORKLOAD`] in container `id` last wrote.
pub fn workload_state(host: &CriHost, id: &str) -> Option<(String, u64)> {
    let (code, out, _) = host.exec_sync(id, &["cat", "/state"]).ok()?;
    let mut it = out.split_whitespace();
    let token = it.next()?.to_string();
    let n = it.next()?.parse().ok()?;
    (code == 0).then_some((token, n))
}

/// Asserts the files of [`WORKLOAD`] are as it left them in container `id`.
pub fn assert_workload_files(host: &CriHost, id: &str) {
    let (_, out, err) = host
        .exec_sync(
            id,
            &[
                "sh",
                "-c",
                "cat /data/added.txt /data/change.txt /data/replace/new.txt; \
                 ls /data/delete.txt /data/replace/old.txt 2>&1 | wc -l; ls /data/replace",
            ],
        )
        .unwrap_or_else(|e| panic!("exec in {id}: {e}"));
    assert_eq!(
        out, "added\nchanged\nnew\n2\nnew.txt\n",
        "files of the workload in {id} (stderr: {err})"
    );
}

/// Runs checkpointctl (scripts/install-deps.sh installs it) with `args`; returns its stdout,
/// failing the test when it fails.
pub fn checkpointctl(args: &[&str]) -> String {
    let mut c = std::process::Command::new(crate::host::which("checkpointctl"));
    c.args(args);
    let out = crate::process::run_with_timeout(&mut c, None, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "checkpointctl {}: {}",
        args.join(" "),
        crate::show(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Turns a CRI checkpoint archive into a checkpoint image the way Podman and checkpointctl
/// describe one: one uncompressed layer holding the archive's files, a manifest carrying the
/// `org.criu.checkpoint.*` annotations containerd's CRI looks for, as an OCI layout tar named
/// `name` that `ctr images import` loads. `container` is the checkpointed container's name.
pub fn checkpoint_image(archive: &Path, name: &str, container: &str, out: &Path) {
    use std::fs;
    let work = out.with_extension("layout");
    let blobs = work.join("blobs").join("sha256");
    fs::create_dir_all(&blobs).expect("create layout dir");
    let sha = |p: &Path| {
        let mut c = std::process::Command::new("sha256sum");
        c.arg(p);
        let o = crate::process::run_with_timeout(&mut c, None, Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(o.status.success(), "sha256sum: {}", crate::show(&o));
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    };
    let add = |bytes: &[u8]| -> (String, usize) {
        let tmp = work.join("blob.tmp");
        fs::write(&tmp, bytes).expect("write blob");
        let d = sha(&tmp);
        fs::rename(&tmp, blobs.join(&d)).expect("move blob");
        (d, bytes.len())
    };
    // The archive is an uncompressed tar of the checkpoint's files: it is the layer as it is.
    let layer = sha(archive);
    let layer_size = fs::metadata(archive).expect("archive size").len();
    fs::copy(archive, blobs.join(&layer)).expect("copy archive as layer");
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer}")]},
    });
    let (config_digest, config_size) = add(config.to_string().as_bytes());
    let annotations = serde_json::json!({
        "org.criu.checkpoint.container.name": container,
        "org.criu.checkpoint.engine": "containerd",
    });
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{config_digest}"), "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": format!("sha256:{layer}"), "size": layer_size}],
        "annotations": annotations,
    });
    let (manifest_digest, manifest_size) = add(manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": format!("sha256:{manifest_digest}"), "size": manifest_size,
                       "platform": {"architecture": "amd64", "os": "linux"},
                       "annotations": {"io.containerd.image.name": name}}],
    });
    fs::write(work.join("index.json"), index.to_string()).expect("write index.json");
    fs::write(work.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("write oci-layout");
    let mut c = std::process::Command::new("tar");
    c.arg("-cf")
        .arg(out)
        .arg("-C")
        .arg(&work)
        .args(["oci-layout", "index.json", "blobs"]);
    let o = crate::process::run_with_timeout(&mut c, None, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(o.status.success(), "tar: {}", crate::show(&o));
    let _ = fs::remove_dir_all(&work);
}
