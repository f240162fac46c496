//! The OpenAPI document against the server that serves it: every
//! documented operation is served, schemathesis (its own checks, from
//! `scripts/ensure-tools`) finds no server error and no answer the
//! document does not describe, and `/docs` renders it.

mod support;

use std::path::PathBuf;
use std::process::{Command, Output};

use bulkhead_testing::{DbKind, TestDb};
use serde_json::{Value, json};
use support::{Process, create_key, serve};

const ADMIN_TOKEN: &str = "openapi-admin-token-0123456789abcdef";

/// The server as it runs in production: keys required, the admin API on.
/// Returns it with a key made by `bulkhead keys create`.
async fn start() -> (TestDb, Process, String, String) {
    let db = TestDb::new(DbKind::Sqlite).await;
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("AGENT_MODE", "development"),
        ("AUTH_MODE", "keys"),
        ("ADMIN_TOKEN", ADMIN_TOKEN),
    ];
    let key = create_key(db.dir.path(), &env, &["--name", "openapi"]);
    let (server, base) = serve(db.dir.path(), &env);
    (db, server, base, key)
}

/// A tool of `scripts/ensure-tools`, found on PATH; `None` (the test is
/// skipped) only outside CI.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{name} is not on PATH (scripts/test puts scripts/ensure-tools' bin folder there)"
        );
        eprintln!("skipped: {name} is not on PATH (run scripts/ensure-tools)");
    }
    found
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn operations(document: &Value) -> Vec<(String, String)> {
    let mut all = Vec::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            all.push((method.to_uppercase(), path.clone()));
        }
    }
    all
}

/// What the router answers for a route it does not have: the document may
/// not list a route the server does not serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_served() {
    let (_db, _server, base, key) = start().await;
    let client = reqwest::Client::new();
    let document: Value = client
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    let operations = operations(&document);
    assert!(operations.len() >= 11, "{operations:?}");
    for (method, path) in operations {
        let url = format!(
            "{base}{}",
            path.replace("{session_id}", &uuid_like())
                .replace("{run_id}", &uuid_like())
                .replace("{key_id}", "ffffffffffffffff")
        );
        let credential = if path.starts_with("/admin/") {
            ADMIN_TOKEN
        } else {
            &key
        };
        let mut request = client
            .request(method.parse().unwrap(), &url)
            .bearer_auth(credential);
        if method == "POST" {
            request = request.json(&json!({"message": "hello"}));
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let body = response.text().await.unwrap();
        let code = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(String::from));
        assert!(
            status != 405 && code.as_deref() != Some("not_found"),
            "{method} {path} is documented but not served: {status} {body}"
        );
    }
}

fn uuid_like() -> String {
    "0190a4c2-7e0a-7000-8000-000000000000".into()
}

