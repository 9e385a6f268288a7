//! One lookup as a race between endpoints: attempts on their own tasks, fast failover, hedging,
//! and what happens to the attempts still running when one wins (see the parent module's docs).

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Bytes;
use reqwest::header::HeaderMap;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

use super::{
    Answer, Budget, Endpoint, Failure, Outcome, Upstreams, answer, describe_reqwest_error, parse_answer,
};
use crate::breaker::Permit;

/// What one attempt is given: the request, encoded once and shared by every attempt of a lookup.
#[derive(Debug)]
pub(super) struct Job {
    pub(super) body: Bytes,
    pub(super) headers: HeaderMap,
    pub(super) timeout: Duration,
    pub(super) default_ttl: u32,
    pub(super) budget: Option<Budget>,
}

/// What an attempt reports to its lookup.
#[derive(Debug)]
pub(super) enum Report {
    Answer(Answer),
    /// `stop`: the caller's deadline ran out, so trying further endpoints is pointless.
    Failed {
        failure: Failure,
        stop: bool,
    },
}

/// One attempt of a lookup.
#[derive(Debug)]
struct Running {
    /// Index of the endpoint.
    endpoint: usize,
    abort: tokio::task::AbortHandle,
    /// Hedged because it was slow: left to finish (and get its verdict) when another wins.
    slow: bool,
    done: bool,
}

/// One lookup's attempts and where it stands. Dropping it (the lookup returned or was itself
/// cancelled) cancels every attempt still running except the slow ones.
#[derive(Debug)]
pub(super) struct Race<'a> {
    upstreams: &'a Upstreams,
    job: Arc<Job>,
    tx: mpsc::UnboundedSender<(usize, Report)>,
    attempts: Vec<Running>,
    failures: Vec<Failure>,
    /// The next endpoint to consider.
    next: usize,
    /// No more attempts (the caller's deadline ran out).
    stopped: bool,
    /// When to hedge, and the attempt that then counts as slow.
    hedge_at: Option<(Instant, usize)>,
}

impl<'a> Race<'a> {
    /// A race over `upstreams`' endpoints for `job`; attempts report on `tx`.
    pub(super) fn new(
        upstreams: &'a Upstreams,
        job: Arc<Job>,
        tx: mpsc::UnboundedSender<(usize, Report)>,
    ) -> Self {
        Self {
            upstreams,
            job,
            tx,
            attempts: Vec::new(),
            failures: Vec::new(),
            next: 0,
            stopped: false,
            hedge_at: None,
        }
    }

    /// When the newest attempt should be hedged, if at all.
    pub(super) fn hedge_at(&self) -> Option<Instant> {
        self.hedge_at.map(|(at, _)| at)
    }

    /// Every endpoint's failure so far.
    pub(super) fn take_failures(&mut self) -> Vec<super::Failure> {
        std::mem::take(&mut self.failures)
    }

    pub(super) fn outstanding(&self) -> usize {
        self.attempts.iter().filter(|a| !a.done).count()
    }

    /// Starts an attempt on the next endpoint whose breaker admits (skipped ones are recorded as
    /// failures) and arms the hedge timer for it. `false` when none is left, the budget is spent
    /// or the race is stopped.
    pub(super) fn launch(&mut self) -> bool {
        let endpoints = &self.upstreams.endpoints;
        while let Some(endpoint) = endpoints.get(self.next).filter(|_| !self.stopped) {
            let index = self.next;
            self.next += 1;
            if self
                .job
                .budget
                .is_some_and(|b| b.until.saturating_duration_since(Instant::now()).is_zero())
            {
                self.failures
                    .push(endpoint.failure("deadline reached (not tried)".into()));
                self.stopped = true;
                return false;
            }
            let Some(permit) = endpoint.breaker.try_acquire() else {
                endpoint.series.count(Outcome::CircuitOpen, None);
                self.failures
                    .push(endpoint.failure("circuit breaker open (skipped)".into()));
                continue;
            };
            let id = self.attempts.len();
            let task = tokio::spawn(
                attempt(endpoint.clone(), permit, self.job.clone(), self.tx.clone(), id).in_current_span(),
            );
            self.attempts.push(Running {
                endpoint: index,
                abort: task.abort_handle(),
                slow: false,
                done: false,
            });
            // Dropping the join handle detaches the task; the race aborts it when needed.
            drop(task);
            self.hedge_at = match self.upstreams.hedge_delay(endpoint) {
                Some(delay) if self.next < endpoints.len() => Some((Instant::now() + delay, id)),
                _ => None,
            };
            return true;
        }
        false
    }

    /// Attempt `id` reported: an answer ends the race; a failure is recorded and the next
    /// endpoint asked at once (fast failover).
    pub(super) fn finished(&mut self, id: usize, report: Report) -> Option<(Answer, usize)> {
        let attempt = self.attempts.get_mut(id)?;
        attempt.done = true;
        let endpoint = attempt.endpoint;
        if self.hedge_at.is_some_and(|(_, owner)| owner == id) {
            self.hedge_at = None;
        }
        match report {
            Report::Answer(answer) => Some((answer, endpoint)),
            Report::Failed { failure, stop } => {
                self.failures.push(failure);
                self.stopped |= stop;
                self.launch();
                None
            }
        }
    }

