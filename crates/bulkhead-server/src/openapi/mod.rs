//! The OpenAPI document and the page that shows it. The document is made
//! from the handlers' `#[utoipa::path]` annotations as `routes::api`
//! registers them, so a route cannot be served without being described;
//! what every protected operation shares (the keys, 401, 429) is added
//! here once rather than on each handler.

use std::sync::OnceLock;

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{
    Content, HeaderBuilder, ObjectBuilder, OpenApi as Document, Ref, RefOr, ResponseBuilder,
    SecurityRequirement, Type,
};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::app::AppState;
use crate::error::ErrorBody;
use crate::routes::openai::OpenAiErrorBody;

/// The document's fixed part; `routes::api` adds the paths.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Bulkhead",
        description = "A container-native AI agent server: the agent API, its sessions, runs and audit trail, and the probes.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    tags(
        (name = "agent", description = "Talk to the agent"),
        (name = "sessions", description = "Conversations, their runs and their audit trail"),
        (name = "runs", description = "One run and its recorded events"),
        (name = "probes", description = "Liveness and readiness, for orchestrators (open)"),
        (name = "documentation", description = "This document and its page (open)"),
        (name = "keys", description = "API keys, for whoever holds ADMIN_TOKEN (the admin API is off without it)"),
        (name = "openai", description = "The OpenAI-compatible API: each agent is a model (errors in OpenAI's shape)"),
        (name = "langgraph", description = "LangGraph's Agent Server API, as `langgraph-sdk` and Agent Chat UI speak it: assistants are the agents, threads are sessions (errors as `{\"detail\"}`)"),
    ),
    components(schemas(ErrorBody, OpenAiErrorBody)),
    modifiers(&Keys),
)]
pub struct ApiDoc;

/// Names of the security schemes, for `security(...)` on a handler.
pub const BEARER: &str = "bearer";
pub const API_KEY: &str = "api_key";
pub const ADMIN_TOKEN: &str = "admin_token";

struct Keys;

impl Modify for Keys {
    fn modify(&self, document: &mut Document) {
        let components = document.components.get_or_insert_with(Default::default);
        let mut bearer = Http::new(HttpAuthScheme::Bearer);
        bearer.description = Some("An API key, sent as `Authorization: Bearer <key>`".into());
        components
            .security_schemes
            .insert(BEARER.into(), SecurityScheme::Http(bearer).into());
        components.security_schemes.insert(
            API_KEY.into(),
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "x-api-key",
                "The same API key, in the `x-api-key` header",
            )))
            .into(),
        );
        let mut admin = Http::new(HttpAuthScheme::Bearer);
        admin.description = Some("ADMIN_TOKEN, as `Authorization: Bearer <token>`".into());
        components
            .security_schemes
            .insert(ADMIN_TOKEN.into(), SecurityScheme::Http(admin).into());
        // Either scheme will do: two requirements, one of which must hold.
        document.security = Some(vec![
            SecurityRequirement::new(BEARER, Vec::<String>::new()),
            SecurityRequirement::new(API_KEY, Vec::<String>::new()),
        ]);
    }
}

/// The whole document: the fixed part, the routes, and what every
/// protected operation answers besides its own statuses.
pub fn document() -> serde_json::Value {
    let mut document = super::routes::api().into_openapi();
    finish(&mut document);
    let mut json = serde_json::to_value(&document).expect("the document serializes");
    uuid_patterns(&mut json);
    json
}

/// Ids are UUIDs, written the usual way. `format: uuid` alone is only an
/// annotation in JSON Schema 2020-12: clients and fuzzers may send any
/// string, so every such schema also gets the pattern (utoipa's `pattern`
/// takes only a literal, hence one pass here rather than one per field).
const UUID_PATTERN: &str =
    "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";

