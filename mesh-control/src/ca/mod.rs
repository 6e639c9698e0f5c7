//! The mesh's certificate authority: X.509-SVIDs for workloads.
//!
//! Istio's istiod signs a workload's CSR after checking its Kubernetes
//! service-account token; without Kubernetes, a workload presents a join
//! token bound to a service account ([`JoinTokens`]). The CA then issues an
//! X.509-SVID (<https://github.com/spiffe/spiffe/blob/main/standards/X509-SVID.md>)
//! whose only subject alternative name is the URI
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, with
//! `serverAuth` and `clientAuth` extended key usages, `CA:FALSE`, an empty
//! subject (so the SAN extension is critical) and a short lifetime (24 h by
//! default, as Istio's). The identity always comes from the caller's
//! authenticated claim (the token), never from the CSR: a CSR's subject and
//! extensions are ignored, only its public key is used, after its signature
//! proves the caller holds the private key. Private keys never leave the
//! workload.
//!
//! The signing CA is either generated on first start and persisted to a
//! directory (`root-cert.pem`, `root-key.pem` with mode 0600), or supplied
//! by the operator (a root, or an intermediate with its chain up to the
//! root; the PKCS#8 key).
//!
//! Root rotation follows the overlap procedure of SPIRE and Istio's
//! plug-in CA rotation: [`CertificateAuthority::rotate_root`] puts the new
//! root into the trust bundle at once but keeps signing with the old one
//! for the rotation overlap (default: the default certificate lifetime, in
//! which every workload renews at half-life and so learns the new bundle);
//! then the new root signs, and the old root stays in the bundle until the
//! last certificate it issued has expired. No peer ever sees a certificate
//! from a root it does not trust yet.
//!
//! Replicas sharing an etcd (feature `etcd`) share one root too: the
//! first to start generates it and stores it in etcd with its key sealed
//! (`shared.rs`), the others read it; each builds its CA from it as from an
//! operator-supplied one.
//!
//! Methods ending in `_at` take the current time as an argument, for tests
//! and for callers with a clock of their own.

mod limits;
pub(crate) mod serving;
#[cfg(feature = "etcd")]
pub(crate) mod shared;
mod signer;
mod tokens;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mesh_core::model::Name;
use mesh_core::spiffe::SpiffeId;
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType,
    SubjectPublicKeyInfo,
};
use serde::{Deserialize, Serialize};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

use self::limits::Limiter;
pub use self::limits::RateLimit;
pub(crate) use self::limits::retry_after_seconds;
#[cfg(feature = "etcd")]
pub use self::shared::{CaKeyEncryptionKey, ENCRYPTION_KEY_LEN};
pub(crate) use self::signer::pem_encode;
use self::signer::{
    BACKDATE, Signer, parse_pems, random_serial, to_offset, truncate_to_seconds, write_file,
};
use self::tokens::Credentials;
pub use self::tokens::{JoinTokens, MIN_TOKEN_LEN, OperatorTokens, ServiceAccount};
pub(crate) use self::tokens::{bearer_token, constant_time_eq};
use crate::error::Error;

/// Istio's default workload certificate lifetime.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The longest lifetime a caller may ask for by default.
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// The lifetime of a generated root (Istio's self-signed root: 10 years).
pub const DEFAULT_ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The shortest lifetime a caller may ask for.
pub const MIN_LIFETIME: Duration = Duration::from_secs(1);

const STATE_FILE: &str = "ca-state.json";
const ROOT_STEM: &str = "root";
const PENDING_STEM: &str = "pending-root";

/// Why a token presented from an address was not accepted
/// ([`CertificateAuthority::authenticate_from`]).
#[derive(Debug)]
pub(crate) enum TokenRefusal {
    /// Not a join token (a 401).
    Unknown(Error),
    /// The address is out of failed attempts: try again after this (a
    /// 429 with `Retry-After`).
    Throttled(Duration),
    /// A read-only operator token, where a workload's is needed (a 403).
    Operator,
}

