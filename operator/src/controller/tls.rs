//! The Secrets of a reconcile with TLS, which the nodes mount and the operator reads.
//!
//! - `<name>-admin-token`: the first admin's bearer token (key `token`), made once unless the
//!   user made it first. Its digest goes into the nodes' configuration.
//! - The node certificate Secret (`tls.crt`, `tls.key`, `ca.crt`):
//!   - `tls.secretName`: the user's; the operator only reads it.
//!   - `tls.certManager`: cert-manager issues it from the `Certificate` applied here.
//!   - neither: the operator's CA (`<name>-ca`, made here unless the user put one there)
//!     issues it as `<name>-tls`, and issues it again 30 days before it ends (the nodes re-read
//!     the files; nothing restarts). A `<name>-tls` this cluster does not own is never touched.
//!
//! The operator calls the nodes with the node certificate (a node may call everything): a
//! token changes for the nodes only as they restart, one by one, which the operator drives.
//!
//! A Secret that is missing, incomplete or not this cluster's is a wait with a reason (a
//! condition and an Event), not an error.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use serde_json::json;

use super::{Context, Error, kube_err, publish};
use crate::FIELD_MANAGER;
use crate::admin::AdminCredentials;
use crate::crd::KVCluster;
use crate::pki;
use crate::resources::{self, NOT_AFTER_ANNOTATION};

/// What the reconcile goes on with.
pub enum TlsMaterial {
    /// `tls.enabled: false`.
    Plain,
    /// Everything is there.
    Ready {
        credentials: AdminCredentials,
        token_sha256: String,
    },
    /// A Secret is missing or incomplete; the message says which and what to do.
    Waiting(String),
}

/// A Secret's value as text (from `data`; `stringData` is write-only).
fn value(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()?
        .get(key)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .filter(|v| !v.trim().is_empty())
}

fn pki_err(what: &str) -> impl FnOnce(pki::PkiError) -> Error {
    let what = what.to_string();
    move |e| Error::Pki(format!("{what}: {e}"))
}

async fn create(api: &Api<Secret>, secret: &Secret) -> Result<(), Error> {
    let name = secret.name_any();
    api.create(&PostParams::default(), secret)
        .await
        .map(|_| ())
        .map_err(kube_err(format!("create Secret {name}")))
}

/// Whether this KVCluster owns the object (so the operator may change it).
fn owned_by(s: &Secret, kvc: &KVCluster) -> bool {
    let uid = kvc.uid();
    s.owner_references()
        .iter()
        .any(|o| o.kind == "KVCluster" && Some(&o.uid) == uid.as_ref())
}

/// Makes sure the Secrets are there; see the module documentation. `kvc` has its effective
/// `tls` (the controller settles an unset one).
pub async fn ensure(ctx: &Context, kvc: &KVCluster, ns: &str) -> Result<TlsMaterial, Error> {
    let tls = kvc.spec.tls_spec();
    if !tls.enabled {
        return Ok(TlsMaterial::Plain);
    }
    let name = kvc.name_any();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);

    // The first admin's token.
    let token_name = resources::admin_token_secret_name(&name);
    let found = secrets
        .get_opt(&token_name)
        .await
        .map_err(kube_err(format!("get Secret {token_name}")))?;
    let token = match found {
        Some(s) => match value(&s, "token") {
            Some(t) => t.trim().to_string(),
            None => {
                return Ok(TlsMaterial::Waiting(format!(
                    "Secret {token_name} has no key \"token\": put the first admin's token there \
                     or delete the Secret to have one made"
                )));
            }
        },
        None => {
            let token = pki::new_token().map_err(pki_err("admin token"))?;
            let secret = resources::secret(
                kvc,
                token_name.clone(),
                "admin-token",
                "Opaque",
                BTreeMap::from([("token".to_string(), token.clone())]),
                BTreeMap::new(),
            )?;
            create(&secrets, &secret).await?;
            publish(
                ctx,
                kvc,
                EventType::Normal,
                "AdminTokenCreated",
                "Create".into(),
                format!("the first admin's token is in Secret {token_name} (key \"token\")"),
            )
            .await;
            token
        }
    };

    // The node certificate.
    let tls_name = resources::tls_secret_name(kvc);
    let source = if tls.secret_name.is_some() {
        "named by tls.secretName".to_string()
    } else if tls.cert_manager.is_some() {
        if let Some(c) = resources::certificate_of(kvc)? {
            let api: Api<DynamicObject> =
                Api::namespaced_with(ctx.client.clone(), ns, &resources::certificate_resource());
            let params = PatchParams::apply(FIELD_MANAGER).force();
            match api
                .patch(
                    &resources::certificate_name(&name),
                    &params,
                    &Patch::Apply(&c),
                )
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    return Ok(TlsMaterial::Waiting(
                        "tls.certManager is set but cert-manager's Certificate kind \
                         (cert-manager.io/v1) is not installed: install cert-manager, or name a \
                         Secret in tls.secretName, or remove both to have the operator make a CA"
                            .into(),
                    ));
                }
                Err(e) => return Err(kube_err("apply Certificate")(e)),
            }
        }
        format!(
            "to be issued by cert-manager (Certificate {})",
            resources::certificate_name(&name)
        )
    } else {
        if let Some(wait) = issue_own(ctx, kvc, &secrets, &name, &tls_name).await? {
            return Ok(TlsMaterial::Waiting(wait));
        }
        "made by the operator".to_string()
    };
    let Some(secret) = secrets
        .get_opt(&tls_name)
        .await
        .map_err(kube_err(format!("get Secret {tls_name}")))?
    else {
        return Ok(TlsMaterial::Waiting(format!(
            "Secret {tls_name} ({source}) does not exist yet"
        )));
    };
    let missing: Vec<&str> = ["tls.crt", "tls.key", "ca.crt"]
        .into_iter()
        .filter(|k| value(&secret, k).is_none())
        .collect();
    if !missing.is_empty() {
        return Ok(TlsMaterial::Waiting(format!(
            "Secret {tls_name} ({source}) has no {}",
            missing.join(", ")
        )));
    }
    let file = |k| value(&secret, k).unwrap_or_default();
    Ok(TlsMaterial::Ready {
        token_sha256: pki::token_sha256(&token),
        credentials: AdminCredentials {
            ca_pem: file("ca.crt"),
            cert_pem: file("tls.crt"),
            key_pem: file("tls.key"),
        },
    })
}

