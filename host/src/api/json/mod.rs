//! The JSON HTTP API: resources under `/api/v1` (VMs and their actions, snapshots,
//! commands, transfers, guests, the host), the event stream, `/healthz` and
//! `/metrics`, all on the XML-RPC listener.
//!
//! [`ENDPOINTS`] is the table of every route: [`configure`] registers it, the
//! OpenAPI document (`openapi.json`, served at `/api/v1/openapi.json`) describes
//! it, and a test checks that the two list the same routes. Handlers
//! ([`handlers`], [`files`], `super::events`, `super::metrics`) decode a request,
//! call the operation in [`ops`](super::ops) and encode its answer as the
//! [`wire`] types; none holds logic of an operation. Every failure is a
//! [`JsonError`]: an HTTP status that fits and a body
//! `{"error": {"code", "name", "message"}}` with the same stable
//! [`FaultCode`] the XML-RPC API reports. Bodies are read by hand (not by actix's
//! extractors) so that malformed JSON, wrong types, unknown keys, oversized or
//! stalled bodies are all such errors; an unknown route under `/api/` is one too.
//! What this module does not do: authenticate (see `super`), or keep state.

pub mod files;
pub mod handlers;
pub mod wire;

use super::ops::ApiError;
use super::FaultCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError, Route};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use std::time::Duration;

/// The largest JSON request body; larger ones are answered 413.
pub const MAX_JSON_BYTES: usize = 1024 * 1024;

/// How long a JSON request body may take to arrive.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// The OpenAPI 3 document of every route.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Why a JSON request failed.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("the body is not valid JSON: {0}")]
    Malformed(String),
    #[error("{0}")]
    InvalidParams(String),
    #[error("the body is larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the body did not arrive within {} s", .0.as_secs())]
    BodyTimeout(Duration),
    #[error("there is no route {method} {path} (GET /api/v1/openapi.json lists them)")]
    NoRoute { method: String, path: String },
    #[error("{path} does not answer {method}, only {}", allowed.join(", "))]
    MethodNotAllowed {
        method: String,
        path: String,
        allowed: Vec<&'static str>,
    },
    #[error("there is no action {0:?}; the actions are {actions}", actions = handlers::ACTIONS.join(", "))]
    UnknownAction(String),
}

impl JsonError {
    /// The stable code of this failure.
    pub fn fault_code(&self) -> FaultCode {
        match self {
            JsonError::Api(e) => e.fault_code(),
            JsonError::Malformed(_) | JsonError::TooLarge { .. } | JsonError::BodyTimeout(_) => {
                FaultCode::MalformedRequest
            }
            JsonError::InvalidParams(_) => FaultCode::InvalidParams,
            JsonError::NoRoute { .. }
            | JsonError::MethodNotAllowed { .. }
            | JsonError::UnknownAction(_) => FaultCode::UnknownMethod,
        }
    }

    /// The message for a person, causes included.
    pub fn message(&self) -> String {
        match self {
            JsonError::Api(e) => e.message(),
            other => other.to_string(),
        }
    }

    /// The JSON body of this error.
    pub fn body(&self) -> wire::ErrorBody {
        let code = self.fault_code();
        wire::ErrorBody {
            error: wire::ErrorDetail {
                code: code.code(),
                name: code.name(),
                message: self.message(),
            },
        }
    }
}