fn uuid_patterns(node: &mut serde_json::Value) {
    match node {
        serde_json::Value::Object(map) => {
            if map.get("format").and_then(|f| f.as_str()) == Some("uuid") {
                map.entry("pattern").or_insert(UUID_PATTERN.into());
            }
            map.values_mut().for_each(uuid_patterns);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(uuid_patterns),
        _ => {}
    }
}

const UNAUTHORIZED: &str = "Unauthorized";
const RATE_LIMITED: &str = "RateLimited";
/// The same two under `/v1`, in OpenAI's shape.
const OPENAI_UNAUTHORIZED: &str = "OpenAiUnauthorized";
const OPENAI_RATE_LIMITED: &str = "OpenAiRateLimited";

fn finish(document: &mut Document) {
    let components = document.components.get_or_insert_with(Default::default);
    for (unauthorized, rate_limited, schema) in [
        (UNAUTHORIZED, RATE_LIMITED, ErrorBody::name()),
        (
            OPENAI_UNAUTHORIZED,
            OPENAI_RATE_LIMITED,
            OpenAiErrorBody::name(),
        ),
    ] {
        door_responses(components, unauthorized, rate_limited, &schema);
    }
    for (path, item) in document.paths.paths.iter_mut() {
        let openai = crate::routes::openai::is_openai(path);
        for operation in operations(item) {
            finish_operation(operation, openai);
        }
    }
}

/// What the door answers, as components.
fn door_responses(
    components: &mut utoipa::openapi::Components,
    unauthorized: &str,
    rate_limited: &str,
    schema: &str,
) {
    components.responses.insert(
        unauthorized.into(),
        error_response("`unauthorized`: no key, or a key that is not valid", schema)
            .header(
                "WWW-Authenticate",
                header_of("How to authenticate: `Bearer`"),
            )
            .build()
            .into(),
    );
    components.responses.insert(
        rate_limited.into(),
        error_response(
            "`rate_limited`: this key has used its requests for now",
            schema,
        )
        .header(
            "Retry-After",
            integer_header("Seconds to wait before sending again"),
        )
        .header(
            "x-ratelimit-limit",
            integer_header("Requests allowed per window"),
        )
        .header(
            "x-ratelimit-remaining",
            integer_header("Requests left in this window"),
        )
        .header(
            "x-ratelimit-reset",
            integer_header("Seconds until the window resets"),
        )
        .build()
        .into(),
    );
}

/// An operation marked `security(())` is open: `security: []`, which
/// overrides the document's requirement (`[{}]` would mean "optional").
/// Every other one answers 401 and 429 as the door does.
fn finish_operation(operation: &mut Operation, openai: bool) {
    let open = operation
        .security
        .as_ref()
        .is_some_and(|requirements| requirements.iter().all(is_empty_requirement));
    if open {
        operation.security = Some(Vec::new());
        return;
    }
    let (unauthorized, rate_limited) = if openai {
        (OPENAI_UNAUTHORIZED, OPENAI_RATE_LIMITED)
    } else {
        (UNAUTHORIZED, RATE_LIMITED)
    };
    let responses = &mut operation.responses.responses;
    responses.insert(
        "401".into(),
        RefOr::Ref(Ref::from_response_name(unauthorized)),
    );
    responses.insert(
        "429".into(),
        RefOr::Ref(Ref::from_response_name(rate_limited)),
    );
}

fn is_empty_requirement(requirement: &SecurityRequirement) -> bool {
    requirement == &SecurityRequirement::default()
}

pub(crate) fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
        &mut item.trace,
    ]
    .into_iter()
    .filter_map(Option::as_mut)
    .chain(item.additional_operations.values_mut())
}

fn error_response(description: &str, schema: &str) -> ResponseBuilder {
    ResponseBuilder::new().description(description).content(
        "application/json",
        Content::new(Some(Ref::from_schema_name(schema))),
    )
}

fn header_of(description: &str) -> utoipa::openapi::Header {
    HeaderBuilder::new()
        .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
        .description(Some(description))
        .build()
}

fn integer_header(description: &str) -> utoipa::openapi::Header {
    HeaderBuilder::new()
        .schema(Some(ObjectBuilder::new().schema_type(Type::Integer)))
        .description(Some(description))
        .build()
}

/// Whether the document lets anyone call this operation (`security: []`),
/// `route` being the path as registered (axum's `MatchedPath`, e.g.
/// `/sessions/{session_id}`). For the door, so that what is enforced is
/// what the document says.
pub fn is_open(method: &axum::http::Method, route: &str) -> bool {
    static OPEN: OnceLock<std::collections::HashSet<(String, String)>> = OnceLock::new();
    OPEN.get_or_init(|| {
        let document = document();
        let mut open = std::collections::HashSet::new();
        if let Some(paths) = document["paths"].as_object() {
            for (path, item) in paths {
                for (method, operation) in item.as_object().into_iter().flatten() {
                    if operation["security"].as_array().is_some_and(Vec::is_empty) {
                        open.insert((method.to_uppercase(), path.clone()));
                    }
                }
            }
        }
        open
    })
    .contains(&(method.as_str().to_string(), route.to_string()))
}

