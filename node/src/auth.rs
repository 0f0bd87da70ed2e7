//! Who may call what on the gRPC port.
//!
//! A call's principal is the node or role named in its TLS client certificate (see
//! [`crate::tls::CertIdentity`]) or the role of the bearer token in its `authorization` header.
//! Each method needs one of: nothing (the health check), a role (`read` < `write` < `admin`), or
//! a node certificate (the peer services). The decision ([`decide`]) is a pure function of the
//! method, the principal and the configuration; [`AuthLayer`] is the thin shell that applies it to
//! every call before the service sees it, and counts the outcomes.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use prometheus::IntCounterVec;
use tonic::codegen::http;

/// A client role. Each includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Read,
    Write,
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "read" => Some(Role::Read),
            "write" => Some(Role::Write),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a verified client certificate says about its holder (read by [`crate::tls`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertIdentity {
    /// A node of the cluster.
    Node(String),
    /// A client with a role; `subject` is the certificate's subject, for logs and errors.
    Role { subject: String, role: Role },
    /// Neither (a certificate from the CA for some other purpose).
    Other(String),
}

/// What the server side knows about a connection; tonic puts it in each request's extensions.
#[derive(Debug, Clone, Default)]
pub struct ConnInfo {
    /// The verified client certificate's identity, if the client presented one.
    pub cert: Option<Arc<CertIdentity>>,
}

/// What a method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Anyone (the gRPC health check, `Check`: probes and load balancers carry no credentials).
    Nothing,
    /// A client with at least this role (or a node).
    Role(Role),
    /// A node of the cluster (replica streams, handoff pulls, gossip).
    Node,
}

/// What a gRPC method (`/package.Service/Method`) needs. Unknown methods need `admin`, so a
/// method added without an entry here is closed rather than open.
pub fn need(path: &str) -> Need {
    let service = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .map_or("", |(service, _)| service);
    match (service, path.rsplit('/').next().unwrap_or("")) {
        // Check only: Watch streams stay open, and anonymous ones would have no bound.
        ("grpc.health.v1.Health", "Check") => Need::Nothing,
        ("grpc.health.v1.Health", _) => Need::Role(Role::Read),
        ("dynakv.v1.KV", "Get" | "Ring") => Need::Role(Role::Read),
        ("dynakv.v1.KV", "Put" | "Delete") => Need::Role(Role::Write),
        ("grpc.reflection.v1.ServerReflection", _)
        | ("grpc.reflection.v1alpha.ServerReflection", _) => Need::Role(Role::Read),
        ("dynakv.v1.Replica" | "dynakv.v1.Gossip", _) => Need::Node,
        _ => Need::Role(Role::Admin),
    }
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A certificate naming a node of the cluster: may call everything (nodes forward client
    /// requests to each other).
    Node(String),
    /// A client certificate or token with a role; `name` is the token's name or the
    /// certificate's subject, for logs and errors.
    Client { name: String, role: Role },
    /// A certificate from the cluster's CA that names neither a node nor a role.
    NoRole(String),
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No credentials, or a token nobody issued.
    Unauthenticated(String),
    /// Credentials that do not allow this method.
    Denied(String),
}

impl Refusal {
    pub fn status(&self) -> tonic::Status {
        match self {
            Refusal::Unauthenticated(m) => tonic::Status::unauthenticated(m.clone()),
            Refusal::Denied(m) => tonic::Status::permission_denied(m.clone()),
        }
    }

    fn outcome(&self) -> &'static str {
        match self {
            Refusal::Unauthenticated(_) => "unauthenticated",
            Refusal::Denied(_) => "permission_denied",
        }
    }
}

/// The bearer tokens a node accepts, by SHA-256 digest.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    by_digest: HashMap<[u8; 32], (String, Role)>,
}

impl Tokens {
    /// From `(name, role, sha256 hex)` entries (entries that do not parse are skipped; config
    /// validation refuses them first).
    pub fn new<'a>(entries: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>) -> Tokens {
        let by_digest = entries
            .into_iter()
            .filter_map(|(name, role, sha256)| {
                Some((
                    parse_digest(sha256)?,
                    (name.to_string(), Role::parse(role)?),
                ))
            })
            .collect();
        Tokens { by_digest }
    }

    fn lookup(&self, token: &str) -> Option<&(String, Role)> {
        self.by_digest.get(&digest(token))
    }
}

/// SHA-256 of a token.
pub fn digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Lower-case hex of a digest.
pub fn digest_hex(token: &str) -> String {
    digest(token).iter().map(|b| format!("{b:02x}")).collect()
}

