//! gRPC glue for `proxybroker.v1.ProxyBroker`: validate, call the [`Broker`], map errors.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::broker::Broker;
use crate::pb;
use crate::pb::proxy_broker_server::ProxyBroker;
use crate::request::{Feedback, Lookup};

/// The feed-facing service.
#[derive(Debug, Clone)]
pub struct BrokerService {
    broker: Arc<Broker>,
}

impl BrokerService {
    /// Serves `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }
}

#[tonic::async_trait]
impl ProxyBroker for BrokerService {
    async fn request_proxy(
        &self,
        request: Request<pb::ProxyRequest>,
    ) -> Result<Response<pb::ProxyResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::info_span!(
            "RequestProxy",
            exchange = %req.exchange_id,
            connection_type = req.connection_type,
            region = req.region.as_deref().unwrap_or(""),
            source = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        async move {
            let result = async {
                let lookup = Lookup::try_from(req)?;
                self.broker.request_proxy(&lookup).await
            }
            .await;
            let span = tracing::Span::current();
            match &result {
                Ok(answer) => {
                    span.record("source", answer.source().as_str_name());
                    span.record("outcome", "ok");
                }
                Err(e) => {
                    span.record("outcome", tracing::field::display(e));
                }
            }
            tracing::debug!("answered");
            result.map(Response::new).map_err(Status::from)
        }
        .instrument(span)
        .await
    }

    async fn report_feedback(
        &self,
        request: Request<pb::ProxyFeedback>,
    ) -> Result<Response<pb::ReportFeedbackResponse>, Status> {
        let feedback = Feedback::try_from(request.into_inner())?;
        tracing::debug!(
            exchange = %feedback.exchange_id,
            connection_type = %feedback.connection_type,
            success = feedback.success,
            "feedback"
        );
        self.broker.report_feedback(&feedback);
        Ok(Response::new(pb::ReportFeedbackResponse { accepted: true }))
    }
}
