//! The request body the client stack hands to the service under it.
//!
//! A retry must send the request again, body included, so the body has to
//! be kept. Envoy buffers request bodies up to a limit for that
//! (`per_request_buffer_limit_bytes`) and gives up retrying a request whose
//! body outgrew it. This stack does the same with one difference that keeps
//! streaming cheap and predictable: a body is kept only when it is **whole
//! at send time**, that is when
//!
//! - it is empty, or
//! - its size hint says it fits the limit (an exact `Content-Length`-like
//!   hint, as [`Full`](http_body_util::Full) gives): it is read to the end
//!   before the first attempt, or
//! - its frames are all ready when the request is sent and add up to no
//!   more than the limit (a tonic unary request, an `axum::body::Body` made
//!   from bytes).
//!
//! Anything else (a body still being produced, or bigger than the limit)
//! is sent once, streaming, frames already read first: such a request is
//! **not retried**. The limit is 64 KiB by default
//! ([`MeshLayer::retry_buffer_limit`](crate::MeshLayer::retry_buffer_limit)).

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::error::BoxError;
use crate::pool::{CarriesTarget, TargetEndpoint};

/// The default size limit of a request body kept for retries.
pub const DEFAULT_RETRY_BUFFER_LIMIT: usize = 64 * 1024;

/// The body of a request sent by the mesh: the caller's body streamed as it
/// is produced, or a kept copy replayed for each attempt (see the
/// [module docs](crate::mesh) on retries).
///
/// Services under [`MeshLayer`](crate::MeshLayer) receive
/// `http::Request<MeshBody<B>>` where the caller sent `http::Request<B>`.
/// Data frames are [`Bytes`]; errors are boxed.
pub struct MeshBody<B> {
    kind: Kind<B>,
    /// Where the mesh sends this request, set for each attempt: carried
    /// here rather than in the request's extensions, where it cost three
    /// allocations and a hash insert per request (see [`CarriesTarget`]).
    target: Option<TargetEndpoint>,
}

enum Kind<B> {
    /// The caller's body, untouched.
    Stream(B),
    /// Frames read ahead while deciding, then the rest of the body.
    Prefixed {
        prefix: VecDeque<Frame<Bytes>>,
        rest: B,
    },
    /// A kept body, from its start.
    Replay {
        kept: Arc<Kept>,
        next: usize,
        trailers_sent: bool,
    },
}

/// A whole request body, kept for replay.
#[derive(Debug, Default)]
pub(crate) struct Kept {
    chunks: Box<[Bytes]>,
    trailers: Option<HeaderMap>,
    len: u64,
}

/// What [`prepare`] made of a body.
pub(crate) enum Prepared<B> {
    /// The whole body: attempts replay it.
    Kept(Arc<Kept>),
    /// Sent once, not retried.
    Once(MeshBody<B>),
}

impl<B> MeshBody<B> {
    /// Streams `body` as it is (what the mesh sends when it does not need
    /// to keep the body).
    pub fn new(body: B) -> Self {
        MeshBody {
            kind: Kind::Stream(body),
            target: None,
        }
    }

    pub(crate) fn replay(kept: &Arc<Kept>) -> Self {
        MeshBody {
            kind: Kind::Replay {
                kept: kept.clone(),
                next: 0,
                trailers_sent: false,
            },
            target: None,
        }
    }

    /// Whether this is a kept copy of the caller's body (a request that can
    /// be retried), rather than the caller's body streamed through.
    pub fn is_replay(&self) -> bool {
        matches!(self.kind, Kind::Replay { .. })
    }

    /// Names the endpoint this request goes to (the mesh layer, for each
    /// attempt); read with [`TargetEndpoint::of`].
    pub(crate) fn set_target(&mut self, target: TargetEndpoint) {
        self.target = Some(target);
    }
}

impl<B> CarriesTarget for MeshBody<B> {
    fn target(&self) -> Option<&TargetEndpoint> {
        self.target.as_ref()
    }
}

impl Kept {
    /// The empty body, shared: an empty request (a GET) is replayable at
    /// the cost of a reference count, without an allocation.
    pub(crate) fn empty() -> Arc<Kept> {
        static EMPTY: std::sync::OnceLock<Arc<Kept>> = std::sync::OnceLock::new();
        EMPTY.get_or_init(|| Arc::new(Kept::default())).clone()
    }

    /// The body's length in bytes.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }
}

fn to_bytes<D: Buf>(mut data: D) -> Bytes {
    // `Bytes` returns itself here, without copying.
    data.copy_to_bytes(data.remaining())
}

fn frame_to_bytes<D: Buf>(frame: Frame<D>) -> Frame<Bytes> {
    frame.map_data(to_bytes)
}

/// Reads what it can of `body` to decide whether it can be replayed (see
/// the [module docs](self)). `keep` false: nothing is read.
#[cfg(test)]
pub(crate) async fn prepare<B>(body: B, keep: bool, limit: usize) -> Result<Prepared<B>, BoxError>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    match Preparing::start(body, keep, limit) {
        Ok(prepared) => Ok(prepared),
        Err(mut preparing) => std::future::poll_fn(|cx| preparing.poll(cx)).await,
    }
}

