//! TLS transport sockets (gRFC A29): the `UpstreamTlsContext` of a
//! cluster with mTLS and the `DownstreamTlsContext` of a server listener's
//! filter chain (A36).
//!
//! Certificates are never in the resources: they name certificate provider
//! instances of the client's bootstrap. This mesh's bootstrap has one,
//! `mesh` (its workload certificate, `certificate_name` `default`, and its
//! trust bundle, `ROOTCA`), so that is what is encoded and the only
//! instance decoding accepts: a resource naming another instance asks for
//! certificates this client does not have, and is rejected rather than
//! served with the `mesh` ones.
//!
//! Decoding reads the current form (`tls_certificate_provider_instance`,
//! `validation_context.ca_certificate_provider_instance`) and the older A29
//! form gRPC still reads and Istio still sends
//! (`tls_certificate_certificate_provider_instance`,
//! `combined_validation_context { default_validation_context,
//! validation_context_certificate_provider_instance }`). Peer certificates
//! are checked by SPIFFE ID: `match_subject_alt_names` with `exact`
//! matchers only (a SPIFFE ID is an exact identity; prefix, suffix,
//! regex and case-insensitive matches are rejected, as are typed SAN
//! matchers). Anything else that would change what is presented or
//! verified (static certificates, SDS, SPKI/hash pinning, CRLs, expired
//! certificates allowed, custom validators, `auto_host_sni`, ...) is
//! rejected.
//!
//! Istio's SIMPLE and MUTUAL modes (certificates from files on the
//! client's filesystem, [`TlsOrigination::Files`]) are encoded in the
//! standard Envoy shape: `common_tls_context.tls_certificates` with one
//! `certificate_chain` / `private_key` by `filename` (MUTUAL only) and
//! `validation_context { trusted_ca { filename }, match_subject_alt_names }`
//! (exact DNS names or URIs). A context with neither certificate provider
//! instance but `tls_certificates`, a `trusted_ca` or `system_root_certs`
//! is read that way; one with neither SANs nor an `sni` (nothing to check
//! the server's name against) is rejected.
//!
//! Without a CA file (SIMPLE / MUTUAL with no `caCertificates`: the
//! system's roots) the validation context carries both
//! `system_root_certs {}` and `trusted_ca { filename:
//! "/etc/ssl/certs/ca-certificates.crt" }` ([`SYSTEM_CA_BUNDLE`]), because
//! each reader understands only one of them:
//!
//! - Envoy does not implement `system_root_certs` (it is
//!   `not-implemented-hide` in the API) and, given a validation context
//!   with no `trusted_ca`, does not verify the server's chain at all. So
//!   the system bundle is named as a file, as Istio's agent resolves its
//!   `file-root:system` secret and Envoy Gateway its system trust store:
//!   the Debian / Ubuntu / Alpine path of Envoy's own images. On a host
//!   without that file Envoy rejects the cluster: it fails closed.
//! - gRPC (gRFC A82) uses the system roots when `system_root_certs` is set
//!   and `ca_certificate_provider_instance` is not; it does not read
//!   `trusted_ca`.
//! - This decoder reads `system_root_certs` as "the system's roots"
//!   ([`FileTls::ca_certificates`] `None`), whatever `trusted_ca` says
//!   next to it: the file is Envoy's stand-in for the same roots, named
//!   by the control plane for a machine it does not see, while the client
//!   loads its own machine's store. A context with neither `trusted_ca`
//!   nor `system_root_certs` is rejected (that would be Envoy's "no
//!   verification"), so "no CA file" never decodes to "do not verify".
//!
//! gRPC clients still do not get file clusters at all (A29 cannot read
//! certificate files, and A82 is behind an environment variable): the ADS
//! server leaves them out of gRPC clients' CDS (see `mesh-control`'s
//! `compat`).

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{
    DataSource, TransportSocket, data_source::Specifier, transport_socket::ConfigType,
};
use envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateProviderPluginInstance, CertificateValidationContext, CommonTlsContext,
    DownstreamTlsContext, TlsCertificate, UpstreamTlsContext,
    certificate_validation_context::{SystemRootCerts, TrustChainVerification},
    common_tls_context::ValidationContextType,
    subject_alt_name_matcher::SanType,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
