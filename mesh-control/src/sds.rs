//! SDS on the ADS stream: the certificates an Envoy node (a gateway, a
//! sidecar) presents to and verifies of mesh workloads.
//!
//! Envoy asks for secrets by name with the type
//! `envoy.extensions.transport_sockets.tls.v3.Secret` on its ADS stream,
//! as Istio's agent answers them:
//!
//! - `default` ([`crate::dialect::SDS_WORKLOAD_CERT`]): a certificate chain
//!   and private key for the stream's verified identity (the join token's
//!   or client certificate's SPIFFE ID, never what the node claims),
//!   issued by mesh-control's CA with a fresh key that is sent only on
//!   this stream (TLS to mesh-control under a CA).
//! - `ROOTCA` ([`crate::dialect::SDS_ROOT_CA`]): the trust bundle (during
//!   a root rotation, old and new roots).
//!
//! Certificates are renewed at half their lifetime (the CA's default), and
//! the trust bundle is compared with the one sent every 30 s (a root
//! rotation); either is a new response with a new version, which Envoy
//! applies to new connections without a restart.
//!
//! A stream without a verified identity (mesh-control runs no CA) gets no
//! secret: its response carries a `resource_errors` entry per name saying
//! why, and mesh-control logs it. Envoy then fails the TLS connections that
//! need the secret: fail closed, never plaintext.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DiscoveryRequest, DiscoveryResponse, ResourceError, ResourceName,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use mesh_core::spiffe::SpiffeId;
use prost::Message;

use crate::ca::CertificateAuthority;
use crate::dialect::{SDS_ROOT_CA, SDS_WORKLOAD_CERT, SECRET_TYPE};

/// How long to wait before trying again when the CA would not issue (its
/// signing limit; an error).
const RETRY: Duration = Duration::from_secs(5);
/// How often the trust bundle is compared with the one sent: a root
/// rotation reaches Envoy within this (the CA's rotation overlap keeps the
/// old root trusted far longer).
const BUNDLE_CHECK: Duration = Duration::from_secs(30);

/// A certificate issued for the stream.
struct Issued {
    chain_pem: String,
    key_pem: String,
    bundle_pem: String,
    /// Half its lifetime: when it is replaced.
    renew_at: SystemTime,
}

/// The SDS state of one ADS stream.
#[derive(Default)]
pub(crate) struct SdsStream {
    /// The secrets subscribed to (empty with `subscribed`: all).
    names: BTreeSet<String>,
    subscribed: bool,
    /// The nonce of the last response.
    nonce: String,
    /// Responses sent (the version and the nonce).
    sent: u64,
    issued: Option<Issued>,
    /// When to try issuing again after a refusal.
    retry_at: Option<SystemTime>,
    /// When to compare the CA's trust bundle with the one sent.
    bundle_check_at: Option<SystemTime>,
}

impl SdsStream {
    /// Handles an SDS request: `Some` is the response to send (a new or
    /// changed subscription); an ACK or NACK needs none.
    pub(crate) fn on_request(
        &mut self,
        req: &DiscoveryRequest,
        ca: Option<&CertificateAuthority>,
        identity: Option<&SpiffeId>,
        client: u64,
    ) -> Option<DiscoveryResponse> {
        let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
        // Only a new subscription is answered, as for the other types: an
        // ACK or NACK (recorded by the caller, see `answers_latest`) needs
        // no response, nor does an ACK of an older response that crossed a
        // renewal on the wire (answering it would keep two responses in
        // flight forever, each stale ACK answered by one more).
        if self.subscribed && names == self.names {
            return None;
        }
        self.names = names;
        self.subscribed = true;
        Some(self.respond(ca, identity, client))
    }

    /// Whether `req` ACKs or NACKs the latest response sent (its nonce):
    /// the ADS stream records it in the client's status (`/status`, CSDS)
    /// as for the other types.
    pub(crate) fn answers_latest(&self, req: &DiscoveryRequest) -> bool {
        !req.response_nonce.is_empty() && req.response_nonce == self.nonce
    }