/// A body being read ahead to decide whether it can be replayed (see the
/// [module docs](self)): polled by the request engine's driver until it
/// knows.
pub(crate) struct Preparing<B> {
    /// `None` once the answer was given.
    body: Option<B>,
    frames: VecDeque<Frame<Bytes>>,
    len: u64,
    limit: u64,
    /// The body declared a size within the limit: it is waited for.
    known: bool,
}

impl<B> Preparing<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    /// The answer when it needs no reading (`keep` false, an empty body,
    /// one declared too big), else the reading to poll.
    pub(crate) fn start(body: B, keep: bool, limit: usize) -> Result<Prepared<B>, Self> {
        if !keep {
            return Ok(Prepared::Once(MeshBody::new(body)));
        }
        if body.is_end_stream() {
            return Ok(Prepared::Kept(Kept::empty()));
        }
        let limit = limit as u64;
        let hint = body.size_hint();
        if hint.lower() > limit {
            return Ok(Prepared::Once(MeshBody::new(body)));
        }
        Err(Preparing {
            known: hint.upper().is_some_and(|upper| upper <= limit),
            body: Some(body),
            frames: VecDeque::new(),
            len: 0,
            limit,
        })
    }

    /// Reads the frames that are ready; ready with the answer once known.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Prepared<B>, BoxError>> {
        let Some(body) = self.body.as_mut() else {
            return Poll::Ready(Err("the request body was already prepared".into()));
        };
        loop {
            match Pin::new(&mut *body).poll_frame(cx) {
                // A body that declared a size within the limit is waited for.
                Poll::Pending if self.known => return Poll::Pending,
                // Not ready: stream from here.
                Poll::Pending => break,
                Poll::Ready(None) => return Poll::Ready(Ok(self.kept())),
                Poll::Ready(Some(Err(e))) => {
                    self.body = None;
                    return Poll::Ready(Err(e.into()));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let frame = frame_to_bytes(frame);
                    if let Some(data) = frame.data_ref() {
                        self.len += data.len() as u64;
                    }
                    self.frames.push_back(frame);
                    if body.is_end_stream() {
                        return Poll::Ready(Ok(self.kept()));
                    }
                    if self.len > self.limit {
                        break;
                    }
                }
            }
        }
        let rest = self
            .body
            .take()
            .expect("the body is there until the answer");
        Poll::Ready(Ok(Prepared::Once(MeshBody {
            kind: Kind::Prefixed {
                prefix: std::mem::take(&mut self.frames),
                rest,
            },
            target: None,
        })))
    }

    fn kept(&mut self) -> Prepared<B> {
        self.body = None;
        let frames = std::mem::take(&mut self.frames);
        Prepared::Kept(Arc::new(Kept::from_frames(frames, self.len)))
    }
}

impl Kept {
    fn from_frames(frames: VecDeque<Frame<Bytes>>, len: u64) -> Self {
        let mut chunks = Vec::with_capacity(frames.len());
        let mut trailers: Option<HeaderMap> = None;
        for frame in frames {
            match frame.into_data() {
                Ok(data) => chunks.push(data),
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        match &mut trailers {
                            Some(all) => all.extend(t),
                            None => trailers = Some(t),
                        }
                    }
                }
            }
        }
        Kept {
            chunks: chunks.into(),
            trailers,
            len,
        }
    }
}

impl<B> Body for MeshBody<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            Kind::Stream(inner) => poll_inner(inner, cx),
            Kind::Prefixed { prefix, rest } => match prefix.pop_front() {
                Some(frame) => Poll::Ready(Some(Ok(frame))),
                None => poll_inner(rest, cx),
            },
            Kind::Replay {
                kept,
                next,
                trailers_sent,
            } => {
                if let Some(chunk) = kept.chunks.get(*next) {
                    *next += 1;
                    return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
                }
                if !*trailers_sent {
                    *trailers_sent = true;
                    if let Some(t) = &kept.trailers {
                        return Poll::Ready(Some(Ok(Frame::trailers(t.clone()))));
                    }
                }
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Stream(inner) => inner.is_end_stream(),
            Kind::Prefixed { prefix, rest } => prefix.is_empty() && rest.is_end_stream(),
            Kind::Replay {
                kept,
                next,
                trailers_sent,
            } => *next >= kept.chunks.len() && (*trailers_sent || kept.trailers.is_none()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Stream(inner) => inner.size_hint(),
            Kind::Prefixed { prefix, rest } => {
                let ahead: u64 = prefix
                    .iter()
                    .filter_map(|f| f.data_ref())
                    .map(|d| d.len() as u64)
                    .sum();
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower().saturating_add(ahead));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(ahead));
                }
                hint
            }
            Kind::Replay { kept, next: 0, .. } => SizeHint::with_exact(kept.len()),
            Kind::Replay { kept, next, .. } => {
                let left: u64 = kept
                    .chunks
                    .get(*next..)
                    .unwrap_or_default()
                    .iter()
                    .map(|c| c.len() as u64)
                    .sum();
                SizeHint::with_exact(left)
            }
        }
    }
}

