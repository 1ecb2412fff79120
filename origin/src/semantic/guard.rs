//! The lexical guard: what a sentence embedding cannot see, required to be identical. A
//! question's numbers and units (in order), the parity of its negations (negating words, and
//! the negative pole of common opposites: "unsafe", "bad", "cons"), the parity of its
//! reversals (the second pole of common action and direction opposites: "remove", "uninstall",
//! "download") and its named terms (capitalised words after a sentence's first, in order) form
//! a fingerprint that joins the scope, so
//! "Is Mars bigger than Earth?" never meets "Is Earth bigger than Mars?", nor "100 g" "200 g",
//! nor "is it safe" "is it not safe", nor "add a user" "remove a user". It stores nothing: the
//! fingerprint only feeds the keyed scope hash. Swaps of lowercase words are `order.rs`'s.
//! docs/semantic-eval.md measures both with the model, category by category.

/// Words that negate what follows, or are the negative pole of a common pair of opposites
/// (lowercase); a token ending in "n't" negates too. A general list, not the evaluation set's.
const NEGATIONS: &[&str] = &[
    "not",
    "no",
    "never",
    "none",
    "nobody",
    "nothing",
    "neither",
    "nor",
    "cannot",
    "without",
    "dont",
    "doesnt",
    "isnt",
    "cant",
    "wont",
    "shouldnt",
    "arent",
    "avoid",
    "lack",
    "fail",
    "unsafe",
    "unhealthy",
    "illegal",
    "impossible",
    "incorrect",
    "invalid",
    "unlikely",
    "unnecessary",
    "insecure",
    "unstable",
    "unable",
    "unsupported",
    "dislike",
    "disable",
    "disallow",
    "disadvantage",
    "disadvantages",
    "disagree",
    "unfair",
    "unhappy",
    "inaccurate",
    "bad",
    "worse",
    "worst",
    "dangerous",
    "harmful",
    "rude",
    "false",
    "cons",
    "lower",
    "decrease",
    "expensive",
    "unpopular",
    "uncommon",
    "dishonest",
    "disprove",
    "against",
];

/// The second pole of common pairs of opposite actions or directions (lowercase base forms;
/// `inflects` finds their regular inflections; irregular past forms are listed): add/remove,
/// install/uninstall, upload/download, … Kept apart from the negations so that "don't remove"
/// is not taken for "add". Only one pole is listed: a paraphrase that swaps "delete" for "remove" keeps its parity, while "add" against
/// "remove" flips it. A general list, not the evaluation set's; words with a common unrelated
/// sense ("close" as near, "fall" as autumn, "fire") are left out.
const REVERSALS: &[&str] = &[
    "remove",
    "delete",
    "uninstall",
    "unload",
    "export",
    "download",
    "decrypt",
    "decode",
    "decompress",
    "unzip",
    "unpack",
    "unwrap",
    "deserialize",
    "sell",
    "sold",
    "pull",
    "unlock",
    "unmount",
    "unsubscribe",
    "disconnect",
    "unfollow",
    "unblock",
    "unfreeze",
    "unpin",
    "unstage",
    "detach",
    "stop",
    "hide",
    "collapse",
    "minimize",
    "shrink",
    "lose",
    "lost",
    "lend",
    "withdraw",
    "withdrew",
    "withdrawn",
    "receive",
    "exit",
    "quit",
    "logout",
    "exclude",
    "reject",
    "revoke",
    "downgrade",
    "deflate",
    "subtract",
    "divide",
    "exhale",
    "descend",
    "dequeue",
];

/// Units of measure and currencies (singular, lowercase): swapped units change the answer
/// even with the same numbers, and the model barely sees the difference.
const UNITS: &[&str] = &[
    "mile",
    "kilometer",
    "kilometre",
    "km",
    "meter",
    "metre",
    "cm",
    "mm",
    "inch",
    "foot",
    "feet",
    "yard",
    "gram",
    "kilogram",
    "kg",
    "g",
    "ounce",
    "oz",
    "pound",
    "lb",
    "ton",
    "cup",
    "tablespoon",
    "teaspoon",
    "liter",
    "litre",
    "ml",
    "gallon",
    "pint",
    "quart",
    "celsius",
    "fahrenheit",
    "kelvin",
    "degree",
    "second",
    "minute",
    "hour",
    "day",
    "week",
    "month",
    "year",
    "byte",
    "kilobyte",
    "megabyte",
    "gigabyte",
    "terabyte",
    "bit",
    "mph",
    "kmh",
    "dollar",
    "euro",
    "yen",
    "pound",
    "cent",
    "percent",
    "calorie",
    "watt",
    "volt",
    "psi",
];