/// A certificate the CA issued.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    /// The leaf certificate followed by any intermediates (PEM), what a
    /// workload presents in handshakes. The root is not included.
    pub chain_pem: String,
    /// The roots to trust (PEM): during a rotation, old and new.
    pub trust_bundle_pem: String,
    /// The identity in the certificate.
    pub spiffe_id: SpiffeId,
    /// The serial number, hex.
    pub serial: String,
    /// Valid from (backdated a little for clock skew).
    pub not_before: SystemTime,
    /// Valid until; renew at half the lifetime.
    pub not_after: SystemTime,
}

/// The certificate authority (see the [module docs](self)). Thread-safe;
/// share it behind an `Arc`.
pub struct CertificateAuthority {
    trust_domain: Name,
    credentials: Credentials,
    /// Certificates signed, per identity.
    signing: Limiter<SpiffeId>,
    /// Failed token attempts, per source address.
    failed_tokens: Limiter<IpAddr>,
    /// Requests refused by each limit (`/metrics`).
    signing_throttled: AtomicU64,
    tokens_throttled: AtomicU64,
    default_lifetime: Duration,
    max_lifetime: Duration,
    root_lifetime: Duration,
    rotation_overlap: Duration,
    dir: Option<PathBuf>,
    state: Mutex<State>,
}

struct State {
    active: Signer,
    pending: Option<Pending>,
    retired: Vec<Retired>,
}

struct Pending {
    signer: Signer,
    activate_at: SystemTime,
}

/// A root that no longer signs but is trusted until `drop_after`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Retired {
    cert_pem: String,
    drop_after_unix: u64,
}

/// What the directory's `ca-state.json` holds besides the PEM files.
#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PersistedState {
    #[serde(default)]
    pending_activate_at_unix: Option<u64>,
    #[serde(default)]
    retired: Vec<Retired>,
}

/// Where the signing CA comes from.
enum Source {
    /// Generated in memory; lost on restart (tests, demos).
    Ephemeral,
    /// Generated on first start and persisted to (or read from) a directory.
    Directory(PathBuf),
    /// Supplied by the operator.
    Pem { chain: String, key: String },
}

/// Builds a [`CertificateAuthority`].
pub struct CaBuilder {
    trust_domain: String,
    source: Source,
    tokens: JoinTokens,
    tokens_file: Option<PathBuf>,
    operators: OperatorTokens,
    operators_file: Option<PathBuf>,
    signing_limit: RateLimit,
    failed_token_limit: RateLimit,
    default_lifetime: Duration,
    max_lifetime: Duration,
    root_lifetime: Duration,
    rotation_overlap: Option<Duration>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys nor the tokens.
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("join_tokens", &self.credentials.join().len())
            .field("default_lifetime", &self.default_lifetime)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A builder for a CA of `trust_domain` (`cluster.local`). Without a
    /// source it generates an in-memory root.
    pub fn builder(trust_domain: impl Into<String>) -> CaBuilder {
        CaBuilder {
            trust_domain: trust_domain.into(),
            source: Source::Ephemeral,
            tokens: JoinTokens::new(),
            tokens_file: None,
            operators: OperatorTokens::default(),
            operators_file: None,
            signing_limit: RateLimit::SIGNING,
            failed_token_limit: RateLimit::FAILED_TOKENS,
            default_lifetime: DEFAULT_LIFETIME,
            max_lifetime: DEFAULT_MAX_LIFETIME,
            root_lifetime: DEFAULT_ROOT_LIFETIME,
            rotation_overlap: None,
        }
    }

