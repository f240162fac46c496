//! Streamable HTTP servers: the egress judgement of the URL, and rmcp's
//! `StreamableHttpClient` over the workspace's reqwest 0.12.
//!
//! rmcp's own client is on reqwest 0.13; ours is ~200 lines and is also
//! where the policy is enforced: the client connects only to the addresses
//! judged (`resolve_to_addrs`), follows no redirect and uses no proxy, and
//! every message it reads is capped (see ARCHITECTURE.md, bulkhead-mcp).

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bulkhead_sandbox::egress::EgressPolicy;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use rmcp::model::{ClientJsonRpcMessage, ServerJsonRpcMessage};
use rmcp::transport::common::http_header::{
    EVENT_STREAM_MIME_TYPE, HEADER_LAST_EVENT_ID, HEADER_SESSION_ID, JSON_MIME_TYPE,
};
use rmcp::transport::streamable_http_client::{
    SseError, StreamableHttpClient, StreamableHttpError, StreamableHttpPostResponse,
};
use sse_stream::{Sse, SseStream};

use crate::bounded::{MAX_MESSAGE_BYTES, Overflow, bounded_events};
use crate::config::redacted_url;
use crate::error::McpError;

/// How much of an error response's body goes into the error.
const ERROR_BODY_BYTES: usize = 512;

type Error = StreamableHttpError<reqwest::Error>;

/// A reqwest client that reaches one server at the addresses the egress
/// policy judged, and nothing else.
#[derive(Clone)]
pub(crate) struct JudgedClient {
    client: reqwest::Client,
    overflow: Overflow,
}

/// Resolves the URL's host once, judges every address with the policy, and
/// builds a client pinned to exactly those addresses.
pub(crate) async fn judged_client(
    server: &str,
    url: &url::Url,
    headers: &[(String, String)],
    policy: &EgressPolicy,
    overflow: Overflow,
) -> Result<JudgedClient, McpError> {
    let refused = |destination: String, rule: String| McpError::EgressRefused {
        server: server.to_string(),
        destination,
        rule,
    };
    let unavailable = |reason: String| McpError::Unavailable {
        server: server.to_string(),
        reason,
    };
    let port = url
        .port_or_known_default()
        .ok_or_else(|| unavailable("the URL has no port".into()))?;
    let (host, literal) = match url.host() {
        Some(url::Host::Domain(name)) => (name.to_string(), None),
        Some(url::Host::Ipv4(ip)) => (ip.to_string(), Some(IpAddr::V4(ip))),
        Some(url::Host::Ipv6(ip)) => (ip.to_string(), Some(IpAddr::V6(ip))),
        None => return Err(unavailable("the URL has no host".into())),
    };
    let destination = format!("{}:{port}", url.host_str().unwrap_or(&host));
    if !policy.allows(&host, port) {
        return Err(refused(destination, "not in SANDBOX_EGRESS_ALLOW".into()));
    }
    let addresses: Vec<SocketAddr> = match literal {
        Some(ip) => vec![SocketAddr::new(ip, port)],
        None => tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| unavailable(format!("could not resolve {host}: {e}")))?
            .collect(),
    };
    if addresses.is_empty() {
        return Err(unavailable(format!("{host} resolved to no address")));
    }
    if let Err(refusal) = policy.check(&host, port, &addresses) {
        let destination = match refusal.address {
            Some(address) if literal.is_none() => format!("{destination} ({address})"),
            _ => destination,
        };
        return Err(refused(destination, refusal.rule));
    }

    let mut default_headers = HeaderMap::new();
    for (name, value) in headers {
        // Validated with the configuration; values may be secrets, so they
        // are marked sensitive (kept out of reqwest's Debug output).
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| unavailable(format!("{name:?} is not a header name")))?;
        let mut value = HeaderValue::from_str(value)
            .map_err(|_| unavailable(format!("the value of header {name} is not valid")))?;
        value.set_sensitive(true);
        default_headers.append(name, value);
    }
    let mut builder = reqwest::Client::builder()
        // The judged addresses are the only way: no proxy from the
        // environment, and no redirect to somewhere not judged.
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .default_headers(default_headers)
        // As rmcp's own client: reusing a connection whose last body was
        // not read to the end stalls ~40 ms on delayed ACKs.
        .pool_max_idle_per_host(0);
    if literal.is_none() {
        builder = builder.resolve_to_addrs(&host, &addresses);
    }
    let client = builder
        .build()
        .map_err(|e| unavailable(format!("could not make an HTTP client: {e}")))?;
    tracing::debug!(server, url = %redacted_url(url), ?addresses, "MCP server judged");
    Ok(JudgedClient { client, overflow })
}

fn media_type_is(value: Option<&HeaderValue>, expected: &str) -> bool {
    value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case(expected))
}