fn poll_inner<B>(
    inner: &mut B,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    match Pin::new(inner).poll_frame(cx) {
        Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame_to_bytes(frame)))),
        Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
        Poll::Ready(None) => Poll::Ready(None),
        Poll::Pending => Poll::Pending,
    }
}

impl<B> fmt::Debug for MeshBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Stream(_) => "stream",
            Kind::Prefixed { .. } => "stream (read ahead)",
            Kind::Replay { .. } => "replay",
        };
        f.debug_struct("MeshBody")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::{BodyExt, Full, StreamBody};
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::UnboundedReceiverStream;

    use super::*;

    type Chunk = Result<Frame<Bytes>, Infallible>;

    async fn collect<B>(body: MeshBody<B>) -> Bytes
    where
        B: Body + Unpin,
        B::Error: Into<BoxError>,
    {
        body.collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn a_small_full_body_is_kept_and_replays_every_time() {
        let Prepared::Kept(kept) = prepare(Full::new(Bytes::from_static(b"hello")), true, 1024)
            .await
            .unwrap()
        else {
            panic!("not kept");
        };
        assert_eq!(kept.len(), 5);
        for _ in 0..3 {
            let body = MeshBody::<Full<Bytes>>::replay(&kept);
            assert!(body.is_replay());
            assert_eq!(body.size_hint().exact(), Some(5));
            assert_eq!(&collect(body).await[..], b"hello");
        }
    }

    #[tokio::test]
    async fn a_body_over_the_limit_streams_once() {
        let big = Full::new(Bytes::from(vec![7u8; 2048]));
        let Prepared::Once(body) = prepare(big, true, 1024).await.unwrap() else {
            panic!("kept");
        };
        assert!(!body.is_replay());
        assert_eq!(collect(body).await.len(), 2048);
    }

    #[tokio::test]
    async fn ready_frames_of_unknown_size_are_kept_when_whole() {
        let (tx, rx) = mpsc::unbounded_channel::<Chunk>();
        tx.send(Ok(Frame::data(Bytes::from_static(b"a")))).unwrap();
        tx.send(Ok(Frame::data(Bytes::from_static(b"b")))).unwrap();
        drop(tx);
        let body = StreamBody::new(UnboundedReceiverStream::new(rx));
        let Prepared::Kept(kept) = prepare(body, true, 1024).await.unwrap() else {
            panic!("not kept");
        };
        assert_eq!(
            &collect(MeshBody::<Full<Bytes>>::replay(&kept)).await[..],
            b"ab"
        );
    }

    #[tokio::test]
    async fn a_body_still_being_written_streams_with_what_was_read_first() {
        let (tx, rx) = mpsc::unbounded_channel::<Chunk>();
        tx.send(Ok(Frame::data(Bytes::from_static(b"first "))))
            .unwrap();
        let body = StreamBody::new(UnboundedReceiverStream::new(rx));
        let Prepared::Once(body) = prepare(body, true, 1024).await.unwrap() else {
            panic!("kept a body that was not finished");
        };
        tx.send(Ok(Frame::data(Bytes::from_static(b"last"))))
            .unwrap();
        drop(tx);
        assert_eq!(&collect(body).await[..], b"first last");
    }

    #[tokio::test]
    async fn trailers_are_kept_too() {
        let (tx, rx) = mpsc::unbounded_channel::<Chunk>();
        tx.send(Ok(Frame::data(Bytes::from_static(b"x")))).unwrap();
        let mut t = HeaderMap::new();
        t.insert("x-check", "1".parse().unwrap());
        tx.send(Ok(Frame::trailers(t))).unwrap();
        drop(tx);
        let body = StreamBody::new(UnboundedReceiverStream::new(rx));
        let Prepared::Kept(kept) = prepare(body, true, 1024).await.unwrap() else {
            panic!("not kept");
        };
        let collected = MeshBody::<Full<Bytes>>::replay(&kept)
            .collect()
            .await
            .unwrap();
        assert_eq!(collected.trailers().unwrap()["x-check"], "1");
    }

    #[tokio::test]
    async fn nothing_is_read_when_nothing_will_be_retried() {
        let (tx, rx) = mpsc::unbounded_channel::<Chunk>();
        tx.send(Ok(Frame::data(Bytes::from_static(b"x")))).unwrap();
        drop(tx);
        let body = StreamBody::new(UnboundedReceiverStream::new(rx));
        let Prepared::Once(body) = prepare(body, false, 1024).await.unwrap() else {
            panic!("kept");
        };
        assert!(matches!(body.kind, Kind::Stream(_)));
    }
}