    /// The CA of `mesh-control serve --ca-dir DIR --join-tokens FILE
    /// --trust-domain TD`: persisted in `dir` (a root is generated on first
    /// start), accepting the join tokens of `join_tokens_file`.
    pub fn open(
        dir: &Path,
        join_tokens_file: &Path,
        trust_domain: &str,
    ) -> Result<CertificateAuthority, Error> {
        CertificateAuthority::builder(trust_domain)
            .directory(dir)
            .join_tokens_file(join_tokens_file)?
            .build()
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The lifetime of a certificate when the caller does not ask for one.
    pub fn default_lifetime(&self) -> Duration {
        self.default_lifetime
    }

    /// The identity a join token grants; `Denied` for an unknown token.
    pub fn authenticate(&self, token: &str) -> Result<SpiffeId, Error> {
        let tokens = self.credentials.join();
        let account = tokens
            .lookup(token)
            .ok_or_else(|| Error::denied("unknown join token"))?;
        account.spiffe_id(&self.trust_domain)
    }

    /// [`CertificateAuthority::authenticate`] for a token presented from
    /// `from`, with the failed-attempts limit of that address (see
    /// `limits.rs`): an address out of attempts gets
    /// [`TokenRefusal::Throttled`] before its token is looked up, an
    /// unknown token costs it one attempt. An operator token is
    /// [`TokenRefusal::Operator`]: it may only read.
    pub(crate) fn authenticate_from(
        &self,
        token: &str,
        from: IpAddr,
    ) -> Result<SpiffeId, TokenRefusal> {
        let now = Instant::now();
        if let Err(wait) = self.failed_tokens.check(&from, now) {
            self.tokens_throttled.fetch_add(1, Ordering::Relaxed);
            return Err(TokenRefusal::Throttled(wait));
        }
        match self.authenticate(token) {
            Ok(id) => Ok(id),
            Err(_) if self.is_operator(token) => Err(TokenRefusal::Operator),
            Err(e) => {
                // Counted now; the next attempt past the limit is refused.
                let _ = self.failed_tokens.take(&from, now);
                Err(TokenRefusal::Unknown(e))
            }
        }
    }

    /// Whether `token` is a read-only operator token (see
    /// [`OperatorTokens`]).
    pub(crate) fn is_operator(&self, token: &str) -> bool {
        self.credentials.operators().contains(token)
    }

    /// Takes one certificate of `identity`'s signing limit: `Err` is how
    /// long until it may have another (a 429).
    pub(crate) fn admit_signing(&self, identity: &SpiffeId) -> Result<(), Duration> {
        self.signing
            .take(identity, Instant::now())
            .inspect_err(|_| {
                self.signing_throttled.fetch_add(1, Ordering::Relaxed);
            })
    }

    /// How many requests each limit refused: (certificate signing, failed
    /// token attempts).
    pub(crate) fn throttled(&self) -> (u64, u64) {
        (
            self.signing_throttled.load(Ordering::Relaxed),
            self.tokens_throttled.load(Ordering::Relaxed),
        )
    }

    /// Issues a certificate for the identity `token` grants. `requested`,
    /// when given, must be that identity: a workload can obtain
    /// certificates only for its own service account. `lifetime` defaults
    /// to [`CertificateAuthority::default_lifetime`].
    pub fn issue_with_token(
        &self,
        token: &str,
        csr_pem: &str,
        requested: Option<&SpiffeId>,
        lifetime: Option<Duration>,
    ) -> Result<IssuedCertificate, Error> {
        let identity = self.authenticate(token)?;
        if let Some(requested) = requested
            && *requested != identity
        {
            return Err(Error::denied(format!(
                "the join token is for {identity}; it cannot obtain a certificate for {requested}"
            )));
        }
        self.sign_csr(csr_pem, &identity, lifetime)
    }

    /// Signs `csr_pem` (PKCS#10) as an X.509-SVID for `identity`, which must
    /// be an authenticated claim of the caller (see [`Self::authenticate`]):
    /// the CSR's subject and extensions are ignored.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        lifetime: Option<Duration>,
    ) -> Result<IssuedCertificate, Error> {
        self.sign_csr_at(csr_pem, identity, lifetime, SystemTime::now())
    }

    /// [`Self::sign_csr`] at time `now`.
    pub fn sign_csr_at(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        lifetime: Option<Duration>,
        now: SystemTime,
    ) -> Result<IssuedCertificate, Error> {
        self.check_identity_and_lifetime(identity, lifetime)?;
        let public_key = csr_public_key(csr_pem)?;
        self.sign_key_at(&public_key, identity, &[], lifetime, now)
    }