/// The HTTP status that goes with a fault code.
pub fn http_status(code: FaultCode) -> StatusCode {
    match code {
        FaultCode::UnknownVm
        | FaultCode::UnknownCommand
        | FaultCode::UnknownTransfer
        | FaultCode::UnknownSnapshot
        | FaultCode::UnknownMethod => StatusCode::NOT_FOUND,
        FaultCode::BadArgument | FaultCode::MalformedRequest | FaultCode::InvalidParams => {
            StatusCode::BAD_REQUEST
        }
        FaultCode::VmExists
        | FaultCode::SnapshotExists
        | FaultCode::InvalidState
        | FaultCode::NotFinished => StatusCode::CONFLICT,
        FaultCode::NotSupported => StatusCode::NOT_IMPLEMENTED,
        FaultCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
        FaultCode::GuestUnreachable | FaultCode::HypervisorFailure | FaultCode::TransferFailed => {
            StatusCode::BAD_GATEWAY
        }
        FaultCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl ResponseError for JsonError {
    fn status_code(&self) -> StatusCode {
        match self {
            JsonError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            JsonError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            JsonError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            other => http_status(other.fault_code()),
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        if self.fault_code() == FaultCode::Internal {
            log::error!("JSON API: {}", self.message());
        } else {
            log::debug!("JSON API: {status}: {}", self.message());
        }
        let mut response = HttpResponse::build(status);
        if let JsonError::MethodNotAllowed { allowed, .. } = self {
            response.insert_header((header::ALLOW, allowed.join(", ")));
        }
        response.json(self.body())
    }
}

/// What a handler answers.
pub type Answer = Result<HttpResponse, JsonError>;

// ---------------------------------------------------------------------------
// The route table.

/// An HTTP method of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Get,
    Post,
    Put,
    Delete,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "GET",
            Verb::Post => "POST",
            Verb::Put => "PUT",
            Verb::Delete => "DELETE",
        }
    }

    fn route(self) -> Route {
        match self {
            Verb::Get => web::get(),
            Verb::Post => web::post(),
            Verb::Put => web::put(),
            Verb::Delete => web::delete(),
        }
    }
}

/// One route: method, path (actix and OpenAPI share the `{name}` syntax) and the
/// handler it goes to.
pub struct Endpoint {
    pub verb: Verb,
    pub path: &'static str,
    to: fn(Route) -> Route,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.verb.as_str(), self.path)
    }
}

const fn endpoint(verb: Verb, path: &'static str, to: fn(Route) -> Route) -> Endpoint {
    Endpoint { verb, path, to }
}

use handlers as h;
use Verb::{Delete, Get, Post, Put};

/// Every route of the JSON API, the event stream and the health endpoints.
pub static ENDPOINTS: &[Endpoint] = &[
    endpoint(Get, "/api/v1/openapi.json", |r| r.to(openapi)),
    endpoint(Get, "/api/v1/host", |r| r.to(h::host)),
    endpoint(Get, "/api/v1/vms", |r| r.to(h::list_vms)),
    endpoint(Post, "/api/v1/vms", |r| r.to(h::create_vm)),
    endpoint(Get, "/api/v1/vms/{vm}", |r| r.to(h::get_vm)),
    endpoint(Delete, "/api/v1/vms/{vm}", |r| r.to(h::remove_vm)),
    endpoint(Post, "/api/v1/vms/{vm}/actions/{action}", |r| {
        r.to(h::action)
    }),
    endpoint(Get, "/api/v1/vms/{vm}/presence", |r| r.to(h::presence)),
    endpoint(Get, "/api/v1/vms/{vm}/performance", |r| {
        r.to(h::performance)
    }),
    endpoint(Post, "/api/v1/vms/{vm}/ping", |r| r.to(h::ping)),
    endpoint(Get, "/api/v1/vms/{vm}/snapshots", |r| r.to(h::snapshots)),
    endpoint(Post, "/api/v1/vms/{vm}/snapshots", |r| {
        r.to(h::take_snapshot)
    }),
    endpoint(Post, "/api/v1/vms/{vm}/snapshots/{snapshot}/restore", |r| {
        r.to(h::restore_snapshot)
    }),
    endpoint(Delete, "/api/v1/vms/{vm}/snapshots/{snapshot}", |r| {
        r.to(h::delete_snapshot)
    }),
    endpoint(Post, "/api/v1/vms/{vm}/commands", |r| r.to(h::run_command)),
    endpoint(Put, "/api/v1/vms/{vm}/files", |r| r.to(files::upload)),
    endpoint(Get, "/api/v1/vms/{vm}/files", |r| r.to(files::download)),
    endpoint(Get, "/api/v1/guests", |r| r.to(h::guests)),
    endpoint(Get, "/api/v1/commands", |r| r.to(h::list_commands)),
    endpoint(Post, "/api/v1/commands", |r| r.to(h::run_multicast)),
    endpoint(Get, "/api/v1/commands/{cmd}", |r| r.to(h::command)),
    endpoint(Get, "/api/v1/commands/{cmd}/result", |r| {
        r.to(h::command_result)
    }),
    endpoint(Get, "/api/v1/commands/{cmd}/output", |r| {
        r.to(h::command_output)
    }),
    endpoint(Post, "/api/v1/commands/{cmd}/cancel", |r| {
        r.to(h::cancel_command)
    }),
    endpoint(Get, "/api/v1/transfers", |r| r.to(h::list_transfers)),
    endpoint(Post, "/api/v1/transfers", |r| r.to(h::start_transfer)),
    endpoint(Get, "/api/v1/transfers/{transfer}", |r| r.to(h::transfer)),
    endpoint(Get, "/api/v1/events", |r| r.to(super::events::stream)),
    endpoint(Get, "/healthz", |r| r.to(super::metrics::healthz)),
    endpoint(Get, "/metrics", |r| r.to(super::metrics::metrics)),
];