    /// The secret names subscribed to (empty: all).
    pub(crate) fn names(&self) -> impl Iterator<Item = &String> {
        self.names.iter()
    }

    /// When the secrets need renewing (`None`: never, nothing subscribed
    /// or nothing to renew).
    pub(crate) fn due(&self) -> Option<SystemTime> {
        if !self.subscribed {
            return None;
        }
        let renew = self.retry_at.or(self.issued.as_ref().map(|i| i.renew_at));
        match (renew, self.bundle_check_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Renews what is due: the response to send.
    pub(crate) fn renew(
        &mut self,
        ca: Option<&CertificateAuthority>,
        identity: Option<&SpiffeId>,
        client: u64,
    ) -> Option<DiscoveryResponse> {
        let now = SystemTime::now();
        if now < self.due()? {
            return None;
        }
        let renew = self.retry_at.or(self.issued.as_ref().map(|i| i.renew_at));
        if renew.is_some_and(|at| now >= at) {
            self.issued = None;
            self.retry_at = None;
            return Some(self.respond(ca, identity, client));
        }
        // Only the bundle check is due: a response if the roots changed.
        self.bundle_check_at = Some(now + BUNDLE_CHECK);
        let (Some(ca), Some(issued)) = (ca, self.issued.as_mut()) else {
            return None;
        };
        let bundle = ca.trust_bundle_pem();
        if bundle == issued.bundle_pem {
            return None;
        }
        issued.bundle_pem = bundle;
        Some(self.respond(Some(ca), identity, client))
    }

    fn respond(
        &mut self,
        ca: Option<&CertificateAuthority>,
        identity: Option<&SpiffeId>,
        client: u64,
    ) -> DiscoveryResponse {
        let names = self.names.clone();
        let wanted = |name: &str| names.is_empty() || names.contains(name);
        let mut resources = Vec::new();
        let mut errors = Vec::new();
        let refusal = match (ca, identity) {
            (None, _) => Some(
                "mesh-control runs no CA: it has no certificates to give (start it with a CA, \
                 see `mesh-control serve --help`)"
                    .to_string(),
            ),
            (Some(_), None) => Some(
                "this ADS stream has no verified identity: send `authorization: Bearer <join \
                 token>` in the ADS gRPC service's initial_metadata"
                    .to_string(),
            ),
            (Some(ca), Some(identity)) => self.issue(ca, identity).err(),
        };
        if let Some(why) = &refusal {
            tracing::warn!(client, "SDS refused: {why}");
        }
        let known = [SDS_WORKLOAD_CERT, SDS_ROOT_CA];
        for name in &names {
            if !known.contains(&name.as_str()) {
                errors.push(error(name, format!("no secret {name:?}: mesh-control serves {SDS_WORKLOAD_CERT:?} (the workload certificate) and {SDS_ROOT_CA:?} (the trust bundle)")));
            }
        }
        match (&self.issued, &refusal) {
            (Some(issued), None) => {
                if wanted(SDS_WORKLOAD_CERT) {
                    resources.push(pack(&Secret {
                        name: SDS_WORKLOAD_CERT.into(),
                        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                            certificate_chain: Some(inline(&issued.chain_pem)),
                            private_key: Some(inline(&issued.key_pem)),
                            ..Default::default()
                        })),
                    }));
                }
                if wanted(SDS_ROOT_CA) {
                    resources.push(pack(&Secret {
                        name: SDS_ROOT_CA.into(),
                        r#type: Some(secret::Type::ValidationContext(
                            CertificateValidationContext {
                                trusted_ca: Some(inline(&issued.bundle_pem)),
                                ..Default::default()
                            },
                        )),
                    }));
                }
            }
            (_, why) => {
                let why = why.clone().unwrap_or_default();
                for name in known.into_iter().filter(|n| wanted(n)) {
                    errors.push(error(name, why.clone()));
                }
            }
        }
        self.sent += 1;
        self.nonce = format!("sds-{}", self.sent);
        if self.issued.is_some() {
            self.bundle_check_at = Some(SystemTime::now() + BUNDLE_CHECK);
        }
        DiscoveryResponse {
            version_info: self.sent.to_string(),
            resources,
            type_url: SECRET_TYPE.to_string(),
            nonce: self.nonce.clone(),
            resource_errors: errors,
            ..Default::default()
        }
    }

    /// Issues the stream's certificate unless one is current.
    fn issue(&mut self, ca: &CertificateAuthority, identity: &SpiffeId) -> Result<(), String> {
        let now = SystemTime::now();
        if self.issued.as_ref().is_some_and(|i| now < i.renew_at) {
            return Ok(());
        }
        if let Err(wait) = ca.admit_signing(identity) {
            self.retry_at = Some(now + wait.max(Duration::from_millis(100)));
            return Err(format!(
                "{identity} is over the CA's signing limit; retrying in {}s",
                wait.as_secs().max(1)
            ));
        }
        match ca.issue_serving_certificate(identity, &[], &[], None) {
            Ok((cert, key_pem)) => {
                // Half of what is left of it (not_before is backdated), and
                // never sooner than a second from now.
                let left = cert.not_after.duration_since(now).unwrap_or(Duration::ZERO);
                self.issued = Some(Issued {
                    chain_pem: cert.chain_pem,
                    key_pem,
                    bundle_pem: cert.trust_bundle_pem,
                    renew_at: now + (left / 2).max(Duration::from_secs(1)),
                });
                self.retry_at = None;
                Ok(())
            }
            Err(e) => {
                self.retry_at = Some(now + RETRY);
                Err(format!(
                    "the CA did not issue a certificate for {identity}: {e}"
                ))
            }
        }
    }
}

