//! The certificates and the token the operator makes for a cluster that names no certificate
//! source of its own: a CA (kept in `<name>-ca`, never mounted into a pod), one node
//! certificate shared by every pod (`urn:dynakv:node:*`, every pod's DNS name), and the first
//! admin's bearer token.
//!
//! A shell: keys and tokens come from the operating system's random source. What to do with
//! them (when to issue, when to renew) is decided by the pure functions at the end.

use k8s_openapi::jiff::{Timestamp, ToSpan, tz::TimeZone};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::resources::{NODE_URI_SAN, node_dns_names};

/// Days a node certificate is valid.
pub const NODE_CERT_DAYS: i64 = 365;
/// A node certificate is issued again when fewer days than this are left.
pub const RENEW_BEFORE_DAYS: i64 = 30;
/// Years the generated CA is valid.
pub const CA_YEARS: i16 = 10;

/// Making a certificate, key or token failed (the random source or the encoder); nothing was
/// written.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct PkiError {
    what: &'static str,
    message: String,
}

fn fail(what: &'static str) -> impl Fn(rcgen::Error) -> PkiError {
    move |e| PkiError {
        what,
        message: e.to_string(),
    }
}

/// A CA: its certificate and private key, PEM.
#[derive(Clone)]
pub struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A node certificate (PEM), its key, and when it stops being valid (unix seconds).
pub struct NodeCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: i64,
}

fn ca_params(cluster: &str, namespace: &str) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(fail("CA parameters"))?;
    let cn: String = format!("DynaKV CA {namespace}/{cluster}")
        .chars()
        .take(64)
        .collect();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name
        .push(DnType::OrganizationName, "dynakv-operator");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

fn ymd(t: Timestamp) -> (i16, u8, u8) {
    let d = t.to_zoned(TimeZone::UTC).date();
    (d.year(), d.month() as u8, d.day() as u8)
}

/// Midnight UTC of the day `t` falls in, as rcgen takes dates (a macro: rcgen does not export
/// the date type by name).
macro_rules! at {
    ($t:expr) => {{
        let (y, m, d) = ymd($t);
        rcgen::date_time_ymd(i32::from(y), m, d)
    }};
}

