//! A fake mesh-control admin API recording the calls it gets.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{post, put};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use mesh_testkit::wait::within;

/// One call the admin API received.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    Register(Value),
    Renew(String),
    Deregister(String),
}

#[derive(Clone)]
pub struct Admin {
    pub calls: Arc<watch::Sender<Vec<Call>>>,
    /// Answer 404 to this many renewals (a control server that forgot us).
    forget: Arc<Mutex<usize>>,
    /// Refuse registrations with this status and message.
    refuse: Option<(StatusCode, &'static str)>,
}

impl Admin {
    fn record(&self, call: Call) -> usize {
        let mut n = 0;
        self.calls.send_modify(|c| {
            c.push(call);
            n = c.iter().filter(|c| matches!(c, Call::Register(_))).count();
        });
        n
    }

    pub async fn wait_for(&self, what: &str, pred: impl Fn(&[Call]) -> bool) -> Vec<Call> {
        let mut rx = self.calls.subscribe();
        within(what, rx.wait_for(|c| pred(c)))
            .await
            .unwrap()
            .clone()
    }
}

async fn register(
    State(admin): State<Admin>,
    axum::Json(body): axum::Json<Value>,
) -> (StatusCode, axum::Json<Value>) {
    if let Some((status, message)) = admin.refuse {
        return (status, axum::Json(json!({ "error": message })));
    }
    let n = admin.record(Call::Register(body));
    (
        StatusCode::CREATED,
        axum::Json(json!({ "lease_id": format!("lease-{n}"), "ttl_seconds": 1 })),
    )
}

async fn renew(State(admin): State<Admin>, Path(id): Path<String>) -> StatusCode {
    admin.record(Call::Renew(id));
    let mut forget = admin.forget.lock().unwrap();
    if *forget > 0 {
        *forget -= 1;
        StatusCode::NOT_FOUND
    } else {
        StatusCode::OK
    }
}

async fn deregister(State(admin): State<Admin>, Path(id): Path<String>) -> StatusCode {
    admin.record(Call::Deregister(id));
    StatusCode::NO_CONTENT
}

pub async fn fake_admin(
    forget: usize,
    refuse: Option<(StatusCode, &'static str)>,
) -> (SocketAddr, Admin) {
    let admin = Admin {
        calls: Arc::new(watch::Sender::new(Vec::new())),
        forget: Arc::new(Mutex::new(forget)),
        refuse,
    };
    let app = Router::new()
        .route("/v1/endpoints", post(register))
        .route("/v1/endpoints/{id}", put(renew).delete(deregister))
        .with_state(admin.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, admin)
}
