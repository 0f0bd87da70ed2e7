//! TLS on the gRPC port (rustls, ring provider): the server side that wraps accepted connections,
//! the client side that wraps dialled ones, certificate files re-read on change, the identity a
//! client certificate names, and the throwaway CA of `dynakv dev`.
//!
//! One CA signs every certificate of a cluster. A node certificate names its node with the URI SAN
//! `urn:dynakv:node:<id>` and is used both to serve and, as a client certificate, to call peers;
//! a client certificate names a role with `urn:dynakv:role:<read|write|admin>`. Client
//! certificates are optional at the TLS layer (clients may use bearer tokens instead); what each
//! call needs is decided in [`crate::auth`].

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::auth::Role;
pub use crate::auth::{CertIdentity, ConnInfo};
use crate::config::TlsConfig;

/// URI SAN prefix of a node certificate.
pub const NODE_URI_PREFIX: &str = "urn:dynakv:node:";
/// URI SAN prefix of a client certificate's role.
pub const ROLE_URI_PREFIX: &str = "urn:dynakv:role:";

/// The identity in a DER certificate (already verified against the CA by rustls). A node URI
/// wins over a role URI.
pub fn identity_of(der: &[u8]) -> CertIdentity {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return CertIdentity::Other("an unparsable certificate".into());
    };
    let subject = cert.subject().to_string();
    let mut role = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                if let Some(id) = uri.strip_prefix(NODE_URI_PREFIX)
                    && !id.is_empty()
                {
                    return CertIdentity::Node(id.to_string());
                }
                if let Some(r) = uri.strip_prefix(ROLE_URI_PREFIX).and_then(Role::parse) {
                    role = role.max(Some(r));
                }
            }
        }
    }
    match role {
        Some(role) => CertIdentity::Role { subject, role },
        None => CertIdentity::Other(subject),
    }
}

/// Why TLS material did not load.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

fn read(path: &Path, what: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path)
        .map_err(|e| TlsError(format!("cannot read the {what} {}: {e}", path.display())))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{}: no certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

fn key(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| TlsError(format!("{}: no private key in it ({e})", path.display())))
}

fn roots(pem: &[u8], path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certs(pem, path)? {
        store
            .add(cert)
            .map_err(|e| TlsError(format!("{}: {e}", path.display())))?;
    }
    Ok(Arc::new(store))
}

/// A server config: this chain and key, client certificates optional but verified against
/// `roots` when presented, HTTP/2 only.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError(format!("client certificate verifier: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError(format!("the certificate and key do not go together: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A client config trusting `roots`, presenting `identity` (chain and key) when given.
pub fn client_config(
    roots: Arc<RootCertStore>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError(format!("the client certificate and key: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A client config from files: the CA to trust and, optionally, a client certificate and key.
pub fn client_config_from_files(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = roots(&read(ca, "CA file")?, ca)?;
    let identity = match identity {
        Some((cert, key_path)) => Some((
            certs(&read(cert, "certificate")?, cert)?,
            key(&read(key_path, "private key")?, key_path)?,
        )),
        None => None,
    };
    client_config(roots, identity)
}

/// A node's TLS material, re-read from its files on [`NodeTls::reload_if_changed`].
pub struct NodeTls {
    files: TlsConfig,
    loaded: Mutex<Vec<u8>>,
    server: RwLock<Arc<ServerConfig>>,
    client: RwLock<Arc<ClientConfig>>,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls")
            .field("files", &self.files)
            .finish()
    }
}

type Configs = (Arc<ServerConfig>, Arc<ClientConfig>);

impl NodeTls {
    /// Loads the files; an error names the file and what is wrong with it.
    pub fn load(files: &TlsConfig) -> Result<Arc<NodeTls>, TlsError> {
        let (bytes, (server, client)) = Self::read_files(files)?;
        Ok(Arc::new(NodeTls {
            files: files.clone(),
            loaded: Mutex::new(bytes),
            server: RwLock::new(server),
            client: RwLock::new(client),
        }))
    }

    fn read_files(files: &TlsConfig) -> Result<(Vec<u8>, Configs), TlsError> {
        let cert_pem = read(&files.cert, "certificate")?;
        let key_pem = read(&files.key, "private key")?;
        let ca_pem = read(&files.ca, "CA file")?;
        let chain = certs(&cert_pem, &files.cert)?;
        let private = key(&key_pem, &files.key)?;
        let roots = roots(&ca_pem, &files.ca)?;
        let server = server_config(chain.clone(), private.clone_key(), roots.clone())?;
        let client = client_config(roots, Some((chain, private)))?;
        let mut all = cert_pem;
        all.extend_from_slice(&key_pem);
        all.extend_from_slice(&ca_pem);
        Ok((all, (server, client)))
    }

    /// Re-reads the files; when they changed and load, new connections use them. Returns
    /// whether they changed. On an error the previous material stays in use.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let (bytes, (server, client)) = Self::read_files(&self.files)?;
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        if *loaded == bytes {
            return Ok(false);
        }
        *self.server.write().unwrap_or_else(PoisonError::into_inner) = server;
        *self.client.write().unwrap_or_else(PoisonError::into_inner) = client;
        *loaded = bytes;
        Ok(true)
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Checks the files every `reload_interval_ms` until `stop` turns true.
    pub async fn watch(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let every = Duration::from_millis(self.files.reload_interval_ms.max(1));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let tls = self.clone();
            match tokio::task::spawn_blocking(move || tls.reload_if_changed()).await {
                Ok(Ok(true)) => tracing::info!(
                    cert = %self.files.cert.display(),
                    "TLS certificate files changed: new connections use them"
                ),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::error!(
                    error = %e,
                    "TLS certificate files do not load; the previous ones stay in use"
                ),
                Err(e) => tracing::error!(error = %e, "TLS reload task failed"),
            }
        }
    }
}

/// The identity in the certificate the other side of a TLS connection presented, if any:
/// `peer_certificates()` of a served connection (the client's) or a dialled one (the server's).
pub fn presented_identity(
    certificates: Option<&[CertificateDer<'_>]>,
) -> Option<Arc<CertIdentity>> {
    certificates
        .and_then(|c| c.first())
        .map(|der| Arc::new(identity_of(der)))
}

/// The TLS server name for a `host` (a DNS name or an IP address).
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(host.to_string())
        .map_err(|e| TlsError(format!("{host:?} is not a valid TLS server name: {e}")))
}

/// Runs the client side of a handshake over `io` to `host`.
pub async fn connect<IO>(
    config: Arc<ClientConfig>,
    host: &str,
    io: IO,
) -> io::Result<tokio_rustls::client::TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let name = server_name(host).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, io)
        .await
}