/// The key of SDS in a client's per-type status (`ClientStatus::types`,
/// beside `LDS` … `EDS`).
pub(crate) const STATUS_NAME: &str = "SDS";

/// The secrets of a response as `/status` and CSDS keep them: private
/// keys replaced by `[redacted]` (as Envoy's own config dump does), the
/// certificates and trust bundle as sent.
pub(crate) fn redacted(resources: &[Any]) -> Vec<Any> {
    resources
        .iter()
        .map(|any| {
            let Ok(mut secret) = Secret::decode(any.value.as_slice()) else {
                return any.clone();
            };
            if let Some(secret::Type::TlsCertificate(tls)) = &mut secret.r#type
                && tls.private_key.is_some()
            {
                tls.private_key = Some(inline("[redacted]"));
            }
            pack(&secret)
        })
        .collect()
}

/// The name of a secret (CSDS lists each by name).
pub(crate) fn secret_name(any: &Any) -> Option<String> {
    (any.type_url == SECRET_TYPE)
        .then(|| Secret::decode(any.value.as_slice()).ok())
        .flatten()
        .map(|s| s.name)
}

fn inline(pem: &str) -> DataSource {
    DataSource {
        specifier: Some(Specifier::InlineString(pem.to_string())),
        ..Default::default()
    }
}

fn pack(secret: &Secret) -> Any {
    Any {
        type_url: SECRET_TYPE.to_string(),
        value: secret.encode_to_vec(),
    }
}

fn error(name: &str, message: String) -> ResourceError {
    ResourceError {
        resource_name: Some(ResourceName {
            name: name.to_string(),
            ..Default::default()
        }),
        error_detail: Some(RpcStatus {
            code: 9, // FAILED_PRECONDITION
            message,
            details: Vec::new(),
        }),
    }
}

