//! A tool's result as the text the model reads.

use rmcp::model::{CallToolResult, ContentBlock, ResourceContents};

/// What a call returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpOutput {
    /// The text parts joined by newlines; other parts summarised
    /// (`[image image/png, 1234 bytes]`); the structured content as JSON
    /// when there is no text part.
    pub content: String,
    /// The server's `isError`: the tool ran and reports a failure.
    pub is_error: bool,
}

/// Bytes that base64 text decodes to, without decoding it.
fn decoded_len(base64: &str) -> usize {
    let trimmed = base64.trim_end_matches('=');
    let symbols = trimmed.bytes().filter(|b| !b.is_ascii_whitespace()).count();
    symbols * 3 / 4
}

pub(crate) fn render(result: CallToolResult) -> McpOutput {
    let mut parts = Vec::new();
    let mut any_text = false;
    for block in &result.content {
        match block {
            ContentBlock::Text(text) => {
                any_text = true;
                parts.push(text.text.clone());
            }
            ContentBlock::Image(image) => parts.push(format!(
                "[image {}, {} bytes]",
                image.mime_type,
                decoded_len(&image.data)
            )),
            ContentBlock::Audio(audio) => parts.push(format!(
                "[audio {}, {} bytes]",
                audio.mime_type,
                decoded_len(&audio.data)
            )),
            ContentBlock::Resource(resource) => match &resource.resource {
                ResourceContents::TextResourceContents { uri, text, .. } => {
                    any_text = true;
                    parts.push(format!("[resource {uri}]\n{text}"));
                }
                ResourceContents::BlobResourceContents {
                    uri,
                    mime_type,
                    blob,
                    ..
                } => parts.push(format!(
                    "[resource {uri}, {}, {} bytes]",
                    mime_type.as_deref().unwrap_or("application/octet-stream"),
                    decoded_len(blob)
                )),
                _ => parts.push("[a resource of a kind this client does not show]".to_string()),
            },
            ContentBlock::ResourceLink(link) => {
                parts.push(format!("[resource link {} ({})]", link.uri, link.name))
            }
            // A kind of content newer than this client.
            _ => parts.push("[content of a kind this client does not show]".to_string()),
        }
    }
    if !any_text && let Some(structured) = &result.structured_content {
        parts.push(structured.to_string());
    }
    McpOutput {
        content: parts.join("\n"),
        is_error: result.is_error.unwrap_or(false),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn result(value: serde_json::Value) -> CallToolResult {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn text_is_joined_and_the_rest_summarised() {
        let output = render(result(json!({
            "content": [
                {"type": "text", "text": "first"},
                {"type": "image", "data": "aGVsbG8gd29ybGQ=", "mimeType": "image/png"},
                {"type": "text", "text": "second"}
            ],
            "structuredContent": {"ignored": true},
            "isError": true
        })));
        assert_eq!(output.content, "first\n[image image/png, 11 bytes]\nsecond");
        assert!(output.is_error);
    }

    #[test]
    fn structured_content_stands_in_for_missing_text() {
        let output = render(result(json!({
            "content": [],
            "structuredContent": {"result": 5}
        })));
        assert_eq!(output.content, r#"{"result":5}"#);
        assert!(!output.is_error);
    }
}
