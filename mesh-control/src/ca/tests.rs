//! The CA against rustls' own certificate verification (webpki), as a
//! workload's peer would check what it issued.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::RootCertStore;
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::signer::pem_encode;
use super::*;
use crate::ErrorKind;

const TOKEN_A: &str = "token-for-catalog-0123456789";
const TOKEN_B: &str = "token-for-payment-0123456789";

fn tokens() -> JoinTokens {
    let mut t = JoinTokens::new();
    t.insert(TOKEN_A, "shop", "catalog").unwrap();
    t.insert(TOKEN_B, "shop", "payment").unwrap();
    t
}

fn ca() -> CertificateAuthority {
    CertificateAuthority::builder("cluster.local")
        .join_tokens(tokens())
        .build()
        .unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// A CSR for a fresh key, asking (in vain) for `san`.
fn csr(san: &str) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "admin");
    params.subject_alt_names = vec![SanType::URI(san.try_into().unwrap())];
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

fn unix_time(t: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(t.duration_since(UNIX_EPOCH).unwrap())
}

/// Verifies `chain_pem` against `bundle_pem` at `at`, as a server checks a
/// client certificate and as a client checks a server's.
fn verify(bundle_pem: &str, chain_pem: &str, at: SystemTime) -> Result<(), rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for root in certs(bundle_pem) {
        roots.add(root)?;
    }
    let chain = certs(chain_pem);
    let (leaf, intermediates) = chain.split_first().unwrap();
    let roots = Arc::new(roots);
    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .unwrap()
        .verify_client_cert(leaf, intermediates, unix_time(at))?;
    verify_server_cert_signed_by_trust_anchor(
        &ParsedCertificate::try_from(leaf)?,
        &roots,
        intermediates,
        unix_time(at),
        provider.signature_verification_algorithms.all,
    )
}

/// The URI SANs of the leaf of `chain_pem`.
fn uri_sans(chain_pem: &str) -> Vec<String> {
    let chain = certs(chain_pem);
    let (_, cert) = X509Certificate::from_der(&chain[0]).unwrap();
    let mut out = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            assert!(ext.critical, "an empty subject makes the SAN critical");
            for name in &san.general_names {
                match name {
                    GeneralName::URI(uri) => out.push(uri.to_string()),
                    other => panic!("unexpected SAN {other:?}"),
                }
            }
        }
    }
    out
}

#[test]
fn issued_svid_verifies_names_the_token_identity_and_expires() {
    let ca = ca();
    let now = SystemTime::now();
    let issued = ca
        .issue_with_token(
            TOKEN_A,
            &csr("spiffe://cluster.local/ns/shop/sa/admin"),
            None,
            Some(Duration::from_secs(3600)),
        )
        .unwrap();
    assert_eq!(
        issued.spiffe_id,
        id("spiffe://cluster.local/ns/shop/sa/catalog")
    );
    // The CSR's SAN and subject are ignored.
    assert_eq!(
        uri_sans(&issued.chain_pem),
        ["spiffe://cluster.local/ns/shop/sa/catalog"]
    );
    let chain = certs(&issued.chain_pem);
    assert_eq!(chain.len(), 1, "a root-signed leaf has no intermediates");
    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    assert!(leaf.subject().iter().next().is_none(), "empty subject");
    assert!(!leaf.is_ca());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    // Lifetime: one hour from now, to the second.
    let not_after = UNIX_EPOCH + Duration::from_secs(leaf.validity().not_after.timestamp() as u64);
    let expected = now + Duration::from_secs(3600);
    let skew = if not_after > expected {
        not_after.duration_since(expected).unwrap()
    } else {
        expected.duration_since(not_after).unwrap()
    };
    assert!(skew <= Duration::from_secs(2), "not_after off by {skew:?}");
    assert_eq!(issued.not_after, not_after);
    // Verifies now, not after expiry, not against another CA.
    verify(&issued.trust_bundle_pem, &issued.chain_pem, now).unwrap();
    verify(
        &ca.trust_bundle_pem(),
        &issued.chain_pem,
        now + Duration::from_secs(3500),
    )
    .unwrap();
    let expired = verify(
        &issued.trust_bundle_pem,
        &issued.chain_pem,
        now + Duration::from_secs(3602),
    );
    assert!(
        matches!(
            expired,
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. }
            ))
        ),
        "{expired:?}"
    );
    let other = CertificateAuthority::builder("cluster.local")
        .build()
        .unwrap();
    assert!(verify(&other.trust_bundle_pem(), &issued.chain_pem, now).is_err());
    // The default lifetime is 24 h.
    let default = ca
        .issue_with_token(TOKEN_B, &csr("x:y"), None, None)
        .unwrap();
    let lifetime = default.not_after.duration_since(now).unwrap();
    assert!(
        lifetime <= DEFAULT_LIFETIME && lifetime > DEFAULT_LIFETIME - Duration::from_secs(5),
        "{lifetime:?}"
    );
}

