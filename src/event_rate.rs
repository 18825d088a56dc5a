//! QEMU's rate limit on some QMP events (its monitor_qapi_event_conf):
//! QUORUM_REPORT_BAD (per node-name) and QUORUM_FAILURE go out at most
//! once a second. The first of a period goes at once; later ones in the
//! period replace each other, and the last is sent when the period ends
//! (which starts another). A quorum that sees a bad child on every
//! request thus reports it once a second, as QSD does.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value};

/// The period of a rate-limited event and the data member that tells
/// its instances apart; None for an event sent as it comes.
fn rate(event: &str) -> Option<(Duration, Option<&'static str>)> {
    match event {
        "QUORUM_REPORT_BAD" => Some((Duration::from_secs(1), Some("node-name"))),
        "QUORUM_FAILURE" => Some((Duration::from_secs(1), None)),
        _ => None,
    }
}

type Key = (String, String);

/// The periods running now, each with the event waiting for its end.
#[derive(Default, Clone)]
pub struct EventRate {
    periods: Arc<Mutex<HashMap<Key, Option<Value>>>>,
}

impl EventRate {
    /// Decides what happens to `event` (the whole message `v`): true to
    /// send it now. Otherwise it waits for the end of its period, when
    /// `send` gets it (on a timer thread).
    pub fn admit(
        &self,
        event: &str,
        data: Option<&Map<String, Value>>,
        v: &Value,
        send: impl Fn(&Value) + Send + 'static,
    ) -> bool {
        let Some((period, member)) = rate(event) else {
            return true;
        };
        let id = member
            .and_then(|m| data.and_then(|d| d.get(m)))
            .and_then(Value::as_str)
            .unwrap_or_default();
        let key = (event.to_string(), id.to_string());
        let Ok(mut periods) = self.periods.lock() else {
            return true;
        };
        if let Some(waiting) = periods.get_mut(&key) {
            *waiting = Some(v.clone());
            return false;
        }
        periods.insert(key.clone(), None);
        drop(periods);
        let periods = self.periods.clone();
        let timer = std::thread::Builder::new()
            .name("qmp-event-rate".into())
            .spawn(move || loop {
                std::thread::sleep(period);
                let next = match periods.lock() {
                    Ok(mut p) => match p.get_mut(&key) {
                        Some(waiting) if waiting.is_some() => waiting.take(),
                        _ => {
                            p.remove(&key);
                            None
                        }
                    },
                    Err(_) => None,
                };
                match next {
                    // Sent at the period's end; a new period starts.
                    Some(v) => send(&v),
                    None => return,
                }
            });
        if timer.is_err() {
            // No timer: no limit either.
            if let Ok(mut p) = self.periods.lock() {
                p.remove(&(event.to_string(), id.to_string()));
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_events_are_limited() {
        let r = EventRate::default();
        let v = Value::Null;
        for _ in 0..3 {
            assert!(r.admit("BLOCK_JOB_READY", None, &v, |_| {}));
        }
    }

    #[test]
    fn a_period_sends_the_first_now_and_the_last_at_its_end() {
        let r = EventRate::default();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let data = |n: &str| {
            let mut m = Map::new();
            m.insert("node-name".into(), Value::from(n));
            m
        };
        let send = |s: &Arc<Mutex<Vec<Value>>>| {
            let s = s.clone();
            move |v: &Value| s.lock().unwrap_or_else(|p| p.into_inner()).push(v.clone())
        };
        let a = data("a");
        assert!(r.admit("QUORUM_REPORT_BAD", Some(&a), &Value::from(1), send(&sent)));
        assert!(!r.admit("QUORUM_REPORT_BAD", Some(&a), &Value::from(2), send(&sent)));
        assert!(!r.admit("QUORUM_REPORT_BAD", Some(&a), &Value::from(3), send(&sent)));
        // Another node has a period of its own.
        let b = data("b");
        assert!(r.admit("QUORUM_REPORT_BAD", Some(&b), &Value::from(4), send(&sent)));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sent.lock().map(|s| s.len()).unwrap_or(0) < 1 {
            assert!(std::time::Instant::now() < deadline, "never sent");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            *sent.lock().unwrap_or_else(|p| p.into_inner()),
            vec![Value::from(3)]
        );
    }
}
