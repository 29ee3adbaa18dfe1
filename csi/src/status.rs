//! The cluster API's answers as gRPC status codes.

use rvol_cluster::client::ClientError;
use tonic::Status;

pub fn from(e: ClientError) -> Status {
    match e {
        ClientError::Refused { status, message } => match status.as_u16() {
            400 => Status::invalid_argument(message),
            401 => Status::unauthenticated(message),
            403 => Status::permission_denied(message),
            404 => Status::not_found(message),
            409 => Status::failed_precondition(message),
            422 => Status::resource_exhausted(message),
            503 => Status::unavailable(message),
            504 => Status::deadline_exceeded(message),
            _ => Status::internal(format!("{message} ({status})")),
        },
        ClientError::Unreachable(m) => Status::unavailable(m),
        e @ ClientError::NotJson(_) => Status::internal(e.to_string()),
    }
}
