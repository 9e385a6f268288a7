//! The broker's errors and the one table that maps them to gRPC status codes.

use tonic::Status;

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
}

impl Error {
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
        }
    }
}
