//! The client side of the CLI: connects to the first reachable endpoint and runs one request.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::config::QuorumSetting;
use crate::proto::{self, ConsistencyLevel, quorum};

use super::{ClientArgs, CredentialArgs};

/// The directory where a running `dynakv dev` cluster records, per node address, where its
/// throwaway CA and admin certificate are, so client commands on this machine find them: one
/// file per address, owned by this user (mode 0700 directory), holding the TLS directory's path.
pub fn dev_registry() -> std::path::PathBuf {
    // SAFETY: getuid(2) cannot fail and touches no memory.
    let uid = unsafe { libc::getuid() };
    std::env::temp_dir().join(format!("dynakv-dev-{uid}"))
}

/// The registry file of `host` (an address's host part: each dev node has an IP of its own).
fn registry_entry(host: &str) -> std::path::PathBuf {
    dev_registry().join(host.replace([':', '/', '[', ']'], "_"))
}

/// The host part of `host:port`.
fn host_of(address: &str) -> &str {
    address.rsplit_once(':').map_or(address, |(host, _)| host)
}

/// Whether the registry is a real directory of this user's that nobody else may write (a
/// directory someone else made in the shared temp dir must not point this user at their CA).
fn registry_is_ours(registry: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: getuid(2) cannot fail and touches no memory.
    let uid = unsafe { libc::getuid() };
    std::fs::symlink_metadata(registry)
        .is_ok_and(|m| m.is_dir() && m.uid() == uid && m.mode() & 0o077 == 0)
}

/// The TLS directory of the `dynakv dev` cluster whose CA issued the certificate of the node at
/// `address` (host:port) on this machine, if one was recorded and still holds a CA.
pub fn dev_tls_dir(address: &str) -> Option<std::path::PathBuf> {
    if !registry_is_ours(&dev_registry()) {
        return None;
    }
    let entry = registry_entry(host_of(address));
    let dir = std::path::PathBuf::from(std::fs::read_to_string(entry).ok()?.trim());
    dir.join("ca.pem").exists().then_some(dir)
}

/// Records (`Some`) or forgets (`None`) the TLS directory of the dev node at `address`
/// (host:port or host).
pub fn record_dev_tls_dir(address: &str, dir: Option<&Path>) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let registry = dev_registry();
    match std::fs::DirBuilder::new().mode(0o700).create(&registry) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    if !registry_is_ours(&registry) {
        return Err(std::io::Error::other(format!(
            "{} is not a directory of this user's that only this user may write",
            registry.display()
        )));
    }
    let entry = registry_entry(host_of(address));
    match dir {
        Some(dir) => std::fs::write(entry, dir.display().to_string()),
        None => match std::fs::remove_file(entry) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

/// A client connection: a channel whose calls carry the client's token, if any.
pub type Conn = InterceptedService<Channel, Credentials>;

/// How a client connects: TLS with a CA (and a client certificate) or plain text, and a bearer
/// token or none.
#[derive(Clone, Default)]
pub struct Credentials {
    tls: Option<Arc<rustls::ClientConfig>>,
    token: Option<MetadataValue<Ascii>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("tls", &self.tls.is_some())
            .field("token", &self.token.is_some())
            .finish()
    }
}

impl Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