use envoy_types::pb::google::protobuf::BoolValue;
use prost::Name as _;

use super::{At, Decoded, FieldError, missing, pack, reject_if, type_name, unpack};
use crate::model::{ClientCertificateFiles, FileTls, Name, TlsOrigination, UpstreamTls};
use crate::spiffe::SpiffeId;

/// The transport socket name of TLS (Envoy's and gRPC's).
pub const TLS_TRANSPORT_SOCKET: &str = "envoy.transport_sockets.tls";
/// The transport socket name of plaintext.
pub(crate) const RAW_BUFFER_TRANSPORT_SOCKET: &str = "envoy.transport_sockets.raw_buffer";
/// The certificate provider instance of the bootstrap that holds the
/// workload's certificate and the mesh trust bundle.
pub const MESH_PROVIDER_INSTANCE: &str = "mesh";
/// The `certificate_name` of the workload certificate.
pub const IDENTITY_CERTIFICATE_NAME: &str = "default";
/// The `certificate_name` of the trust bundle (Istio's name).
pub const ROOT_CERTIFICATE_NAME: &str = "ROOTCA";
/// The system CA bundle named as Envoy's `trusted_ca` when a SIMPLE /
/// MUTUAL context verifies against the system's roots (next to
/// `system_root_certs`, which Envoy does not implement; see the module
/// docs): the path of Debian, Ubuntu and Alpine, the bases of Envoy's
/// images, and what Istio's agent finds first.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// What a transport socket asks for.
pub(crate) enum Transport<T> {
    /// Plaintext (absent, or `raw_buffer`).
    Plaintext,
    /// TLS with this context.
    Tls(T),
}

/// The cluster's `transport_socket` for `tls`.
pub(crate) fn upstream_to_proto(tls: &UpstreamTls) -> TransportSocket {
    let common = match &tls.origination {
        TlsOrigination::IstioMutual => common_to_proto(&tls.server_identities),
        TlsOrigination::Files(files) => files_to_proto(files),
    };
    let context = UpstreamTlsContext {
        common_tls_context: Some(common),
        sni: tls.sni.to_string(),
        ..Default::default()
    };
    TransportSocket {
        name: TLS_TRANSPORT_SOCKET.to_string(),
        config_type: Some(ConfigType::TypedConfig(pack(&context))),
    }
}

/// A filter chain's `transport_socket` for mTLS; the client certificate is
/// required or only verified when presented.
pub(crate) fn downstream_to_proto(require_client_certificate: bool) -> TransportSocket {
    let context = DownstreamTlsContext {
        common_tls_context: Some(common_to_proto(&[])),
        require_client_certificate: Some(BoolValue {
            value: require_client_certificate,
        }),
        ..Default::default()
    };
    TransportSocket {
        name: TLS_TRANSPORT_SOCKET.to_string(),
        config_type: Some(ConfigType::TypedConfig(pack(&context))),
    }
}

