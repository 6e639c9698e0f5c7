//! CSR handling of `POST /v1/certificates`: the PEM the body's `csr`
//! carries, its one `CERTIFICATE REQUEST` block, the PKCS#10 parse, the
//! requested SPIFFE ID, the signature check and the signing by the mesh CA
//! for the identity a join token grants.
//!
//! The input is a mode byte, then: with bit 0 clear, the `csr` text as sent;
//! with bit 0 set, DER bytes that the target wraps in a PEM block, so the
//! fuzzer reaches the PKCS#10 parser without having to learn base64.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use mesh_control::ca::{CertificateAuthority, JoinTokens};

const TOKEN: &str = "token-for-catalog-0123456789";

fn ca() -> &'static CertificateAuthority {
    static CA: OnceLock<CertificateAuthority> = OnceLock::new();
    CA.get_or_init(|| {
        let mut tokens = JoinTokens::new();
        tokens
            .insert(TOKEN, "shop", "catalog")
            .expect("a fixed token is valid");
        CertificateAuthority::builder("cluster.local")
            .join_tokens(tokens)
            .build()
            .expect("an in-memory CA builds")
    })
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for (i, chunk) in bytes.chunks(3).enumerate() {
        if i > 0 && i % 16 == 0 {
            out.push('\n');
        }
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let pem = if mode & 1 == 1 {
        format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            base64(rest)
        )
    } else {
        match std::str::from_utf8(rest) {
            Ok(text) => text.to_string(),
            Err(_) => return,
        }
    };
    let ca = ca();
    let requested = match CertificateAuthority::csr_requested_identity(&pem) {
        Ok(requested) => requested,
        Err(_) => return,
    };
    let lifetime = (mode & 2 == 2).then(|| Duration::from_secs(3600));
    if let Ok(issued) = ca.issue_with_token(TOKEN, &pem, requested.as_ref(), lifetime) {
        assert_eq!(
            issued.spiffe_id.to_string(),
            "spiffe://cluster.local/ns/shop/sa/catalog"
        );
    }
    let identity = ca.authenticate(TOKEN).expect("the fixed token is known");
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let _ = ca.sign_csr_at(&pem, &identity, lifetime, now);
});
