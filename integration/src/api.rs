//! The few calls `ctr` 2.1 cannot make, through containerd's gRPC API (containerd-client).

use std::path::Path;

use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::UpdateTaskRequest;
use containerd_client::tonic::Request;
use prost_types::Any;

/// Type URL under which containerd (typeurl) registers `specs.LinuxResources`; the value is JSON.
pub const LINUX_RESOURCES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";

fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    Ok(rt.block_on(f))
}

/// Tasks.Update with `resources` (an OCI `LinuxResources` as JSON), as `ctr task update` did in
/// containerd 1.x.
pub fn update_task(
    address: &Path,
    namespace: &str,
    id: &str,
    resources: &serde_json::Value,
) -> Result<(), String> {
    let value = serde_json::to_vec(resources).map_err(|e| e.to_string())?;
    block_on(async {
        let channel = containerd_client::connect(address)
            .await
            .map_err(|e| format!("connect {}: {e}", address.display()))?;
        let mut client = TasksClient::new(channel);
        let mut req = Request::new(UpdateTaskRequest {
            container_id: id.to_string(),
            resources: Some(Any {
                type_url: LINUX_RESOURCES_TYPE_URL.to_string(),
                value,
            }),
            annotations: Default::default(),
        });
        req.metadata_mut().insert(
            "containerd-namespace",
            namespace
                .parse()
                .map_err(|e| format!("namespace {namespace:?} as metadata: {e}"))?,
        );
        client
            .update(req)
            .await
            .map_err(|s| format!("Tasks.Update({id}): {s}"))?;
        Ok(())
    })?
}