#[test]
fn a_token_for_a_cannot_get_b() {
    let ca = ca();
    let b = id("spiffe://cluster.local/ns/shop/sa/payment");
    let err = ca
        .issue_with_token(TOKEN_A, &csr("x:y"), Some(&b), None)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Denied);
    assert!(
        err.to_string()
            .contains("the join token is for spiffe://cluster.local/ns/shop/sa/catalog"),
        "{err}"
    );
    // Asking for its own identity is fine; B's token gets B.
    let a = id("spiffe://cluster.local/ns/shop/sa/catalog");
    assert!(
        ca.issue_with_token(TOKEN_A, &csr("x:y"), Some(&a), None)
            .is_ok()
    );
    let issued = ca
        .issue_with_token(TOKEN_B, &csr("x:y"), Some(&b), None)
        .unwrap();
    assert_eq!(uri_sans(&issued.chain_pem), [b.as_str()]);
    // Unknown tokens, other trust domains.
    let err = ca
        .issue_with_token("not-a-token-at-all", &csr("x:y"), None, None)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Denied);
    let err = ca
        .sign_csr(
            &csr("x:y"),
            &id("spiffe://evil.org/ns/shop/sa/catalog"),
            None,
        )
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Denied);
}

#[test]
fn bad_requests_are_refused() {
    let ca = ca();
    let a = id("spiffe://cluster.local/ns/shop/sa/catalog");
    for bad in [
        "",
        "garbage",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ] {
        let err = ca.sign_csr(bad, &a, None).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidRequest, "{bad:?}: {err}");
    }
    // A CSR whose signature does not match its key: proof of possession fails.
    let good = csr("x:y");
    let mut der = certs_of_label(&good, "CERTIFICATE REQUEST");
    let last = der.len() - 1;
    der[last] ^= 0x55;
    let tampered = pem_encode("CERTIFICATE REQUEST", &der);
    let err = ca.sign_csr(&tampered, &a, None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidRequest);
    let err = ca
        .sign_csr(
            &good,
            &a,
            Some(DEFAULT_MAX_LIFETIME + Duration::from_secs(1)),
        )
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidRequest);
    assert!(err.to_string().contains("lifetime"), "{err}");
    assert!(ca.sign_csr(&good, &a, Some(Duration::ZERO)).is_err());
}

fn certs_of_label(pem: &str, label: &str) -> Vec<u8> {
    signer::parse_pems(pem, label).unwrap().remove(0).contents
}

#[test]
fn pem_encoding_matches_rcgen() {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["a.example".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    assert_eq!(pem_encode("CERTIFICATE", cert.der()), cert.pem());
    for len in 0..5 {
        let data = vec![0xffu8; len];
        let pem = pem_encode("X", &data);
        assert_eq!(certs_of_label(&pem, "X"), data);
    }
}

#[test]
fn a_generated_root_persists_with_a_private_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ca");
    let first = CertificateAuthority::builder("cluster.local")
        .directory(&path)
        .build()
        .unwrap();
    let root = first.signing_root_pem();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path.join("root-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the directory is private");
    }
    drop(first);
    let second = CertificateAuthority::builder("cluster.local")
        .directory(&path)
        .build()
        .unwrap();
    assert_eq!(second.signing_root_pem(), root);
    // A missing key is an error, not a silent new root.
    std::fs::remove_file(path.join("root-key.pem")).unwrap();
    let err = CertificateAuthority::builder("cluster.local")
        .directory(&path)
        .build()
        .err()
        .unwrap();
    assert!(err.to_string().contains("root-key.pem"), "{err}");
}

