//! The API's HTTP listener: actix-web serving the route table of [`super::configure`]
//! on one address (`127.0.0.1:50505` by default, the original's).
//!
//! [`serve`] binds and hands back the [`Server`]; the caller runs it (spawn it, or
//! await it) and stops it through [`Server::handle`]. The server installs no signal
//! handlers of its own: the host agent's binary owns SIGTERM/SIGINT and stops the
//! engine and the server in its order. Workers share the one [`Engine`], which is a
//! cheap handle to the actors.

use crate::engine::Engine;
use actix_web::dev::Server;
use actix_web::{App, HttpServer};
use std::net::SocketAddr;
use std::time::Duration;

/// How long a stopping server lets requests in flight finish (a blocking
/// `cpFileToVM` may be one of them).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Binds `listen` and returns the server, ready to run: spawn it
/// (`actix_rt::spawn(server)`) or await it; it must run inside the actix system that
/// runs the engine. Fails if the address cannot be bound.
pub async fn serve(engine: Engine, listen: SocketAddr) -> std::io::Result<Server> {
    let server = HttpServer::new(move || {
        let engine = engine.clone();
        App::new().configure(move |cfg| super::configure(cfg, engine))
    })
    .disable_signals()
    .shutdown_timeout(SHUTDOWN_GRACE.as_secs())
    .bind(listen)?
    .run();
    log::info!("API listening on http://{listen} (XML-RPC at /RPC2 and /, JSON under /api/v1)");
    Ok(server)
}
