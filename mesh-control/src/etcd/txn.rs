//! Transactions: comparisons, operations and their results.

use super::client::prefix_end;
use super::pb::etcdserverpb as pb;
use super::pb::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use super::pb::etcdserverpb::request_op::Request;
use super::pb::etcdserverpb::response_op::Response;
use super::{Error, KeyValue, LeaseId};

/// How a [`Compare`] compares what etcd has with the given value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    /// What etcd has equals the value.
    Equal,
    /// What etcd has differs from the value.
    NotEqual,
    /// What etcd has is greater than the value.
    Greater,
    /// What etcd has is less than the value.
    Less,
}

impl CompareOp {
    fn result(self) -> CompareResult {
        match self {
            CompareOp::Equal => CompareResult::Equal,
            CompareOp::NotEqual => CompareResult::NotEqual,
            CompareOp::Greater => CompareResult::Greater,
            CompareOp::Less => CompareResult::Less,
        }
    }
}

/// A condition of a [`Txn`], on one key or on every key of a prefix. A key
/// that does not exist has version, create and mod revision 0 and no
/// lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare(pb::Compare);

impl Compare {
    fn new(
        key: &[u8],
        range_end: Vec<u8>,
        op: CompareOp,
        target: CompareTarget,
        value: TargetUnion,
    ) -> Compare {
        Compare(pb::Compare {
            result: op.result() as i32,
            target: target as i32,
            key: key.to_vec(),
            target_union: Some(value),
            range_end,
        })
    }

    /// The revision of the last write of `key` compared with `revision`.
    pub fn mod_revision(key: impl AsRef<[u8]>, op: CompareOp, revision: i64) -> Compare {
        Compare::new(
            key.as_ref(),
            Vec::new(),
            op,
            CompareTarget::Mod,
            TargetUnion::ModRevision(revision),
        )
    }

    /// The revision that created `key` compared with `revision`.
    pub fn create_revision(key: impl AsRef<[u8]>, op: CompareOp, revision: i64) -> Compare {
        Compare::new(
            key.as_ref(),
            Vec::new(),
            op,
            CompareTarget::Create,
            TargetUnion::CreateRevision(revision),
        )
    }

    /// The number of writes to `key` since it was created compared with
    /// `version`.
    pub fn version(key: impl AsRef<[u8]>, op: CompareOp, version: i64) -> Compare {
        Compare::new(
            key.as_ref(),
            Vec::new(),
            op,
            CompareTarget::Version,
            TargetUnion::Version(version),
        )
    }

    /// The value of `key` compared with `value` (bytewise). Never holds
    /// for a key that does not exist.
    pub fn value(key: impl AsRef<[u8]>, op: CompareOp, value: impl AsRef<[u8]>) -> Compare {
        Compare::new(
            key.as_ref(),
            Vec::new(),
            op,
            CompareTarget::Value,
            TargetUnion::Value(value.as_ref().to_vec()),
        )
    }

    /// The lease of `key` compared with `lease` (`None`: no lease).
    pub fn lease(key: impl AsRef<[u8]>, op: CompareOp, lease: Option<LeaseId>) -> Compare {
        Compare::new(
            key.as_ref(),
            Vec::new(),
            op,
            CompareTarget::Lease,
            TargetUnion::Lease(lease.map_or(0, LeaseId::get)),
        )
    }

    /// `key` does not exist.
    pub fn absent(key: impl AsRef<[u8]>) -> Compare {
        Compare::version(key, CompareOp::Equal, 0)
    }

    /// No key under `prefix` was written after `revision`: every existing
    /// key's mod revision is at most `revision` (holds for an empty
    /// prefix). Deletions leave no key to compare; see
    /// [`super::Etcd::commit_if_unchanged`].
    pub fn prefix_unchanged_since(prefix: impl AsRef<[u8]>, revision: i64) -> Compare {
        let prefix = prefix.as_ref();
        Compare::new(
            prefix,
            prefix_end(prefix),
            CompareOp::Less,
            CompareTarget::Mod,
            TargetUnion::ModRevision(revision.saturating_add(1)),
        )
    }
}

/// An operation of a [`Txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Read a key.
    Get {
        /// The key.
        key: Vec<u8>,
    },
    /// Read every key under a prefix.
    GetPrefix {
        /// The prefix.
        prefix: Vec<u8>,
    },
    /// Write a key.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
        /// The lease to attach the key to.
        lease: Option<LeaseId>,
    },
    /// Delete a key.
    Delete {
        /// The key.
        key: Vec<u8>,
    },
    /// Delete every key under a prefix.
    DeletePrefix {
        /// The prefix.
        prefix: Vec<u8>,
    },
}

impl Op {
    /// [`Op::Get`].
    pub fn get(key: impl AsRef<[u8]>) -> Op {
        Op::Get {
            key: key.as_ref().to_vec(),
        }
    }

    /// [`Op::GetPrefix`].
    pub fn get_prefix(prefix: impl AsRef<[u8]>) -> Op {
        Op::GetPrefix {
            prefix: prefix.as_ref().to_vec(),
        }
    }

    /// [`Op::Put`].
    pub fn put(key: impl AsRef<[u8]>, value: impl AsRef<[u8]>, lease: Option<LeaseId>) -> Op {
        Op::Put {
            key: key.as_ref().to_vec(),
            value: value.as_ref().to_vec(),
            lease,
        }
    }

    /// [`Op::Delete`].
    pub fn delete(key: impl AsRef<[u8]>) -> Op {
        Op::Delete {
            key: key.as_ref().to_vec(),
        }
    }

    /// [`Op::DeletePrefix`].
    pub fn delete_prefix(prefix: impl AsRef<[u8]>) -> Op {
        Op::DeletePrefix {
            prefix: prefix.as_ref().to_vec(),
        }
    }

