//! A local DNS server for tests: UDP on 127.0.0.1 at a random port,
//! answering A and AAAA questions from a table the test changes at run
//! time, with the TTL the test sets. Tests of DNS clusters point the
//! resolvers under test at it (`PROXYLESS_DNS_SERVER`, `ClientOptions::
//! dns_server`, mesh-control's `--dns-server`), so nothing reaches the
//! outside world.
//!
//! Hand-written on hickory-proto's message types rather than
//! hickory-server: the server crate brings an authority/zone framework
//! (and more dependencies) to answer what fits in forty lines here, while
//! hickory-proto is built anyway for the resolver under test. The wire
//! format is hickory's, so the answers are real DNS messages.
//!
//! A name in the table answers NOERROR with its addresses of the asked
//! family (none: NOERROR, no records); a name not in it answers NXDOMAIN.
//! Every question is counted, so a test can tell that a client re-asked.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, Metadata, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;

/// The table: name (lower case, no trailing dot) → addresses, and the TTL
/// of every answer.
#[derive(Debug)]
struct Table {
    names: BTreeMap<String, Vec<IpAddr>>,
    ttl: u32,
}

/// A running test DNS server; stops when dropped.
#[derive(Debug)]
pub struct DnsServer {
    addr: SocketAddr,
    table: Arc<Mutex<Table>>,
    queries: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl DnsServer {
    /// Starts a server on 127.0.0.1:<random UDP port> with an empty table
    /// whose answers live `ttl_secs`.
    ///
    /// # Panics
    /// If no UDP port can be bound (outside a tokio runtime too).
    pub async fn start(ttl_secs: u32) -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind the test DNS server's UDP socket");
        let addr = socket.local_addr().expect("local addr");
        let table = Arc::new(Mutex::new(Table {
            names: BTreeMap::new(),
            ttl: ttl_secs,
        }));
        let queries = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(serve(socket, table.clone(), queries.clone()));
        DnsServer {
            addr,
            table,
            queries,
            task,
        }
    }

    /// Where it listens (UDP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the addresses of `name` (replacing what it had); an empty list
    /// keeps the name (NOERROR, no records).
    pub fn set(&self, name: &str, addresses: &[IpAddr]) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table.names.insert(normalize(name), addresses.to_vec());
    }

    /// Removes `name`: it answers NXDOMAIN.
    pub fn remove(&self, name: &str) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table.names.remove(&normalize(name));
    }

    /// Sets the TTL of the answers from now on.
    pub fn set_ttl(&self, ttl_secs: u32) {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).ttl = ttl_secs;
    }

    /// The questions answered so far (A and AAAA count one each).
    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(socket: UdpSocket, table: Arc<Mutex<Table>>, queries: Arc<AtomicU64>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let Ok(request) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        queries.fetch_add(1, Ordering::Relaxed);
        let response = answer(&request, &table);
        if let Ok(bytes) = response.to_vec() {
            let _ = socket.send_to(&bytes, peer).await;
        }
    }
}

fn answer(request: &Message, table: &Mutex<Table>) -> Message {
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata = Metadata::response_from_request(&request.metadata);
    response.metadata.authoritative = true;
    response.metadata.recursion_available = true;
    let table = table.lock().unwrap_or_else(|e| e.into_inner());
    for query in &request.queries {
        response.add_query(query.clone());
        let name = normalize(&query.name().to_ascii());
        let Some(addresses) = table.names.get(&name) else {
            response.metadata.response_code = ResponseCode::NXDomain;
            continue;
        };
        for ip in addresses {
            let rdata = match (ip, query.query_type()) {
                (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
                (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
                _ => continue,
            };
            response.add_answer(Record::from_rdata(query.name().clone(), table.ttl, rdata));
        }
    }
    response
}