/// The document as this server serves it, made once at start: a server
/// that refuses streams does not offer them, and `agent` is one of the
/// agents it runs.
pub(crate) fn document_for(streaming: bool, agents: &[&str]) -> Bytes {
    let mut document = document();
    if !streaming {
        without_streaming(&mut document);
    }
    if let Some(agent) =
        document.pointer_mut("/components/schemas/AgentRequestBody/properties/agent")
    {
        let mut ids: Vec<serde_json::Value> = agents.iter().map(|id| (*id).into()).collect();
        ids.push(serde_json::Value::Null);
        agent["enum"] = serde_json::Value::Array(ids);
    }
    // A model is one of the agents.
    for body in ["ChatCompletionRequest", "ResponseRequest"] {
        if let Some(model) =
            document.pointer_mut(&format!("/components/schemas/{body}/properties/model"))
        {
            model["enum"] = agents
                .iter()
                .map(|id| serde_json::Value::from(*id))
                .collect();
        }
    }
    Bytes::from(serde_json::to_vec(&document).expect("the document serializes"))
}

fn without_streaming(document: &mut serde_json::Value) {
    for path in ["~1agent", "~1v1~1chat~1completions", "~1v1~1responses"] {
        if let Some(content) = document
            .pointer_mut(&format!("/paths/{path}/post/responses/200/content"))
            .and_then(serde_json::Value::as_object_mut)
        {
            content.remove("text/event-stream");
        }
    }
    for body in [
        "AgentRequestBody",
        "ChatCompletionRequest",
        "ResponseRequest",
    ] {
        if let Some(stream) =
            document.pointer_mut(&format!("/components/schemas/{body}/properties/stream"))
        {
            *stream = serde_json::json!({
                "type": ["boolean", "null"],
                "enum": [false, null],
                "description": "Streaming is turned off on this server (ENABLE_STREAMING=false): `true` is answered with 400 `streaming_disabled`.",
            });
        }
    }
}

/// This document
///
/// OpenAPI 3.1, generated from the code that serves the routes.
#[utoipa::path(get, path = "/openapi.json", tag = "documentation", security(()), responses(
    (status = 200, description = "The OpenAPI document", content_type = "application/json",
        body = inline(Object)),
))]
pub async fn openapi_json(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        state.openapi_document().clone(),
    )
        .into_response()
}

const DOCS_HTML: &str = include_str!("docs.html");
const DOCS_CSS: &str = include_str!("docs.css");
const DOCS_JS: &str = include_str!("docs.js");

/// The page and its Content-Security-Policy, made once. The style and the
/// script are inline, allowed by their hashes: the page needs nothing but
/// itself and same-origin requests, and serving it is one route.
fn docs_page() -> &'static (Bytes, HeaderValue) {
    static PAGE: OnceLock<(Bytes, HeaderValue)> = OnceLock::new();
    PAGE.get_or_init(|| {
        let hash = |text: &str| {
            base64::engine::general_purpose::STANDARD.encode(Sha256::digest(text.as_bytes()))
        };
        let page = DOCS_HTML
            .replace("/*STYLE*/", DOCS_CSS)
            .replace("/*SCRIPT*/", DOCS_JS);
        let policy = format!(
            "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; \
             connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
             form-action 'none'; frame-ancestors 'none'",
            hash(DOCS_JS),
            hash(DOCS_CSS),
        );
        (
            Bytes::from(page),
            HeaderValue::try_from(policy).expect("the policy is a valid header value"),
        )
    })
}

/// This document, for a person
///
/// A page that reads `/openapi.json` and shows every operation, with a
/// field for a key and a form to try each one. Self-contained: it loads
/// nothing from anywhere else.
#[utoipa::path(get, path = "/docs", tag = "documentation", security(()), responses(
    (status = 200, description = "The page", content_type = "text/html", body = String),
))]
pub async fn docs() -> Response {
    let (page, policy) = docs_page();
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (header::CONTENT_SECURITY_POLICY, policy.clone()),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
        ],
        page.clone(),
    )
        .into_response()
}

#[cfg(test)]
mod tests;