/// 64 hex digits to a digest.
pub fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The principal of a call from its certificate identity and `authorization` header. A token
/// that is presented but unknown, or a header that is not `Bearer <token>`, is an error even
/// when a certificate is present: a client that sends a wrong token should hear about it.
pub fn principal(
    cert: Option<&CertIdentity>,
    authorization: Option<&[u8]>,
    tokens: &Tokens,
) -> Result<Option<Principal>, Refusal> {
    if let Some(header) = authorization {
        let token = std::str::from_utf8(header)
            .ok()
            .and_then(|h| h.strip_prefix("Bearer ").map(str::trim))
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Refusal::Unauthenticated(
                    "the authorization header is not \"Bearer <token>\"".to_string(),
                )
            })?;
        let (name, role) = tokens.lookup(token).ok_or_else(|| {
            Refusal::Unauthenticated("the bearer token is not known to this node".to_string())
        })?;
        return Ok(Some(Principal::Client {
            name: name.clone(),
            role: *role,
        }));
    }
    Ok(cert.map(|c| match c {
        CertIdentity::Node(id) => Principal::Node(id.clone()),
        CertIdentity::Role { subject, role } => Principal::Client {
            name: subject.clone(),
            role: *role,
        },
        CertIdentity::Other(subject) => Principal::NoRole(subject.clone()),
    }))
}

/// Whether `who` may call `path`. With `required` unset every call is allowed (a node without
/// TLS, for trying DynaKV out).
pub fn decide(path: &str, who: Option<&Principal>, required: bool) -> Result<(), Refusal> {
    if !required {
        return Ok(());
    }
    let need = need(path);
    let method = path.trim_start_matches('/');
    match (need, who) {
        (Need::Nothing, _) | (_, Some(Principal::Node(_))) => Ok(()),
        (Need::Node, Some(p)) => Err(Refusal::Denied(format!(
            "{method} is for cluster nodes only; {} is not a node certificate",
            describe(p)
        ))),
        (Need::Role(needed), Some(Principal::Client { role, .. })) if *role >= needed => Ok(()),
        (Need::Role(needed), Some(p)) => Err(Refusal::Denied(format!(
            "{method} needs the {needed} role; {}",
            describe(p)
        ))),
        (Need::Node, None) => Err(Refusal::Unauthenticated(format!(
            "{method} needs a node certificate from the cluster's CA"
        ))),
        (Need::Role(needed), None) => Err(Refusal::Unauthenticated(format!(
            "{method} needs the {needed} role: present a client certificate from the cluster's \
             CA or a bearer token (authorization: Bearer <token>)"
        ))),
    }
}

fn describe(p: &Principal) -> String {
    match p {
        Principal::Node(id) => format!("node {id}"),
        Principal::Client { name, role } => format!("{name:?} has the {role} role"),
        Principal::NoRole(subject) => {
            format!("the certificate {subject:?} names no role (urn:dynakv:role:<role>)")
        }
    }
}

/// What [`AuthLayer`] needs.
#[derive(Clone)]
pub struct AuthSettings {
    pub required: bool,
    pub tokens: Arc<Tokens>,
    /// `dynakv_auth_requests_total` by outcome.
    pub outcomes: IntCounterVec,
}

/// A tower layer that refuses calls [`decide`] does not allow, before any service sees them.
#[derive(Clone)]
pub struct AuthLayer {
    settings: AuthSettings,
}