/// The paths of [`ENDPOINTS`], each once, in the table's order.
pub fn paths() -> Vec<&'static str> {
    let mut paths: Vec<&'static str> = Vec::new();
    for endpoint in ENDPOINTS {
        if !paths.contains(&endpoint.path) {
            paths.push(endpoint.path);
        }
    }
    paths
}

/// Registers [`ENDPOINTS`]: one resource per path, answering 405 with the allowed
/// methods to any other method; then a 404 in JSON for any other path under
/// `/api/`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::QueryConfig::default().error_handler(|e, _req| {
        JsonError::InvalidParams(format!("the query string is wrong: {e}")).into()
    }));
    for path in paths() {
        let mut resource = web::resource(path).default_service(web::to(method_not_allowed));
        for endpoint in ENDPOINTS.iter().filter(|e| e.path == path) {
            resource = resource.route((endpoint.to)(endpoint.verb.route()));
        }
        cfg.service(resource);
    }
    cfg.service(web::resource("/api/{rest:.*}").to(no_route));
}

async fn method_not_allowed(req: HttpRequest) -> HttpResponse {
    let pattern = req.match_pattern().unwrap_or_else(|| req.path().to_owned());
    let error = JsonError::MethodNotAllowed {
        method: req.method().to_string(),
        path: req.path().to_owned(),
        allowed: ENDPOINTS
            .iter()
            .filter(|e| e.path == pattern)
            .map(|e| e.verb.as_str())
            .collect(),
    };
    error.error_response()
}

async fn no_route(req: HttpRequest) -> HttpResponse {
    let error = JsonError::NoRoute {
        method: req.method().to_string(),
        path: req.path().to_owned(),
    };
    error.error_response()
}

async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(OPENAPI)
}

// ---------------------------------------------------------------------------
// Bodies.

/// Reads a whole request body of at most `limit` bytes within [`BODY_TIMEOUT`].
async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<Bytes, JsonError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(JsonError::TooLarge { limit });
    }
    let read = async {
        let mut body = BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| JsonError::Malformed(e.to_string()))?;
            if body.len() + chunk.len() > limit {
                return Err(JsonError::TooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    };
    tokio::time::timeout(BODY_TIMEOUT, read)
        .await
        .map_err(|_| JsonError::BodyTimeout(BODY_TIMEOUT))?
}

/// Parses JSON: bad syntax is [`JsonError::Malformed`], wrong types, missing or
/// unknown keys are [`JsonError::InvalidParams`].
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, JsonError> {
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            JsonError::InvalidParams(format!("the body does not fit: {e}"))
        }
        _ => JsonError::Malformed(e.to_string()),
    })
}

/// A required JSON body.
pub async fn json_body<T: DeserializeOwned>(
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<T, JsonError> {
    let body = read_body(req, payload, MAX_JSON_BYTES).await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(JsonError::InvalidParams(
            "the request needs a JSON body".into(),
        ));
    }
    parse(&body)
}

