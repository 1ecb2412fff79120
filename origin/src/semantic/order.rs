//! Word order: what the embedding and the guard's fingerprint cannot see when two questions
//! hold the same lowercase words in another direction ("convert a string to an integer" /
//! "an integer to a string", "copy from src to dst" / "from dst to src"). A question's content
//! words, and the direction words among them, become keyed 4-byte hashes in order, stored with
//! its vector (never its text); a candidate is refused when two content words both questions
//! hold stand in opposite order with a direction word between them in both.

use gateway_common::key::KeySecret;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The most tokens kept per question (a question is at most `scope::MAX_CHARS` characters;
/// this bounds what one vector stores, 4 bytes a token).
pub const MAX_TOKENS: usize = 255;

/// A direction word's token. Content words never hash to it (`word_hash` maps 0 to 1): which
/// direction word it was does not matter, only where one stands.
const DIRECTION: u32 = 0;

/// Words that set the roles of the words around them: "from A to B", "A into B", "A than
/// B", "A over B", "A before B". A swap of two words across one of them changes the question.
const DIRECTIONS: &[&str] = &[
    "to", "from", "into", "onto", "than", "toward", "towards", "vs", "versus", "over", "before",
    "after",
];

/// Words that carry no content: articles, pronouns, auxiliaries, question words and the
/// prepositions that are not direction words. A general English list.
const STOPWORDS: &[&str] = &[
    "a", "an", "the", "and", "or", "but", "if", "then", "so", "of", "in", "on", "at", "by", "for",
    "with", "about", "as", "is", "are", "was", "were", "be", "been", "being", "am", "do", "does",
    "did", "doing", "have", "has", "had", "having", "can", "could", "should", "would", "will",
    "shall", "may", "might", "must", "i", "me", "my", "mine", "you", "your", "yours", "we", "us",
    "our", "he", "him", "his", "she", "her", "it", "its", "they", "them", "their", "this", "that",
    "these", "those", "there", "here", "what", "which", "who", "whom", "whose", "when", "where",
    "why", "how", "whats", "hows", "whos", "s", "t", "ll", "re", "ve", "d", "m", "some", "any",
    "one", "please", "tell", "explain", "way", "best", "just", "also", "very", "really", "ways",
    "get", "use", "using", "make",
];

/// A question's tokens in order: keyed hashes of its content words and `DIRECTION` marks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Words(Vec<u32>);

/// The keyed hasher of one tenant: HMAC-SHA-256(secret, "semw1" 0x00 tenant 0x00 word), first
/// 4 bytes. Keyed like the scope, so a listing of Redis cannot be checked against a guessed
/// word without the cache key secret, and per tenant, so two tenants' lists do not compare.
#[derive(Clone)]
pub struct WordKey(Hmac<Sha256>);

impl std::fmt::Debug for WordKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WordKey(..)")
    }
}

impl WordKey {
    pub fn new(secret: &KeySecret, tenant: &str) -> WordKey {
        let mut mac = secret.mac();
        mac.update(b"semw1\0");
        mac.update(tenant.as_bytes());
        mac.update(&[0]);
        WordKey(mac)
    }

    fn word_hash(&self, word: &str) -> u32 {
        let mut mac = self.0.clone();
        mac.update(word.as_bytes());
        let out = mac.finalize().into_bytes();
        match u32::from_le_bytes([out[0], out[1], out[2], out[3]]) {
            DIRECTION => 1,
            h => h,
        }
    }

    /// The tokens of `text`: lowercased words (split at anything not a letter or digit, an
    /// apostrophe dropped so "what's" is "whats"), stopwords dropped, a plural "s" dropped, at
    /// most [`MAX_TOKENS`]; consecutive direction words are one mark.
    pub fn words(&self, text: &str) -> Words {
        let mut tokens = Vec::new();
        let lower = text.to_lowercase().replace(['\'', '’'], "");
        for word in lower.split(|c: char| !c.is_alphanumeric()) {
            if tokens.len() == MAX_TOKENS {
                break;
            }
            if word.is_empty() || STOPWORDS.contains(&word) {
                continue;
            }
            if DIRECTIONS.contains(&word) {
                if tokens.last() != Some(&DIRECTION) {
                    tokens.push(DIRECTION);
                }
                continue;
            }
            tokens.push(self.word_hash(singular(word)));
        }
        Words(tokens)
    }
}

/// `word` without a plural "s" ("lists", "files"), leaving "class", "status", "analysis".
fn singular(word: &str) -> &str {
    match word.strip_suffix('s') {
        Some(stem) if stem.len() >= 3 && !stem.ends_with(['s', 'u', 'i']) => stem,
        _ => word,
    }
}