/// Whether `lower` is one of `list`'s base forms or a regular inflection of one: "removes",
/// "removed", "removing", "stopped", "stopping", "downloads".
fn inflects(lower: &str, list: &[&str]) -> bool {
    if list.contains(&lower) {
        return true;
    }
    let stems = [
        lower.strip_suffix('s'),
        lower.strip_suffix("es"),
        lower.strip_suffix('d'),
        lower.strip_suffix("ed"),
        lower.strip_suffix("ing"),
    ];
    stems.into_iter().flatten().any(|stem| {
        list.contains(&stem)
            || list.contains(&format!("{stem}e").as_str())
            // A doubled final consonant: "stopped", "popping".
            || stem
                .char_indices()
                .last()
                .is_some_and(|(i, c)| stem[..i].ends_with(c) && list.contains(&&stem[..i]))
    })
}

/// The fingerprint of `text`: `numbers|negation parity|reversal parity|named terms`. Two
/// questions may match by meaning only when their fingerprints are equal.
pub fn fingerprint(text: &str) -> String {
    let mut numbers = Vec::new();
    let mut named = Vec::new();
    let mut negations = 0usize;
    let mut reversals = 0usize;
    let mut sentence_start = true;
    for raw in text.split_whitespace() {
        let ends_sentence = raw.ends_with(['.', '?', '!', ':']);
        let word = raw.trim_matches(|c: char| !c.is_alphanumeric() && c != '\'');
        let word = word
            .strip_suffix("'s")
            .or_else(|| word.strip_suffix("’s"))
            .unwrap_or(word)
            .trim_matches('\'');
        if !word.is_empty() {
            let lower = word.to_lowercase();
            let singular = lower.strip_suffix('s').unwrap_or(&lower);
            if word.chars().any(|c| c.is_ascii_digit()) {
                numbers.push(lower.replace(',', ""));
            } else if UNITS.contains(&lower.as_str()) || UNITS.contains(&singular) {
                numbers.push(singular.to_string());
            } else if lower.ends_with("n't") || NEGATIONS.contains(&lower.as_str()) {
                negations += 1;
            } else if inflects(&lower, REVERSALS) {
                reversals += 1;
            } else if !sentence_start
                && word != "I"
                && !word.starts_with("I'")
                && word.chars().next().is_some_and(char::is_uppercase)
            {
                named.push(lower);
            }
            sentence_start = false;
        }
        if ends_sentence {
            sentence_start = true;
        }
    }
    format!(
        "{}|{}|{}|{}",
        numbers.join(","),
        negations % 2,
        reversals % 2,
        named.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paraphrases_keep_their_fingerprint() {
        let same = [
            (
                "What is the capital of Australia?",
                "Which city is Australia's capital?",
            ),
            (
                "How do I reverse a list in Python?",
                "What's the way to reverse a Python list?",
            ),
            (
                "What does HTTP status 404 mean?",
                "What is the meaning of an HTTP 404 status code?",
            ),
        ];
        for (a, b) in same {
            assert_eq!(fingerprint(a), fingerprint(b), "{a} / {b}");
        }
    }

    #[test]
    fn negation_numbers_and_swapped_names_change_the_fingerprint() {
        let different = [
            (
                "Is it safe to eat raw chicken?",
                "Is it not safe to eat raw chicken?",
            ),
            ("Why does my code compile?", "Why doesn't my code compile?"),
            (
                "How many calories are in 100 grams of rice?",
                "How many calories are in 200 grams of rice?",
            ),
            ("Is Mars bigger than Earth?", "Is Earth bigger than Mars?"),
            (
                "Convert 5 miles to kilometers.",
                "Convert 5 kilometers to miles.",
            ),
            (
                "Is coffee good for your health?",
                "Is coffee bad for your health?",
            ),
            (
                "What is the capital of Austria?",
                "What is the capital of Australia?",
            ),
        ];
        for (a, b) in different {
            assert_ne!(fingerprint(a), fingerprint(b), "{a} / {b}");
        }
    }

    #[test]
    fn an_action_against_its_opposite_changes_the_fingerprint() {
        let different = [
            (
                "How do I add a user to the sudo group?",
                "How do I remove a user from the sudo group?",
            ),
            ("How do I install it?", "How do I uninstall it?"),
            (
                "Upload a file to the server.",
                "Downloading a file from the server.",
            ),
            ("When should I buy shares?", "When should I sell shares?"),
            ("Start the container.", "Stopped the container."),
        ];
        for (a, b) in different {
            assert_ne!(fingerprint(a), fingerprint(b), "{a} / {b}");
        }
    }

    #[test]
    fn a_reversal_is_not_a_negation_and_a_synonym_keeps_the_parity() {
        assert_ne!(
            fingerprint("Don't remove the file."),
            fingerprint("Add the file.")
        );
        assert_eq!(
            fingerprint("How do I remove a branch?"),
            fingerprint("How can I delete a branch?")
        );
    }

    #[test]
    fn the_pronoun_i_and_a_sentence_start_are_not_names() {
        assert_eq!(fingerprint("How do I go? Then I wait."), "|0|0|");
    }
}