    /// The hedge delay of the newest attempt passed without an answer: ask the next endpoint as
    /// well, and let the slow attempt finish on its own should another win.
    pub(super) fn hedge(&mut self) {
        let Some((_, owner)) = self.hedge_at.take() else {
            return;
        };
        if self.launch()
            && let Some(slow) = self.attempts.get_mut(owner)
        {
            slow.slow = true;
            if let Some(e) = self.upstreams.endpoints.get(slow.endpoint) {
                tracing::debug!(
                    endpoint = %e.name,
                    "no answer within the hedge delay: asked the next endpoint too"
                );
            }
        }
    }
}

impl Drop for Race<'_> {
    fn drop(&mut self) {
        for a in self.attempts.iter().filter(|a| !a.done && !a.slow) {
            a.abort.abort();
        }
    }
}

/// Counts an attempt cancelled before it finished (its task aborted) as `cancelled`.
struct CancelGuard<'a> {
    endpoint: &'a Endpoint,
    finished: bool,
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.endpoint.series.count(Outcome::Cancelled, None);
        }
    }
}

/// One attempt, on its own task: waits for an in-flight slot, sends, reads and validates the
/// answer, gives the breaker its verdict, counts, and reports to the lookup (which may be gone).
async fn attempt(
    endpoint: Arc<Endpoint>,
    permit: Permit,
    job: Arc<Job>,
    tx: mpsc::UnboundedSender<(usize, Report)>,
    id: usize,
) {
    let mut guard = CancelGuard {
        endpoint: &endpoint,
        finished: false,
    };
    let report = run_attempt(&endpoint, permit, &job).await;
    guard.finished = true;
    drop(guard);
    let _ = tx.send((id, report));
}

async fn run_attempt(endpoint: &Endpoint, permit: Permit, job: &Job) -> Report {
    let budget_until = job.budget.map(|b| b.until);
    let caller_set = job.budget.is_some_and(|b| b.set_by_caller);
    // The earlier of `start + timeout` and the budget; whether the budget is what cut it short.
    let bound = |start: Instant| {
        let own = start + job.timeout;
        match budget_until {
            Some(until) if until < own => (until, caller_set),
            _ => (own, false),
        }
    };

    // 1. An in-flight slot, waited for within the same bounds. Running out of time here says
    //    nothing about the endpoint's health: no verdict.
    let (wait_until, _) = bound(Instant::now());
    let waited = Instant::now();
    let slot = match tokio::time::timeout_at(wait_until, endpoint.in_flight.acquire()).await {
        Ok(Ok(slot)) => slot,
        _ => {
            drop(permit);
            endpoint.series.count(Outcome::Saturated, None);
            return Report::Failed {
                failure: endpoint.failure(format!(
                    "saturated: {} requests in flight (upstream_max_in_flight) for {} ms",
                    endpoint.max_in_flight,
                    waited.elapsed().as_millis()
                )),
                stop: false,
            };
        }
    };

    // 2. The request itself.
    let started = Instant::now();
    let (until, caller_bound) = bound(started);
    let outcome = tokio::time::timeout_at(until, send(endpoint, job)).await;
    let latency = started.elapsed();
    drop(slot);
    match outcome {
        Ok(Ok(answer)) => {
            endpoint.series.count(Outcome::Success, Some(latency));
            endpoint.record(Some(latency), None);
            endpoint
                .latencies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record(latency);
            permit.success();
            Report::Answer(answer)
        }
        Ok(Err((outcome, reason))) => {
            endpoint.series.count(outcome, Some(latency));
            endpoint.record(Some(latency), Some(&reason));
            permit.failure();
            tracing::warn!(endpoint = %endpoint.name, %reason, "upstream failed");
            Report::Failed {
                failure: endpoint.failure(reason),
                stop: false,
            }
        }
        Err(_) if caller_bound => {
            // The caller's deadline, not the endpoint, ran out: no verdict on the endpoint.
            endpoint.series.count(Outcome::Deadline, Some(latency));
            drop(permit);
            Report::Failed {
                failure: endpoint.failure(format!(
                    "caller's deadline reached after {} ms",
                    latency.as_millis()
                )),
                stop: true,
            }
        }
        Err(_) => {
            endpoint.series.count(Outcome::Timeout, Some(latency));
            let reason = format!("timed out after {} s", (until - started).as_secs_f32());
            endpoint.record(Some(latency), Some(&reason));
            permit.failure();
            tracing::warn!(endpoint = %endpoint.name, %reason, "upstream failed");
            Report::Failed {
                failure: endpoint.failure(reason),
                stop: false,
            }
        }
    }
}

/// Sends the request and reads the answer, at most [`MAX_ANSWER_BYTES`] of it.
async fn send(endpoint: &Endpoint, job: &Job) -> Result<Answer, (Outcome, String)> {
    let mut response = endpoint
        .client
        .post(endpoint.request_url.clone())
        .headers(job.headers.clone())
        .body(job.body.clone())
        .send()
        .await
        .map_err(|e| (Outcome::Error, describe_reqwest_error(&e)))?;
    let status = response.status();
    if status.is_redirection() {
        // The Location is not shown: it may carry credentials.
        return Err((
            Outcome::Redirect,
            format!("HTTP {status}: redirect (not followed)"),
        ));
    }
    if !status.is_success() {
        return Err((Outcome::Error, format!("HTTP {status}")));
    }
    let invalid = |e: String| (Outcome::InvalidAnswer, format!("invalid answer: {e}"));
    let mut body = answer::LimitedBody::new(response.content_length()).map_err(invalid)?;
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| (Outcome::Error, describe_reqwest_error(&e)))?
    {
        body.push(&chunk).map_err(invalid)?;
    }
    parse_answer(&body.into_bytes(), job.default_ttl).map_err(invalid)
}