impl Words {
    /// Whether `self` and `other` hold two shared content words in opposite order, with a
    /// direction word between them in each: then they ask in opposite directions. Each word
    /// counts at its first position. Reorderings without a direction word between ("a list
    /// in Python" / "a Python list") pass; so does an empty list on either side.
    pub fn inverted(&self, other: &Words) -> bool {
        let ours = positions(&self.0);
        let theirs = positions(&other.0);
        // (position here, position there) of each content word both hold, in our order.
        let shared: Vec<(usize, usize)> = ours
            .iter()
            .filter_map(|&(token, here)| {
                theirs
                    .iter()
                    .find(|(t, _)| *t == token)
                    .map(|&(_, there)| (here, there))
            })
            .collect();
        let marks_here = marks_before(&self.0);
        let marks_there = marks_before(&other.0);
        let between = |marks: &[usize], a: usize, b: usize| {
            let (lo, hi) = if a < b { (a, b) } else { (b, a) };
            marks[hi] > marks[lo]
        };
        shared.iter().enumerate().any(|(i, &(here_a, there_a))| {
            shared[i + 1..].iter().any(|&(here_b, there_b)| {
                there_b < there_a
                    && between(&marks_here, here_a, here_b)
                    && between(&marks_there, there_a, there_b)
            })
        })
    }

    /// The stored form: a count byte, then the tokens (little-endian).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let n = self.0.len().min(MAX_TOKENS);
        out.push(n as u8);
        for token in &self.0[..n] {
            out.extend_from_slice(&token.to_le_bytes());
        }
    }

    /// The tokens at the head of `bytes` and what follows them; `None` when it is too short.
    pub fn decode(bytes: &[u8]) -> Option<(Words, &[u8])> {
        let (&n, rest) = bytes.split_first()?;
        let len = 4 * usize::from(n);
        if rest.len() < len {
            return None;
        }
        let (tokens, rest) = rest.split_at(len);
        let tokens = tokens
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Some((Words(tokens), rest))
    }

    /// The number of bytes `encode` writes.
    pub fn encoded_len(&self) -> usize {
        1 + 4 * self.0.len().min(MAX_TOKENS)
    }
}

/// Each distinct content word at its first position.
fn positions(tokens: &[u32]) -> Vec<(u32, usize)> {
    let mut seen: Vec<(u32, usize)> = Vec::new();
    for (i, &token) in tokens.iter().enumerate() {
        if token != DIRECTION && !seen.iter().any(|(t, _)| *t == token) {
            seen.push((token, i));
        }
    }
    seen
}

/// For each position, how many direction marks stand before it.
fn marks_before(tokens: &[u32]) -> Vec<usize> {
    let mut count = 0;
    tokens
        .iter()
        .map(|&token| {
            let before = count;
            count += usize::from(token == DIRECTION);
            before
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inverted(a: &str, b: &str) -> bool {
        let key = WordKey::new(&KeySecret::new(b"secret"), "acme");
        key.words(a).inverted(&key.words(b))
    }

    #[test]
    fn a_swap_of_two_lowercase_terms_is_not_a_match() {
        for (a, b) in [
            (
                "How do I convert a string to an integer in Java?",
                "How do I convert an integer to a string in Java?",
            ),
            (
                "Write a function to copy a file from src to dst in Go.",
                "Write a function to copy a file from dst to src in Go.",
            ),
            (
                "How do I send money from PayPal to my bank?",
                "How do I send money from my bank to PayPal?",
            ),
            ("Is a cat bigger than a dog?", "Is a dog bigger than a cat?"),
            (
                "Convert miles into kilometers.",
                "Convert kilometers into miles.",
            ),
        ] {
            assert!(inverted(a, b), "{a} / {b}");
            assert!(inverted(b, a), "{b} / {a}");
        }
    }

    #[test]
    fn a_paraphrase_that_reorders_without_a_direction_word_between_still_matches() {
        for (a, b) in [
            (
                "How do I reverse a list in Python?",
                "What's the way to reverse a Python list?",
            ),
            (
                "What is the capital of Australia?",
                "Which city is Australia's capital?",
            ),
            (
                "Is it safe to eat raw chicken?",
                "Is eating raw chicken safe?",
            ),
            (
                "How do I convert a string to an integer in Java?",
                "In Java, how can I turn a string into an integer?",
            ),
        ] {
            assert!(!inverted(a, b), "{a} / {b}");
        }
    }

    #[test]
    fn the_same_words_under_another_tenant_or_secret_do_not_compare() {
        let text = "convert a string to an integer";
        let acme = WordKey::new(&KeySecret::new(b"secret"), "acme").words(text);
        assert_ne!(
            acme,
            WordKey::new(&KeySecret::new(b"secret"), "globex").words(text)
        );
        assert_ne!(
            acme,
            WordKey::new(&KeySecret::new(b"other"), "acme").words(text)
        );
        assert_eq!(
            acme,
            WordKey::new(&KeySecret::new(b"secret"), "acme").words(text)
        );
    }

    #[test]
    fn stored_words_round_trip_and_a_short_buffer_is_refused() {
        let words = WordKey::new(&KeySecret::new(b"k"), "t").words("copy a file from src to dst");
        let mut bytes = Vec::new();
        words.encode(&mut bytes);
        bytes.extend_from_slice(b"rest");
        assert_eq!(bytes.len(), words.encoded_len() + 4);
        let (back, rest) = Words::decode(&bytes).unwrap();
        assert_eq!((back, rest), (words, b"rest".as_slice()));
        assert_eq!(Words::decode(&[3, 0, 0]), None);
        assert_eq!(Words::decode(&[]), None);
    }

    #[test]
    fn no_words_on_either_side_is_never_an_inversion() {
        let key = WordKey::new(&KeySecret::new(b"k"), "t");
        let some = key.words("convert a string to an integer");
        assert!(!some.inverted(&Words::default()));
        assert!(!Words::default().inverted(&some));
    }
}
