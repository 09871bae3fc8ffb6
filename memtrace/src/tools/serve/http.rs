//! The HTTP side: GET only, two read-only endpoints, a bounded number of connections, and
//! a deadline on each request's headers. Nothing a request says changes what is traced.

use std::{cell::RefCell, convert::Infallible, rc::Rc, time::Duration};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, header};
use hyper_util::rt::{TokioIo, TokioTimer};

use super::State;

/// Connections served at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 64;

pub async fn serve(listener: tokio::net::TcpListener, state: Rc<RefCell<State>>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let Ok((stream, _)) = listener.accept().await else { continue };
        let state = state.clone();
        tokio::task::spawn_local(async move {
            let service = hyper::service::service_fn(move |req| {
                let response = respond(&state, &req);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(permit);
        });
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn respond<B>(state: &RefCell<State>, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "memtrace serve answers GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let body = state.borrow_mut().snapshot().encode();
            let mut r = text(StatusCode::OK, body);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            r
        }
        "/debug/pprof/heap" => {
            let Some(pid) = query_pid(req.uri().query().unwrap_or_default()) else {
                return text(StatusCode::BAD_REQUEST, "give the process: /debug/pprof/heap?pid=N\n".into());
            };
            match super::heap_profile(&state.borrow(), pid) {
                Ok(bytes) => {
                    let mut r = Response::new(Full::new(Bytes::from(bytes)));
                    r.headers_mut()
                        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/octet-stream"));
                    r
                }
                Err((status, why)) => text(StatusCode::from_u16(status).unwrap_or(StatusCode::NOT_FOUND), why + "\n"),
            }
        }
        "/" => text(
            StatusCode::OK,
            "memtrace serve\n/metrics\n/debug/pprof/heap?pid=N (the processes this agent was told to trace)\n".into(),
        ),
        _ => text(StatusCode::NOT_FOUND, "no such endpoint: /metrics and /debug/pprof/heap?pid=N are served\n".into()),
    }
}

/// `pid=N` from a query string (go tool pprof adds `seconds=...` to some requests).
fn query_pid(query: &str) -> Option<u32> {
    query.split('&').find_map(|kv| kv.strip_prefix("pid=")).and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn pid_from_the_query() {
        assert_eq!(super::query_pid("pid=42"), Some(42));
        assert_eq!(super::query_pid("seconds=30&pid=7"), Some(7));
        assert_eq!(super::query_pid("pid=x"), None);
        assert_eq!(super::query_pid(""), None);
    }
}
