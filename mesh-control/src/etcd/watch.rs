//! [`Watch`]: the changes under a prefix, in revision order, across
//! reconnections.
//!
//! A task owns the gRPC stream. It remembers the revision after the last
//! event it delivered; when the stream breaks (etcd restarted, the
//! connection dropped, the member went away) it opens a new one, on the
//! next endpoint that answers, from that revision, waiting between
//! attempts (50 ms doubling to 2 s, jittered so replicas do not reconnect
//! in step). etcd keeps history until it compacts it, so nothing written
//! while the watch was away is lost, and nothing is delivered twice. If
//! etcd compacted past that revision in the meantime, the watch ends with
//! [`ErrorKind::Compacted`]: the caller lists again and watches anew.
//!
//! Progress notifications (etcd's `progress_notify`, sent by an idle watch
//! every few minutes) move the resume revision forward without events, so
//! an idle watch resumes from a recent revision, not from one compaction
//! may have removed.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::codec::Streaming;

use super::client::{Etcd, Retry};
use super::pb::etcdserverpb as pb;
use super::pb::etcdserverpb::watch_client::WatchClient;
use super::pb::etcdserverpb::watch_request::RequestUnion;
use super::pb::mvccpb;
use super::{Error, ErrorKind, KeyValue, show_key};

/// Batches the watch buffers before etcd's stream is read no further
/// (which in turn makes etcd hold them).
const BUFFER: usize = 64;
/// See [`super::client`]'s `MAX_MESSAGE`: one watch response carries every
/// event of a revision.
const MAX_MESSAGE: usize = 256 * 1024 * 1024;
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The key was written (created or changed).
    Put,
    /// The key was deleted (by a delete, or by its lease ending).
    Delete,
}

/// One change: a key written or deleted, at `kv.mod_revision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key as written; for a delete, the key with an empty value and
    /// the revision of the deletion as `mod_revision`.
    pub kv: KeyValue,
}

/// Changes etcd sent together, in revision order: every event of one
/// revision (a transaction's writes) is in the same batch, so applying a
/// batch at once never shows half a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchBatch {
    /// The events.
    pub events: Vec<Event>,
    /// The revision of the last event: every change up to it has been
    /// delivered.
    pub revision: i64,
}

/// The changes under a prefix ([`super::Etcd::watch_prefix`]): a stream of
/// [`WatchBatch`]es in revision order, across reconnections (see the
/// module docs). It ends with an `Err` only when it cannot go on:
/// [`ErrorKind::Compacted`] (list again and watch anew), or etcd
/// canceling the watch ([`ErrorKind::Rejected`]). While etcd is
/// unreachable it yields nothing and keeps trying; the outage is logged.
///
/// Dropping it stops the watch.
#[derive(Debug)]
pub struct Watch {
    batches: mpsc::Receiver<Result<WatchBatch, Error>>,
    task: JoinHandle<()>,
}

impl Watch {
    /// The next batch; `None` after an `Err` (the watch is over).
    pub async fn next(&mut self) -> Option<Result<WatchBatch, Error>> {
        self.batches.recv().await
    }
}

impl futures_util::Stream for Watch {
    type Item = Result<WatchBatch, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.batches.poll_recv(cx)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What is watched, and from where the next stream starts.
struct Spec {
    key: Vec<u8>,
    range_end: Vec<u8>,
    /// The first revision not delivered yet (0 until etcd says "now").
    next: i64,
}

/// An open stream, its watch created.
struct Opened {
    /// Kept open: etcd ends the watch when the client's side closes.
    _requests: mpsc::Sender<pb::WatchRequest>,
    responses: Streaming<pb::WatchResponse>,
    endpoint: String,
}

/// Creates the watch, then hands the stream to a task.
pub(crate) async fn start(
    etcd: Etcd,
    key: Vec<u8>,
    range_end: Vec<u8>,
    start_revision: i64,
) -> Result<Watch, Error> {
    let mut spec = Spec {
        key,
        range_end,
        next: start_revision.max(0),
    };
    let opened = open(&etcd, &mut spec).await?;
    let (sender, batches) = mpsc::channel(BUFFER);
    let task = tokio::spawn(run(etcd, spec, opened, sender));
    Ok(Watch { batches, task })
}

/// Opens a stream and creates the watch from `spec.next`, on the first
/// endpoint that answers.
async fn open(etcd: &Etcd, spec: &mut Spec) -> Result<Opened, Error> {
    let what = format!("watch {}", show_key(&spec.key));
    let create = pb::WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(pb::WatchCreateRequest {
            key: spec.key.clone(),
            range_end: spec.range_end.clone(),
            start_revision: spec.next,
            progress_notify: true,
            ..Default::default()
        })),
    };
    let ((requests, responses, created), endpoint) = etcd
        .call(&what, Retry::Idempotent, |channel| {
            let create = create.clone();
            async move {
                let (requests, outgoing) = mpsc::channel(1);
                requests
                    .send(create)
                    .await
                    .map_err(|_| Status::internal("the watch request stream closed"))?;
                // No deadline on the request: it would end the stream.
                let mut responses = WatchClient::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE)
                    .watch(tonic::Request::new(ReceiverStream::new(outgoing)))
                    .await?
                    .into_inner();
                match responses.message().await? {
                    Some(created) => Ok((requests, responses, created)),
                    None => Err(Status::unavailable(
                        "the watch stream ended before etcd created the watch",
                    )),
                }
            }
        })
        .await?;
    let endpoint = endpoint.to_owned();
    if let Some(error) = terminal(&created, spec, &endpoint) {
        return Err(error);
    }
    if !created.created {
        return Err(Error::invalid_response(
            &endpoint,
            format_args!("the first answer to {what} did not create the watch"),
        ));
    }
    if spec.next == 0 {
        let now = created.header.as_ref().map_or(0, |h| h.revision);
        spec.next = now + 1;
    }
    Ok(Opened {
        _requests: requests,
        responses,
        endpoint,
    })
}