impl AuthLayer {
    pub fn new(settings: AuthSettings) -> AuthLayer {
        AuthLayer { settings }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            settings: self.settings.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    settings: AuthSettings,
}

impl<S, B> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        futures::future::Either<futures::future::Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if !self.settings.required || need(request.uri().path()) == Need::Nothing {
            return futures::future::Either::Right(self.inner.call(request));
        }
        let cert = request
            .extensions()
            .get::<ConnInfo>()
            .and_then(|c| c.cert.as_deref());
        let decision = principal(
            cert,
            request
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(|h| h.as_bytes()),
            &self.settings.tokens,
        )
        .and_then(|who| decide(request.uri().path(), who.as_ref(), true));
        match decision {
            Ok(()) => {
                self.settings.outcomes.with_label_values(&["ok"]).inc();
                futures::future::Either::Right(self.inner.call(request))
            }
            Err(refusal) => {
                self.settings
                    .outcomes
                    .with_label_values(&[refusal.outcome()])
                    .inc();
                tracing::debug!(path = request.uri().path(), ?refusal, "call refused");
                futures::future::Either::Left(futures::future::ready(Ok(refusal
                    .status()
                    .into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(role: Role) -> Principal {
        Principal::Client {
            name: "app".into(),
            role,
        }
    }

    #[test]
    fn each_method_needs_what_the_docs_say() {
        let table = [
            ("/grpc.health.v1.Health/Check", Need::Nothing),
            ("/grpc.health.v1.Health/Watch", Need::Role(Role::Read)),
            ("/dynakv.v1.KV/Get", Need::Role(Role::Read)),
            ("/dynakv.v1.KV/Ring", Need::Role(Role::Read)),
            ("/dynakv.v1.KV/Put", Need::Role(Role::Write)),
            ("/dynakv.v1.KV/Delete", Need::Role(Role::Write)),
            ("/dynakv.v1.Admin/ClusterStatus", Need::Role(Role::Admin)),
            ("/dynakv.v1.Admin/SetWeight", Need::Role(Role::Admin)),
            ("/dynakv.v1.Replica/Exchange", Need::Node),
            ("/dynakv.v1.Replica/Pull", Need::Node),
            ("/dynakv.v1.Gossip/Deliver", Need::Node),
            (
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                Need::Role(Role::Read),
            ),
            ("/dynakv.v1.KV/SomethingNew", Need::Role(Role::Admin)),
            ("/unknown.Service/X", Need::Role(Role::Admin)),
            ("garbage", Need::Role(Role::Admin)),
            ("", Need::Role(Role::Admin)),
        ];
        for (path, expected) in table {
            assert_eq!(need(path), expected, "{path}");
        }
    }

    #[test]
    fn roles_include_the_lower_ones() {
        let put = "/dynakv.v1.KV/Put";
        let get = "/dynakv.v1.KV/Get";
        let admin = "/dynakv.v1.Admin/Leave";
        assert!(decide(get, Some(&client(Role::Read)), true).is_ok());
        assert!(matches!(
            decide(put, Some(&client(Role::Read)), true),
            Err(Refusal::Denied(m)) if m.contains("needs the write role") && m.contains("read role")
        ));
        assert!(decide(put, Some(&client(Role::Write)), true).is_ok());
        assert!(matches!(
            decide(admin, Some(&client(Role::Write)), true),
            Err(Refusal::Denied(_))
        ));
        assert!(decide(admin, Some(&client(Role::Admin)), true).is_ok());
        // A node may call everything; a client may never call the peer services.
        let node = Principal::Node("n1".into());
        for path in [put, get, admin, "/dynakv.v1.Replica/Exchange"] {
            assert!(decide(path, Some(&node), true).is_ok(), "{path}");
        }
        assert!(matches!(
            decide("/dynakv.v1.Replica/Exchange", Some(&client(Role::Admin)), true),
            Err(Refusal::Denied(m)) if m.contains("cluster nodes only")
        ));
        assert!(matches!(
            decide(get, Some(&Principal::NoRole("CN=x".into())), true),
            Err(Refusal::Denied(m)) if m.contains("names no role")
        ));
    }

    #[test]
    fn no_credentials_is_unauthenticated_except_for_health() {
        assert!(decide("/grpc.health.v1.Health/Check", None, true).is_ok());
        for path in ["/dynakv.v1.KV/Get", "/dynakv.v1.Replica/Pull"] {
            assert!(matches!(
                decide(path, None, true),
                Err(Refusal::Unauthenticated(_))
            ));
        }
        // Not required: open (a node without TLS).
        assert!(decide("/dynakv.v1.Replica/Pull", None, false).is_ok());
    }

    #[test]
    fn tokens_are_matched_by_digest() {
        let tokens = Tokens::new([("app", "write", digest_hex("s3cret").as_str())]);
        assert_eq!(
            principal(None, Some(b"Bearer s3cret"), &tokens),
            Ok(Some(client(Role::Write)))
        );
        assert!(matches!(
            principal(None, Some(b"Bearer other"), &tokens),
            Err(Refusal::Unauthenticated(m)) if m.contains("not known")
        ));
        assert!(matches!(
            principal(None, Some(b"Basic abc"), &tokens),
            Err(Refusal::Unauthenticated(_))
        ));
        assert!(matches!(
            principal(None, Some(b"Bearer "), &tokens),
            Err(Refusal::Unauthenticated(_))
        ));
        assert!(matches!(
            principal(None, Some(&[0xff, 0xfe]), &tokens),
            Err(Refusal::Unauthenticated(_))
        ));
        // A wrong token is refused even beside a valid certificate.
        let cert = CertIdentity::Node("n1".into());
        assert!(principal(Some(&cert), Some(b"Bearer other"), &tokens).is_err());
        assert_eq!(
            principal(Some(&cert), None, &tokens),
            Ok(Some(Principal::Node("n1".into())))
        );
        assert_eq!(principal(None, None, &tokens), Ok(None));
    }

    #[test]
    fn digests_parse_only_as_64_hex_digits() {
        let hex = digest_hex("x");
        assert_eq!(parse_digest(&hex), Some(digest("x")));
        assert_eq!(parse_digest(&hex.to_uppercase()), Some(digest("x")));
        assert_eq!(parse_digest(&hex[..63]), None);
        assert_eq!(parse_digest(&format!("{}g", &hex[..63])), None);
        assert_eq!(parse_digest("é".repeat(32).as_str()), None);
    }
}
