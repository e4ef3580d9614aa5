//! Shell-style globs over guest ids, as the original's `fnmatch` on the `to` header.
//!
//! A multicast command names its targets with a pattern: `*` matches any run of
//! characters (including none), `?` exactly one character, `[...]` one character
//! of a set (`a-z` ranges allowed; a `]` first in the set and a `-` first or last
//! are literal), `[!...]` one character outside the set. Everything else, including
//! `\`, is literal: like `fnmatch.fnmatchcase` there is no escape character, so a
//! special character is quoted by putting it in a set (`[*]`), which is what
//! [`escape`] does. An unclosed `[` is a literal `[`. Matching is case-sensitive,
//! works on Unicode scalar values, and is done by the classic two-pointer star
//! algorithm: at most O(pattern × text) steps, never exponential backtracking, no
//! recursion, no panics. There are no character classes (`[[:alpha:]]`), no `**`
//! and no path-separator rules; ids contain no `/` anyway.

/// One element of a parsed pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Literal(char),
    AnyChar,
    Star,
    Set {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Token {
    /// Whether this single-character token matches `c` (a star is handled by the matcher).
    fn matches(&self, c: char) -> bool {
        match self {
            Token::Literal(l) => *l == c,
            Token::AnyChar => true,
            Token::Star => false,
            Token::Set { negated, ranges } => {
                ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated
            }
        }
    }
}

/// Splits a pattern into tokens, merging runs of stars (they match the same texts).
fn parse(pattern: &str) -> Vec<Token> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut tokens = Vec::with_capacity(chars.len());
    let mut i = 0;
    while let Some(&c) = chars.get(i) {
        i += 1;
        match c {
            '*' => {
                if tokens.last() != Some(&Token::Star) {
                    tokens.push(Token::Star);
                }
            }
            '?' => tokens.push(Token::AnyChar),
            '[' => match parse_set(&chars, i) {
                Some((set, next)) => {
                    tokens.push(set);
                    i = next;
                }
                None => tokens.push(Token::Literal('[')),
            },
            _ => tokens.push(Token::Literal(c)),
        }
    }
    tokens
}

/// Parses a set whose `[` is just before `start`: the token and the index after its
/// `]`, or `None` when the set is not closed (the `[` is then literal).
fn parse_set(chars: &[char], start: usize) -> Option<(Token, usize)> {
    let mut j = start;
    let negated = chars.get(j) == Some(&'!');
    if negated {
        j += 1;
    }
    let items_start = j;
    // A `]` right after `[` or `[!` belongs to the set.
    if chars.get(j) == Some(&']') {
        j += 1;
    }
    while chars.get(j).is_some_and(|&c| c != ']') {
        j += 1;
    }
    // `j` is at the closing `]`, or past the end when there is none.
    let items = chars.get(items_start..j).filter(|_| j < chars.len())?;
    let mut ranges = Vec::with_capacity(items.len());
    let mut k = 0;
    while let Some(&lo) = items.get(k) {
        match (items.get(k + 1), items.get(k + 2)) {
            (Some('-'), Some(&hi)) => {
                // A reversed range (`z-a`) is kept and matches nothing, as in fnmatch.
                ranges.push((lo, hi));
                k += 3;
            }
            _ => {
                ranges.push((lo, lo));
                k += 1;
            }
        }
    }
    Some((Token::Set { negated, ranges }, j + 1))
}

/// Whether `text` matches the shell-style `pattern` (see the module documentation).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let tokens = parse(pattern);
    let text: Vec<char> = text.chars().collect();
    // `p` and `t` walk the pattern and the text; after a star, `backtrack` remembers
    // the token after it and the text position it currently swallows up to, so that a
    // mismatch lets that star swallow one more character instead of failing.
    let (mut p, mut t) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while let Some(&c) = text.get(t) {
        match tokens.get(p) {
            Some(Token::Star) => {
                backtrack = Some((p + 1, t));
                p += 1;
                continue;
            }
            Some(token) if token.matches(c) => {
                p += 1;
                t += 1;
                continue;
            }
            _ => {}
        }
        match backtrack {
            Some((after_star, swallowed)) => {
                p = after_star;
                t = swallowed + 1;
                backtrack = Some((after_star, swallowed + 1));
            }
            None => return false,
        }
    }
    tokens
        .get(p..)
        .is_some_and(|rest| rest.iter().all(|token| *token == Token::Star))
}

/// Whether `pattern` has no wildcard, so that it matches exactly the text equal to it.
pub fn is_literal(pattern: &str) -> bool {
    parse(pattern)
        .iter()
        .all(|token| matches!(token, Token::Literal(_)))
}