/// schemathesis, every check it has, against the live server: examples,
/// coverage (boundary and wrong values), fuzzing, and stateful sequences
/// along the document's links (a run, then its session, runs, audit,
/// events, and deleting it). Deterministic generation, so a failure
/// reproduces; the report is printed either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing() {
    let Some(schemathesis) = tool("schemathesis") else {
        return;
    };
    let (db, server, base, key) = start().await;
    // Stateful sequences along the document's own links only, long enough
    // to reach every operation they lead to (a run, its approval, its
    // session's reads, deleting it). Links schemathesis infers by itself
    // (`GET /agents` → `GET /agents/{agent_id}`, an id for an id) took every
    // scenario of a deterministic run, and the documented ones none.
    // No generated message makes the mock model call a tool, so no run of
    // this server ever waits for an approval, and deciding one can only
    // answer 404, 409 or 422 here: its warning that it found no data to
    // decide on is expected (tests/api/approvals.rs drives it through).
    // The OpenAI face's conversations end with the user's new message, not
    // blank, a rule JSON Schema cannot state of a list's last item: a
    // generated conversation that ends otherwise is valid by the document
    // and still refused (400, naming the field), so for those two
    // operations 400 is an expected answer to valid data (and schemathesis'
    // warning that they reject most of what it generates is expected: three
    // of the four roles cannot end a conversation). Every other
    // check holds for them, and the openai SDK's suite (tests/openai.rs)
    // covers what they accept. (schemathesis picks its checks once for the
    // run: per operation, only their settings can change.) The same holds
    // of the LangGraph routes that make runs: their `input` is a
    // conversation whose last message is the human's new one, so a
    // generated one is refused (422, naming the field) for the same reason;
    // the langgraph-sdk suite (tests/langgraph.rs) covers what they accept.
    // The LangGraph operations have no links: with them, the stateful
    // phase spent its scenarios there and never reached the sessions' (the
    // langgraph-sdk suite walks threads and runs end to end). Their ids
    // are schemathesis' own, which answer 404: its warning that it lacks
    // data for them is expected.
    let config = db.dir.path().join("schemathesis.toml");
    std::fs::write(
        &config,
        "[phases.stateful]\nmax-steps = 12\n[phases.stateful.inference]\nalgorithms = []\n\n\
         [[operations]]\ninclude-operation-id = \"decide\"\nwarnings = false\n\n\
         [[operations]]\ninclude-path-regex = \"^/v1/(chat/completions|responses)$\"\n\
         checks.positive_data_acceptance.expected-statuses = \
         [\"2xx\", \"400\", \"401\", \"404\", \"409\", \"429\", \"5xx\"]\nwarnings = false\n\n\
         [[operations]]\ninclude-path-regex = \"^(/threads/\\\\{thread_id\\\\})?/runs(/wait|/stream)?$\"\n\
         checks.positive_data_acceptance.expected-statuses = \
         [\"2xx\", \"400\", \"401\", \"404\", \"409\", \"422\", \"429\", \"5xx\"]\nwarnings = false\n\n\
         [[operations]]\ninclude-tag = \"langgraph\"\n\
         exclude-path-regex = \"^(/threads/\\\\{thread_id\\\\})?/runs(/wait|/stream)?$\"\nwarnings = false\n",
    )
    .unwrap();
    // The API with the key, the admin API with the admin token: each part
    // with what opens it, and `ignored_auth` checks that each protected
    // operation refuses a request without it.
    // The admin API has no links of its own: schemathesis' inferred ones
    // are its stateful phase, so it keeps the defaults.
    let defaults = db.dir.path().join("defaults.toml");
    std::fs::write(&defaults, "").unwrap();
    for (part, filter, credential, config) in [
        ("the API", "--exclude-tag", key.as_str(), &config),
        ("the admin API", "--include-tag", ADMIN_TOKEN, &defaults),
    ] {
        let mut command = Command::new(&schemathesis);
        command
            .current_dir(db.dir.path())
            .arg("--config-file")
            .arg(config)
            .arg("run")
            .arg(format!("{base}/openapi.json"))
            .args([filter, "keys"])
            .args(["--checks", "all"])
            .args(["--max-examples", "40"])
            .arg("--generation-deterministic")
            // The one health check that measures time (how long generating
            // took): the suite asserts no timing, and a loaded machine would
            // fail it. The others are properties of the document.
            .args(["--suppress-health-check", "too_slow"])
            .args(["--workers", "1"])
            .args(["--request-timeout", "20"])
            .args(["-H", &format!("Authorization: Bearer {credential}")])
            .arg("--no-color")
            .env("NO_COLOR", "1");
        let output = command.output().expect("schemathesis runs");
        let report = text(&output);
        println!("{part}:\n{report}");
        assert!(
            output.status.success(),
            "schemathesis found failures in {part} (report above); the server said:\n{}",
            server.all_output()
        );
        assert!(report.contains("No issues found"), "{part}: {report}");
    }
}

/// The document is valid OpenAPI 3.1 by the specification's own schema
/// (as schemathesis ships it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_is_valid_openapi_3_1() {
    let Some(schemathesis) = tool("schemathesis") else {
        return;
    };
    let python = std::fs::canonicalize(&schemathesis)
        .unwrap()
        .with_file_name("python");
    let (_db, _server, base, _key) = start().await;
    let output = Command::new(python)
        .args([
            "-c",
            "import sys, schemathesis\n\
             schema = schemathesis.openapi.from_url(sys.argv[1])\n\
             schema.validate()\n\
             print(schema.specification.version)",
        ])
        .arg(format!("{base}/openapi.json"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "3.1.0");
}

