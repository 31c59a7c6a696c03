//! VADER sentiment analysis (Hutto & Gilbert, 2014), implemented in Rust for the local provider.
//!
//! VADER scores a text with a lexicon of about 7,500 words and emoticons, each rated from -4
//! (most negative) to +4 (most positive) by human raters, and a handful of rules. The lexicon
//! files are the reference implementation's own (`models/vader/`, MIT licence); this module
//! implements the rules from their description and is tested against the scores the Python
//! reference (`vaderSentiment` 3.3.2) gives for a fixed list of sentences
//! (`models/vader/reference.json`).
//!
//! The text is split on whitespace; punctuation is stripped from both ends of a token unless
//! that leaves two characters or fewer (so emoticons such as `:)` survive), and emoji are first
//! replaced by their description (`😁` becomes "beaming face with smiling eyes"). Each token
//! gets a valence, zero unless it is in the lexicon, adjusted by these rules:
//!
//! - **Boosters and dampeners** (`very`, `extremely`, `kind of`, `slightly`, …) in the three
//!   tokens before a sentiment word add or take ±0.293, scaled by 0.95 and 0.9 at distances two
//!   and three. The boosters themselves score zero.
//! - **Capitals**: a sentiment word (or booster) in capitals while the text is not all in
//!   capitals gains ±0.733.
//! - **Negation**: a negation (`not`, `never`, `without`, anything with `n't`, …) in the three
//!   tokens before flips and damps the valence (× -0.74), with the reference's exceptions
//!   ("never so/this" intensifies × 1.25, "without doubt" does not negate); `no` before a
//!   sentiment word negates it; `least` negates unless it follows `at` or `very`.
//! - **Idioms**: a few fixed phrases ("the bomb", "kiss of death", "to die for", …) replace
//!   the valence.
//! - **"but"**: words before the first `but` count half, words after it one and a half times.
//! - **Punctuation**: up to four `!` add 0.292 each, and two or more `?` add 0.18 each (0.96
//!   from four on), in the direction of the sum.
//!
//! The sum is normalised to `compound` = s / √(s² + 15), in [-1, 1]; `pos`, `neg` and `neu` are
//! the shares of positive, negative and neutral tokens (each sentiment token weighted by its
//! valence plus one). The label is `positive` when compound ≥ 0.05, `negative` when ≤ -0.05,
//! else `neutral`: the thresholds the VADER authors recommend.
//!
//! Two behaviours of the reference that look accidental are kept so scores match it: the
//! "but" rule finds each token's valence by *value* (so two tokens with the same valence can
//! both be scaled at one position), and the capital check, like Python's `str.isupper`, looks
//! only at cased letters. Not implemented: the reference's "sentiment-laden idioms" list, which
//! the reference itself never applies.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// The hasher of the lexicon tables: foldhash, several times faster than std's SipHash on
/// short words, with a per-process random seed. The keys are the lexicon's own (nobody else
/// inserts any), so SipHash's resistance to chosen-key flooding buys nothing here.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
/// A set with the same hasher.
type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

/// The lexicon file's name in a VADER model directory.
pub const LEXICON_FILE: &str = "vader_lexicon.txt";
/// The emoji descriptions file's name in a VADER model directory.
pub const EMOJI_FILE: &str = "emoji_utf8_lexicon.txt";

/// Booster increment, from the VADER paper's rater study.
const BOOST: f64 = 0.293;
/// Capitals increment.
const CAPS_BOOST: f64 = 0.733;
/// A negated word's valence is multiplied by this.
const NEGATION: f64 = -0.74;
/// The normalisation constant: compound = s / √(s² + ALPHA).
const ALPHA: f64 = 15.0;
/// Compound threshold for the positive and negative labels.
pub const LABEL_THRESHOLD: f64 = 0.05;

