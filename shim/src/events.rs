//! Publishing task events to containerd, in the order they happen, across
//! containerd restarts.

use std::time::{Duration, Instant};

use containerd_shim::{
    event::Event,
    util::{connect, timestamp},
};
use containerd_shim_protos::{
    events::task::{
        TaskCheckpointed, TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO,
        TaskOOM, TaskPaused, TaskResumed, TaskStart,
    },
    protobuf::{well_known_types::any::Any, Message},
    shim::{event::Envelope, events::ForwardRequest},
    shim_async::{Client, EventsClient},
    ttrpc::context,
};
use log::{debug, warn};
use tokio::sync::mpsc;

/// How long one event may wait for containerd to come back before it is dropped.
const PATIENCE: Duration = Duration::from_secs(60);
/// The longest pause between two attempts to reach containerd.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// One forward call may take this long before the connection counts as dead.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// An event's protobuf name, the type URL of the `Any` containerd decodes it
/// from. Written out rather than asked of the message's descriptor, as
/// containerd-shim's `convert_to_any` does (and protobuf's `MessageDyn`
/// encoders, for an error message): a descriptor's first use parses and
/// indexes every .proto file the events import, 350 KiB of heap kept for the
/// shim's life. So events are encoded through `Message`, whose errors name
/// the type with a constant (a test checks the names against the descriptors).
pub trait Named {
    const TYPE_URL: &'static str;
}

macro_rules! named {
    ($($event:ident),* $(,)?) => {
        $(impl Named for $event {
            const TYPE_URL: &'static str = concat!("containerd.events.", stringify!($event));
        })*
        /// Every event the shim publishes, for the test of their names.
        #[cfg(test)]
        fn every_event() -> Vec<(&'static str, Box<dyn containerd_shim_protos::protobuf::MessageDyn>)> {
            vec![$((<$event as Named>::TYPE_URL, Box::new($event::default()))),*]
        }
    };
}

named!(
    TaskCreate,
    TaskStart,
    TaskDelete,
    TaskIO,
    TaskExit,
    TaskOOM,
    TaskExecAdded,
    TaskExecStarted,
    TaskPaused,
    TaskResumed,
    TaskCheckpointed,
);

/// Topic, type name, encoded event.
type Queued = (String, &'static str, Vec<u8>);

/// Events go through one queue so that they reach containerd in the order
/// they were published, whatever the caller's task.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::UnboundedSender<Queued>,
}

impl Publisher {
    /// Forwards events to containerd's ttrpc `address`, reconnecting whenever
    /// a forward fails (containerd restarted): a failed event is retried, in
    /// order, rather than dropped.
    pub fn new(address: String, namespace: String) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Queued>();
        tokio::spawn(async move {
            let mut client: Option<EventsClient> = None;
            while let Some((topic, name, event)) = rx.recv().await {
                let request = match envelope(&topic, &namespace, name, event) {
                    Ok(r) => r,
                    Err(e) => {
                        warn!("encode event {topic}: {e}");
                        continue;
                    }
                };
                forward(&address, &mut client, &topic, &request).await;
            }
        });
        Self { tx }
    }

    /// A publisher that hands each event to `sink`, one at a time (tests).
    #[cfg(test)]
    pub fn with_sink<F>(sink: F) -> Self
    where
        F: Fn(String, Vec<u8>) + Send + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<Queued>();
        tokio::spawn(async move {
            while let Some((topic, _, event)) = rx.recv().await {
                sink(topic, event);
            }
        });
        Self { tx }
    }

    pub fn publish<E: Event + Named + Message>(&self, event: E) {
        let topic = event.topic();
        debug!("event {topic}");
        let bytes = match event.write_to_bytes() {
            Ok(b) => b,
            Err(e) => {
                warn!("encode event {topic}: {e}");
                return;
            }
        };
        if self
            .tx
            .send((topic.clone(), <E as Named>::TYPE_URL, bytes))
            .is_err()
        {
            warn!("event queue closed, dropped {topic}");
        }
    }
}

fn envelope(
    topic: &str,
    namespace: &str,
    name: &str,
    event: Vec<u8>,
) -> containerd_shim::Result<ForwardRequest> {
    let mut envelope = Envelope::new();
    envelope.set_topic(topic.to_string());
    envelope.set_namespace(namespace.to_string());
    envelope.set_timestamp(timestamp()?);
    let mut any = Any::new();
    any.type_url = name.to_string();
    any.value = event;
    envelope.set_event(any);
    let mut request = ForwardRequest::new();
    request.set_envelope(envelope);
    Ok(request)
}

async fn forward(
    address: &str,
    client: &mut Option<EventsClient>,
    topic: &str,
    request: &ForwardRequest,
) {
    let give_up = Instant::now() + PATIENCE;
    let mut backoff = Duration::from_millis(50);
    loop {
        if client.is_none() {
            *client = reconnect(address).await;
        }
        if let Some(c) = client.as_ref() {
            let ctx = context::with_timeout(FORWARD_TIMEOUT.as_nanos() as i64);
            match c.forward(ctx, request).await {
                Ok(_) => return,
                Err(e) => {
                    debug!("forward {topic}: {e}; reconnecting");
                    *client = None;
                }
            }
        }
        if Instant::now() >= give_up {
            warn!("containerd unreachable at {address} for {PATIENCE:?}: dropped event {topic}");
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn reconnect(address: &str) -> Option<EventsClient> {
    let addr = address.to_string();
    let fd = tokio::task::spawn_blocking(move || connect(addr))
        .await
        .ok()?
        .ok()?;
    // SAFETY: `fd` is a connected unix socket we own; the client takes it over.
    let client = unsafe { Client::from_raw_unix_socket_fd(fd) };
    Some(EventsClient::new(client))
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::events::task::{TaskExit, TaskStart};

    #[tokio::test]
    async fn events_keep_their_order() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let p = Publisher::with_sink(move |topic, _| {
            let _ = tx.send(topic);
        });
        p.publish(TaskStart::default());
        p.publish(TaskExit::default());
        assert_eq!(rx.recv().await.unwrap(), "/tasks/start");
        assert_eq!(rx.recv().await.unwrap(), "/tasks/exit");
    }

    #[test]
    fn event_names_are_their_descriptors_and_the_envelope_carries_them() {
        for (name, event) in every_event() {
            assert_eq!(name, event.descriptor_dyn().full_name());
            let bytes = event.write_to_bytes_dyn().unwrap();
            let request = envelope("/tasks/x", "ns", name, bytes.clone()).unwrap();
            let any = request.envelope.event.as_ref().unwrap();
            assert_eq!(any.type_url, name);
            assert_eq!(any.value, bytes);
        }
    }
}