/// A pattern matching exactly `text`: `*`, `?` and `[` are quoted as `[*]`, `[?]`, `[[]`.
pub fn escape(text: &str) -> String {
    let mut pattern = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '*' | '?' | '[' => {
                pattern.push('[');
                pattern.push(c);
                pattern.push(']');
            }
            _ => pattern.push(c),
        }
    }
    pattern
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn stars_and_question_marks() {
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "52:54:00:AB:CD:EF"));
        assert!(glob_match("52:54:00:*", "52:54:00:AB:CD:EF"));
        assert!(!glob_match("52:54:00:*", "52:54:01:AB:CD:EF"));
        assert!(glob_match("*:EF", "52:54:00:AB:CD:EF"));
        assert!(glob_match("vm-?", "vm-1"));
        assert!(!glob_match("vm-?", "vm-10"));
        assert!(!glob_match("vm-?", "vm-"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(glob_match("a*b*c", "abc"));
        assert!(!glob_match("a*b*c", "acb"));
        assert!(glob_match("**a**", "bab"));
        assert!(glob_match("", ""));
        assert!(!glob_match("", "a"));
        assert!(glob_match("é?", "éü"));
    }

    #[test]
    fn matching_is_case_sensitive() {
        assert!(!glob_match("52:54:00:ab:*", "52:54:00:AB:CD:EF"));
    }

    #[test]
    fn sets_ranges_and_negation() {
        assert!(glob_match("vm-[0-9]", "vm-7"));
        assert!(!glob_match("vm-[0-9]", "vm-x"));
        assert!(glob_match("vm-[!0-9]", "vm-x"));
        assert!(!glob_match("vm-[!0-9]", "vm-7"));
        assert!(glob_match("[abc]", "b"));
        assert!(glob_match("[]]", "]"));
        assert!(glob_match("[!]]", "a"));
        assert!(!glob_match("[!]]", "]"));
        assert!(glob_match("[a-]", "-"));
        assert!(glob_match("[-a]", "-"));
        assert!(!glob_match("[z-a]", "m"));
        // `^` does not negate in fnmatch, only `!` does.
        assert!(glob_match("[^a]", "^"));
        assert!(!glob_match("[^a]", "b"));
    }

    #[test]
    fn unclosed_sets_and_backslashes_are_literal() {
        assert!(glob_match("[abc", "[abc"));
        assert!(!glob_match("[abc", "a"));
        assert!(glob_match("[!", "[!"));
        assert!(glob_match("a\\*", "a\\xyz"));
        assert!(is_literal("[abc"));
        assert!(is_literal("a\\b"));
    }

    #[test]
    fn literal_patterns_are_recognised() {
        assert!(is_literal("52:54:00:AB:CD:EF"));
        assert!(is_literal(""));
        assert!(!is_literal("vm-*"));
        assert!(!is_literal("vm-?"));
        assert!(!is_literal("vm-[12]"));
        assert!(is_literal(&escape("plain")));
        assert!(!is_literal(&escape("a*")));
    }

    #[test]
    fn escape_quotes_wildcards() {
        assert_eq!(escape("a*b?c[d]"), "a[*]b[?]c[[]d]");
        assert!(glob_match(&escape("a*b?c[d]"), "a*b?c[d]"));
        assert!(!glob_match(&escape("a*"), "ab"));
    }

    #[test]
    fn pathological_patterns_finish_quickly() {
        // Exponential backtracking would never finish this; the star algorithm does.
        let text = "a".repeat(2_000);
        let pattern = format!("{}b", "a*".repeat(100));
        assert!(!glob_match(&pattern, &text));
    }

    /// Characters that exercise the special cases more often than uniform chars would.
    fn glob_char() -> impl Strategy<Value = char> {
        prop_oneof![
            3 => prop::sample::select(vec!['*', '?', '[', ']', '!', '-', '\\', 'a', 'b', ':']),
            1 => any::<char>(),
        ]
    }

    fn glob_string() -> impl Strategy<Value = String> {
        prop::collection::vec(glob_char(), 0..24).prop_map(String::from_iter)
    }

    proptest! {
        #[test]
        fn a_literal_pattern_matches_only_itself(pattern in glob_string(), text in glob_string()) {
            if is_literal(&pattern) {
                prop_assert!(glob_match(&pattern, &pattern));
                prop_assert_eq!(glob_match(&pattern, &text), pattern == text);
            }
        }

        #[test]
        fn a_star_matches_everything(text in any::<String>()) {
            prop_assert!(glob_match("*", &text));
        }

        #[test]
        fn random_patterns_and_texts_never_panic(pattern in glob_string(), text in glob_string()) {
            let _ = glob_match(&pattern, &text);
            let _ = is_literal(&pattern);
        }

        #[test]
        fn escaped_text_matches_itself_and_is_literal_only_without_wildcards(
            text in glob_string(),
            other in glob_string(),
        ) {
            let pattern = escape(&text);
            prop_assert!(glob_match(&pattern, &text));
            prop_assert_eq!(glob_match(&pattern, &other), text == other);
        }

        #[test]
        fn prefix_star_matches_every_extension(prefix in glob_string(), rest in glob_string()) {
            let pattern = format!("{}*", escape(&prefix));
            let text = format!("{prefix}{rest}");
            prop_assert!(glob_match(&pattern, &text));
        }
    }
}
