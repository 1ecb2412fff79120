//! Token counts as providers report them, in a whole answer or in one streamed chunk. Counts
//! are provider-supplied: every sum saturates instead of overflowing.

use gateway_common::entry::Usage;
use serde::Deserialize;
use serde::de::IgnoredAny;

/// What a JSON answer or chunk says about tokens.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reported {
    /// `None` when there is no `usage` object (or it is `null`).
    pub usage: Option<Usage>,
    /// `"choices": []`: a chunk that carries nothing but the usage.
    pub no_choices: bool,
}

#[derive(Deserialize)]
struct Probe {
    choices: Option<Vec<IgnoredAny>>,
    usage: Option<RawUsage>,
}

/// OpenAI's chat names, or the Responses and Messages APIs' `input_tokens`/`output_tokens`;
/// Anthropic counts prompt-cache reads and writes apart from `input_tokens`.
#[derive(Deserialize)]
struct RawUsage {
    #[serde(default, alias = "input_tokens")]
    prompt_tokens: Option<u64>,
    #[serde(default, alias = "output_tokens")]
    completion_tokens: Option<u64>,
    #[serde(default)]
    total_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

/// Reads `usage` (and whether `choices` is empty) from a JSON object; `None` if `json` is not
/// one. Embeddings report no completion tokens; a missing total is the sum of the parts.
pub fn read(json: &[u8]) -> Option<Reported> {
    let probe: Probe = serde_json::from_slice(json).ok()?;
    let usage = probe.usage.map(|u| {
        let prompt = u
            .prompt_tokens
            .unwrap_or(0)
            .saturating_add(u.cache_creation_input_tokens.unwrap_or(0))
            .saturating_add(u.cache_read_input_tokens.unwrap_or(0));
        let completion = u.completion_tokens.unwrap_or(0);
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: u
                .total_tokens
                .filter(|t| *t > 0)
                .unwrap_or(prompt.saturating_add(completion)),
        }
    });
    Some(Reported {
        usage,
        no_choices: probe.choices.is_some_and(|c| c.is_empty()),
    })
}

/// The usage of a whole (non-streamed) answer.
pub fn of_answer(body: &[u8]) -> Option<Usage> {
    read(body)?.usage
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_and_messages_usage_read_as_prompt_and_completion_tokens() {
        let responses = of_answer(
            br#"{"object":"response","usage":{"input_tokens":3,"output_tokens":4,"total_tokens":7}}"#,
        )
        .unwrap();
        assert_eq!(
            (
                responses.prompt_tokens,
                responses.completion_tokens,
                responses.total_tokens
            ),
            (3, 4, 7)
        );
        let messages = of_answer(
            br#"{"type":"message","usage":{"input_tokens":3,"cache_read_input_tokens":10,"cache_creation_input_tokens":1,"output_tokens":4}}"#,
        )
        .unwrap();
        assert_eq!(
            (
                messages.prompt_tokens,
                messages.completion_tokens,
                messages.total_tokens
            ),
            (14, 4, 18)
        );
    }

    #[test]
    fn usage_is_read_from_chat_and_embedding_answers() {
        let chat = br#"{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        assert_eq!(of_answer(chat).unwrap().total_tokens, 7);
        let emb = br#"{"data":[],"usage":{"prompt_tokens":5,"total_tokens":5}}"#;
        assert_eq!(of_answer(emb).unwrap().completion_tokens, 0);
        assert!(of_answer(b"{}").is_none());
        assert!(of_answer(br#"{"usage":null}"#).is_none());
        assert!(of_answer(b"not json").is_none());
    }

    #[test]
    fn a_usage_chunk_is_told_from_a_content_chunk() {
        let chunk =
            read(br#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#).unwrap();
        assert!(chunk.no_choices);
        assert_eq!(chunk.usage.unwrap().total_tokens, 3);
        let content = read(br#"{"choices":[{"delta":{}}],"usage":null}"#).unwrap();
        assert_eq!(content, Reported::default());
    }

    #[test]
    fn hostile_counts_saturate() {
        let huge = format!(
            r#"{{"usage":{{"prompt_tokens":{},"completion_tokens":{}}}}}"#,
            u64::MAX,
            u64::MAX
        );
        assert_eq!(of_answer(huge.as_bytes()).unwrap().total_tokens, u64::MAX);
    }
}
