//! [`Etcd`]: the calls, and failover across endpoints.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tonic::Status;
use tonic::transport::Channel;

use super::error::{Failure, from_status, is_timeout};
use super::pb::etcdserverpb as pb;
use super::pb::etcdserverpb::kv_client::KvClient;
use super::pb::etcdserverpb::lease_client::LeaseClient;
use super::pb::etcdserverpb::maintenance_client::MaintenanceClient;
use super::transport::{self, ChannelTimeouts, EtcdEndpoint, EtcdTls};
use super::txn::{Op, Txn, TxnResponse};
use super::watch::{self, Watch};
use super::{Error, ErrorKind, KeyValue, Lease, LeaseId, LeaseInfo, ServerStatus, show_key};

/// The largest message the client decodes. etcd sends any size (its
/// `--max-recv-bytes` bounds requests only), and a watch response carries
/// every event of a revision: a transaction writing many keys is one
/// response. Lists are paged (see [`Etcd::get_prefix`]).
const MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// Keys per page of [`Etcd::get_prefix`].
const PAGE: i64 = 1000;

/// Timeouts of an [`Etcd`] client. The defaults suit a replica: fail a
/// dead endpoint within a second, give a live but busy etcd a few seconds.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EtcdOptions {
    /// TCP connect plus TLS handshake, per endpoint (default 1 s). A
    /// refused connection fails at once whatever this is.
    pub connect_timeout: Duration,
    /// One call on one endpoint, connection included (default 5 s); sent
    /// to etcd as the call's deadline too. With several endpoints a call
    /// may take this long on each before failing over.
    pub request_timeout: Duration,
    /// HTTP/2 pings while a watch or keep-alive stream is open (default
    /// 10 s), so a peer that vanished without closing the connection (a
    /// host down, a partition) is noticed. Keep it at or above etcd's
    /// `--grpc-keepalive-min-time` (5 s by default), or etcd closes the
    /// connection for pinging too often.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is dropped
    /// (default 5 s).
    pub keepalive_timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
        }
    }
}

/// A client of etcd's v3 API, for a cluster given by its client URLs.
///
/// Cheap to clone (clones share channels). Each call goes to the endpoint
/// that answered last and, when that one cannot be reached, to the next
/// ones in order. A call that failed before its request left (connection
/// refused, connect timeout, TLS handshake) is always tried on the next
/// endpoint; a call whose connection broke afterwards is tried again
/// (once more on every endpoint) only when it is a read or a lease renewal
/// (a write may have been applied, so it returns
/// [`ErrorKind::Unavailable`] and the caller decides). Reads are
/// linearizable (etcd's default), so any member answers the same.
///
/// Needs a tokio runtime (channels and watches run tasks on it).
#[derive(Clone)]
pub struct Etcd {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: Vec<EtcdEndpoint>,
    /// The endpoint that answered last: where calls start.
    active: AtomicUsize,
    options: EtcdOptions,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints())
            .field("options", &self.inner.options)
            .finish()
    }
}

/// Whether a call may be sent again after its connection broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// A read (or a renewal): sending it twice does no harm.
    Idempotent,
    /// A write: sent again only if it never left.
    OnlyUnsent,
}

impl Etcd {
    /// Connects to the etcd cluster at `endpoints` (client URLs such as
    /// `http://10.0.0.1:2379`, or `https://...` with `tls`), with the
    /// default [`EtcdOptions`], and checks that one answers (etcd's Status
    /// call): a replica configured with the wrong URLs or certificates
    /// learns it at start, not at its first write.
    pub async fn connect(endpoints: &[String], tls: Option<EtcdTls>) -> Result<Etcd, Error> {
        Etcd::connect_with(endpoints, tls, EtcdOptions::default()).await
    }

    /// [`Etcd::connect`] with other timeouts.
    pub async fn connect_with(
        endpoints: &[String],
        tls: Option<EtcdTls>,
        options: EtcdOptions,
    ) -> Result<Etcd, Error> {
        let etcd = Etcd::new_lazy(endpoints, tls, options)?;
        etcd.status().await?;
        Ok(etcd)
    }