#[allow(deprecated)] // match_subject_alt_names: what gRPC enforces (A29)
fn common_to_proto(identities: &[SpiffeId]) -> CommonTlsContext {
    CommonTlsContext {
        tls_certificate_provider_instance: Some(CertificateProviderPluginInstance {
            instance_name: MESH_PROVIDER_INSTANCE.to_string(),
            certificate_name: IDENTITY_CERTIFICATE_NAME.to_string(),
        }),
        validation_context_type: Some(ValidationContextType::ValidationContext(
            CertificateValidationContext {
                ca_certificate_provider_instance: Some(CertificateProviderPluginInstance {
                    instance_name: MESH_PROVIDER_INSTANCE.to_string(),
                    certificate_name: ROOT_CERTIFICATE_NAME.to_string(),
                }),
                match_subject_alt_names: identities
                    .iter()
                    .map(|id| StringMatcher {
                        match_pattern: Some(MatchPattern::Exact(id.as_str().to_string())),
                        ignore_case: false,
                    })
                    .collect(),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

/// The standard Envoy shape of TLS from files (SIMPLE / MUTUAL).
#[allow(deprecated)] // match_subject_alt_names: the form Envoy and gRPC read
fn files_to_proto(files: &FileTls) -> CommonTlsContext {
    let file = |path: &Name| DataSource {
        specifier: Some(Specifier::Filename(path.to_string())),
        ..Default::default()
    };
    CommonTlsContext {
        tls_certificates: files
            .client_certificate
            .iter()
            .map(|c| TlsCertificate {
                certificate_chain: Some(file(&c.certificate_chain)),
                private_key: Some(file(&c.private_key)),
                ..Default::default()
            })
            .collect(),
        validation_context_type: Some(ValidationContextType::ValidationContext(
            CertificateValidationContext {
                trusted_ca: Some(match &files.ca_certificates {
                    Some(ca) => file(ca),
                    None => file(&Name::from(SYSTEM_CA_BUNDLE)),
                }),
                system_root_certs: files
                    .ca_certificates
                    .is_none()
                    .then_some(SystemRootCerts {}),
                match_subject_alt_names: files
                    .subject_alt_names
                    .iter()
                    .map(|name| StringMatcher {
                        match_pattern: Some(MatchPattern::Exact(name.to_string())),
                        ignore_case: false,
                    })
                    .collect(),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

/// Reads a transport socket: plaintext, or TLS with a `C` context (by the
/// type URL of its `typed_config`, as gRPC identifies it); other transport
/// sockets are unsupported.
pub(crate) fn transport_from_proto<C: prost::Message + prost::Name + Default>(
    ts: Option<&TransportSocket>,
) -> Decoded<Transport<C>> {
    let Some(ts) = ts else {
        return Ok(Transport::Plaintext);
    };
    match &ts.config_type {
        Some(ConfigType::TypedConfig(any)) => {
            let name = type_name(&any.type_url);
            if name == RawBuffer::full_name() {
                Ok(Transport::Plaintext)
            } else if name == C::full_name() {
                unpack::<C>(any).at("typed_config").map(Transport::Tls)
            } else {
                Err(FieldError::unsupported(format!(
                    "transport socket {:?} ({name}) is not supported: only {} ({}) and raw_buffer",
                    ts.name,
                    TLS_TRANSPORT_SOCKET,
                    C::full_name()
                ))
                .at("typed_config"))
            }
        }
        None if ts.name == RAW_BUFFER_TRANSPORT_SOCKET => Ok(Transport::Plaintext),
        None => Err(missing("typed_config")),
    }
}

/// The model of an `UpstreamTlsContext`.
pub(crate) fn upstream_from_proto(context: &UpstreamTlsContext) -> Decoded<UpstreamTls> {
    reject_if(context.auto_host_sni, "auto_host_sni")?;
    reject_if(context.auto_sni_san_validation, "auto_sni_san_validation")?;
    let common = context
        .common_tls_context
        .as_ref()
        .ok_or_else(|| missing("common_tls_context"))?;
    if is_file_based(common) {
        let files = files_from_proto(common).at("common_tls_context")?;
        if files.subject_alt_names.is_empty() && context.sni.is_empty() {
            return Err(FieldError::invalid(
                "missing: TLS from files needs an sni or match_subject_alt_names to verify \
                 the server's name against",
            )
            .at("sni"));
        }
        return Ok(UpstreamTls {
            server_identities: Arc::from([]),
            sni: context.sni.as_str().into(),
            origination: TlsOrigination::Files(files),
        });
    }
    let identities = common_from_proto(common, true).at("common_tls_context")?;
    Ok(UpstreamTls {
        server_identities: identities.into(),
        sni: context.sni.as_str().into(),
        origination: TlsOrigination::IstioMutual,
    })
}

/// Whether a context is the file shape (SIMPLE / MUTUAL): no certificate
/// provider instance for the own certificate, and certificate files, a
/// `trusted_ca` or `system_root_certs`. Anything else is read as A29 (and
/// gets its errors).
#[allow(deprecated)] // the older A29 field is part of the test
fn is_file_based(c: &CommonTlsContext) -> bool {
    let instances = c.tls_certificate_provider_instance.is_some()
        || c.tls_certificate_certificate_provider_instance.is_some();
    let trusted_ca = matches!(
        &c.validation_context_type,
        Some(ValidationContextType::ValidationContext(v))
            if v.trusted_ca.is_some() || v.system_root_certs.is_some()
    );
    !instances && (!c.tls_certificates.is_empty() || trusted_ca)
}

/// What neither form of `CommonTlsContext` (file-based or the `mesh`
/// instance) supports: SDS, the older certificate provider, a custom
/// certificate selector or handshaker.
#[allow(deprecated)] // tls_certificate_certificate_provider: rejected, as gRPC does
fn reject_other_certificate_sources(c: &CommonTlsContext) -> Decoded<()> {
    reject_if(
        !c.tls_certificate_sds_secret_configs.is_empty(),
        "tls_certificate_sds_secret_configs",
    )?;
    reject_if(
        c.tls_certificate_certificate_provider.is_some(),
        "tls_certificate_certificate_provider",
    )?;
    reject_if(
        c.custom_tls_certificate_selector.is_some(),
        "custom_tls_certificate_selector",
    )?;
    reject_if(c.custom_handshaker.is_some(), "custom_handshaker")?;
    Ok(())
}

/// The files of a SIMPLE / MUTUAL context: at most one client certificate
/// (both files by `filename`), the trusted CA by `filename` or the
/// system's roots, exact SANs.
#[allow(deprecated)] // match_subject_alt_names: what Envoy and gRPC read
fn files_from_proto(c: &CommonTlsContext) -> Decoded<FileTls> {
    reject_other_certificate_sources(c)?;
    let client_certificate = match c.tls_certificates.as_slice() {
        [] => None,
        [cert] => Some(client_certificate_from_proto(cert).at_index("tls_certificates", 0)?),
        more => {
            return Err(FieldError::unsupported(format!(
                "{} certificates: only one client certificate is supported",
                more.len()
            ))
            .at("tls_certificates"));
        }
    };
    let v = match &c.validation_context_type {
        Some(ValidationContextType::ValidationContext(v)) => v,
        Some(_) => {
            return Err(FieldError::unsupported(
                "with certificate files, only a validation_context with a trusted_ca file or \
                 system_root_certs is supported",
            )
            .at("validation_context_type"));
        }
        None => {
            return Err(FieldError::unsupported(
                "missing: the server's certificate must be verified (set trusted_ca to a CA \
                 file, or system_root_certs; skipping verification is not supported)",
            )
            .at("validation_context"));
        }
    };
    files_validation_from_proto(v, client_certificate).at("validation_context")
}

fn client_certificate_from_proto(cert: &TlsCertificate) -> Decoded<ClientCertificateFiles> {
    reject_if(cert.pkcs12.is_some(), "pkcs12")?;
    reject_if(cert.watched_directory.is_some(), "watched_directory")?;
    reject_if(cert.private_key_provider.is_some(), "private_key_provider")?;
    reject_if(cert.password.is_some(), "password")?;
    reject_if(cert.ocsp_staple.is_some(), "ocsp_staple")?;
    reject_if(
        !cert.signed_certificate_timestamp.is_empty(),
        "signed_certificate_timestamp",
    )?;
    reject_if(cert.tls_params.is_some(), "tls_params")?;
    Ok(ClientCertificateFiles {
        certificate_chain: filename(cert.certificate_chain.as_ref()).at("certificate_chain")?,
        private_key: filename(cert.private_key.as_ref()).at("private_key")?,
    })
}

/// A `DataSource` naming a file (inline data and environment variables
/// are not supported: the files are what gets re-read on rotation).
fn filename(source: Option<&DataSource>) -> Decoded<Name> {
    let source = source.ok_or_else(|| FieldError::invalid("missing"))?;
    reject_if(source.watched_directory.is_some(), "watched_directory")?;
    match &source.specifier {
        Some(Specifier::Filename(path)) if !path.is_empty() => Ok(path.as_str().into()),
        Some(Specifier::Filename(_)) | None => Err(missing("filename")),
        Some(_) => Err(FieldError::unsupported(
            "only filename data sources are supported (not inline bytes, strings or \
             environment variables)",
        )),
    }
}

fn files_validation_from_proto(
    v: &CertificateValidationContext,
    client_certificate: Option<ClientCertificateFiles>,
) -> Decoded<FileTls> {
    reject_if(
        v.ca_certificate_provider_instance.is_some(),
        "ca_certificate_provider_instance",
    )?;
    // `system_root_certs` wins over `trusted_ca`: next to it, the file is
    // Envoy's stand-in for the system's roots (see the module docs).
    let ca_certificates = match (&v.system_root_certs, &v.trusted_ca) {
        (Some(SystemRootCerts {}), Some(ca)) => {
            // Still a file name Envoy can read, or Envoy would NACK what
            // this reads as valid.
            filename(Some(ca)).at("trusted_ca")?;
            None
        }
        (Some(SystemRootCerts {}), None) => None,
        (None, Some(ca)) => Some(filename(Some(ca)).at("trusted_ca")?),
        (None, None) => {
            return Err(FieldError::invalid(
                "missing: the server's certificate must be verified: set trusted_ca to a CA \
                 file, or system_root_certs (with trusted_ca naming the system bundle for \
                 Envoy, which does not implement system_root_certs and would not verify)",
            )
            .at("trusted_ca"));
        }
    };
    reject_validation_extras(v)?;
    let subject_alt_names = sans_from_proto(
        v,
        &[SanType::Dns, SanType::Uri],
        "DNS and URI",
        name_from_proto,
    )?;
    Ok(FileTls {
        ca_certificates,
        subject_alt_names: subject_alt_names.into(),
        client_certificate,
    })
}

/// An `exact`, case-sensitive SAN matcher (a DNS name or a URI).
fn name_from_proto(m: &StringMatcher) -> Decoded<Name> {
    if m.ignore_case {
        return Err(FieldError::unsupported(
            "ignore_case is not supported: names are matched exactly",
        ));
    }
    match &m.match_pattern {
        Some(MatchPattern::Exact(name)) if !name.is_empty() => Ok(name.as_str().into()),
        Some(MatchPattern::Exact(_)) => Err(FieldError::invalid("empty name").at("exact")),
        Some(_) => Err(FieldError::unsupported(
            "only exact SAN matchers are supported (prefix, suffix, contains and regex are not)",
        )),
        None => Err(missing("match_pattern")),
    }
}

/// Whether a `DownstreamTlsContext` requires a client certificate. The
/// server verifies a presented certificate against the trust bundle, so a
/// validation context is required whenever client certificates are.
/// Peer SAN matching on the server is not supported (authorization is
/// RBAC's job, by principal).
pub(crate) fn downstream_from_proto(context: &DownstreamTlsContext) -> Decoded<bool> {
    reject_if(
        context.require_sni.as_ref().is_some_and(|b| b.value),
        "require_sni",
    )?;
    let require = context
        .require_client_certificate
        .as_ref()
        .is_some_and(|b| b.value);
    let common = context
        .common_tls_context
        .as_ref()
        .ok_or_else(|| missing("common_tls_context"))?;
    let identities = common_from_proto(common, require).at("common_tls_context")?;
    if !identities.is_empty() {
        return Err(FieldError::unsupported(
            "matching client certificates by SAN is not supported on servers: authorize \
             principals with RBAC",
        )
        .at("validation_context.match_subject_alt_names")
        .at("common_tls_context"));
    }
    Ok(require)
}

/// Checks a `CommonTlsContext` and returns the SANs the peer must match
/// (empty: any certificate the trust bundle verifies). The own
/// certificate must come from the `mesh` instance; a validation context
/// is required when `validate` is set.
#[allow(deprecated)] // the older A29 fields are read, as gRPC does
fn common_from_proto(c: &CommonTlsContext, validate: bool) -> Decoded<Vec<SpiffeId>> {
    reject_if(!c.tls_certificates.is_empty(), "tls_certificates")?;
    reject_other_certificate_sources(c)?;
    match (
        &c.tls_certificate_provider_instance,
        &c.tls_certificate_certificate_provider_instance,
    ) {
        (Some(p), _) => check_instance(&p.instance_name).at("tls_certificate_provider_instance")?,
        (None, Some(p)) => {
            check_instance(&p.instance_name).at("tls_certificate_certificate_provider_instance")?
        }
        (None, None) => {
            return Err(FieldError::unsupported(
                "missing: only mutual TLS with the workload certificate of the certificate \
                 provider instance \"mesh\" is supported",
            )
            .at("tls_certificate_provider_instance"));
        }
    }
    match &c.validation_context_type {
        Some(ValidationContextType::ValidationContext(v)) => {
            validation_from_proto(v, None).at("validation_context")
        }
        Some(ValidationContextType::CombinedValidationContext(combined)) => {
            reject_if(
                combined.validation_context_sds_secret_config.is_some(),
                "validation_context_sds_secret_config",
            )
            .at("combined_validation_context")?;
            reject_if(
                combined.validation_context_certificate_provider.is_some(),
                "validation_context_certificate_provider",
            )
            .at("combined_validation_context")?;
            let instance = combined
                .validation_context_certificate_provider_instance
                .as_ref()
                .map(|p| p.instance_name.as_str());
            if let Some(name) = instance {
                check_instance(name)
                    .at("validation_context_certificate_provider_instance")
                    .at("combined_validation_context")?;
            }
            let default = combined
                .default_validation_context
                .clone()
                .unwrap_or_default();
            validation_from_proto(&default, instance)
                .at("default_validation_context")
                .at("combined_validation_context")
        }
        Some(ValidationContextType::ValidationContextCertificateProviderInstance(p)) => {
            check_instance(&p.instance_name)
                .at("validation_context_certificate_provider_instance")?;
            Ok(Vec::new())
        }
        Some(ValidationContextType::ValidationContextSdsSecretConfig(_)) => {
            reject_if(true, "validation_context_sds_secret_config").map(|()| Vec::new())
        }
        Some(ValidationContextType::ValidationContextCertificateProvider(_)) => {
            reject_if(true, "validation_context_certificate_provider").map(|()| Vec::new())
        }
        None if validate => Err(FieldError::invalid(
            "missing: peer certificates must be verified (set ca_certificate_provider_instance \
             to the \"mesh\" instance)",
        )
        .at("validation_context")),
        None => Ok(Vec::new()),
    }
}

/// A validation context; `outer_instance` is the CA instance named next to
/// it (the combined form), which stands for its own
/// `ca_certificate_provider_instance`. SANs may come as
/// `match_subject_alt_names` (what gRPC enforces) or as URI-typed
/// `match_typed_subject_alt_names` (Envoy's newer form), exact only.
fn validation_from_proto(
    v: &CertificateValidationContext,
    outer_instance: Option<&str>,
) -> Decoded<Vec<SpiffeId>> {
    match (&v.ca_certificate_provider_instance, outer_instance) {
        (Some(p), _) => check_instance(&p.instance_name).at("ca_certificate_provider_instance")?,
        (None, Some(_)) => {}
        (None, None) => {
            return Err(FieldError::invalid(
                "missing: the trust bundle must come from the certificate provider instance \
                 \"mesh\"",
            )
            .at("ca_certificate_provider_instance"));
        }
    }
    reject_if(v.trusted_ca.is_some(), "trusted_ca")?;
    reject_if(v.system_root_certs.is_some(), "system_root_certs")?;
    reject_validation_extras(v)?;
    sans_from_proto(v, &[SanType::Uri], "URI (SPIFFE IDs)", san_from_proto)
}

/// The SANs of `match_subject_alt_names`, then those of
/// `match_typed_subject_alt_names` (of the `types` only, which `only`
/// names in the error), each read by `san`.
#[allow(deprecated)] // match_subject_alt_names: what Envoy and gRPC read
fn sans_from_proto<T>(
    v: &CertificateValidationContext,
    types: &[SanType],
    only: &str,
    san: fn(&StringMatcher) -> Decoded<T>,
) -> Decoded<Vec<T>> {
    let mut sans = v
        .match_subject_alt_names
        .iter()
        .enumerate()
        .map(|(i, m)| san(m).at_index("match_subject_alt_names", i))
        .collect::<Decoded<Vec<_>>>()?;
    for (i, typed) in v.match_typed_subject_alt_names.iter().enumerate() {
        let at = "match_typed_subject_alt_names";
        if !types.iter().any(|&t| typed.san_type == t as i32) {
            let kind = SanType::try_from(typed.san_type).map_or("unknown", |t| t.as_str_name());
            return Err(FieldError::unsupported(format!(
                "SAN type {kind} is not supported: only {only}"
            ))
            .at("san_type")
            .at_index(at, i));
        }
        let m = typed
            .matcher
            .as_ref()
            .ok_or_else(|| missing("matcher").at_index(at, i))?;
        sans.push(san(m).at("matcher").at_index(at, i)?);
    }
    Ok(sans)
}

/// What neither validation form supports: anything that changes how a
/// chain is checked besides its roots and SANs.
fn reject_validation_extras(v: &CertificateValidationContext) -> Decoded<()> {
    reject_if(v.watched_directory.is_some(), "watched_directory")?;
    reject_if(
        !v.verify_certificate_spki.is_empty(),
        "verify_certificate_spki",
    )?;
    reject_if(
        !v.verify_certificate_hash.is_empty(),
        "verify_certificate_hash",
    )?;
    reject_if(
        v.require_signed_certificate_timestamp
            .as_ref()
            .is_some_and(|b| b.value),
        "require_signed_certificate_timestamp",
    )?;
    reject_if(v.crl.is_some(), "crl")?;
    reject_if(v.allow_expired_certificate, "allow_expired_certificate")?;
    reject_if(
        v.trust_chain_verification != TrustChainVerification::VerifyTrustChain as i32,
        "trust_chain_verification",
    )?;
    reject_if(
        v.custom_validator_config.is_some(),
        "custom_validator_config",
    )?;
    reject_if(v.max_verify_depth.is_some(), "max_verify_depth")?;
    Ok(())
}

/// An `exact`, case-sensitive matcher of a SPIFFE ID.
fn san_from_proto(m: &StringMatcher) -> Decoded<SpiffeId> {
    if m.ignore_case {
        return Err(FieldError::unsupported(
            "ignore_case is not supported: SPIFFE IDs are matched exactly",
        ));
    }
    match &m.match_pattern {
        Some(MatchPattern::Exact(uri)) => SpiffeId::parse(uri)
            .map_err(|e| FieldError::invalid(format!("{uri:?} is not a SPIFFE ID: {e}")))
            .at("exact"),
        Some(_) => Err(FieldError::unsupported(
            "only exact SPIFFE ID matchers are supported (prefix, suffix, contains and regex \
             are not)",
        )),
        None => Err(missing("match_pattern")),
    }
}

fn check_instance(name: &str) -> Decoded<()> {
    if name == MESH_PROVIDER_INSTANCE {
        Ok(())
    } else {
        Err(FieldError::unsupported(format!(
            "certificate provider instance {name:?} is not supported: only \
             {MESH_PROVIDER_INSTANCE:?} (the bootstrap's certificate_providers.mesh)"
        ))
        .at("instance_name"))
    }
}

#[cfg(test)]
mod tests {
    //! The shape of SIMPLE / MUTUAL with the system's roots, both ways
    //! (the CA-file shape and its errors are tested in `xds/tests.rs`).

    use super::*;

    fn simple(ca: Option<&str>) -> UpstreamTls {
        UpstreamTls {
            server_identities: Arc::from([]),
            sni: "api.example.com".into(),
            origination: TlsOrigination::Files(FileTls {
                ca_certificates: ca.map(Name::from),
                subject_alt_names: Arc::from([]),
                client_certificate: None,
            }),
        }
    }

    fn context(tls: &UpstreamTls) -> UpstreamTlsContext {
        match transport_from_proto::<UpstreamTlsContext>(Some(&upstream_to_proto(tls))) {
            Ok(Transport::Tls(c)) => c,
            _ => panic!("not a TLS transport socket"),
        }
    }

    fn validation(c: &mut UpstreamTlsContext) -> &mut CertificateValidationContext {
        match c
            .common_tls_context
            .as_mut()
            .and_then(|c| c.validation_context_type.as_mut())
        {
            Some(ValidationContextType::ValidationContext(v)) => v,
            other => panic!("{other:?}"),
        }
    }

    /// The decoding error, as the public error prints it.
    fn error(c: &UpstreamTlsContext) -> String {
        upstream_from_proto(c)
            .unwrap_err()
            .into_error(super::super::ResourceType::Cluster, Some("x"))
            .to_string()
    }

    fn trusted_ca(v: &CertificateValidationContext) -> Option<&str> {
        match v.trusted_ca.as_ref().and_then(|d| d.specifier.as_ref()) {
            Some(Specifier::Filename(f)) => Some(f),
            _ => None,
        }
    }

    #[test]
    fn system_roots_name_the_bundle_for_envoy_and_system_root_certs_for_grpc_and_us() {
        let tls = simple(None);
        let mut c = context(&tls);
        let v = validation(&mut c);
        // Envoy: a file it reads (it ignores system_root_certs and would
        // not verify at all without a trusted_ca).
        assert_eq!(trusted_ca(v), Some(SYSTEM_CA_BUNDLE));
        // gRPC (A82) and this decoder: the system's roots.
        assert_eq!(v.system_root_certs, Some(SystemRootCerts {}));
        assert_eq!(v.ca_certificate_provider_instance, None);
        assert_eq!(upstream_from_proto(&c).unwrap(), tls);
        // A CA file: no system_root_certs, and it round-trips as a file,
        // even when it is the system bundle's path.
        for ca in ["/etc/certs/ca.pem", SYSTEM_CA_BUNDLE] {
            let tls = simple(Some(ca));
            let mut c = context(&tls);
            let v = validation(&mut c);
            assert_eq!(trusted_ca(v), Some(ca));
            assert_eq!(v.system_root_certs, None);
            assert_eq!(upstream_from_proto(&c).unwrap(), tls);
        }
    }

    #[test]
    fn system_root_certs_win_over_trusted_ca_and_read_alone() {
        let mut c = context(&simple(None));
        // Another control plane's guess at the bundle: still the system's
        // roots of the client's own machine.
        validation(&mut c).trusted_ca = Some(DataSource {
            specifier: Some(Specifier::Filename(
                "/etc/pki/tls/certs/ca-bundle.crt".into(),
            )),
            ..Default::default()
        });
        assert_eq!(upstream_from_proto(&c).unwrap(), simple(None));
        // gRPC's form: system_root_certs alone.
        validation(&mut c).trusted_ca = None;
        assert_eq!(upstream_from_proto(&c).unwrap(), simple(None));
        // Next to system_root_certs, trusted_ca must still be a file Envoy
        // can read (inline bytes are not).
        validation(&mut c).trusted_ca = Some(DataSource {
            specifier: Some(Specifier::InlineString("PEM".into())),
            ..Default::default()
        });
        let e = error(&c);
        assert!(e.contains("trusted_ca"), "{e}");
    }

    #[test]
    fn no_roots_at_all_is_never_read_as_no_verification() {
        let mut c = context(&simple(None));
        let v = validation(&mut c);
        v.trusted_ca = None;
        v.system_root_certs = None;
        // Neither roots nor a client certificate: not the file shape at
        // all, so A29's rules refuse it.
        let e = error(&c);
        assert!(e.contains("tls_certificate_provider_instance"), "{e}");
        // With a client certificate (MUTUAL): refused, naming the roots.
        let mut mutual = simple(None);
        if let TlsOrigination::Files(f) = &mut mutual.origination {
            f.client_certificate = Some(ClientCertificateFiles {
                certificate_chain: "/c.pem".into(),
                private_key: "/c.key".into(),
            });
        }
        let mut c = context(&mutual);
        assert_eq!(upstream_from_proto(&c).unwrap(), mutual);
        let v = validation(&mut c);
        v.trusted_ca = None;
        v.system_root_certs = None;
        let e = error(&c);
        assert!(
            e.contains("trusted_ca: missing: the server's certificate must be verified"),
            "{e}"
        );
    }

    #[test]
    fn system_root_certs_are_refused_with_the_mesh_instance() {
        // ISTIO_MUTUAL verifies against the mesh trust bundle only.
        let mesh = UpstreamTls {
            sni: "outbound_.80_._.a".into(),
            ..UpstreamTls::default()
        };
        let mut c = context(&mesh);
        validation(&mut c).system_root_certs = Some(SystemRootCerts {});
        let e = error(&c);
        assert!(e.contains("system_root_certs"), "{e}");
    }
}