impl Credentials {
    /// From the flags: `--ca`, `--cert`/`--key` and `--token`. Without `--ca` (and without
    /// `--plaintext`), the credentials of a `dynakv dev` cluster serving the first of `endpoints`
    /// on this machine, if there is one (see [`dev_tls_dir`]): its CA and, unless a token is
    /// given, its admin client certificate.
    pub fn from_args(args: &CredentialArgs, endpoints: &str) -> Result<Credentials, ClientError> {
        let dev = match &args.ca {
            None if !args.plaintext => endpoints
                .split(',')
                .map(str::trim)
                .find(|e| !e.is_empty())
                .and_then(|e| dev_tls_dir(e.rsplit("://").next().unwrap_or(e))),
            _ => None,
        };
        let ca = args
            .ca
            .clone()
            .or_else(|| dev.as_ref().map(|d| d.join("ca.pem")));
        let identity = match (&args.cert, &args.cert_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) if args.token.is_none() => dev
                .as_ref()
                .map(|d| (d.join("client.pem"), d.join("client-key.pem"))),
            (None, None) => None,
            _ => return Err(ClientError::invalid("--cert and --key go together")),
        };
        Self::from_files(
            ca.as_deref(),
            identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
            args.token.as_deref(),
        )
    }

    /// From a CA file (TLS), a client certificate and key, and a token; each optional, but a
    /// certificate needs a CA.
    pub fn from_files(
        ca: Option<&Path>,
        identity: Option<(&Path, &Path)>,
        token: Option<&str>,
    ) -> Result<Credentials, ClientError> {
        let tls = match ca {
            Some(ca) => Some(
                crate::tls::client_config_from_files(ca, identity)
                    .map_err(|e| ClientError::invalid(format!("TLS: {e}")))?,
            ),
            None if identity.is_some() => {
                return Err(ClientError::invalid(
                    "--cert needs --ca (the CA that signed the nodes' certificates)",
                ));
            }
            None => None,
        };
        if token.is_some() && tls.is_none() {
            return Err(ClientError::invalid(
                "--token needs TLS (--ca): nodes accept tokens only over TLS, and one sent in \
                 plain text can be read on the way",
            ));
        }
        let token = match token {
            Some(t) => Some(
                format!("Bearer {}", t.trim())
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| ClientError::invalid("--token: not a printable ASCII string"))?,
            ),
            None => None,
        };
        Ok(Credentials { tls, token })
    }

    /// An endpoint for `address` (`host:port`, `http://host:port` or, with a CA,
    /// `https://host:port`). TLS is this client's, not the scheme's: the connection is made by
    /// [`Credentials::connect`].
    pub fn endpoint(&self, address: &str) -> Result<Endpoint, String> {
        let rest = match address.split_once("://") {
            Some(("http", rest)) => rest,
            Some(("https", rest)) if self.tls.is_some() => rest,
            Some(("https", _)) => {
                return Err(format!(
                    "{address}: https needs --ca (the CA that signed the nodes' certificates)"
                ));
            }
            Some((scheme, _)) => return Err(format!("{address}: unknown scheme {scheme:?}")),
            None => address,
        };
        Endpoint::from_shared(format!("http://{rest}")).map_err(|e| format!("{address}: {e}"))
    }

    fn dialler(
        &self,
        connect_timeout: Duration,
    ) -> impl tower::Service<
        Uri,
        Response = hyper_util::rt::TokioIo<Box<dyn crate::net::Io>>,
        Error = crate::net::NotConnected,
        Future = impl Send,
    > + Clone
    + Send
    + 'static {
        let tls = self
            .tls
            .clone()
            .map(|c| -> crate::net::TlsSource { Arc::new(move || c.clone()) });
        tower::service_fn(move |uri: Uri| crate::net::dial(uri, None, connect_timeout, tls.clone()))
    }

    /// Connects now (TCP and, with a CA, the TLS handshake, within `connect_timeout`).
    pub async fn connect(
        &self,
        endpoint: Endpoint,
        connect_timeout: Duration,
    ) -> Result<Conn, tonic::transport::Error> {
        let channel = endpoint
            .connect_with_connector(self.dialler(connect_timeout))
            .await?;
        Ok(InterceptedService::new(channel, self.clone()))
    }

    /// Connects on first use.
    pub fn connect_lazy(&self, endpoint: Endpoint, connect_timeout: Duration) -> Conn {
        let channel = endpoint.connect_with_connector_lazy(self.dialler(connect_timeout));
        InterceptedService::new(channel, self.clone())
    }
}

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
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => 7,
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
/// [`connect`] to `args.endpoint` with `args.credentials`.
pub async fn connect_args(args: &ClientArgs) -> Result<(Conn, String), ClientError> {
    connect(
        &args.endpoint,
        &Credentials::from_args(&args.credentials, &args.endpoint)?,
    )
    .await
}

pub async fn connect(
    endpoints: &str,
    credentials: &Credentials,
) -> Result<(Conn, String), ClientError> {
    connect_with_timeout(endpoints, credentials, DEFAULT_REQUEST_TIMEOUT).await
}

pub async fn connect_with_timeout(
    endpoints: &str,
    credentials: &Credentials,
    request_timeout: Duration,
) -> Result<(Conn, String), ClientError> {
    let mut errors = Vec::new();
    for ep in endpoints
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        let endpoint = match credentials.endpoint(ep) {
            Ok(e) => e,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let endpoint = endpoint.timeout(request_timeout).tcp_nodelay(true);
        let ch = match credentials.connect(endpoint, Duration::from_secs(1)).await {
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
            Ok(Err(s)) if credentials.tls.is_none() && s.code() != tonic::Code::Unauthenticated => {
                errors.push(format!(
                    "{ep}: {} (if the node speaks TLS, pass --ca)",
                    s.message()
                ))
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_never_sent_without_tls() {
        let e = Credentials::from_files(None, None, Some("dkv_x")).unwrap_err();
        assert!(e.message.contains("--token needs TLS"), "{}", e.message);
        let e = Credentials::from_files(None, Some((Path::new("c"), Path::new("k"))), None)
            .unwrap_err();
        assert!(e.message.contains("--cert needs --ca"), "{}", e.message);
    }

    #[test]
    fn the_dev_registry_is_trusted_only_when_nobody_else_may_write_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let registry = dir.path().join("registry");
        std::fs::create_dir(&registry).unwrap();
        std::fs::set_permissions(&registry, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(registry_is_ours(&registry));
        std::fs::set_permissions(&registry, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(!registry_is_ours(&registry), "writable by others");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&registry, &link).unwrap();
        std::fs::set_permissions(&registry, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(!registry_is_ours(&link), "a symlink");
        assert!(!registry_is_ours(&dir.path().join("missing")));
    }
}