impl JudgedClient {
    fn events(&self, response: reqwest::Response) -> BoxStream<'static, Result<Sse, SseError>> {
        let body = bounded_events(
            response.bytes_stream(),
            MAX_MESSAGE_BYTES,
            self.overflow.clone(),
        );
        SseStream::from_bytes_stream(body).boxed()
    }

    async fn bounded_body(&self, response: reqwest::Response) -> Result<Vec<u8>, Error> {
        let too_large = || {
            self.overflow.set();
            StreamableHttpError::ResponseBodyTooLarge {
                max_size: MAX_MESSAGE_BYTES,
            }
        };
        if response
            .content_length()
            .is_some_and(|length| length > MAX_MESSAGE_BYTES as u64)
        {
            return Err(too_large());
        }
        let mut stream = response.bytes_stream();
        let mut body = Vec::new();
        while let Some(chunk) = stream
            .try_next()
            .await
            .map_err(|e| StreamableHttpError::Client(e.without_url()))?
        {
            if chunk.len() > MAX_MESSAGE_BYTES - body.len() {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// The start of an error response's body, for the error.
    async fn error_text(response: reqwest::Response) -> String {
        let mut stream = response.bytes_stream();
        let mut body = Vec::new();
        while body.len() < ERROR_BODY_BYTES {
            match stream.next().await {
                Some(Ok(chunk)) => body.extend_from_slice(&chunk),
                _ => break,
            }
        }
        body.truncate(ERROR_BODY_BYTES);
        String::from_utf8_lossy(&body).trim().to_string()
    }
}

fn with_headers(
    mut request: reqwest::RequestBuilder,
    session_id: Option<&str>,
    auth_header: Option<String>,
    custom_headers: HashMap<HeaderName, HeaderValue>,
) -> reqwest::RequestBuilder {
    if let Some(token) = auth_header {
        request = request.bearer_auth(token);
    }
    for (name, value) in custom_headers {
        request = request.header(name, value);
    }
    if let Some(session_id) = session_id {
        request = request.header(HEADER_SESSION_ID, session_id);
    }
    request
}

impl StreamableHttpClient for JudgedClient {
    type Error = reqwest::Error;

    async fn post_message(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<StreamableHttpPostResponse, Error> {
        let request = self
            .client
            .post(uri.as_ref())
            .header(
                ACCEPT,
                format!("{EVENT_STREAM_MIME_TYPE}, {JSON_MIME_TYPE}"),
            )
            .json(&message);
        let request = with_headers(request, session_id.as_deref(), auth_header, custom_headers);
        let response = request
            .send()
            .await
            .map_err(|e| StreamableHttpError::Client(e.without_url()))?;
        let status = response.status();
        if matches!(status, StatusCode::ACCEPTED | StatusCode::NO_CONTENT) {
            return Ok(StreamableHttpPostResponse::Accepted);
        }
        if status == StatusCode::NOT_FOUND && session_id.is_some() {
            return Err(StreamableHttpError::SessionExpired);
        }
        let awaits_no_response = !matches!(message, ClientJsonRpcMessage::Request(_));
        let content_type = response.headers().get(CONTENT_TYPE).cloned();
        let new_session = response
            .headers()
            .get(HEADER_SESSION_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if !status.is_success() {
            let text = JudgedClient::error_text(response).await;
            // A JSON-RPC error in an error status says more than the status.
            if media_type_is(content_type.as_ref(), JSON_MIME_TYPE)
                && let Ok(error @ ServerJsonRpcMessage::Error(_)) =
                    serde_json::from_str::<ServerJsonRpcMessage>(&text)
            {
                return Ok(StreamableHttpPostResponse::Json(error, new_session));
            }
            return Err(StreamableHttpError::UnexpectedServerResponse(Cow::Owned(
                format!("HTTP {status}: {text}"),
            )));
        }
        if media_type_is(content_type.as_ref(), EVENT_STREAM_MIME_TYPE) {
            return Ok(StreamableHttpPostResponse::Sse(
                self.events(response),
                new_session,
            ));
        }
        if media_type_is(content_type.as_ref(), JSON_MIME_TYPE) {
            let body = self.bounded_body(response).await?;
            return match serde_json::from_slice::<ServerJsonRpcMessage>(&body) {
                Ok(message) => Ok(StreamableHttpPostResponse::Json(message, new_session)),
                Err(_) if awaits_no_response => Ok(StreamableHttpPostResponse::Accepted),
                Err(e) => Err(StreamableHttpError::Deserialize(e)),
            };
        }
        if awaits_no_response {
            // Some servers answer a notification with an empty 200.
            return Ok(StreamableHttpPostResponse::Accepted);
        }
        Err(StreamableHttpError::UnexpectedContentType(
            content_type.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        ))
    }

    async fn delete_session(
        &self,
        uri: Arc<str>,
        session_id: Arc<str>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<(), Error> {
        let request = with_headers(
            self.client.delete(uri.as_ref()),
            Some(&session_id),
            auth_header,
            custom_headers,
        );
        let response = request
            .send()
            .await
            .map_err(|e| StreamableHttpError::Client(e.without_url()))?;
        if response.status() == StatusCode::METHOD_NOT_ALLOWED {
            return Ok(());
        }
        response
            .error_for_status()
            .map_err(|e| StreamableHttpError::Client(e.without_url()))?;
        Ok(())
    }

    async fn get_stream(
        &self,
        uri: Arc<str>,
        session_id: Option<Arc<str>>,
        last_event_id: Option<String>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<BoxStream<'static, Result<Sse, SseError>>, Error> {
        let mut request = self
            .client
            .get(uri.as_ref())
            .header(ACCEPT, EVENT_STREAM_MIME_TYPE);
        if let Some(last_event_id) = last_event_id {
            request = request.header(HEADER_LAST_EVENT_ID, last_event_id);
        }
        let request = with_headers(request, session_id.as_deref(), auth_header, custom_headers);
        let response = request
            .send()
            .await
            .map_err(|e| StreamableHttpError::Client(e.without_url()))?;
        let status = response.status();
        if status == StatusCode::METHOD_NOT_ALLOWED {
            return Err(StreamableHttpError::ServerDoesNotSupportSse);
        }
        if !status.is_success() {
            let text = JudgedClient::error_text(response).await;
            return Err(StreamableHttpError::UnexpectedServerResponse(Cow::Owned(
                format!("HTTP {status}: {text}"),
            )));
        }
        let content_type = response.headers().get(CONTENT_TYPE);
        if !media_type_is(content_type, EVENT_STREAM_MIME_TYPE) {
            return Err(StreamableHttpError::UnexpectedContentType(
                content_type.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
            ));
        }
        Ok(self.events(response))
    }
}
