//! One endpoint's metric series, resolved once when the endpoint is built: counting an upstream
//! call is an atomic add on a stored handle, with no label vector built and no map looked up.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use crate::metrics::{Labels, Metrics};

/// How one upstream call ended: the `outcome` label of `proxy_broker_upstream_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A valid answer.
    Success,
    /// Connection error or a non-2xx, non-3xx status.
    Error,
    /// A 3xx status (redirects are not followed).
    Redirect,
    /// 2xx with a body that is not a valid answer (or too large).
    InvalidAnswer,
    /// No answer within `timeout_seconds` or the broker's own limit.
    Timeout,
    /// The caller's deadline ran out first (no verdict on the endpoint).
    Deadline,
    /// Skipped: the endpoint's breaker is open.
    CircuitOpen,
    /// Not sent: `upstream_max_in_flight` requests were in flight until the deadline.
    Saturated,
    /// Cancelled because another endpoint answered first (no verdict).
    Cancelled,
}

impl Outcome {
    /// Every outcome, in label order.
    pub const ALL: [Outcome; 9] = [
        Outcome::Success,
        Outcome::Error,
        Outcome::Redirect,
        Outcome::InvalidAnswer,
        Outcome::Timeout,
        Outcome::Deadline,
        Outcome::CircuitOpen,
        Outcome::Saturated,
        Outcome::Cancelled,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Error => "error",
            Outcome::Redirect => "redirect",
            Outcome::InvalidAnswer => "invalid_answer",
            Outcome::Timeout => "timeout",
            Outcome::Deadline => "deadline",
            Outcome::CircuitOpen => "circuit_open",
            Outcome::Saturated => "saturated",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// Handles on one endpoint's series (they share their values with the registry's families).
#[derive(Debug)]
pub struct Series {
    requests: [Counter; Outcome::ALL.len()],
    duration: Histogram,
    circuit: Gauge,
}

fn endpoint_labels(name: &str) -> Labels {
    vec![("endpoint", name.to_owned())]
}

fn outcome_labels(name: &str, outcome: Outcome) -> Labels {
    vec![
        ("endpoint", name.to_owned()),
        ("outcome", outcome.label().to_owned()),
    ]
}

impl Series {
    /// Creates (or finds) the series of endpoint `name`; they start at 0.
    pub fn resolve(metrics: &Metrics, name: &str) -> Self {
        Self {
            requests: Outcome::ALL.map(|o| {
                metrics
                    .upstream_requests
                    .get_or_create_owned(&outcome_labels(name, o))
            }),
            duration: metrics
                .upstream_duration
                .get_or_create_owned(&endpoint_labels(name)),
            circuit: metrics.circuit_state.get_or_create_owned(&endpoint_labels(name)),
        }
    }

    /// Removes endpoint `name`'s series from the registry (handles still held count on unseen).
    pub fn retire(metrics: &Metrics, name: &str) {
        for o in Outcome::ALL {
            metrics.upstream_requests.remove(&outcome_labels(name, o));
        }
        metrics.upstream_duration.remove(&endpoint_labels(name));
        metrics.circuit_state.remove(&endpoint_labels(name));
    }

    /// Counts one call; `latency` is observed for calls that were sent.
    pub fn count(&self, outcome: Outcome, latency: Option<Duration>) {
        // `ALL` lists the variants in declaration order, so the discriminant is the index.
        if let Some(counter) = self.requests.get(outcome as usize) {
            counter.inc();
        }
        if let Some(l) = latency {
            self.duration.observe(l.as_secs_f64());
        }
    }

    /// Sets the circuit-state gauge.
    pub fn set_circuit(&self, value: i64) {
        self.circuit.set(value);
    }
}