    /// Issues mesh-control's own serving certificate: a fresh key (it never
    /// leaves the process) and a certificate for `identity` that also names
    /// `dns_names` and `ips`, so clients that verify a host name (the
    /// bootstrap's `ca_certificate_file`, `mesh-control status --ca-file`)
    /// accept it as well as SPIFFE-aware ones. Returns the certificate and
    /// the PKCS#8 key (PEM).
    pub fn issue_serving_certificate(
        &self,
        identity: &SpiffeId,
        dns_names: &[String],
        ips: &[IpAddr],
        lifetime: Option<Duration>,
    ) -> Result<(IssuedCertificate, String), Error> {
        self.issue_serving_certificate_at(identity, dns_names, ips, lifetime, SystemTime::now())
    }

    /// [`Self::issue_serving_certificate`] at time `now`.
    pub fn issue_serving_certificate_at(
        &self,
        identity: &SpiffeId,
        dns_names: &[String],
        ips: &[IpAddr],
        lifetime: Option<Duration>,
        now: SystemTime,
    ) -> Result<(IssuedCertificate, String), Error> {
        self.check_identity_and_lifetime(identity, lifetime)?;
        let key = rcgen::KeyPair::generate()
            .map_err(|e| Error::config(format!("cannot generate a serving key: {e}")))?;
        let mut sans = Vec::with_capacity(dns_names.len() + ips.len());
        for name in dns_names {
            sans.push(SanType::DnsName(name.as_str().try_into().map_err(|e| {
                Error::config(format!("serving certificate: DNS name {name:?}: {e}"))
            })?));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let issued = self.sign_key_at(&key, identity, &sans, lifetime, now)?;
        Ok((issued, key.serialize_pem()))
    }

    fn check_identity_and_lifetime(
        &self,
        identity: &SpiffeId,
        lifetime: Option<Duration>,
    ) -> Result<(), Error> {
        if identity.trust_domain() != &*self.trust_domain {
            return Err(Error::denied(format!(
                "{identity} is not in the trust domain {}",
                self.trust_domain
            )));
        }
        let lifetime = lifetime.unwrap_or(self.default_lifetime);
        if lifetime < MIN_LIFETIME || lifetime > self.max_lifetime {
            return Err(Error::invalid_request(format!(
                "a certificate lifetime of {lifetime:?} is outside {MIN_LIFETIME:?}..={:?}",
                self.max_lifetime
            )));
        }
        Ok(())
    }

    /// Signs `public_key` for `identity` (the URI SAN, first) plus
    /// `extra_sans`.
    fn sign_key_at(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        identity: &SpiffeId,
        extra_sans: &[SanType],
        lifetime: Option<Duration>,
        now: SystemTime,
    ) -> Result<IssuedCertificate, Error> {
        self.check_identity_and_lifetime(identity, lifetime)?;
        let lifetime = lifetime.unwrap_or(self.default_lifetime);
        let mut state = self.lock_at(now);
        let signer = &mut state.active;
        let mut not_after = now.checked_add(lifetime).unwrap_or(now);
        if not_after > signer.not_after {
            tracing::warn!(
                %identity,
                "the CA certificate expires before the requested lifetime ends; the certificate \
                 ends with it"
            );
            not_after = signer.not_after;
        }
        let not_before = now.checked_sub(BACKDATE).unwrap_or(now);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names =
            vec![SanType::URI(identity.as_str().try_into().map_err(|e| {
                Error::invalid_request(format!("{identity}: {e}"))
            })?)];
        params.subject_alt_names.extend_from_slice(extra_sans);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = to_offset(not_before);
        params.not_after = to_offset(not_after);
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        let cert = params
            .signed_by(public_key, &signer.issuer)
            .map_err(|e| Error::invalid_request(format!("cannot sign the CSR: {e}")))?;
        let not_after = truncate_to_seconds(not_after);
        signer.last_issued_expiry = signer.last_issued_expiry.max(not_after);
        let chain_pem = format!("{}{}", cert.pem(), signer.intermediates_pem);
        let trust_bundle_pem = state.bundle();
        Ok(IssuedCertificate {
            chain_pem,
            trust_bundle_pem,
            spiffe_id: identity.clone(),
            serial: serial
                .to_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            not_before: truncate_to_seconds(not_before),
            not_after,
        })
    }

    /// The SPIFFE ID a CSR asks for in its subject alternative names, if
    /// any. The CA never takes the identity from a CSR; this lets the
    /// certificate API refuse, naming both, a CSR that asks for another
    /// identity than the caller's token grants instead of silently
    /// issuing a certificate the workload did not expect.
    pub fn csr_requested_identity(csr_pem: &str) -> Result<Option<SpiffeId>, Error> {
        let der = csr_der(csr_pem)?;
        let (_, csr) = X509CertificationRequest::from_der(&der)
            .map_err(|e| Error::invalid_request(format!("CSR: not a PKCS#10 request: {e}")))?;
        for ext in csr.requested_extensions().into_iter().flatten() {
            if let x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) = ext {
                for name in &san.general_names {
                    if let x509_parser::extensions::GeneralName::URI(uri) = name
                        && uri.starts_with("spiffe://")
                    {
                        return SpiffeId::parse(uri)
                            .map(Some)
                            .map_err(|e| Error::invalid_request(format!("CSR: {e}")));
                    }
                }
            }
        }
        Ok(None)
    }