/// Words that negate what follows.
const NEGATIONS: &[&str] = &[
    "aint",
    "arent",
    "cannot",
    "cant",
    "couldnt",
    "darent",
    "didnt",
    "doesnt",
    "ain't",
    "aren't",
    "can't",
    "couldn't",
    "daren't",
    "didn't",
    "doesn't",
    "dont",
    "hadnt",
    "hasnt",
    "havent",
    "isnt",
    "mightnt",
    "mustnt",
    "neither",
    "don't",
    "hadn't",
    "hasn't",
    "haven't",
    "isn't",
    "mightn't",
    "mustn't",
    "neednt",
    "needn't",
    "never",
    "none",
    "nope",
    "nor",
    "not",
    "nothing",
    "nowhere",
    "oughtnt",
    "shant",
    "shouldnt",
    "uhuh",
    "wasnt",
    "werent",
    "oughtn't",
    "shan't",
    "shouldn't",
    "uh-uh",
    "wasn't",
    "weren't",
    "without",
    "wont",
    "wouldnt",
    "won't",
    "wouldn't",
    "rarely",
    "seldom",
    "despite",
];

/// Words that strengthen the sentiment word they precede.
const BOOSTERS_UP: &[&str] = &[
    "absolutely",
    "amazingly",
    "awfully",
    "completely",
    "considerable",
    "considerably",
    "decidedly",
    "deeply",
    "effing",
    "enormous",
    "enormously",
    "entirely",
    "especially",
    "exceptional",
    "exceptionally",
    "extreme",
    "extremely",
    "fabulously",
    "flipping",
    "flippin",
    "frackin",
    "fracking",
    "fricking",
    "frickin",
    "frigging",
    "friggin",
    "fully",
    "fuckin",
    "fucking",
    "fuggin",
    "fugging",
    "greatly",
    "hella",
    "highly",
    "hugely",
    "incredible",
    "incredibly",
    "intensely",
    "major",
    "majorly",
    "more",
    "most",
    "particularly",
    "purely",
    "quite",
    "really",
    "remarkably",
    "so",
    "substantially",
    "thoroughly",
    "total",
    "totally",
    "tremendous",
    "tremendously",
    "uber",
    "unbelievably",
    "unusually",
    "utter",
    "utterly",
    "very",
];

/// Words (and two-word phrases) that weaken the sentiment word they precede.
const BOOSTERS_DOWN: &[&str] = &[
    "almost",
    "barely",
    "hardly",
    "just enough",
    "kind of",
    "kinda",
    "kindof",
    "kind-of",
    "less",
    "little",
    "marginal",
    "marginally",
    "occasional",
    "occasionally",
    "partly",
    "scarce",
    "scarcely",
    "slight",
    "slightly",
    "somewhat",
    "sort of",
    "sorta",
    "sortof",
    "sort-of",
];

/// Phrases whose valence replaces that of the sentiment word in them.
const IDIOMS: &[(&str, f64)] = &[
    ("the shit", 3.0),
    ("the bomb", 3.0),
    ("bad ass", 1.5),
    ("badass", 1.5),
    ("bus stop", 0.0),
    ("yeah right", -2.0),
    ("kiss of death", -1.5),
    ("to die for", 3.0),
    ("beating heart", 3.5),
];

/// Scores of one text.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VaderScores {
    /// Share of negative tokens, 0 to 1.
    pub neg: f64,
    /// Share of neutral tokens, 0 to 1.
    pub neu: f64,
    /// Share of positive tokens, 0 to 1.
    pub pos: f64,
    /// Normalised sum of the valences, -1 to 1.
    pub compound: f64,
}

impl VaderScores {
    /// `positive`, `negative` or `neutral`, by the ±0.05 compound thresholds.
    pub fn label(&self) -> &'static str {
        if self.compound >= LABEL_THRESHOLD {
            "positive"
        } else if self.compound <= -LABEL_THRESHOLD {
            "negative"
        } else {
            "neutral"
        }
    }

    /// The scores rounded as the reference implementation returns them: three decimals, four
    /// for `compound`.
    pub fn rounded(&self) -> VaderScores {
        let round = |x: f64, scale: f64| (x * scale).round() / scale;
        VaderScores {
            neg: round(self.neg, 1e3),
            neu: round(self.neu, 1e3),
            pos: round(self.pos, 1e3),
            compound: round(self.compound, 1e4),
        }
    }
}