/// An optional JSON body: none (or only white space) means the default.
pub async fn optional_json_body<T: DeserializeOwned + Default>(
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<T, JsonError> {
    let body = read_body(req, payload, MAX_JSON_BYTES).await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse(&body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// (method, path) of every operation of the OpenAPI document.
    fn documented() -> BTreeSet<(String, String)> {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
        let mut routes = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("a path item").keys() {
                if ["get", "post", "put", "delete", "patch", "head", "options"]
                    .contains(&method.as_str())
                {
                    routes.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        routes
    }

    #[test]
    fn the_openapi_document_lists_exactly_the_route_table() {
        let mut served: BTreeSet<(String, String)> = ENDPOINTS
            .iter()
            .map(|e| (e.verb.as_str().to_owned(), e.path.to_owned()))
            .collect();
        for path in super::super::xmlrpc::PATHS {
            served.insert(("POST".to_owned(), path.to_owned()));
        }
        let documented = documented();
        let undocumented: Vec<_> = served.difference(&documented).collect();
        let unserved: Vec<_> = documented.difference(&served).collect();
        assert!(
            undocumented.is_empty(),
            "not in openapi.json: {undocumented:?}"
        );
        assert!(unserved.is_empty(), "documented, not served: {unserved:?}");
    }

    #[test]
    fn the_openapi_document_has_every_fault_code() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let codes = &doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]
            ["name"]["enum"];
        let names: BTreeSet<&str> = codes
            .as_array()
            .expect("the error names are an enum")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        let ours: BTreeSet<&str> = FaultCode::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names, ours);
    }

    #[test]
    fn every_code_has_a_fitting_status() {
        let status = |c| http_status(c).as_u16();
        assert_eq!(status(FaultCode::UnknownVm), 404);
        assert_eq!(status(FaultCode::BadArgument), 400);
        assert_eq!(status(FaultCode::VmExists), 409);
        assert_eq!(status(FaultCode::InvalidState), 409);
        assert_eq!(status(FaultCode::NotSupported), 501);
        assert_eq!(status(FaultCode::Timeout), 504);
        assert_eq!(status(FaultCode::GuestUnreachable), 502);
        assert_eq!(status(FaultCode::HypervisorFailure), 502);
        assert_eq!(status(FaultCode::Internal), 500);
        for code in FaultCode::ALL {
            assert!(http_status(code).as_u16() >= 400, "{code:?}");
        }
    }

    #[test]
    fn bodies_are_told_apart_by_what_is_wrong() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Body {
            #[allow(dead_code)]
            name: String,
        }
        let code = |body: &str| parse::<Body>(body.as_bytes()).unwrap_err().fault_code();
        assert_eq!(code("{\"name\": "), FaultCode::MalformedRequest);
        assert_eq!(code("not json"), FaultCode::MalformedRequest);
        assert_eq!(code("{\"name\": 5}"), FaultCode::InvalidParams);
        assert_eq!(code("{}"), FaultCode::InvalidParams);
        assert_eq!(
            code("{\"name\": \"x\", \"nmae\": 1}"),
            FaultCode::InvalidParams
        );
        assert_eq!(code("[1]"), FaultCode::InvalidParams);
        assert!(parse::<Body>(b"{\"name\": \"x\"}").is_ok());
    }

    #[test]
    fn errors_are_json_with_code_name_and_message() {
        let error = JsonError::NoRoute {
            method: "GET".into(),
            path: "/api/v1/nope".into(),
        };
        let body = serde_json::to_value(error.body()).unwrap();
        assert_eq!(body["error"]["code"], -32601);
        assert_eq!(body["error"]["name"], "unknown-method");
        assert_eq!(
            body["error"]["message"],
            "there is no route GET /api/v1/nope (GET /api/v1/openapi.json lists them)"
        );
        assert_eq!(error.status_code(), StatusCode::NOT_FOUND);
        let error = JsonError::TooLarge { limit: 10 };
        assert_eq!(error.status_code(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(error.fault_code(), FaultCode::MalformedRequest);
    }
}