    /// The client without the check of [`Etcd::connect`]: nothing is
    /// dialled until the first call. Errors are settings only (endpoints
    /// that are not client URLs, unreadable TLS files).
    pub fn new_lazy(
        endpoints: &[String],
        tls: Option<EtcdTls>,
        options: EtcdOptions,
    ) -> Result<Etcd, Error> {
        if endpoints.is_empty() {
            return Err(Error::config(
                "no etcd endpoints given: list etcd's client URLs (its --advertise-client-urls)",
            ));
        }
        let timeouts = ChannelTimeouts {
            connect: options.connect_timeout,
            keepalive_interval: options.keepalive_interval,
            keepalive_timeout: options.keepalive_timeout,
        };
        let mut parsed: Vec<EtcdEndpoint> = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let uri = transport::parse_endpoint(endpoint, tls.is_some())?;
            let url = uri.to_string().trim_end_matches('/').to_owned();
            if parsed.iter().any(|e| e.url == url) {
                continue;
            }
            let channel = transport::channel(uri, tls.as_ref(), timeouts)?;
            parsed.push(EtcdEndpoint { url, channel });
        }
        Ok(Etcd {
            inner: Arc::new(Inner {
                endpoints: parsed,
                active: AtomicUsize::new(0),
                options,
            }),
        })
    }

    /// The endpoints, normalized (`http://host:port`), in the order they
    /// are tried.
    pub fn endpoints(&self) -> Vec<&str> {
        self.inner
            .endpoints
            .iter()
            .map(|e| e.url.as_str())
            .collect()
    }

    /// A request carrying the call's deadline, so etcd gives up when this
    /// client does.
    pub(crate) fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.inner.options.request_timeout);
        request
    }

    /// Runs `attempt` on the endpoints in turn, from the one that answered
    /// last, until one answers (see the type's docs for which failures
    /// move on). `what` names the call in errors. The endpoint that
    /// answered is returned with the value.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        what: &str,
        retry: Retry,
        mut attempt: F,
    ) -> Result<(T, &str), Error>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let endpoints = &self.inner.endpoints;
        let count = endpoints.len();
        let first = self.inner.active.load(Ordering::Relaxed) % count;
        let timeout = self.inner.options.request_timeout;
        let mut failures: Vec<Error> = Vec::new();
        // A read whose connection broke gets a second round: the first call
        // after etcd went away can fail on the dead connection before the
        // client has noticed it, and the second one reconnects (or says
        // why it cannot).
        let rounds = if retry == Retry::Idempotent { 2 } else { 1 };
        for _ in 0..rounds {
            failures.clear();
            let mut reconnecting_may_help = false;
            for offset in 0..count {
                let index = (first + offset) % count;
                let endpoint = &endpoints[index];
                let url = endpoint.url.as_str();
                let outcome =
                    tokio::time::timeout(timeout, attempt(endpoint.channel.clone())).await;
                let failure = match outcome {
                    Ok(Ok(value)) => {
                        self.inner.active.store(index, Ordering::Relaxed);
                        return Ok((value, url));
                    }
                    Ok(Err(status)) if is_timeout(&status) => no_answer(url, what, timeout),
                    Ok(Err(status)) => {
                        let failure = from_status(url, what, &status);
                        reconnecting_may_help |= matches!(failure, Failure::Broken(_));
                        failure
                    }
                    Err(_) => no_answer(url, what, timeout),
                };
                match failure {
                    Failure::Answered(error) => {
                        self.inner.active.store(index, Ordering::Relaxed);
                        return Err(error);
                    }
                    Failure::NotSent(error) => failures.push(error),
                    Failure::Broken(error) if retry == Retry::Idempotent => failures.push(error),
                    Failure::Broken(error) => {
                        self.inner
                            .active
                            .store((index + 1) % count, Ordering::Relaxed);
                        return Err(Error::new(
                            error.kind(),
                            format!(
                                "{error}; the {what} may or may not have been applied: read \
                                 before writing again"
                            ),
                        )
                        .at(url));
                    }
                }
            }
            if !reconnecting_may_help {
                break;
            }
        }
        Err(all_failed(what, failures))
    }

    /// Status of the member that answers: its version, the store's
    /// revision, its leader. [`Etcd::connect`] calls it to check that the
    /// cluster answers.
    pub async fn status(&self) -> Result<ServerStatus, Error> {
        let (response, endpoint) = self
            .call("status", Retry::Idempotent, |channel| {
                let request = self.request(pb::StatusRequest {});
                async move {
                    MaintenanceClient::new(channel)
                        .status(request)
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await?;
        let header = header(response.header.as_ref(), endpoint, "status")?;
        Ok(ServerStatus {
            endpoint: endpoint.to_owned(),
            version: response.version,
            revision: header.revision,
            member_id: header.member_id,
            leader: response.leader,
            raft_term: response.raft_term,
            db_size: response.db_size,
            errors: response.errors,
        })
    }

    /// The value of `key`, if it exists.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<KeyValue>, Error> {
        let key = key.as_ref();
        let what = format!("get {}", show_key(key));
        let request = pb::RangeRequest {
            key: key.to_vec(),
            ..Default::default()
        };
        let (response, _) = self.range(&what, request).await?;
        Ok(response.kvs.into_iter().next().map(KeyValue::from))
    }

    /// Every key under `prefix` (all keys for an empty prefix), sorted by
    /// key, and the store revision they were read at: one consistent view
    /// even when it takes several pages, which is what a watch resumes
    /// from (`watch_prefix(prefix, revision + 1)`).
    pub async fn get_prefix(
        &self,
        prefix: impl AsRef<[u8]>,
    ) -> Result<(Vec<KeyValue>, i64), Error> {
        let prefix = prefix.as_ref();
        let what = format!("list prefix {}", show_key(prefix));
        let range_end = prefix_end(prefix);
        let mut kvs = Vec::new();
        let mut from = prefix.to_vec();
        let mut revision = 0;
        loop {
            let request = pb::RangeRequest {
                key: from,
                range_end: range_end.clone(),
                limit: PAGE,
                revision,
                ..Default::default()
            };
            let (response, endpoint) = self.range(&what, request).await?;
            let read_at = header(response.header.as_ref(), &endpoint, &what)?.revision;
            if revision == 0 {
                revision = read_at;
            }
            let Some(last) = response.kvs.last() else {
                break;
            };
            let mut next = last.key.clone();
            next.push(0);
            kvs.extend(response.kvs.into_iter().map(KeyValue::from));
            if !response.more {
                break;
            }
            from = next;
        }
        Ok((kvs, revision))
    }

    async fn range(
        &self,
        what: &str,
        request: pb::RangeRequest,
    ) -> Result<(pb::RangeResponse, String), Error> {
        let (response, endpoint) = self
            .call(what, Retry::Idempotent, |channel| {
                let request = self.request(request.clone());
                async move {
                    KvClient::new(channel)
                        .max_decoding_message_size(MAX_MESSAGE)
                        .range(request)
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await?;
        Ok((response, endpoint.to_owned()))
    }

    /// Writes `value` at `key`, attached to `lease` if given (the key is
    /// deleted when the lease ends); returns the revision of the write.
    pub async fn put(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        lease: Option<LeaseId>,
    ) -> Result<i64, Error> {
        let key = key.as_ref();
        let what = format!("put {}", show_key(key));
        let request = pb::PutRequest {
            key: key.to_vec(),
            value: value.as_ref().to_vec(),
            lease: lease.map_or(0, LeaseId::get),
            ..Default::default()
        };
        let (response, endpoint) = self
            .call(&what, Retry::OnlyUnsent, |channel| {
                let request = self.request(request.clone());
                async move {
                    KvClient::new(channel)
                        .put(request)
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await?;
        Ok(header(response.header.as_ref(), endpoint, &what)?.revision)
    }

    /// Deletes `key`; returns whether it existed.
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<bool, Error> {
        let key = key.as_ref();
        let what = format!("delete {}", show_key(key));
        let deleted = self.delete_range(&what, key.to_vec(), Vec::new()).await?;
        Ok(deleted > 0)
    }

    /// Deletes every key under `prefix`; returns how many there were.
    pub async fn delete_prefix(&self, prefix: impl AsRef<[u8]>) -> Result<u64, Error> {
        let prefix = prefix.as_ref();
        let what = format!("delete prefix {}", show_key(prefix));
        self.delete_range(&what, prefix.to_vec(), prefix_end(prefix))
            .await
    }

    async fn delete_range(
        &self,
        what: &str,
        key: Vec<u8>,
        range_end: Vec<u8>,
    ) -> Result<u64, Error> {
        let request = pb::DeleteRangeRequest {
            key,
            range_end,
            prev_kv: false,
        };
        let (response, _) = self
            .call(what, Retry::OnlyUnsent, |channel| {
                let request = self.request(request.clone());
                async move {
                    KvClient::new(channel)
                        .delete_range(request)
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await?;
        Ok(u64::try_from(response.deleted).unwrap_or(0))
    }

    /// Runs a transaction: if every comparison of `txn` holds, its success
    /// operations, else its failure operations, atomically at one revision.
    /// That the comparisons failed is not an error here
    /// ([`TxnResponse::succeeded`] says); see [`Etcd::commit_if_unchanged`]
    /// for the common case.
    pub async fn txn(&self, txn: Txn) -> Result<TxnResponse, Error> {
        let what = "transaction";
        let request = txn.into_request();
        let (response, endpoint) = self
            .call(what, Retry::OnlyUnsent, |channel| {
                let request = self.request(request.clone());
                async move {
                    KvClient::new(channel)
                        .max_decoding_message_size(MAX_MESSAGE)
                        .txn(request)
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await?;
        TxnResponse::from_response(response, endpoint)
    }

    /// Applies `ops` in one transaction if no key under `prefix` changed
    /// after `revision` (the revision the caller read the prefix at, from
    /// [`Etcd::get_prefix`] or a watch); returns the revision of the
    /// commit, or [`ErrorKind::Conflict`] when some key changed: read
    /// again, decide again, retry.
    ///
    /// etcd compares what exists: a key *deleted* after `revision` leaves
    /// nothing to compare. Writers that delete under the prefix should also
    /// write a guard key under it in the same transaction (any key that is
    /// never deleted, with any value), so a deletion shows as a change.
    pub async fn commit_if_unchanged(
        &self,
        prefix: impl AsRef<[u8]>,
        revision: i64,
        ops: impl IntoIterator<Item = Op>,
    ) -> Result<i64, Error> {
        let prefix = prefix.as_ref();
        let txn = Txn::new()
            .when([super::Compare::prefix_unchanged_since(prefix, revision)])
            .and_then(ops);
        let response = self.txn(txn).await?;
        if response.succeeded {
            Ok(response.revision)
        } else {
            Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "etcd: a key under {} changed after revision {revision} (the store is at \
                     revision {} now), so the transaction was not applied: read the prefix again \
                     and retry",
                    show_key(prefix),
                    response.revision
                ),
            ))
        }
    }

    /// Compacts etcd's history up to `revision`: watches and reads at
    /// older revisions fail with [`ErrorKind::Compacted`] afterwards.
    /// (etcd compacts by itself when run with `--auto-compaction-*`.)
    pub async fn compact(&self, revision: i64) -> Result<(), Error> {
        let what = format!("compact to revision {revision}");
        let request = pb::CompactionRequest {
            revision,
            physical: false,
        };
        self.call(&what, Retry::OnlyUnsent, |channel| {
            let request = self.request(request);
            async move { KvClient::new(channel).compact(request).await.map(|_| ()) }
        })
        .await?;
        Ok(())
    }

    /// Grants a lease of `ttl` (whole seconds, rounded up; etcd may grant
    /// more, never less, when `ttl` is under its minimum of about 1.5 times
    /// its election timeout). Keys put with it are deleted when it expires
    /// or is revoked; [`Etcd::keep_alive`] renews it.
    pub async fn grant(&self, ttl: Duration) -> Result<Lease, Error> {
        let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let seconds = i64::try_from(seconds.max(1)).unwrap_or(i64::MAX);
        let what = format!("grant a lease of {seconds}s");
        let request = pb::LeaseGrantRequest {
            ttl: seconds,
            id: 0,
        };
        let (response, endpoint) = self
            .call(&what, Retry::OnlyUnsent, |channel| {
                let request = self.request(request);
                async move {
                    LeaseClient::new(channel)
                        .lease_grant(request)
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await?;
        if !response.error.is_empty() {
            return Err(Error::new(
                ErrorKind::Rejected,
                format!("etcd at {endpoint} refused to {what}: {}", response.error),
            )
            .at(endpoint));
        }
        let Some(id) = LeaseId::new(response.id) else {
            return Err(Error::invalid_response(
                endpoint,
                format_args!("lease grant returned lease ID {}", response.id),
            ));
        };
        Ok(Lease {
            id,
            ttl: seconds_to_duration(response.ttl),
        })
    }

    /// Renews `lease` once; returns its TTL from now. A lease that expired
    /// or was revoked is [`ErrorKind::NotFound`]: its keys are gone, grant
    /// a new lease and write them again. Renew at a fraction of the TTL
    /// (a third, as etcd's own client does) so one lost renewal does not
    /// lose the keys.
    pub async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, Error> {
        let what = format!("renew lease {lease}");
        let (response, endpoint) = self
            .call(&what, Retry::Idempotent, |channel| {
                let request = self.request(tokio_stream::once(pb::LeaseKeepAliveRequest {
                    id: lease.get(),
                }));
                async move {
                    let mut responses = LeaseClient::new(channel)
                        .lease_keep_alive(request)
                        .await?
                        .into_inner();
                    responses.message().await
                }
            })
            .await?;
        let Some(response) = response else {
            return Err(Error::invalid_response(
                endpoint,
                format_args!("the keep-alive stream of lease {lease} ended without an answer"),
            ));
        };
        if response.ttl <= 0 {
            return Err(lease_not_found(endpoint, lease));
        }
        Ok(seconds_to_duration(response.ttl))
    }

    /// Revokes `lease`, deleting its keys now. [`ErrorKind::NotFound`] if
    /// it had already expired or been revoked.
    pub async fn revoke(&self, lease: LeaseId) -> Result<(), Error> {
        let what = format!("revoke lease {lease}");
        let request = pb::LeaseRevokeRequest { id: lease.get() };
        self.call(&what, Retry::OnlyUnsent, |channel| {
            let request = self.request(request);
            async move {
                LeaseClient::new(channel)
                    .lease_revoke(request)
                    .await
                    .map(|_| ())
            }
        })
        .await?;
        Ok(())
    }

    /// What etcd knows of `lease`: its remaining and granted TTL and the
    /// keys attached to it. [`ErrorKind::NotFound`] if it expired or was
    /// revoked.
    pub async fn time_to_live(&self, lease: LeaseId) -> Result<LeaseInfo, Error> {
        let what = format!("read lease {lease}");
        let request = pb::LeaseTimeToLiveRequest {
            id: lease.get(),
            keys: true,
        };
        let (response, endpoint) = self
            .call(&what, Retry::Idempotent, |channel| {
                let request = self.request(request);
                async move {
                    LeaseClient::new(channel)
                        .max_decoding_message_size(MAX_MESSAGE)
                        .lease_time_to_live(request)
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await?;
        // etcd answers -1 for a lease it does not have, rather than an error.
        if response.ttl < 0 {
            return Err(lease_not_found(endpoint, lease));
        }
        Ok(LeaseInfo {
            id: lease,
            ttl: seconds_to_duration(response.ttl),
            granted_ttl: seconds_to_duration(response.granted_ttl),
            keys: response.keys,
        })
    }

    /// Watches every key under `prefix` from `start_revision` (0: from
    /// now). Returns once etcd has created the watch (so with 0, every
    /// change after this returns is seen); the [`Watch`] then yields the
    /// changes in revision order and keeps going across reconnections
    /// (see its docs).
    pub async fn watch_prefix(
        &self,
        prefix: impl AsRef<[u8]>,
        start_revision: i64,
    ) -> Result<Watch, Error> {
        let prefix = prefix.as_ref();
        watch::start(
            self.clone(),
            prefix.to_vec(),
            prefix_end(prefix),
            start_revision,
        )
        .await
    }
}

/// A call that got no answer within the request timeout (tonic's own
/// deadline, from the request's `grpc-timeout`, or ours around the call).
fn no_answer(url: &str, what: &str, timeout: Duration) -> Failure {
    Failure::Broken(
        Error::new(
            ErrorKind::Unavailable,
            format!("etcd at {url}: no answer to {what} within {timeout:?}"),
        )
        .at(url),
    )
}

fn lease_not_found(endpoint: &str, lease: LeaseId) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!(
            "etcd at {endpoint}: lease {lease} not found: it expired or was revoked, and its keys \
             are deleted; grant a new lease and write them again"
        ),
    )
    .at(endpoint)
}

/// The error when every endpoint failed.
fn all_failed(what: &str, failures: Vec<Error>) -> Error {
    let all_tls = failures.iter().all(|e| e.kind() == ErrorKind::Tls);
    let kind = if all_tls && !failures.is_empty() {
        ErrorKind::Tls
    } else {
        ErrorKind::Unavailable
    };
    let hint = if kind == ErrorKind::Tls {
        "fix the TLS settings"
    } else {
        "check that etcd runs, that these are its client URLs (its --advertise-client-urls) and \
         that this host reaches them"
    };
    if let [only] = failures.as_slice() {
        let mut error = Error::new(kind, format!("{only}; {hint}"));
        if let Some(endpoint) = only.endpoint() {
            error = error.at(endpoint);
        }
        return error;
    }
    let each: Vec<String> = failures.iter().map(ToString::to_string).collect();
    Error::new(
        kind,
        format!(
            "no etcd endpoint answered {what}: {}; {hint}",
            each.join("; ")
        ),
    )
}

/// The header etcd puts on every answer.
fn header<'a>(
    header: Option<&'a pb::ResponseHeader>,
    endpoint: &str,
    what: &str,
) -> Result<&'a pb::ResponseHeader, Error> {
    header.ok_or_else(|| {
        Error::invalid_response(endpoint, format_args!("the answer to {what} has no header"))
    })
}

fn seconds_to_duration(seconds: i64) -> Duration {
    Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
}

/// The end of the range of keys starting with `prefix` (exclusive): the
/// prefix with its last byte below 0xff incremented, and `[0]` (etcd's "to
/// the end of the keyspace") when there is none, as for an empty prefix.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/mesh/"), b"/mesh0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn ttls_round_up_to_seconds() {
        assert_eq!(seconds_to_duration(-1), Duration::ZERO);
        assert_eq!(seconds_to_duration(3), Duration::from_secs(3));
    }

    #[tokio::test]
    async fn settings_are_checked_before_dialling() {
        let error = Etcd::new_lazy(&[], None, EtcdOptions::default()).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Config);
        let endpoints = [
            "127.0.0.1:2379".to_owned(),
            "http://127.0.0.1:2379/".to_owned(),
        ];
        let etcd = Etcd::new_lazy(&endpoints, None, EtcdOptions::default()).unwrap();
        assert_eq!(etcd.endpoints(), ["http://127.0.0.1:2379"]);
    }
}