    /// The join tokens this CA accepts (registration authenticates with them too).
    pub fn join_tokens(&self) -> Arc<JoinTokens> {
        self.credentials.join()
    }

    /// The roots workloads must trust (PEM): the signing root, plus during
    /// a rotation the incoming or the retiring one.
    pub fn trust_bundle_pem(&self) -> String {
        self.trust_bundle_pem_at(SystemTime::now())
    }

    /// [`Self::trust_bundle_pem`] at time `now`.
    pub fn trust_bundle_pem_at(&self, now: SystemTime) -> String {
        self.lock_at(now).bundle()
    }

    /// The root that currently signs (PEM).
    pub fn signing_root_pem(&self) -> String {
        self.lock_at(SystemTime::now()).active.root_pem.clone()
    }

    /// Starts a rotation to a newly generated root (see the
    /// [module docs](self)). Fails while another rotation is under way.
    pub fn rotate_root(&self) -> Result<(), Error> {
        self.rotate_root_at(SystemTime::now())
    }

    /// [`Self::rotate_root`] at time `now`.
    pub fn rotate_root_at(&self, now: SystemTime) -> Result<(), Error> {
        let signer = Signer::generate(&self.trust_domain, self.root_lifetime, now)?;
        self.begin_rotation(signer, now)
    }

    /// Starts a rotation to an operator-supplied CA (`chain_pem`: the
    /// signing certificate first, ending with its root; `key_pem`: PKCS#8).
    pub fn rotate_to_pem(&self, chain_pem: &str, key_pem: &str) -> Result<(), Error> {
        let now = SystemTime::now();
        let mut signer = Signer::from_pem(chain_pem, key_pem, now, self.max_lifetime)?;
        signer.last_issued_expiry = now;
        self.begin_rotation(signer, now)
    }

    fn begin_rotation(&self, signer: Signer, now: SystemTime) -> Result<(), Error> {
        let mut state = self.lock_at(now);
        if let Some(pending) = &state.pending {
            return Err(Error::config(format!(
                "a root rotation is under way until {}; start the next one after it",
                unix(pending.activate_at)
            )));
        }
        let activate_at = now.checked_add(self.rotation_overlap).unwrap_or(now);
        if let Some(dir) = &self.dir {
            signer.save(dir, PENDING_STEM)?;
        }
        state.pending = Some(Pending {
            signer,
            activate_at,
        });
        if let Some(dir) = &self.dir {
            state.persist(dir)?;
        }
        drop(state);
        tracing::info!(
            trust_domain = %self.trust_domain,
            activate_at = unix(activate_at),
            "root rotation started: the new root is in the trust bundle and signs after the overlap"
        );
        // Activation at once when there is no overlap.
        drop(self.lock_at(now));
        Ok(())
    }

