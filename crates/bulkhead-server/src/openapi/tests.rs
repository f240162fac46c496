use std::collections::BTreeSet;

use serde_json::Value;

use super::*;

fn json() -> Value {
    serde_json::from_slice(&document_for(true, &["default"])).unwrap()
}

/// What anyone may call, without a key (`/metrics` once it is served).
const OPEN: [&str; 7] = [
    "/health",
    "/ready",
    "/ready/replica",
    "/openapi.json",
    "/docs",
    "/metrics",
    "/info",
];
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn each_operation(document: &Value) -> Vec<(String, String, Value)> {
    let mut all = Vec::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in METHODS {
            if let Some(operation) = item.get(method) {
                all.push((path.clone(), method.to_string(), operation.clone()));
            }
        }
    }
    all
}

#[test]
fn the_document_is_openapi_3_1_with_both_key_schemes() {
    let document = json();
    assert_eq!(document["openapi"], "3.1.0");
    assert_eq!(document["info"]["title"], "Bulkhead");
    assert_eq!(document["info"]["version"], env!("CARGO_PKG_VERSION"));
    let schemes = &document["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["type"], "http");
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    assert_eq!(schemes["api_key"]["type"], "apiKey");
    assert_eq!(schemes["api_key"]["in"], "header");
    assert_eq!(schemes["api_key"]["name"], "x-api-key");
    assert_eq!(
        document["security"],
        serde_json::json!([{"bearer": []}, {"api_key": []}])
    );
}

/// The routes of the tutorials' contract and ours are all there (new ones
/// need no entry here: `routes::api` is the list).
#[test]
fn the_document_has_the_api() {
    let routes: BTreeSet<String> = each_operation(&json())
        .into_iter()
        .map(|(path, method, _)| format!("{} {path}", method.to_uppercase()))
        .collect();
    let expected: BTreeSet<String> = [
        "POST /agent",
        "GET /health",
        "GET /ready",
        "GET /ready/replica",
        "GET /sessions/{session_id}",
        "DELETE /sessions/{session_id}",
        "GET /sessions/{session_id}/runs",
        "GET /sessions/{session_id}/audit",
        "GET /runs/{run_id}",
        "GET /runs/{run_id}/events",
        "GET /openapi.json",
        "GET /docs",
        "GET /v1/models",
        "GET /v1/models/{model_id}",
        "POST /v1/chat/completions",
        "POST /v1/responses",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let missing: Vec<_> = expected.difference(&routes).collect();
    assert!(missing.is_empty(), "not in the document: {missing:?}");
}

/// Open operations say `security: []`; every other one inherits the keys
/// (or names schemes of its own) and answers 401 and 429 besides its own
/// statuses; every operation has an id, a tag, a summary and only
/// described responses.
#[test]
fn every_operation_says_who_may_call_it_and_what_it_answers() {
    let document = json();
    let mut ids = BTreeSet::new();
    for (path, method, operation) in each_operation(&document) {
        let what = format!("{method} {path}");
        assert!(
            ids.insert(operation["operationId"].as_str().unwrap().to_string()),
            "{what}: operationId repeated"
        );
        assert!(operation["tags"][0].is_string(), "{what}: no tag");
        assert!(operation["summary"].is_string(), "{what}: no summary");
        let responses = operation["responses"].as_object().unwrap();
        for (status, response) in responses {
            assert!(
                response.get("$ref").is_some() || response["description"].is_string(),
                "{what} {status}: no description"
            );
        }
        if OPEN.contains(&path.as_str()) {
            assert_eq!(operation["security"], serde_json::json!([]), "{what}");
            // No key is asked for; /metrics alone may have a token of its own.
            let own_token = path == "/metrics"
                && responses["401"]["description"]
                    .as_str()
                    .is_some_and(|d| d.contains("METRICS_TOKEN"));
            assert!(!responses.contains_key("401") || own_token, "{what}");
        } else {
            if let Some(requirements) = operation.get("security") {
                let requirements = requirements.as_array().unwrap();
                assert!(!requirements.is_empty(), "{what}: not in OPEN, yet open");
                for requirement in requirements {
                    for scheme in requirement.as_object().unwrap().keys() {
                        assert!(
                            document["components"]["securitySchemes"]
                                .get(scheme)
                                .is_some(),
                            "{what}: no security scheme {scheme}"
                        );
                    }
                }
            }
            // Under `/v1` the door answers in OpenAI's shape.
            let dialect = if path.starts_with("/v1/") {
                "OpenAi"
            } else {
                ""
            };
            assert_eq!(
                responses["401"]["$ref"],
                format!("#/components/responses/{dialect}Unauthorized")
            );
            assert_eq!(
                responses["429"]["$ref"],
                format!("#/components/responses/{dialect}RateLimited")
            );
            for status in responses.keys().filter(|s| s.starts_with('4')) {
                let body = responses[status]["content"]["application/json"]["schema"]["$ref"]
                    .as_str()
                    .or(responses[status]["$ref"].as_str());
                assert!(body.is_some(), "{what} {status}: no error body");
            }
        }
    }
    let components = &document["components"]["responses"];
    for dialect in ["", "OpenAi"] {
        assert!(
            components[format!("{dialect}Unauthorized")]["headers"]
                .get("WWW-Authenticate")
                .is_some()
        );
        for header in [
            "Retry-After",
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
        ] {
            assert!(
                components[format!("{dialect}RateLimited")]["headers"]
                    .get(header)
                    .is_some()
            );
        }
    }
}

/// Ids in and out are UUIDs with a pattern a client (or fuzzer) can
/// check, not only the `format` annotation.
#[test]
fn every_uuid_has_its_pattern() {
    let document = json();
    let parameters = document["paths"]["/sessions/{session_id}"]["get"]["parameters"]
        .as_array()
        .unwrap();
    assert_eq!(parameters[0]["schema"]["format"], "uuid");
    assert_eq!(parameters[0]["schema"]["pattern"], UUID_PATTERN);
    let body = &document["components"]["schemas"]["AgentRequestBody"]["properties"];
    assert_eq!(body["session_id"]["pattern"], UUID_PATTERN);
    let text = document.to_string();
    assert_eq!(
        text.matches(r#""format":"uuid""#).count(),
        text.matches(&serde_json::to_string(UUID_PATTERN).unwrap())
            .count()
    );
}

/// Every `$ref` points at something the document has.
#[test]
fn every_reference_resolves() {
    fn walk(node: &Value, document: &Value, refs: &mut usize) {
        match node {
            Value::Object(map) => {
                if let Some(Value::String(target)) = map.get("$ref") {
                    let pointer = target.strip_prefix('#').expect("a local reference");
                    assert!(
                        document.pointer(pointer).is_some(),
                        "{target} does not resolve"
                    );
                    *refs += 1;
                }
                map.values().for_each(|v| walk(v, document, refs));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, document, refs)),
            _ => {}
        }
    }
    let document = json();
    let mut refs = 0;
    walk(&document, &document, &mut refs);
    assert!(refs > 20, "only {refs} references");
}

/// A route can only be added through `routes!` in `routes::api`, which
/// documents it: a plain `.route(...)` (or a nested or merged router)
/// anywhere in the server would serve what the document does not show.
#[test]
fn no_route_is_added_around_the_document() {
    fn sources(dir: &std::path::Path, found: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, found);
            } else if path.extension().is_some_and(|e| e == "rs") {
                found.push(path);
            }
        }
    }
    let mut files = Vec::new();
    sources(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let mut offending = Vec::new();
    for file in files {
        if file.ends_with("openapi/tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            for call in [
                ".route(",
                ".route_service(",
                ".nest(",
                ".nest_service(",
                ".merge(",
            ] {
                if code.contains(call) {
                    offending.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        offending.is_empty(),
        "routes served outside `routes::api` (add them there with `routes!`, \
         their handler annotated with #[utoipa::path]):\n{}",
        offending.join("\n")
    );
}

/// The page loads nothing but itself and same-origin requests, and its
/// policy allows exactly its own inline style and script.
#[test]
fn the_docs_page_is_self_contained() {
    let (page, policy) = docs_page();
    let page = std::str::from_utf8(page).unwrap();
    let policy = policy.to_str().unwrap();
    assert!(!page.contains("/*SCRIPT*/") && !page.contains("/*STYLE*/"));
    assert_eq!(page.matches("<script").count(), 1);
    assert_eq!(page.matches("</script").count(), 1);
    for external in ["http://", "https://", "src=", "href=\"//"] {
        assert!(
            !page.to_lowercase().contains(external),
            "the page refers to {external}"
        );
    }
    assert!(!DOCS_CSS.contains("url(") && !DOCS_CSS.contains("@import"));
    // The script asks this origin only, relative to the page.
    assert!(!DOCS_JS.contains("XMLHttpRequest") && !DOCS_JS.contains("import("));
    assert_eq!(DOCS_JS.matches("fetch(").count(), 2);
    assert_eq!(
        DOCS_JS.matches("fetch(new URL(").count(),
        2,
        "every fetch is relative to the page"
    );
    assert!(policy.starts_with("default-src 'none';"));
    assert!(policy.contains("connect-src 'self'"));
    assert!(!policy.contains("unsafe"));
    let sha = |text: &str| {
        base64::engine::general_purpose::STANDARD.encode(Sha256::digest(text.as_bytes()))
    };
    assert!(policy.contains(&format!("script-src 'sha256-{}'", sha(DOCS_JS))));
    assert!(policy.contains(&format!("style-src 'sha256-{}'", sha(DOCS_CSS))));
    assert!(
        page.len() < 64 * 1024,
        "the page is {} bytes; it ships in the binary",
        page.len()
    );
}

#[test]
fn the_door_can_ask_which_routes_are_open() {
    use axum::http::Method;
    assert!(is_open(&Method::GET, "/health"));
    assert!(is_open(&Method::GET, "/docs"));
    assert!(!is_open(&Method::POST, "/health"));
    assert!(!is_open(&Method::POST, "/agent"));
    assert!(!is_open(&Method::GET, "/sessions/{session_id}"));
    assert!(!is_open(&Method::GET, "/no/such/route"));
}

/// ENABLE_STREAMING=false: the document offers no stream.
#[test]
fn a_server_without_streaming_documents_none() {
    let document: Value = serde_json::from_slice(&document_for(false, &["default"])).unwrap();
    let content = &document["paths"]["/agent"]["post"]["responses"]["200"]["content"];
    assert!(content.get("application/json").is_some());
    assert!(content.get("text/event-stream").is_none());
    let stream = &document["components"]["schemas"]["AgentRequestBody"]["properties"]["stream"];
    assert_eq!(stream["enum"], serde_json::json!([false, null]));
    assert!(
        json()["paths"]["/agent"]["post"]["responses"]["200"]["content"]
            .get("text/event-stream")
            .is_some()
    );
}