/// The operator's own CA and the node certificate it issues (again when it nears its end or
/// the CA changed). `Some`: what it waits for instead.
async fn issue_own(
    ctx: &Context,
    kvc: &KVCluster,
    secrets: &Api<Secret>,
    name: &str,
    tls_name: &str,
) -> Result<Option<String>, Error> {
    let ns = kvc.namespace().unwrap_or_default();
    let now = (ctx.clock)();
    let ca_name = resources::ca_secret_name(name);
    let found = secrets
        .get_opt(&ca_name)
        .await
        .map_err(kube_err(format!("get Secret {ca_name}")))?;
    let ca = match found.as_ref().and_then(|s| {
        Some(pki::Ca {
            cert_pem: value(s, "ca.crt")?,
            key_pem: value(s, "ca.key")?,
        })
    }) {
        Some(ca) => ca,
        None if found.is_some() => {
            return Ok(Some(format!(
                "Secret {ca_name} has no ca.crt or ca.key: put the CA there, or delete the \
                 Secret to have a new CA made (the node certificate is then issued again)"
            )));
        }
        None => {
            let ca = pki::generate_ca(name, &ns, now).map_err(pki_err("CA"))?;
            let secret = resources::secret(
                kvc,
                ca_name.clone(),
                "ca",
                "Opaque",
                BTreeMap::from([
                    ("ca.crt".to_string(), ca.cert_pem.clone()),
                    ("ca.key".to_string(), ca.key_pem.clone()),
                ]),
                BTreeMap::new(),
            )?;
            create(secrets, &secret).await?;
            ca
        }
    };
    let current = secrets
        .get_opt(tls_name)
        .await
        .map_err(kube_err(format!("get Secret {tls_name}")))?;
    if let Some(s) = &current
        && !owned_by(s, kvc)
    {
        return Ok(Some(format!(
            "Secret {tls_name} exists and is not this cluster's, so the operator does not write \
             its certificate there: name it in tls.secretName to use it as it is, or move it \
             away"
        )));
    }
    let not_after = current
        .as_ref()
        .and_then(|s| s.annotations().get(NOT_AFTER_ANNOTATION))
        .and_then(|v| v.parse::<i64>().ok());
    let same_ca = current
        .as_ref()
        .and_then(|s| value(s, "ca.crt"))
        .is_some_and(|c| c == ca.cert_pem);
    if current.is_some() && same_ca && !pki::needs_renewal(not_after, now) {
        return Ok(None);
    }
    let cert = match pki::issue_node_cert(&ca, name, &ns, now) {
        Ok(cert) => cert,
        Err(e) => {
            return Ok(Some(format!(
                "the CA in Secret {ca_name} cannot issue the node certificate: {e}"
            )));
        }
    };
    let data = BTreeMap::from([
        ("tls.crt".to_string(), cert.cert_pem),
        ("tls.key".to_string(), cert.key_pem),
        ("ca.crt".to_string(), ca.cert_pem.clone()),
    ]);
    let annotations =
        BTreeMap::from([(NOT_AFTER_ANNOTATION.to_string(), cert.not_after.to_string())]);
    let what = if current.is_some() {
        let patch = json!({
            "metadata": {"annotations": annotations},
            "stringData": data,
        });
        secrets
            .patch(tls_name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(kube_err(format!("update Secret {tls_name}")))?;
        "issued again"
    } else {
        let secret = resources::secret(
            kvc,
            tls_name.to_string(),
            "tls",
            "kubernetes.io/tls",
            data,
            annotations,
        )?;
        create(secrets, &secret).await?;
        "issued"
    };
    publish(
        ctx,
        kvc,
        EventType::Normal,
        "CertificateIssued",
        "Issue".into(),
        format!(
            "node certificate {what} in Secret {tls_name} by the CA in Secret {ca_name}, valid \
             until {}",
            k8s_openapi::jiff::Timestamp::from_second(cert.not_after)
                .map(|t| t.to_string())
                .unwrap_or_default()
        ),
    )
    .await;
    Ok(None)
}
