//! Publishing task events to containerd, in the order they happen.

use std::sync::Arc;

use containerd_shim::{event::Event, publisher::RemotePublisher};
use containerd_shim_protos::{protobuf::MessageDyn, ttrpc::context::Context};
use log::{debug, warn};
use tokio::sync::mpsc;

/// Events go through one queue so that they reach containerd in the order
/// they were published, whatever the caller's task.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::UnboundedSender<(String, Box<dyn MessageDyn>)>,
}

impl Publisher {
    pub fn new(remote: RemotePublisher, namespace: String) -> Self {
        let remote = Arc::new(remote);
        Self::with_sink(move |topic, event| {
            let remote = remote.clone();
            let namespace = namespace.clone();
            async move {
                if let Err(e) = remote
                    .publish(Context::default(), &topic, &namespace, event)
                    .await
                {
                    warn!("publish {topic}: {e}");
                }
            }
        })
    }

    /// A publisher that hands each event to `sink`, one at a time.
    pub fn with_sink<F, Fut>(sink: F) -> Self
    where
        F: Fn(String, Box<dyn MessageDyn>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<(String, Box<dyn MessageDyn>)>();
        tokio::spawn(async move {
            while let Some((topic, event)) = rx.recv().await {
                sink(topic, event).await;
            }
        });
        Self { tx }
    }

    pub fn publish<E: Event + MessageDyn + 'static>(&self, event: E) {
        let topic = event.topic();
        debug!("event {topic}");
        if self.tx.send((topic.clone(), Box::new(event))).is_err() {
            warn!("event queue closed, dropped {topic}");
        }
    }
}
