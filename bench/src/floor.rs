//! The origin's floor: a bare actix-web handler that reads the request body and answers given
//! bytes, with as many workers as the origin. Whatever the origin does beyond this is its cost.

use actix_web::dev::ServerHandle;
use actix_web::{App, HttpResponse, HttpServer, web};
use bytes::Bytes;

/// A running bare actix-web server; stop it with [`BareActix::stop`].
pub struct BareActix {
    url: String,
    handle: ServerHandle,
}

impl BareActix {
    /// Serves `POST /v1/chat/completions` answering `body` on a free loopback port. Must be
    /// called inside an actix (or Tokio) runtime, which then drives it.
    pub fn start(body: Bytes, workers: usize) -> anyhow::Result<BareActix> {
        let server = HttpServer::new(move || {
            let body = body.clone();
            App::new().route(
                "/v1/chat/completions",
                web::post().to(move |_request: web::Bytes| {
                    let body = body.clone();
                    async move {
                        HttpResponse::Ok()
                            .content_type("application/json")
                            .body(body)
                    }
                }),
            )
        })
        .workers(workers)
        .bind("127.0.0.1:0")?;
        let url = format!("http://{}/v1/chat/completions", server.addrs()[0]);
        let server = server.run();
        let handle = server.handle();
        actix_web::rt::spawn(server);
        Ok(BareActix { url, handle })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn stop(self) {
        self.handle.stop(true).await;
    }
}
