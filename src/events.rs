//! QMP event delivery. Monitors that finished capability negotiation
//! subscribe; `emit` serializes the event once per layout and queues it on
//! every subscriber's output synchronously, so an event raised while a
//! command runs reaches the client before that command's reply.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::qmp::frame;
use crate::qmp::outbox::Outbox;

/// Where parts of the daemon outside the control actor raise QMP events
/// (block drivers, jobs): (event name, data).
pub type EventSink = std::sync::Arc<dyn Fn(&str, Map<String, Value>) + Send + Sync>;

struct Subscriber {
    id: u64,
    pretty: bool,
    out: Outbox,
}

#[derive(Default)]
pub struct EventBus {
    next_id: AtomicU64,
    subs: Arc<Mutex<Vec<Subscriber>>>,
    /// QEMU's rate limits (a few events go out at most once a second).
    rate: crate::event_rate::EventRate,
}

/// Unsubscribes when dropped.
pub struct Subscription<'a> {
    bus: &'a EventBus,
    id: u64,
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        if let Ok(mut subs) = self.bus.subs.lock() {
            subs.retain(|s| s.id != self.id);
        }
    }
}

impl EventBus {
    pub fn subscribe(&self, pretty: bool, out: Outbox) -> Subscription<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut subs) = self.subs.lock() {
            subs.push(Subscriber { id, pretty, out });
        }
        Subscription { bus: self, id }
    }

    /// Waits (at most `limit`) until every monitor has written what is
    /// queued for it: the events of the exit path reach the clients
    /// before the monitors close.
    pub async fn flush(&self, limit: std::time::Duration) {
        let outs: Vec<Outbox> = match self.subs.lock() {
            Ok(subs) => subs.iter().map(|s| s.out.clone()).collect(),
            Err(_) => return,
        };
        // One after another is as good as together: each only waits.
        let all = async {
            for out in &outs {
                out.drained().await;
            }
        };
        let _ = tokio::time::timeout(limit, all).await;
    }

    /// Emits `event` with optional `data` to every negotiated monitor.
    pub fn emit(&self, event: &str, data: Option<Map<String, Value>>) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| (d.as_secs() as i64, d.subsec_micros() as i64))
            .unwrap_or((-1, -1));
        let mut obj = Map::new();
        obj.insert(
            "timestamp".into(),
            json!({"seconds": now.0, "microseconds": now.1}),
        );
        obj.insert("event".into(), json!(event));
        if let Some(d) = data {
            obj.insert("data".into(), Value::Object(d));
        }
        tracing::trace!(target: "qmp_event", event);
        let v = Value::Object(obj);
        let subs = self.subs.clone();
        let data = v.get("data").and_then(Value::as_object);
        if self
            .rate
            .admit(event, data, &v, move |later| deliver(&subs, later))
        {
            deliver(&self.subs, &v);
        }
    }
}

/// Queues the event on every subscriber, serialized once per layout.
fn deliver(subs: &Mutex<Vec<Subscriber>>, v: &Value) {
    let (mut compact, mut pretty) = (None, None);
    let Ok(mut subs) = subs.lock() else {
        return;
    };
    subs.retain(|s| {
        let text = if s.pretty {
            pretty.get_or_insert_with(|| frame(v, true)).clone()
        } else {
            compact.get_or_insert_with(|| frame(v, false)).clone()
        };
        s.out.send(text)
    });
}