/// Why a VADER model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum VaderError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A lexicon line is not `token<TAB>valence<TAB>…`.
    #[error("{file} line {line}: {problem}")]
    Format {
        /// The file's name.
        file: &'static str,
        /// One-based line number.
        line: usize,
        /// What is wrong.
        problem: String,
    },
}

/// A loaded VADER analyser: the lexicon and the emoji descriptions.
#[derive(Debug, Clone)]
pub struct Vader {
    lexicon: FastMap<String, f64>,
    emoji: FastMap<char, String>,
    /// True when no emoji in `emoji` is an ASCII character (the reference's file has none):
    /// ASCII text then needs no emoji lookup at all.
    emoji_ascii_free: bool,
    boosters: FastMap<&'static str, f64>,
    /// The boosters of several words ("kind of"), by their first word, for phrase lookups.
    phrase_boosters: FastMap<&'static str, Vec<(&'static str, f64)>>,
    /// [`IDIOMS`], by their first word (in [`IDIOMS`]' order under each).
    idioms: FastMap<&'static str, Vec<(&'static str, f64)>>,
    /// [`NEGATIONS`], for lookups.
    negations: FastSet<&'static str>,
}

impl Vader {
    /// Loads `vader_lexicon.txt` and `emoji_utf8_lexicon.txt` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, VaderError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| VaderError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        Self::from_texts(&read(LEXICON_FILE)?, &read(EMOJI_FILE)?)
    }

    /// Builds the analyser from the two files' contents.
    pub fn from_texts(lexicon: &str, emoji: &str) -> Result<Self, VaderError> {
        let mut words = FastMap::with_capacity_and_hasher(7_600, Default::default());
        for (n, line) in lexicon.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let mut fields = line.split('\t');
            let (Some(token), Some(valence)) = (fields.next(), fields.next()) else {
                return Err(VaderError::Format {
                    file: LEXICON_FILE,
                    line: n + 1,
                    problem: "expected a token and a valence separated by a tab".to_owned(),
                });
            };
            let valence: f64 = valence.trim().parse().map_err(|_| VaderError::Format {
                file: LEXICON_FILE,
                line: n + 1,
                problem: format!("valence `{valence}` is not a number"),
            })?;
            words.insert(token.to_owned(), valence);
        }
        let mut emojis = FastMap::default();
        for line in emoji.lines() {
            let mut fields = line.trim().split('\t');
            if let (Some(symbol), Some(description)) = (fields.next(), fields.next()) {
                // The reference replaces emoji one character at a time, so entries of several
                // code points (flags, skin tones) never match; they are skipped here too.
                let mut chars = symbol.chars();
                if let (Some(c), None) = (chars.next(), chars.next()) {
                    emojis.insert(c, description.to_owned());
                }
            }
        }
        let boosters = BOOSTERS_UP
            .iter()
            .map(|w| (*w, BOOST))
            .chain(BOOSTERS_DOWN.iter().map(|w| (*w, -BOOST)))
            .collect();
        let emoji_ascii_free = emojis.keys().all(|c| !c.is_ascii());
        let boosters: FastMap<&'static str, f64> = boosters;
        let mut phrase_boosters: FastMap<&'static str, Vec<(&'static str, f64)>> =
            FastMap::default();
        for (phrase, v) in BOOSTERS_UP
            .iter()
            .map(|w| (*w, BOOST))
            .chain(BOOSTERS_DOWN.iter().map(|w| (*w, -BOOST)))
            .filter(|(w, _)| w.contains(' '))
        {
            phrase_boosters
                .entry(first_word(phrase))
                .or_default()
                .push((phrase, v));
        }
        let mut idioms: FastMap<&'static str, Vec<(&'static str, f64)>> = FastMap::default();
        for &(phrase, v) in IDIOMS {
            idioms
                .entry(first_word(phrase))
                .or_default()
                .push((phrase, v));
        }
        Ok(Vader {
            lexicon: words,
            emoji: emojis,
            emoji_ascii_free,
            boosters,
            phrase_boosters,
            idioms,
            negations: NEGATIONS.iter().copied().collect(),
        })
    }

    /// Lexicon entries.
    pub fn lexicon_len(&self) -> usize {
        self.lexicon.len()
    }

    /// Scores `text` (unrounded; see [`VaderScores::rounded`]).
    pub fn polarity_scores(&self, text: &str) -> VaderScores {
        let text = self.describe_emoji(text);
        let text = text.trim();
        let tokens: Vec<&str> = text.split_whitespace().map(strip_punctuation).collect();
        let lower: Vec<Cow<'_, str>> = tokens.iter().map(|t| lowercase(t)).collect();
        let caps_differ = caps_differ(&tokens);
        let mut valences: Vec<f64> = Vec::with_capacity(tokens.len());
        for i in 0..tokens.len() {
            let zero = self.boosters.contains_key(&*lower[i])
                || (lower[i] == "kind" && lower.get(i + 1).is_some_and(|n| n == "of"));
            valences.push(if zero {
                0.0
            } else {
                self.valence(&tokens, &lower, i, caps_differ)
            });
        }
        apply_but(&lower, &mut valences);
        score(&valences, text)
    }

    /// The text with every emoji replaced by its description, spaced as the reference does: a
    /// space before the description unless one is already there, none after. Borrowed when
    /// there is no emoji.
    fn describe_emoji<'t>(&self, text: &'t str) -> Cow<'t, str> {
        let is_emoji =
            |c: &char| !(self.emoji_ascii_free && c.is_ascii()) && self.emoji.contains_key(c);
        if !text.chars().any(|c| is_emoji(&c)) {
            return Cow::Borrowed(text);
        }
        let mut out = String::with_capacity(text.len());
        let mut after_space = true;
        for c in text.chars() {
            match self.emoji.get(&c) {
                Some(description) => {
                    if !after_space {
                        out.push(' ');
                    }
                    out.push_str(description);
                    after_space = false;
                }
                None => {
                    out.push(c);
                    after_space = c == ' ';
                }
            }
        }
        Cow::Owned(out)
    }

    fn in_lexicon(&self, word: &str) -> bool {
        self.lexicon.contains_key(word)
    }

    /// The booster adjustment `word` (as written) gives a sentiment word of `valence`.
    fn booster(&self, word: &str, lower: &str, valence: f64, caps_differ: bool) -> f64 {
        let Some(&boost) = self.boosters.get(lower) else {
            return 0.0;
        };
        let mut scalar = if valence < 0.0 { -boost } else { boost };
        if is_upper(word) && caps_differ {
            scalar += if valence > 0.0 {
                CAPS_BOOST
            } else {
                -CAPS_BOOST
            };
        }
        scalar
    }

    /// The valence of token `i` with every rule but "but" and punctuation applied.
    fn valence(&self, tokens: &[&str], lower: &[Cow<'_, str>], i: usize, caps_differ: bool) -> f64 {
        let Some(&base) = self.lexicon.get(&*lower[i]) else {
            return 0.0;
        };
        let mut valence = base;
        // "no" right before another lexicon word negates that word instead of scoring itself.
        if lower[i] == "no" && lower.get(i + 1).is_some_and(|n| self.in_lexicon(n)) {
            valence = 0.0;
        }
        let before = |k: usize| (i >= k).then(|| &*lower[i - k]);
        if before(1) == Some("no")
            || before(2) == Some("no")
            || (before(3) == Some("no") && matches!(before(1), Some("or" | "nor")))
        {
            valence = base * NEGATION;
        }
        if is_upper(tokens[i]) && caps_differ {
            valence += if valence > 0.0 {
                CAPS_BOOST
            } else {
                -CAPS_BOOST
            };
        }
        for distance in 1..=3 {
            let Some(word) = before(distance) else { break };
            if self.in_lexicon(word) {
                continue;
            }
            let mut scalar = self.booster(tokens[i - distance], word, valence, caps_differ);
            scalar *= match distance {
                2 => 0.95,
                3 => 0.9,
                _ => 1.0,
            };
            valence += scalar;
            valence = negation(&self.negations, valence, lower, i, distance);
            if distance == 3 {
                valence = self.idioms(valence, lower, i);
            }
        }
        self.least(valence, lower, i)
    }

    /// Idioms around token `i` (called only when `i >= 3`), and two-word dampeners
    /// ("kind of") before it. Phrases are compared word by word, without joining them.
    fn idioms(&self, mut valence: f64, lower: &[Cow<'_, str>], i: usize) -> f64 {
        // Every phrase below starts at a word in `i - 3 ..= i`: when none of those words
        // starts an idiom or a booster phrase, nothing can match.
        let starts = |w: &Cow<'_, str>| {
            self.idioms.contains_key(&**w) || self.phrase_boosters.contains_key(&**w)
        };
        if !lower[i - 3..=i].iter().any(starts) {
            return valence;
        }
        let before = [i - 1..i + 1, i - 2..i + 1, i - 2..i, i - 3..i, i - 3..i - 1];
        // The idioms starting with the range's first word are the only ones it can be.
        let idiom = |range: std::ops::Range<usize>| {
            let words = &lower[range];
            self.idioms
                .get(&**words.first()?)?
                .iter()
                .find(|(p, _)| phrase_is(p, words))
                .map(|(_, v)| *v)
        };
        if let Some(v) = before.iter().find_map(|r| idiom(r.clone())) {
            valence = v;
        }
        if i + 1 < lower.len()
            && let Some(v) = idiom(i..i + 2)
        {
            valence = v;
        }
        if i + 2 < lower.len()
            && let Some(v) = idiom(i..i + 3)
        {
            valence = v;
        }
        for range in [&before[3], &before[4], &before[2]] {
            if let Some(boost) = self.phrase_booster(&lower[range.clone()]) {
                valence += boost;
            }
        }
        valence
    }

    /// The booster whose text is `words` joined by spaces, if any.
    fn phrase_booster(&self, words: &[Cow<'_, str>]) -> Option<f64> {
        match words {
            [word] => self.boosters.get(&**word).copied(),
            [first, ..] => self
                .phrase_boosters
                .get(&**first)?
                .iter()
                .find(|(p, _)| phrase_is(p, words))
                .map(|(_, v)| *v),
            [] => None,
        }
    }

    /// "least" before token `i` negates it, unless it is "at least" or "very least".
    fn least(&self, valence: f64, lower: &[Cow<'_, str>], i: usize) -> f64 {
        if i == 0 || lower[i - 1] != "least" || self.in_lexicon("least") {
            return valence;
        }
        if i > 1 && (lower[i - 2] == "at" || lower[i - 2] == "very") {
            valence
        } else {
            valence * NEGATION
        }
    }
}

/// The phrase's first word.
fn first_word(phrase: &'static str) -> &'static str {
    phrase.split(' ').next().unwrap_or(phrase)
}

/// True when `phrase` is `words` joined by single spaces. Tokens never contain a space (they
/// come from splitting on whitespace, and lower-casing makes none), so comparing the
/// phrase's space-separated parts with the words is the same as comparing with the joined
/// text, without building it.
fn phrase_is(phrase: &str, words: &[Cow<'_, str>]) -> bool {
    // The joined text's length first: it rules out almost every phrase without a search.
    let joined_len = words.iter().map(|w| w.len()).sum::<usize>() + words.len().saturating_sub(1);
    if phrase.len() != joined_len {
        return false;
    }
    let mut parts = phrase.split(' ');
    words.iter().all(|w| parts.next() == Some(&**w)) && parts.next().is_none()
}

/// `word` in lower case; borrowed when it is ASCII without capitals (nothing to change).
fn lowercase(word: &str) -> Cow<'_, str> {
    if word
        .bytes()
        .all(|b| b.is_ascii() && !b.is_ascii_uppercase())
    {
        Cow::Borrowed(word)
    } else {
        Cow::Owned(word.to_lowercase())
    }
}

/// The negation rule for the word `distance` tokens before token `i`.
fn negation(
    negations: &FastSet<&str>,
    valence: f64,
    lower: &[Cow<'_, str>],
    i: usize,
    distance: usize,
) -> f64 {
    let at = |k: usize| -> &str { &lower[i - k] };
    let is_negation = |word: &str| is_negation(negations, word);
    match distance {
        1 if is_negation(at(1)) => valence * NEGATION,
        2 if at(2) == "never" && matches!(at(1), "so" | "this") => valence * 1.25,
        2 if at(2) == "without" && at(1) == "doubt" => valence,
        2 if is_negation(at(2)) => valence * NEGATION,
        // As in the reference: "so" or "this" right before the word intensifies here too.
        3 if (at(3) == "never" && matches!(at(2), "so" | "this"))
            || matches!(at(1), "so" | "this") =>
        {
            valence * 1.25
        }
        3 if at(3) == "without" && (at(2) == "doubt" || at(1) == "doubt") => valence,
        3 if is_negation(at(3)) => valence * NEGATION,
        _ => valence,
    }
}

/// A word of [`NEGATIONS`] (looked up in `negations`, the same words), or one with `n't`.
fn is_negation(negations: &FastSet<&str>, word: &str) -> bool {
    negations.contains(word) || (word.as_bytes().contains(&b'\'') && word.contains("n't"))
}

/// Python's `str.isupper`: at least one cased character, and no lower-case one.
fn is_upper(word: &str) -> bool {
    let mut cased = false;
    for c in word.chars() {
        if c.is_lowercase() {
            return false;
        }
        if c.is_uppercase() {
            cased = true;
        }
    }
    cased
}

/// True when some, but not all, tokens are in capitals.
fn caps_differ(tokens: &[&str]) -> bool {
    let upper = tokens.iter().filter(|t| is_upper(t)).count();
    upper > 0 && upper < tokens.len()
}

/// The token without the ASCII punctuation at its ends, unless that leaves two characters or
/// fewer (an emoticon such as `:)` or `:D`).
fn strip_punctuation(token: &str) -> &str {
    let stripped = token.trim_matches(|c: char| c.is_ascii_punctuation());
    if stripped.chars().count() <= 2 {
        token
    } else {
        stripped
    }
}

/// The "but" rule, reproducing the reference's lookup by value: for each position in turn, the
/// first token whose valence equals the one found there is scaled.
fn apply_but(lower: &[Cow<'_, str>], valences: &mut [f64]) {
    let Some(but) = lower.iter().position(|w| w == "but") else {
        return;
    };
    for position in 0..valences.len() {
        let value = valences[position];
        let Some(index) = valences.iter().position(|v| *v == value) else {
            continue;
        };
        if index < but {
            valences[index] = value * 0.5;
        } else if index > but {
            valences[index] = value * 1.5;
        }
    }
}

/// Punctuation emphasis: up to four `!`, and two or more `?`.
fn punctuation_emphasis(text: &str) -> f64 {
    let exclamations = text.matches('!').count().min(4);
    let questions = text.matches('?').count();
    let question_boost = match questions {
        0 | 1 => 0.0,
        2 | 3 => questions as f64 * 0.18,
        _ => 0.96,
    };
    exclamations as f64 * 0.292 + question_boost
}

fn score(valences: &[f64], text: &str) -> VaderScores {
    if valences.is_empty() {
        return VaderScores {
            neg: 0.0,
            neu: 0.0,
            pos: 0.0,
            compound: 0.0,
        };
    }
    let emphasis = punctuation_emphasis(text);
    let mut sum: f64 = valences.iter().sum();
    if sum > 0.0 {
        sum += emphasis;
    } else if sum < 0.0 {
        sum -= emphasis;
    }
    let compound = (sum / (sum * sum + ALPHA).sqrt()).clamp(-1.0, 1.0);
    let mut positive = 0.0;
    let mut negative = 0.0;
    let mut neutral = 0.0;
    for &v in valences {
        if v > 0.0 {
            positive += v + 1.0;
        } else if v < 0.0 {
            negative += v - 1.0;
        } else {
            neutral += 1.0;
        }
    }
    if positive > negative.abs() {
        positive += emphasis;
    } else if positive < negative.abs() {
        negative -= emphasis;
    }
    let total = positive + negative.abs() + neutral;
    VaderScores {
        neg: (negative / total).abs(),
        neu: (neutral / total).abs(),
        pos: (positive / total).abs(),
        compound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Vader {
        Vader::from_texts(
            "good\t1.9\t0.9\t[]\nbad\t-2.5\t0.7\t[]\nno\t-1.2\t0.4\t[]\n:)\t2.0\t0.5\t[]\r\n",
            "😁\tbeaming face with smiling eyes\n",
        )
        .unwrap()
    }

    #[test]
    fn tokens_keep_emoticons_and_lose_surrounding_punctuation() {
        assert_eq!(strip_punctuation("good!!"), "good");
        assert_eq!(strip_punctuation(":)"), ":)");
        assert_eq!(strip_punctuation("(ok)"), "(ok)");
        assert_eq!(strip_punctuation("'quoted'"), "quoted");
        assert!(is_upper("GOOD!") && !is_upper("Good") && !is_upper(":)"));
    }

    #[test]
    fn rules_move_the_score_the_right_way() {
        let v = tiny();
        let plain = v.polarity_scores("it is good").compound;
        assert!(plain > 0.0);
        assert!(v.polarity_scores("it is very good").compound > plain);
        assert!(v.polarity_scores("it is not good").compound < 0.0);
        assert!(v.polarity_scores("it is GOOD").compound > plain);
        assert!(v.polarity_scores("it is good!").compound > plain);
        assert_eq!(v.polarity_scores("").label(), "neutral");
        assert_eq!(v.polarity_scores("so 😁 :)").label(), "positive");
        assert_eq!(v.polarity_scores("bad").label(), "negative");
    }

    #[test]
    fn malformed_lexicons_are_reported_with_their_line() {
        let e = Vader::from_texts("good\t1.9\nbad\tworse\n", "").unwrap_err();
        assert_eq!(
            e.to_string(),
            "vader_lexicon.txt line 2: valence `worse` is not a number"
        );
    }

    #[test]
    fn phrases_compare_word_by_word_as_joined_text_would() {
        fn words(s: &str) -> Vec<Cow<'_, str>> {
            s.split(' ').map(Cow::Borrowed).collect()
        }
        assert!(phrase_is("kind of", &words("kind of")));
        assert!(phrase_is("kiss of death", &words("kiss of death")));
        assert!(!phrase_is("kind of", &words("kind")));
        assert!(!phrase_is("kind", &words("kind of")));
        assert!(!phrase_is("kind of", &words("kind off")));
        assert!(!phrase_is("the bomb", &words("bomb the")));
    }

    #[test]
    fn lowercase_borrows_only_what_needs_no_change() {
        assert!(matches!(lowercase("good"), Cow::Borrowed("good")));
        assert!(matches!(lowercase(":)"), Cow::Borrowed(":)")));
        assert_eq!(lowercase("GOOD"), "good");
        assert_eq!(lowercase("ÉTÉ"), "été");
        // Not ASCII: lower-cased by the standard library, whatever it is.
        assert_eq!(lowercase("ǅ"), "ǆ");
    }

    #[test]
    fn text_without_emoji_is_not_copied_and_emoji_are_described() {
        let v = tiny();
        assert!(matches!(
            v.describe_emoji("plain :) text"),
            Cow::Borrowed(_)
        ));
        assert!(matches!(v.describe_emoji("été"), Cow::Borrowed(_)));
        assert_eq!(
            v.describe_emoji("so😁"),
            "so beaming face with smiling eyes"
        );
    }

    #[test]
    fn two_word_dampeners_apply() {
        let v = tiny();
        // "kind of" three and two tokens before a sentiment word dampens it.
        let plain = v.polarity_scores("a b it good").compound;
        let damped = v.polarity_scores("kind of it good").compound;
        assert!(0.0 < damped && damped < plain, "{damped} < {plain}");
        assert_eq!(
            v.phrase_booster(&[Cow::Borrowed("kind"), Cow::Borrowed("of")]),
            Some(-BOOST)
        );
        assert_eq!(v.phrase_booster(&[Cow::Borrowed("very")]), Some(BOOST));
        assert_eq!(
            v.phrase_booster(&[Cow::Borrowed("kind"), Cow::Borrowed("off")]),
            None
        );
    }
}
