//! The broker's errors and the one table that maps them to gRPC status codes.

use tonic::Status;
use tonic_types::{ErrorDetails, StatusExt};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request broke a rule; `field` is the request field at fault.
    #[error("{field}: {rule}")]
    InvalidArgument {
        /// The offending field, e.g. `exchange_id`.
        field: &'static str,
        /// What is wrong with it.
        rule: String,
    },
    /// Every upstream failed and falling back was not allowed.
    #[error("{0}")]
    Unavailable(String),
    /// The broker is at a limit of its own; the caller may retry after `retry_after`.
    #[error("{message}")]
    ResourceExhausted {
        /// Which limit, and what to do.
        message: String,
        /// When a retry may succeed (sent as `google.rpc.RetryInfo`).
        retry_after: std::time::Duration,
    },
}

impl Error {
    /// The gRPC status for this error.
    pub fn into_status(self) -> Status {
        Status::from(self)
    }

    /// A request-validation error.
    pub fn invalid(field: &'static str, rule: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field,
            rule: rule.into(),
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match error {
            Error::InvalidArgument { .. } => Status::invalid_argument(message),
            Error::Unavailable(_) => Status::unavailable(message),
            Error::ResourceExhausted { retry_after, .. } => Status::with_error_details(
                tonic::Code::ResourceExhausted,
                message,
                ErrorDetails::with_retry_info(Some(retry_after)),
            ),
        }
    }
}