    fn into_request(self) -> pb::RequestOp {
        let request = match self {
            Op::Get { key } => Request::RequestRange(pb::RangeRequest {
                key,
                ..Default::default()
            }),
            Op::GetPrefix { prefix } => Request::RequestRange(pb::RangeRequest {
                range_end: prefix_end(&prefix),
                key: prefix,
                ..Default::default()
            }),
            Op::Put { key, value, lease } => Request::RequestPut(pb::PutRequest {
                key,
                value,
                lease: lease.map_or(0, LeaseId::get),
                ..Default::default()
            }),
            Op::Delete { key } => Request::RequestDeleteRange(pb::DeleteRangeRequest {
                key,
                ..Default::default()
            }),
            Op::DeletePrefix { prefix } => Request::RequestDeleteRange(pb::DeleteRangeRequest {
                range_end: prefix_end(&prefix),
                key: prefix,
                ..Default::default()
            }),
        };
        pb::RequestOp {
            request: Some(request),
        }
    }
}

/// A transaction: if every comparison holds, the success operations run,
/// else the failure operations, atomically at one revision (one revision
/// for all its writes, one watch response for all its events).
///
/// ```ignore
/// let txn = Txn::new()
///     .when([Compare::mod_revision("/mesh/config", CompareOp::Equal, read_at)])
///     .and_then([Op::put("/mesh/config", yaml, None)])
///     .or_else([Op::get("/mesh/config")]);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    compares: Vec<Compare>,
    success: Vec<Op>,
    failure: Vec<Op>,
}

impl Txn {
    /// An empty transaction (no conditions: it succeeds).
    pub fn new() -> Txn {
        Txn::default()
    }

    /// Adds conditions (all must hold).
    pub fn when(mut self, compares: impl IntoIterator<Item = Compare>) -> Txn {
        self.compares.extend(compares);
        self
    }

    /// Adds operations run when the conditions hold.
    pub fn and_then(mut self, ops: impl IntoIterator<Item = Op>) -> Txn {
        self.success.extend(ops);
        self
    }

    /// Adds operations run when a condition does not hold.
    pub fn or_else(mut self, ops: impl IntoIterator<Item = Op>) -> Txn {
        self.failure.extend(ops);
        self
    }

    pub(crate) fn into_request(self) -> pb::TxnRequest {
        pb::TxnRequest {
            compare: self.compares.into_iter().map(|c| c.0).collect(),
            success: self.success.into_iter().map(Op::into_request).collect(),
            failure: self.failure.into_iter().map(Op::into_request).collect(),
        }
    }
}

/// What a [`Txn`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResponse {
    /// Whether the conditions held (so the success operations ran).
    pub succeeded: bool,
    /// The store's revision after the transaction: the revision of its
    /// writes, if it wrote.
    pub revision: i64,
    /// One result per operation that ran, in order.
    pub responses: Vec<OpResponse>,
}

/// The result of one [`Op`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResponse {
    /// What [`Op::Get`] or [`Op::GetPrefix`] read, sorted by key.
    Get(Vec<KeyValue>),
    /// [`Op::Put`] wrote.
    Put,
    /// How many keys [`Op::Delete`] or [`Op::DeletePrefix`] deleted.
    Delete(u64),
}

impl TxnResponse {
    pub(crate) fn from_response(response: pb::TxnResponse, endpoint: &str) -> Result<Self, Error> {
        let Some(header) = response.header else {
            return Err(Error::invalid_response(
                endpoint,
                "the answer to a transaction has no header",
            ));
        };
        let mut responses = Vec::with_capacity(response.responses.len());
        for op in response.responses {
            responses.push(match op.response {
                Some(Response::ResponseRange(range)) => {
                    OpResponse::Get(range.kvs.into_iter().map(KeyValue::from).collect())
                }
                Some(Response::ResponsePut(_)) => OpResponse::Put,
                Some(Response::ResponseDeleteRange(delete)) => {
                    OpResponse::Delete(u64::try_from(delete.deleted).unwrap_or(0))
                }
                Some(Response::ResponseTxn(_)) | None => {
                    return Err(Error::invalid_response(
                        endpoint,
                        "a transaction answered an operation this client did not send",
                    ));
                }
            });
        }
        Ok(TxnResponse {
            succeeded: response.succeeded,
            revision: header.revision,
            responses,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_unchanged_compares_every_key_below_the_next_revision() {
        let compare = Compare::prefix_unchanged_since("/mesh/", 41).0;
        assert_eq!(compare.key, b"/mesh/");
        assert_eq!(compare.range_end, b"/mesh0");
        assert_eq!(compare.result, CompareResult::Less as i32);
        assert_eq!(compare.target, CompareTarget::Mod as i32);
        assert_eq!(compare.target_union, Some(TargetUnion::ModRevision(42)));
    }

    #[test]
    fn ops_become_requests() {
        let request = Txn::new()
            .when([Compare::absent("k")])
            .and_then([Op::put("k", "v", LeaseId::new(7)), Op::delete_prefix("p/")])
            .or_else([Op::get("k")])
            .into_request();
        assert_eq!(request.compare.len(), 1);
        let Some(Request::RequestPut(put)) = &request.success[0].request else {
            panic!("not a put: {:?}", request.success[0]);
        };
        assert_eq!((put.key.as_slice(), put.lease), (&b"k"[..], 7));
        let Some(Request::RequestDeleteRange(delete)) = &request.success[1].request else {
            panic!("not a delete: {:?}", request.success[1]);
        };
        assert_eq!(delete.range_end, b"p0");
        assert!(matches!(
            request.failure[0].request,
            Some(Request::RequestRange(_))
        ));
    }
}
