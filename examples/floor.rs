//! The throughput floor `/api/route` is measured against (bench/load.sh, docs/performance.md).
//!
//! actix-web on loopback with the daemon's server settings (default worker count, backlog
//! 2048, 30 s shutdown timeout), answering every POST with a constant ~130-byte JSON body
//! and doing nothing else: no auth, no parsing, no decision, no audit. The ratio
//! daemon/floor then says what Hall's own work costs on this machine.
//!
//! `cargo run --release --example floor -- [ADDR]` (default 127.0.0.1:0); logs
//! `listening on http://ADDR` on stderr like the daemon.

use actix_web::{web, App, HttpResponse, HttpServer};

/// Shaped like a real decision answer, so response size matches too.
const BODY: &str = r#"{"decision_id":"0190f0e4-7a3b-7c2d-8e9f-0a1b2c3d4e5f","allowed":true,"worker_id":"worker.000001","deny_reason":null,"dry_run":false}"#;

async fn answer(_body: web::Bytes) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(BODY)
}

fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_string());
    actix_web::rt::System::new().block_on(async move {
        let server = HttpServer::new(|| App::new().default_service(web::to(answer)))
            .backlog(2048)
            .shutdown_timeout(30)
            .bind(&addr)?;
        let bound = server.addrs().first().copied();
        let server = server.run();
        if let Some(a) = bound {
            eprintln!("listening on http://{a}");
        }
        server.await
    })
}