/// A new CA for the cluster, valid from yesterday for [`CA_YEARS`].
pub fn generate_ca(cluster: &str, namespace: &str, now: Timestamp) -> Result<Ca, PkiError> {
    let mut params = ca_params(cluster, namespace)?;
    params.not_before = at!(now - 24.hours());
    let (y, m, d) = ymd(now);
    params.not_after = rcgen::date_time_ymd(i32::from(y + CA_YEARS), m, d.min(28));
    let key = KeyPair::generate().map_err(fail("CA key"))?;
    let cert = params.self_signed(&key).map_err(fail("CA certificate"))?;
    Ok(Ca {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A node certificate for every pod of the cluster, signed by `ca`, valid from yesterday for
/// [`NODE_CERT_DAYS`].
pub fn issue_node_cert(
    ca: &Ca,
    cluster: &str,
    namespace: &str,
    now: Timestamp,
) -> Result<NodeCert, PkiError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(fail("CA key"))?;
    let spki = x509_parser::pem::parse_x509_pem(ca.cert_pem.as_bytes())
        .ok()
        .and_then(|(_, pem)| pem.parse_x509().ok().map(|c| c.public_key().raw.to_vec()));
    if spki.as_deref() != Some(rcgen::PublicKeyData::subject_public_key_info(&ca_key).as_slice()) {
        return Err(PkiError {
            what: "CA",
            message: "ca.key is not the key of the certificate in ca.crt".into(),
        });
    }
    // The issuer as the CA certificate names it, so that what is issued chains to that
    // certificate whoever made it.
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(fail("CA certificate"))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(fail("node"))?;
    // X.509 limits a common name to 64 characters; the DNS names are what is checked.
    let cn: String = format!("{cluster}.{namespace}").chars().take(64).collect();
    params.distinguished_name.push(DnType::CommonName, cn);
    let mut sans = Vec::new();
    for name in node_dns_names(cluster, namespace) {
        sans.push(SanType::DnsName(
            name.as_str().try_into().map_err(fail("node DNS name"))?,
        ));
    }
    sans.push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    sans.push(SanType::URI(
        NODE_URI_SAN.try_into().map_err(fail("node URI"))?,
    ));
    params.subject_alt_names = sans;
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let expires = now + (NODE_CERT_DAYS * 24).hours();
    params.not_before = at!(now - 24.hours());
    params.not_after = at!(expires);
    let key = KeyPair::generate().map_err(fail("node key"))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(fail("node certificate"))?;
    // rcgen's dates are whole days (midnight UTC): the certificate ends at the start of the
    // day `expires` falls in.
    let (y, m, d) = ymd(expires);
    let not_after = format!("{y:04}-{m:02}-{d:02}T00:00:00Z")
        .parse::<Timestamp>()
        .map(|t| t.as_second())
        .unwrap_or_else(|_| expires.as_second());
    Ok(NodeCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after,
    })
}

/// A new bearer token: `dkv_` and 32 random bytes, base64url (as `dynakv token` makes them).
pub fn new_token() -> Result<String, PkiError> {
    use base64::Engine;
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).map_err(|_| {
        PkiError {
            what: "token",
            message: "the system's random source failed".into(),
        }
    })?;
    Ok(format!(
        "dkv_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

/// SHA-256 of a token, hex: what the nodes keep (`auth.tokens[].sha256`).
pub fn token_sha256(token: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, token.trim().as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether a node certificate valid until `not_after` (unix seconds; `None`: unknown) is due
/// to be issued again at `now`.
pub fn needs_renewal(not_after: Option<i64>, now: Timestamp) -> bool {
    match not_after {
        None => true,
        Some(t) => t - now.as_second() < RENEW_BEFORE_DAYS * 24 * 3600,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        "2026-12-04T12:00:00Z".parse().unwrap()
    }

    #[test]
    fn renewal_starts_thirty_days_before_the_end() {
        let day = 24 * 3600;
        let t = now().as_second();
        assert!(needs_renewal(None, now()));
        assert!(needs_renewal(Some(t + 29 * day), now()));
        assert!(!needs_renewal(Some(t + 31 * day), now()));
        assert!(needs_renewal(Some(t - day), now()));
    }

    #[test]
    fn tokens_are_prefixed_distinct_and_hashed_like_the_nodes_do() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert!(a.starts_with("dkv_") && a.len() == 4 + 43, "{a}");
        assert_ne!(a, b);
        assert_eq!(token_sha256(&a), dynakv_node::auth::digest_hex(&a));
    }

    #[test]
    fn a_certificate_is_issued_by_the_ca_in_the_secret_whatever_its_name() {
        // A CA the user put in <name>-ca, named unlike the operator's.
        let mut other = generate_ca("elsewhere", "other", now()).unwrap();
        let mine = generate_ca("kv", "shop", now()).unwrap();
        other.key_pem = mine.key_pem.clone();
        assert!(
            issue_node_cert(&other, "kv", "shop", now()).is_err(),
            "a key that is not the CA's"
        );
        let node = issue_node_cert(&mine, "kv", "shop", now()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.crt"), &mine.cert_pem).unwrap();
        std::fs::write(dir.path().join("tls.crt"), &node.cert_pem).unwrap();
        std::fs::write(dir.path().join("tls.key"), &node.key_pem).unwrap();
        // A client trusting that CA with the node certificate as its identity: both load.
        dynakv_node::tls::client_config_from_files(
            &dir.path().join("ca.crt"),
            Some((&dir.path().join("tls.crt"), &dir.path().join("tls.key"))),
        )
        .unwrap();
    }

    #[test]
    fn the_node_certificate_is_a_node_identity_for_every_pod_name_and_chains_to_the_ca() {
        let ca = generate_ca("kv", "shop", now()).unwrap();
        let node = issue_node_cert(&ca, "kv", "shop", now()).unwrap();
        assert_eq!(
            node.not_after,
            "2027-12-04T00:00:00Z"
                .parse::<Timestamp>()
                .unwrap()
                .as_second()
        );
        // The node's own TLS code verifies the chain and reads the identity.
        let dir = tempfile::tempdir().unwrap();
        let files = [
            ("ca.crt", &ca.cert_pem),
            ("tls.crt", &node.cert_pem),
            ("tls.key", &node.key_pem),
        ];
        for (f, text) in files {
            std::fs::write(dir.path().join(f), text).unwrap();
        }
        let tls = dynakv_node::tls::NodeTls::load(&dynakv_node::config::TlsConfig {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
            ca: dir.path().join("ca.crt"),
            reload_interval_ms: 1000,
        })
        .unwrap();
        drop(tls);
        use rustls_pki_types::pem::PemObject;
        let der =
            rustls_pki_types::CertificateDer::from_pem_slice(node.cert_pem.as_bytes()).unwrap();
        assert_eq!(
            dynakv_node::tls::identity_of(&der),
            dynakv_node::auth::CertIdentity::Node("*".into())
        );
        let text = String::from_utf8_lossy(&der).to_string();
        for name in ["kv-peers.shop.svc", "kv.shop.svc", "localhost"] {
            assert!(text.contains(name), "{name} is among the names");
        }
    }
}
