//! Task events forwarded to containerd's ttrpc event service (TTRPC_ADDRESS).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_shim_protos::api::ForwardRequest;
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim_async::EventsClient;
use protobuf::well_known_types::any::Any;
use protobuf::well_known_types::timestamp::Timestamp;
use protobuf::MessageFull;

/// The current time as a protobuf timestamp.
pub fn now() -> Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

/// Sends events; connects lazily and drops events when containerd is unreachable (containerd
/// also learns exits from Wait and State).
#[derive(Clone)]
pub struct Publisher {
    address: Option<String>,
    namespace: String,
    client: std::sync::Arc<tokio::sync::Mutex<Option<EventsClient>>>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Publisher({:?})", self.address)
    }
}

impl Publisher {
    /// A publisher to containerd's ttrpc address.
    pub fn new(address: Option<String>, namespace: String) -> Self {
        Publisher {
            address,
            namespace,
            client: Default::default(),
        }
    }

    /// The containerd namespace the shim serves (`-namespace`).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Publishes `event` on `topic` (for example `/tasks/exit`).
    pub async fn publish<M: MessageFull>(&self, topic: &str, event: &M) {
        let Some(address) = &self.address else { return };
        let Ok(any) = Any::pack(event) else { return };
        let any = Any {
            type_url: M::descriptor().full_name().to_string(),
            ..any
        };
        let env = Envelope {
            timestamp: protobuf::MessageField::some(now()),
            namespace: self.namespace.clone(),
            topic: topic.to_string(),
            event: protobuf::MessageField::some(any),
            ..Default::default()
        };
        let req = ForwardRequest {
            envelope: protobuf::MessageField::some(env),
            ..Default::default()
        };
        let mut guard = self.client.lock().await;
        if guard.is_none() {
            let addr = if address.starts_with("unix://") {
                address.clone()
            } else {
                format!("unix://{address}")
            };
            match ttrpc::asynchronous::Client::connect(&addr).await {
                Ok(c) => *guard = Some(EventsClient::new(c)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach containerd's event service");
                    return;
                }
            }
        }
        if let Some(c) = guard.as_ref() {
            if let Err(e) = c
                .forward(ttrpc::context::with_timeout(5_000_000_000), &req)
                .await
            {
                tracing::warn!(error = %e, topic, "publishing an event failed");
                *guard = None;
            }
        }
    }
}