/// PEM files written by [`write_dev_pki`].
#[derive(Debug, Clone)]
pub struct DevPki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    /// The admin client's certificate and key.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl DevPki {
    /// The paths [`write_dev_pki`] writes in `dir`.
    pub fn at(dir: &Path) -> DevPki {
        DevPki {
            dir: dir.to_path_buf(),
            ca: dir.join("ca.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        }
    }

    pub fn node_cert(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.pem"))
    }
    pub fn node_key(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}-key.pem"))
    }
}

/// Writes a throwaway CA, a certificate per node (for `localhost` and its IP) and an admin
/// client certificate into `dir`, unless a CA is there already (a restarted dev cluster keeps
/// its certificates; nodes missing theirs get new ones from the same CA).
pub fn write_dev_pki(dir: &Path, nodes: &[(String, IpAddr)]) -> Result<DevPki, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let fail = |what: &str, e: &dyn std::fmt::Display| TlsError(format!("{what}: {e}"));
    for id in nodes.iter().map(|(id, _)| id.as_str()) {
        if matches!(id, "ca" | "client") {
            return Err(TlsError(format!(
                "node id {id:?} is reserved: its files would be the CA's or the client's"
            )));
        }
    }
    // Private keys live here: the directory is the user's alone.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| fail(&dir.display().to_string(), &e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| fail(&dir.display().to_string(), &e))?;
    let pki = DevPki::at(dir);
    let ca_key_path = dir.join("ca-key.pem");
    let write = |path: &Path, text: &str| -> Result<(), TlsError> {
        use std::io::Write;
        let _ = std::fs::remove_file(path);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|e| fail(&path.display().to_string(), &e))
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(|e| fail("CA", &e))?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "DynaKV dev CA (throwaway)");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = match std::fs::read_to_string(&ca_key_path) {
        Ok(pem) if pki.ca.exists() => KeyPair::from_pem(&pem).map_err(|e| fail("CA key", &e))?,
        _ => {
            let key = KeyPair::generate().map_err(|e| fail("CA key", &e))?;
            let cert = ca_params.self_signed(&key).map_err(|e| fail("CA", &e))?;
            write(&ca_key_path, &key.serialize_pem())?;
            write(&pki.ca, &cert.pem())?;
            // A new CA invalidates every certificate it did not sign.
            for (id, _) in nodes {
                let _ = std::fs::remove_file(pki.node_cert(id));
            }
            let _ = std::fs::remove_file(&pki.client_cert);
            key
        }
    };
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |path: &Path, key_path: &Path, cn: &str, sans: Vec<SanType>| {
        if path.exists() && key_path.exists() {
            return Ok(());
        }
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| fail(cn, &e))?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().map_err(|e| fail(cn, &e))?;
        let cert = params.signed_by(&key, &issuer).map_err(|e| fail(cn, &e))?;
        write(key_path, &key.serialize_pem())?;
        write(path, &cert.pem())
    };
    let uri = |s: String| -> Result<SanType, TlsError> {
        Ok(SanType::URI(
            s.as_str().try_into().map_err(|e| fail(&s, &e))?,
        ))
    };
    for (id, ip) in nodes {
        let sans = vec![
            SanType::DnsName("localhost".try_into().map_err(|e| fail("localhost", &e))?),
            SanType::IpAddress(*ip),
            uri(format!("{NODE_URI_PREFIX}{id}"))?,
        ];
        leaf(&pki.node_cert(id), &pki.node_key(id), id, sans)?;
    }
    leaf(
        &pki.client_cert,
        &pki.client_key,
        "dev-admin",
        vec![uri(format!("{ROLE_URI_PREFIX}admin"))?],
    )?;
    Ok(pki)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_certificates_name_their_node_and_role() {
        let dir = tempfile::tempdir().unwrap();
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        let pki = write_dev_pki(dir.path(), &[("n1".into(), ip)]).unwrap();
        let der = |path: &Path| certs(&std::fs::read(path).unwrap(), path).unwrap()[0].clone();
        assert_eq!(
            identity_of(&der(&pki.node_cert("n1"))),
            CertIdentity::Node("n1".into())
        );
        assert!(matches!(
            identity_of(&der(&pki.client_cert)),
            CertIdentity::Role { role: Role::Admin, ref subject } if subject.contains("dev-admin")
        ));
        assert!(matches!(identity_of(&der(&pki.ca)), CertIdentity::Other(_)));
        assert!(matches!(
            identity_of(b"not a certificate"),
            CertIdentity::Other(_)
        ));
        // Written again: the same CA and certificates are kept.
        let ca = std::fs::read(&pki.ca).unwrap();
        let node = std::fs::read(pki.node_cert("n1")).unwrap();
        write_dev_pki(dir.path(), &[("n1".into(), ip)]).unwrap();
        assert_eq!(std::fs::read(&pki.ca).unwrap(), ca);
        assert_eq!(std::fs::read(pki.node_cert("n1")).unwrap(), node);
    }

    fn node_files(pki: &DevPki, id: &str) -> TlsConfig {
        TlsConfig {
            cert: pki.node_cert(id),
            key: pki.node_key(id),
            ca: pki.ca.clone(),
            reload_interval_ms: 1000,
        }
    }

    /// Serves one handshake on a duplex pipe and returns the identity the server saw, or the
    /// client's error.
    async fn handshake(
        server: &Arc<NodeTls>,
        client: Arc<ClientConfig>,
    ) -> Result<Option<CertIdentity>, String> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config());
        let (client, served) = tokio::join!(connect(client, "127.0.0.2", b), acceptor.accept(a));
        client.map_err(|e| e.to_string())?;
        let served = served.map_err(|e| format!("the server refused: {e}"))?;
        Ok(presented_identity(served.get_ref().1.peer_certificates()).map(|c| (*c).clone()))
    }

    #[tokio::test]
    async fn mutual_tls_identifies_nodes_and_refuses_other_cas() {
        let dir = tempfile::tempdir().unwrap();
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        let pki = write_dev_pki(&dir.path().join("a"), &[("n1".into(), ip)]).unwrap();
        let other = write_dev_pki(&dir.path().join("b"), &[("n1".into(), ip)]).unwrap();
        let server = NodeTls::load(&node_files(&pki, "n1")).unwrap();

        // A node presents its certificate as a client.
        let seen = handshake(&server, server.client_config()).await.unwrap();
        assert_eq!(seen, Some(CertIdentity::Node("n1".into())));
        // A client without a certificate is let through TLS (tokens decide later).
        let anonymous = client_config_from_files(&pki.ca, None).unwrap();
        assert_eq!(handshake(&server, anonymous).await.unwrap(), None);
        // A client of another CA does not trust the server.
        let stranger = client_config_from_files(&other.ca, None).unwrap();
        let e = handshake(&server, stranger).await.unwrap_err();
        assert!(
            e.contains("UnknownIssuer") || e.contains("invalid peer certificate"),
            "{e}"
        );
        // A client certificate from another CA is refused by the server.
        let impostor =
            client_config_from_files(&pki.ca, Some((&other.client_cert, &other.client_key)))
                .unwrap();
        assert!(handshake(&server, impostor).await.is_err());
    }

    #[tokio::test]
    async fn changed_files_are_picked_up_and_bad_ones_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        let pki = write_dev_pki(dir.path(), &[("n1".into(), ip)]).unwrap();
        let tls = NodeTls::load(&node_files(&pki, "n1")).unwrap();
        assert!(!tls.reload_if_changed().unwrap());
        // A broken key file: an error, and the old material stays.
        let key = std::fs::read(pki.node_key("n1")).unwrap();
        std::fs::write(pki.node_key("n1"), b"garbage").unwrap();
        assert!(tls.reload_if_changed().is_err());
        assert!(handshake(&tls, tls.client_config()).await.is_ok());
        // New certificate and key from the same CA: loaded.
        std::fs::write(pki.node_key("n1"), key).unwrap();
        std::fs::remove_file(pki.node_cert("n1")).unwrap();
        std::fs::remove_file(pki.node_key("n1")).unwrap();
        write_dev_pki(dir.path(), &[("n1".into(), ip)]).unwrap();
        assert!(tls.reload_if_changed().unwrap());
        assert!(handshake(&tls, tls.client_config()).await.is_ok());
    }
}