/// Sleeps until `at` (forever when `None`): the renewal branch of an ADS
/// stream's loop.
pub(crate) async fn until(at: Option<SystemTime>) {
    match at {
        Some(at) => {
            let wait = at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::time::sleep(wait).await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::JoinTokens;

    fn request(names: &[&str], nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: SECRET_TYPE.into(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    #[test]
    fn issues_the_streams_identity_and_refuses_without_a_ca() {
        let ca = CertificateAuthority::builder("cluster.local")
            .join_tokens(JoinTokens::new())
            .build()
            .unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/istio-system/sa/gw").unwrap();
        let mut s = SdsStream::default();
        let r = s
            .on_request(
                &request(&["default", "ROOTCA"], ""),
                Some(&ca),
                Some(&id),
                1,
            )
            .unwrap();
        assert_eq!(r.resources.len(), 2, "{:?}", r.resource_errors);
        let cert = Secret::decode(r.resources[0].value.as_slice()).unwrap();
        assert_eq!(cert.name, "default");
        let Some(secret::Type::TlsCertificate(tls)) = cert.r#type else {
            panic!("not a certificate");
        };
        let Some(Specifier::InlineString(chain)) = tls.certificate_chain.and_then(|d| d.specifier)
        else {
            panic!("no chain");
        };
        let (_, pem) = x509_parser::pem::parse_x509_pem(chain.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let sans = cert.subject_alternative_name().unwrap().unwrap();
        assert!(format!("{:?}", sans.value).contains(id.as_str()));
        // What `/status` and CSDS keep: the names, the chain, no key.
        let kept = redacted(&r.resources);
        assert_eq!(secret_name(&kept[0]).as_deref(), Some("default"));
        assert_eq!(secret_name(&kept[1]).as_deref(), Some("ROOTCA"));
        assert_eq!(kept[1], r.resources[1], "the trust bundle as sent");
        let Some(secret::Type::TlsCertificate(tls)) =
            Secret::decode(kept[0].value.as_slice()).unwrap().r#type
        else {
            panic!("not a certificate");
        };
        assert_eq!(tls.private_key, Some(inline("[redacted]")));
        assert_eq!(tls.certificate_chain, Some(inline(&chain)));
        assert!(!format!("{kept:?}").contains("PRIVATE KEY"));
        // An ACK (of the latest nonce) is recorded by the stream.
        assert!(s.answers_latest(&request(&["default", "ROOTCA"], &r.nonce)));
        assert!(!s.answers_latest(&request(&["default", "ROOTCA"], "")));
        assert!(!s.answers_latest(&request(&["default", "ROOTCA"], "sds-0")));
        // An ACK of an older response with the same names (it crossed a
        // renewal) needs none either.
        assert!(
            s.on_request(
                &request(&["default", "ROOTCA"], "sds-0"),
                Some(&ca),
                Some(&id),
                1
            )
            .is_none()
        );
        // An ACK needs no response; renewal is at half the lifetime.
        assert!(
            s.on_request(
                &request(&["default", "ROOTCA"], &r.nonce),
                Some(&ca),
                Some(&id),
                1
            )
            .is_none()
        );
        assert!(s.due().unwrap() > SystemTime::now());
        // Nothing new when the bundle check finds the same roots; a root
        // rotation is pushed with the same certificate.
        s.bundle_check_at = Some(SystemTime::now());
        assert!(s.renew(Some(&ca), Some(&id), 1).is_none());
        ca.rotate_root().unwrap();
        s.bundle_check_at = Some(SystemTime::now());
        let rotated = s.renew(Some(&ca), Some(&id), 1).expect("the new bundle");
        assert_eq!(rotated.resources.len(), 2);
        assert_eq!(rotated.resources[0], r.resources[0], "same certificate");
        assert_ne!(rotated.resources[1], r.resources[1], "new roots");
        assert_ne!(rotated.version_info, r.version_info);

        let mut open = SdsStream::default();
        let r = open
            .on_request(&request(&["default"], ""), None, None, 2)
            .unwrap();
        assert!(r.resources.is_empty());
        let message = &r.resource_errors[0].error_detail.as_ref().unwrap().message;
        assert!(message.contains("no CA"), "{message}");
    }
}
