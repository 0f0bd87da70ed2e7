//! The client side of the CLI: connects to the first reachable endpoint and runs one request.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use tonic::transport::{Channel, Endpoint};

use crate::config::QuorumSetting;
use crate::proto::{self, ConsistencyLevel, quorum};

use super::ClientArgs;

/// A failed client command, with the exit code it maps to.
#[derive(Debug)]
pub struct ClientError {
    pub code: tonic::Code,
    pub message: String,
}

impl ClientError {
    pub fn exit_code(&self) -> u8 {
        exit_code(self.code)
    }

    pub fn invalid(message: impl Into<String>) -> ClientError {
        ClientError {
            code: tonic::Code::InvalidArgument,
            message: message.into(),
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

/// Exit codes of client commands (documented in `dynakv --help`).
pub fn exit_code(code: tonic::Code) -> u8 {
    match code {
        tonic::Code::Ok => 0,
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => 3,
        tonic::Code::Unavailable => 4,
        tonic::Code::DeadlineExceeded => 5,
        tonic::Code::ResourceExhausted => 6,
        _ => 1,
    }
}

/// Name of a gRPC code as it appears in the gRPC spec (`UNAVAILABLE`).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Default bound on a whole client request when `--timeout-ms` is not given: the node's default
/// deadline (5 s) plus room for the answer.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to the first endpoint of the comma-separated list that answers a health check
/// within a second (a paused or wedged node accepts TCP connections but never answers). Every
/// request on the channel is bounded by `request_timeout`.
pub async fn connect(endpoints: &str) -> Result<(Channel, String), ClientError> {
    connect_with_timeout(endpoints, DEFAULT_REQUEST_TIMEOUT).await
}

pub async fn connect_with_timeout(
    endpoints: &str,
    request_timeout: Duration,
) -> Result<(Channel, String), ClientError> {
    let mut errors = Vec::new();
    for ep in endpoints
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        let uri = if ep.contains("://") {
            ep.to_string()
        } else {
            format!("http://{ep}")
        };
        let endpoint = match Endpoint::from_shared(uri) {
            Ok(e) => e,
            Err(e) => {
                errors.push(format!("{ep}: {e}"));
                continue;
            }
        };
        let endpoint = endpoint
            .connect_timeout(Duration::from_secs(1))
            .timeout(request_timeout)
            .tcp_nodelay(true);
        let ch = match endpoint.connect().await {
            Ok(ch) => ch,
            Err(e) => {
                errors.push(format!("{ep}: {}", source_chain(&e)));
                continue;
            }
        };
        let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
        let check = health.check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        });
        match tokio::time::timeout(Duration::from_secs(1), check).await {
            Ok(Ok(_)) => return Ok((ch, ep.to_string())),
            Ok(Err(s)) => errors.push(format!("{ep}: {}", s.message())),
            Err(_) => errors.push(format!("{ep}: no answer within 1 s")),
        }
    }
    Err(ClientError {
        code: tonic::Code::Unavailable,
        message: format!("no node reachable ({})", errors.join("; ")),
    })
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

pub fn quorum_proto(q: Option<QuorumSetting>) -> Option<proto::Quorum> {
    q.map(|q| proto::Quorum {
        value: Some(match q {
            QuorumSetting::One => quorum::Value::Level(ConsistencyLevel::One as i32),
            QuorumSetting::Quorum => quorum::Value::Level(ConsistencyLevel::Quorum as i32),
            QuorumSetting::All => quorum::Value::Level(ConsistencyLevel::All as i32),
            QuorumSetting::Count(c) => quorum::Value::Count(c),
        }),
    })
}

pub fn consistency(
    args: &ClientArgs,
    r: Option<QuorumSetting>,
    w: Option<QuorumSetting>,
) -> proto::Consistency {
    proto::Consistency {
        r: quorum_proto(r),
        w: quorum_proto(w),
        sloppy: if args.strict { Some(false) } else { None },
        timeout_ms: args.timeout_ms.unwrap_or(0),
    }
}

pub fn decode_context(text: &str) -> Result<bytes::Bytes, ClientError> {
    B64.decode(text.trim())
        .map(bytes::Bytes::from)
        .map_err(|e| ClientError::invalid(format!("--context is not base64: {e}")))
}