#[test]
fn rotation_keeps_old_roots_until_their_last_certificate_expires() {
    let ca = CertificateAuthority::builder("cluster.local")
        .join_tokens(tokens())
        .default_lifetime(Duration::from_secs(10))
        .rotation_overlap(Duration::from_secs(5))
        .build()
        .unwrap();
    let a = id("spiffe://cluster.local/ns/shop/sa/catalog");
    let t0 = UNIX_EPOCH
        + Duration::from_secs(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        );
    let at = |s: u64| t0 + Duration::from_secs(s);
    let old_root = ca.trust_bundle_pem_at(t0);
    assert_eq!(certs(&old_root).len(), 1);

    ca.rotate_root_at(at(0)).unwrap();
    assert!(ca.rotate_root_at(at(1)).is_err(), "one rotation at a time");
    // During the overlap: both roots trusted, the old one still signs.
    let bundle = ca.trust_bundle_pem_at(at(1));
    assert_eq!(certs(&bundle).len(), 2);
    let during = ca.sign_csr_at(&csr("x:y"), &a, None, at(2)).unwrap();
    verify(&old_root, &during.chain_pem, at(3)).unwrap();
    // After the overlap the new root signs; the old root stays trusted
    // until `during` (the last it signed) expires at 12 s.
    let after = ca.sign_csr_at(&csr("x:y"), &a, None, at(5)).unwrap();
    assert!(verify(&old_root, &after.chain_pem, at(6)).is_err());
    let bundle = ca.trust_bundle_pem_at(at(6));
    assert_eq!(certs(&bundle).len(), 2);
    verify(&bundle, &during.chain_pem, at(6)).unwrap();
    verify(&bundle, &after.chain_pem, at(6)).unwrap();
    assert_eq!(certs(&ca.trust_bundle_pem_at(at(12))).len(), 2);
    let final_bundle = ca.trust_bundle_pem_at(at(13));
    assert_eq!(certs(&final_bundle).len(), 1);
    verify(&final_bundle, &after.chain_pem, at(13)).unwrap();
    assert!(verify(&final_bundle, &during.chain_pem, at(11)).is_err());
    // And a next rotation may start.
    ca.rotate_root_at(at(14)).unwrap();
}

#[test]
fn rotation_state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let build = || {
        CertificateAuthority::builder("cluster.local")
            .directory(dir.path())
            .default_lifetime(Duration::from_secs(60))
            .rotation_overlap(Duration::from_secs(3600))
            .build()
            .unwrap()
    };
    let ca = build();
    let old = ca.signing_root_pem();
    ca.rotate_root().unwrap();
    let bundle = ca.trust_bundle_pem();
    assert_eq!(certs(&bundle).len(), 2);
    drop(ca);
    let again = build();
    assert_eq!(again.signing_root_pem(), old, "still in the overlap");
    assert_eq!(again.trust_bundle_pem(), bundle);
}

#[test]
fn an_operator_supplied_intermediate_signs_with_its_chain() {
    // root → intermediate, made by "the operator".
    let root_key = KeyPair::generate().unwrap();
    let mut root_params = CertificateParams::default();
    root_params
        .distinguished_name
        .push(DnType::CommonName, "corp root");
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, root_key);
    let int_key = KeyPair::generate().unwrap();
    let mut int_params = CertificateParams::default();
    int_params
        .distinguished_name
        .push(DnType::CommonName, "mesh intermediate");
    int_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    int_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let intermediate = int_params.signed_by(&int_key, &root_issuer).unwrap();

    let ca = CertificateAuthority::builder("cluster.local")
        .signing_pem(
            format!("{}{}", intermediate.pem(), root.pem()),
            int_key.serialize_pem(),
        )
        .build()
        .unwrap();
    assert_eq!(ca.trust_bundle_pem(), root.pem());
    let a = id("spiffe://cluster.local/ns/shop/sa/catalog");
    let issued = ca.sign_csr(&csr("x:y"), &a, None).unwrap();
    let chain = certs(&issued.chain_pem);
    assert_eq!(chain.len(), 2, "leaf and intermediate");
    assert_eq!(chain[1], *intermediate.der());
    verify(&root.pem(), &issued.chain_pem, SystemTime::now()).unwrap();

    // A key that does not match, a chain without its root, a non-CA.
    let wrong = CertificateAuthority::builder("cluster.local")
        .signing_pem(
            format!("{}{}", intermediate.pem(), root.pem()),
            KeyPair::generate().unwrap().serialize_pem(),
        )
        .build()
        .err()
        .unwrap();
    assert!(wrong.to_string().contains("does not belong"), "{wrong}");
    let rootless = CertificateAuthority::builder("cluster.local")
        .signing_pem(intermediate.pem(), int_key.serialize_pem())
        .build()
        .err()
        .unwrap();
    assert!(
        rootless.to_string().contains("self-signed root"),
        "{rootless}"
    );
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["x.example".into()])
        .unwrap()
        .self_signed(&leaf_key)
        .unwrap();
    let not_ca = CertificateAuthority::builder("cluster.local")
        .signing_pem(leaf.pem(), leaf_key.serialize_pem())
        .build()
        .err()
        .unwrap();
    assert!(not_ca.to_string().contains("not a CA"), "{not_ca}");
}