/// `/docs` as a browser gets it, and its script run against the live
/// document (in node, with just enough of a DOM): every operation is
/// rendered, with its "Try it" form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docs_page_renders_every_operation() {
    let (db, _server, base, _key) = start().await;
    let response = reqwest::get(format!("{base}/docs")).await.unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    let policy = headers["content-security-policy"].to_str().unwrap();
    assert!(policy.starts_with("default-src 'none'"), "{policy}");
    assert!(policy.contains("connect-src 'self'"), "{policy}");
    let page = response.text().await.unwrap();

    let Some(node) = tool("node") else {
        return;
    };
    let script = page
        .split_once("<script>")
        .and_then(|(_, rest)| rest.split_once("</script>"))
        .map(|(script, _)| script)
        .expect("one inline script");
    let runner = db.dir.path().join("render.js");
    std::fs::write(&runner, RENDER).unwrap();
    let output = Command::new(node)
        .arg(&runner)
        .arg(format!("{base}/docs"))
        .env("DOCS_SCRIPT", script)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    let rendered: Value = serde_json::from_slice(&output.stdout).unwrap();

    let document: Value = reqwest::get(format!("{base}/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rendered_text = rendered["text"].as_str().unwrap();
    for (method, path) in operations(&document) {
        assert!(
            rendered_text.contains(&format!("{} {path}", method.to_lowercase())),
            "{method} {path} is not on the page"
        );
    }
    assert_eq!(
        rendered["operations"].as_u64().unwrap() as usize,
        operations(&document).len()
    );
    assert_eq!(
        rendered["send_buttons"], rendered["operations"],
        "one Try it per operation"
    );
    assert!(rendered_text.contains("AgentRequestBody"));
    assert!(
        rendered["errors"].as_array().unwrap().is_empty(),
        "{rendered}"
    );
    // Every request the page made went to the server it came from.
    for url in rendered["fetched"].as_array().unwrap() {
        assert!(url.as_str().unwrap().starts_with(&base), "{url}");
    }
}

/// Just enough of a browser for the page's script: elements that keep
/// their children and text, `fetch` and `location`. Prints what was
/// rendered.
const RENDER: &str = r#"
const pageUrl = process.argv[2];
const errors = [];
const fetched = [];
class Node {}
class Element extends Node {
  constructor(tag) { super(); this.tagName = tag.toUpperCase(); this.children = []; this.attributes = {}; this.listeners = {}; this._text = ""; this.value = ""; }
  append(...nodes) { for (const n of nodes) this.children.push(n); }
  replaceChildren(...nodes) { this.children = []; this.append(...nodes); }
  setAttribute(k, v) { this.attributes[k] = v; if (k === "id") ids[v] = this; }
  addEventListener(kind, f) { this.listeners[kind] = f; }
  set textContent(t) { this.children = [new Text(String(t))]; }
  get textContent() { return this.children.map((c) => c.textContent).join(""); }
  set className(c) { this.attributes.class = c; }
}
class Text extends Node { constructor(t) { super(); this.text = t; } get textContent() { return this.text; } }
const ids = {};
for (const id of ["auth", "main", "key", "scheme", "title", "summary"]) ids[id] = new Element("div");
globalThis.Node = Node;
globalThis.document = {
  createElement: (tag) => new Element(tag),
  createTextNode: (t) => new Text(t),
  getElementById: (id) => ids[id] || null,
  title: "",
};
globalThis.location = new URL(pageUrl);
globalThis.sessionStorage = { getItem: () => null, setItem: () => {} };
const realFetch = fetch;
globalThis.fetch = (url, init) => { fetched.push(String(url)); return realFetch(url, init); };
process.on("uncaughtException", (e) => errors.push(String(e)));
process.on("unhandledRejection", (e) => errors.push(String(e)));
new Function(process.env.DOCS_SCRIPT)();
const walk = (node, f) => { f(node); for (const c of node.children || []) walk(c, f); };
const started = Date.now();
const report = () => {
  if (ids.main.children.length === 0 && Date.now() - started < 15000) return setTimeout(report, 50);
  let operations = 0, buttons = 0;
  walk(ids.main, (n) => {
    if (n.tagName === "DETAILS" && n.attributes.class === "op") operations++;
    if (n.tagName === "BUTTON" && n.textContent === "Send") buttons++;
    if (n.attributes && n.attributes.class === "error") errors.push(n.textContent);
  });
  // The schemas section is made of the same elements as operations.
  let schemas = 0;
  walk(ids.main, (n) => { if (n.attributes && typeof n.attributes.id === "string" && n.attributes.id.startsWith("schema-")) schemas++; });
  const text = [];
  walk(ids.main, (n) => {
    if (n.tagName === "SUMMARY") text.push(n.children.map((c) => c.textContent).join(" "));
  });
  console.log(JSON.stringify({ operations: operations - schemas, send_buttons: buttons, errors, fetched, text: text.join("\n") }));
  process.exit(0);
};
report();
"#;