    /// The state, with any due activation done and expired roots dropped.
    fn lock_at(&self, now: SystemTime) -> MutexGuard<'_, State> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.advance(now)
            && let Some(dir) = &self.dir
        {
            let result = state
                .active
                .save(dir, ROOT_STEM)
                .and_then(|()| state.persist(dir))
                .and_then(|()| remove_signer_files(dir, PENDING_STEM));
            if let Err(e) = result {
                // The files still say "pending, due": a restart redoes this.
                tracing::warn!(error = %e, "cannot persist the CA state");
            }
        }
        state
    }
}

impl State {
    /// Activates a due pending root and drops expired retired roots.
    /// Returns whether the persisted state changed.
    fn advance(&mut self, now: SystemTime) -> bool {
        let mut changed = false;
        if self.pending.as_ref().is_some_and(|p| p.activate_at <= now)
            && let Some(pending) = self.pending.take()
        {
            let old = std::mem::replace(&mut self.active, pending.signer);
            self.active.last_issued_expiry = self.active.last_issued_expiry.max(now);
            self.retired.push(Retired {
                cert_pem: old.root_pem,
                drop_after_unix: unix(old.last_issued_expiry.max(now)),
            });
            tracing::info!("root rotation: the new root signs now");
            changed = true;
        }
        let before = self.retired.len();
        let now_unix = unix(now);
        self.retired.retain(|r| r.drop_after_unix >= now_unix);
        changed || self.retired.len() != before
    }

    fn bundle(&self) -> String {
        let mut roots = vec![self.active.root_pem.as_str()];
        if let Some(pending) = &self.pending {
            roots.push(pending.signer.root_pem.as_str());
        }
        roots.extend(self.retired.iter().map(|r| r.cert_pem.as_str()));
        let mut bundle = String::new();
        for root in roots {
            if !bundle.contains(root) {
                bundle.push_str(root);
            }
        }
        bundle
    }

    fn persist(&self, dir: &Path) -> Result<(), Error> {
        let state = PersistedState {
            pending_activate_at_unix: self.pending.as_ref().map(|p| unix(p.activate_at)),
            retired: self.retired.clone(),
        };
        let json = serde_json::to_string_pretty(&state)
            .map_err(|e| Error::config(format!("cannot encode the CA state: {e}")))?;
        write_file(&dir.join(STATE_FILE), &json, false)
    }
}

impl CaBuilder {
    /// Persist the CA in `dir`: a root is generated on first start and read
    /// back on later ones (an operator may also put `root-cert.pem` and
    /// `root-key.pem` there).
    pub fn directory(mut self, dir: impl Into<PathBuf>) -> Self {
        self.source = Source::Directory(dir.into());
        self
    }

    /// Use an operator-supplied CA: `chain_pem` holds the signing
    /// certificate (root or intermediate) first and ends with the root;
    /// `key_pem` is its PKCS#8 private key.
    pub fn signing_pem(mut self, chain_pem: impl Into<String>, key_pem: impl Into<String>) -> Self {
        self.source = Source::Pem {
            chain: chain_pem.into(),
            key: key_pem.into(),
        };
        self
    }

    /// The join tokens the CA accepts (none by default: every token is denied).
    pub fn join_tokens(mut self, tokens: JoinTokens) -> Self {
        self.tokens = tokens;
        self.tokens_file = None;
        self
    }

    /// The join tokens from a JSON file (see [`JoinTokens::from_json`]);
    /// the error names the file.
    pub fn join_tokens_file(self, path: &Path) -> Result<Self, Error> {
        let mut builder = self.join_tokens(JoinTokens::load(path)?);
        builder.tokens_file = Some(path.to_path_buf());
        Ok(builder)
    }