/// The error that ends the watch, if `response` says it is over.
fn terminal(response: &pb::WatchResponse, spec: &Spec, endpoint: &str) -> Option<Error> {
    if response.compact_revision != 0 {
        return Some(Error::compacted(
            endpoint,
            spec.next,
            response.compact_revision,
        ));
    }
    if response.canceled {
        let reason = if response.cancel_reason.is_empty() {
            "no reason given"
        } else {
            &response.cancel_reason
        };
        return Some(
            Error::new(
                ErrorKind::Rejected,
                format!(
                    "etcd at {endpoint} canceled the watch of {}: {reason}",
                    show_key(&spec.key)
                ),
            )
            .at(endpoint),
        );
    }
    None
}

/// Why a stream stopped.
enum Stopped {
    /// The consumer dropped the watch.
    Dropped,
    /// The watch cannot go on.
    Over(Error),
    /// The stream broke: open another.
    Broken(String),
}

async fn run(
    etcd: Etcd,
    mut spec: Spec,
    mut opened: Opened,
    sender: mpsc::Sender<Result<WatchBatch, Error>>,
) {
    loop {
        let reason = match deliver(&mut spec, &mut opened, &sender).await {
            Stopped::Dropped => return,
            Stopped::Over(error) => {
                let _ = sender.send(Err(error)).await;
                return;
            }
            Stopped::Broken(reason) => reason,
        };
        tracing::warn!(
            "etcd watch of {}: the stream from {} broke ({reason}); resuming from revision {}",
            show_key(&spec.key),
            opened.endpoint,
            spec.next
        );
        let mut backoff = FIRST_BACKOFF;
        opened = loop {
            tokio::time::sleep(backoff.mul_f64(rand::random_range(0.5..1.0))).await;
            match open(&etcd, &mut spec).await {
                Ok(opened) => break opened,
                Err(error)
                    if matches!(
                        error.kind(),
                        ErrorKind::Compacted | ErrorKind::Rejected | ErrorKind::InvalidResponse
                    ) =>
                {
                    let _ = sender.send(Err(error)).await;
                    return;
                }
                Err(error) => {
                    tracing::debug!("etcd watch of {}: {error}", show_key(&spec.key));
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
            if sender.is_closed() {
                return;
            }
        };
        tracing::info!(
            "etcd watch of {}: resumed on {} from revision {}",
            show_key(&spec.key),
            opened.endpoint,
            spec.next
        );
    }
}

/// Forwards the stream's events until it stops.
async fn deliver(
    spec: &mut Spec,
    opened: &mut Opened,
    sender: &mpsc::Sender<Result<WatchBatch, Error>>,
) -> Stopped {
    loop {
        let response = match opened.responses.message().await {
            Ok(Some(response)) => response,
            Ok(None) => return Stopped::Broken("etcd closed the stream".to_owned()),
            Err(status) => {
                return Stopped::Broken(format!("{:?}: {}", status.code(), status.message()));
            }
        };
        if let Some(error) = terminal(&response, spec, &opened.endpoint) {
            return Stopped::Over(error);
        }
        if response.events.is_empty() {
            // A progress notification: every change up to the header's
            // revision has been sent.
            if !response.created
                && let Some(header) = &response.header
            {
                spec.next = spec.next.max(header.revision + 1);
            }
            continue;
        }
        let mut events = Vec::with_capacity(response.events.len());
        for event in response.events {
            match convert(event) {
                Some(event) => events.push(event),
                None => {
                    return Stopped::Over(Error::invalid_response(
                        &opened.endpoint,
                        format_args!(
                            "the watch of {} sent an event without a key or of an unknown type",
                            show_key(&spec.key)
                        ),
                    ));
                }
            }
        }
        let revision = events.last().map_or(spec.next - 1, |e| e.kv.mod_revision);
        spec.next = revision + 1;
        if sender
            .send(Ok(WatchBatch { events, revision }))
            .await
            .is_err()
        {
            return Stopped::Dropped;
        }
    }
}

fn convert(event: mvccpb::Event) -> Option<Event> {
    let kind = match mvccpb::event::EventType::try_from(event.r#type).ok()? {
        mvccpb::event::EventType::Put => EventKind::Put,
        mvccpb::event::EventType::Delete => EventKind::Delete,
    };
    Some(Event {
        kind,
        kv: KeyValue::from(event.kv?),
    })
}
