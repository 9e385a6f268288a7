//! gRPC glue for `proxybroker.v1.ProxyBrokerAdmin`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::broker::Broker;
use crate::error::Error;
use crate::pb;
use crate::pb::proxy_broker_admin_server::ProxyBrokerAdmin;

/// The operator-facing service.
#[derive(Debug, Clone)]
pub struct AdminService {
    broker: Arc<Broker>,
}

impl AdminService {
    /// Serves `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }
}

const NOT_YET: &str =
    "arrives with upstream delegation (issue 3): this build resolves from the embedded configuration only";

#[tonic::async_trait]
impl ProxyBrokerAdmin for AdminService {
    async fn list_upstreams(
        &self,
        _request: Request<pb::ListUpstreamsRequest>,
    ) -> Result<Response<pb::ListUpstreamsResponse>, Status> {
        Err(Error::Unimplemented(NOT_YET).into())
    }

    async fn list_cache(
        &self,
        _request: Request<pb::ListCacheRequest>,
    ) -> Result<Response<pb::ListCacheResponse>, Status> {
        Err(Error::Unimplemented(NOT_YET).into())
    }

    async fn invalidate_cache(
        &self,
        _request: Request<pb::InvalidateCacheRequest>,
    ) -> Result<Response<pb::InvalidateCacheResponse>, Status> {
        Err(Error::Unimplemented(NOT_YET).into())
    }

    async fn get_effective_config(
        &self,
        _request: Request<pb::GetEffectiveConfigRequest>,
    ) -> Result<Response<pb::GetEffectiveConfigResponse>, Status> {
        Ok(Response::new(pb::GetEffectiveConfigResponse {
            config_json: self.broker.config().redacted_json(),
        }))
    }
}