    /// Read-only operator tokens: `/status`, `/v1/services` and `/metrics`
    /// accept them as `Authorization: Bearer`, nothing else does (see
    /// [`OperatorTokens`]).
    pub fn operator_tokens(mut self, tokens: OperatorTokens) -> Self {
        self.operators = tokens;
        self.operators_file = None;
        self
    }

    /// Operator tokens from a file (one per line), read again whenever it
    /// changes (`serve --operator-token-file`).
    pub fn operator_tokens_file(self, path: &Path) -> Result<Self, Error> {
        let mut builder = self.operator_tokens(OperatorTokens::load(path)?);
        builder.operators_file = Some(path.to_path_buf());
        Ok(builder)
    }

    /// How many certificates one identity may have signed: a burst, then a
    /// rate (default [`RateLimit::SIGNING`]). Beyond it `POST
    /// /v1/certificates` answers 429 with `Retry-After`.
    pub fn signing_rate_limit(mut self, limit: RateLimit) -> Self {
        self.signing_limit = limit;
        self
    }

    /// How many unknown tokens one source address may try: a burst, then
    /// a rate (default [`RateLimit::FAILED_TOKENS`]). Beyond it every
    /// token from that address gets 429 with `Retry-After`, before it is
    /// looked up.
    pub fn failed_token_rate_limit(mut self, limit: RateLimit) -> Self {
        self.failed_token_limit = limit;
        self
    }

    /// The lifetime of certificates whose caller does not ask for one
    /// (default 24 h).
    pub fn default_lifetime(mut self, lifetime: Duration) -> Self {
        self.default_lifetime = lifetime;
        self
    }

    /// The longest lifetime a caller may ask for (default 7 days).
    pub fn max_lifetime(mut self, lifetime: Duration) -> Self {
        self.max_lifetime = lifetime;
        self
    }

    /// The lifetime of generated roots (default 10 years).
    pub fn root_lifetime(mut self, lifetime: Duration) -> Self {
        self.root_lifetime = lifetime;
        self
    }

    /// How long a new root is trusted before it signs (default: the default
    /// lifetime, so every workload has renewed, and learned the new bundle,
    /// before it meets a certificate from the new root).
    pub fn rotation_overlap(mut self, overlap: Duration) -> Self {
        self.rotation_overlap = Some(overlap);
        self
    }

    /// Generates, loads or checks the signing CA.
    pub fn build(mut self) -> Result<CertificateAuthority, Error> {
        let now = SystemTime::now();
        SpiffeId::new(&self.trust_domain, "ns", "sa")
            .map_err(|e| Error::config(format!("CA: {e}")))?;
        if self.default_lifetime < MIN_LIFETIME || self.default_lifetime > self.max_lifetime {
            return Err(Error::config(format!(
                "CA: the default lifetime {:?} must be within {MIN_LIFETIME:?}..={:?}",
                self.default_lifetime, self.max_lifetime
            )));
        }
        let mut dir = None;
        let source = std::mem::replace(&mut self.source, Source::Ephemeral);
        let state = match source {
            Source::Ephemeral => State {
                active: Signer::generate(&self.trust_domain, self.root_lifetime, now)?,
                pending: None,
                retired: Vec::new(),
            },
            Source::Pem { chain, key } => State {
                active: Signer::from_pem(&chain, &key, now, self.max_lifetime)?,
                pending: None,
                retired: Vec::new(),
            },
            Source::Directory(path) => {
                let state = load_or_generate(&path, &self, now)?;
                dir = Some(path);
                state
            }
        };
        let ca = CertificateAuthority {
            trust_domain: Name::from(self.trust_domain),
            credentials: Credentials::new(
                std::mem::take(&mut self.tokens),
                self.tokens_file.take(),
                std::mem::take(&mut self.operators),
                self.operators_file.take(),
            ),
            signing: Limiter::new(self.signing_limit),
            failed_tokens: Limiter::new(self.failed_token_limit),
            signing_throttled: AtomicU64::new(0),
            tokens_throttled: AtomicU64::new(0),
            default_lifetime: self.default_lifetime,
            max_lifetime: self.max_lifetime,
            root_lifetime: self.root_lifetime,
            rotation_overlap: self.rotation_overlap.unwrap_or(self.default_lifetime),
            dir,
            state: Mutex::new(state),
        };
        // A rotation that came due while the control server was down.
        drop(ca.lock_at(now));
        Ok(ca)
    }
}

fn load_or_generate(dir: &Path, b: &CaBuilder, now: SystemTime) -> Result<State, Error> {
    create_private_dir(dir)?;
    let active = match Signer::load(dir, ROOT_STEM, now, b.max_lifetime)? {
        Some(signer) => {
            tracing::info!(dir = %dir.display(), "CA: using the root in the directory");
            signer
        }
        None => {
            let signer = Signer::generate(&b.trust_domain, b.root_lifetime, now)?;
            signer.save(dir, ROOT_STEM)?;
            tracing::info!(dir = %dir.display(), "CA: generated a new root");
            signer
        }
    };
    let state_path = dir.join(STATE_FILE);
    let persisted: PersistedState = match std::fs::read_to_string(&state_path) {
        Ok(json) => serde_json::from_str(&json)
            .map_err(|e| Error::config(format!("{}: {e}", state_path.display())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => PersistedState::default(),
        Err(e) => {
            return Err(Error::io(
                format!("cannot read {}", state_path.display()),
                e,
            ));
        }
    };
    let pending = match persisted.pending_activate_at_unix {
        Some(at) => {
            let signer =
                Signer::load(dir, PENDING_STEM, now, b.max_lifetime)?.ok_or_else(|| {
                    Error::config(format!(
                        "{} names a pending root, but {PENDING_STEM}-cert.pem is missing",
                        state_path.display()
                    ))
                })?;
            Some(Pending {
                signer,
                activate_at: UNIX_EPOCH + Duration::from_secs(at),
            })
        }
        None => None,
    };
    Ok(State {
        active,
        pending,
        retired: persisted.retired,
    })
}

fn create_private_dir(dir: &Path) -> Result<(), Error> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))
}

fn remove_signer_files(dir: &Path, stem: &str) -> Result<(), Error> {
    for suffix in ["key", "cert"] {
        let path = dir.join(format!("{stem}-{suffix}.pem"));
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("cannot remove {}", path.display()), e)),
        }
    }
    Ok(())
}

/// The public key of a PKCS#10 CSR whose signature verifies (the caller
/// holds the private key).
fn csr_public_key(csr_pem: &str) -> Result<SubjectPublicKeyInfo, Error> {
    let der = csr_der(csr_pem)?;
    let (_, csr) = X509CertificationRequest::from_der(&der)
        .map_err(|e| Error::invalid_request(format!("CSR: not a PKCS#10 request: {e}")))?;
    csr.verify_signature().map_err(|e| {
        Error::invalid_request(format!(
            "CSR: the signature does not verify (the request must be signed with its key): {e}"
        ))
    })?;
    SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
        .map_err(|e| Error::invalid_request(format!("CSR: unsupported public key: {e}")))
}

/// The DER of the one CSR block in `csr_pem`.
fn csr_der(csr_pem: &str) -> Result<Vec<u8>, Error> {
    let mut blocks = parse_pems(csr_pem, "CERTIFICATE REQUEST")
        .map_err(|e| Error::invalid_request(format!("CSR: {e}")))?;
    if blocks.is_empty() {
        blocks = parse_pems(csr_pem, "NEW CERTIFICATE REQUEST")
            .map_err(|e| Error::invalid_request(format!("CSR: {e}")))?;
    }
    let [block] = blocks.as_slice() else {
        return Err(Error::invalid_request(
            "expected one PEM \"CERTIFICATE REQUEST\" block",
        ));
    };
    Ok(block.contents.clone())
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests;
