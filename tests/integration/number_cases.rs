//! JSON number texts that must pass through inferflow unchanged: edge cases, and random
//! doubles in their shortest round-trip form. Shared by the integration tests (`numbers`,
//! `feature_store`) and tests/batch.rs (`#[path]`).

#![allow(dead_code, unreachable_pub)]

/// Written exactly so, each must come out exactly so.
pub const EDGE: &[&str] = &[
    // One step off before serde_json's `float_roundtrip`.
    "91.57142857142857",
    "0.12044115189281823",
    // ±2^53 ± 1: the edge of the integers a double holds.
    "9007199254740991",
    "9007199254740992",
    "9007199254740993",
    "-9007199254740991",
    "-9007199254740992",
    "-9007199254740993",
    // The 64-bit edges, and beyond ±2^64.
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775808",
    "-9223372036854775809",
    "12345678901234567890123",
    "-12345678901234567890123",
    // Zeros, exponents, notations.
    "-0.0",
    "-0",
    "0",
    "1e300",
    "5e-324",
    "1.5E+10",
    "2.5e-10",
    "1e-400",
    "1.7976931348623157e308",
    "0.1",
    "100.0",
    "3.0e2",
];

/// A number beyond the double range: a JSON number all the same, kept as written.
pub const BEYOND_F64: &str = "1E400";

/// `n` random doubles in shortest round-trip form: half as Rust's `{}` of a double in [0, 1)
/// (`0.12044115189281823`), half as `{:?}` of a random bit pattern (any magnitude; exponent
/// form when very large or small).
pub fn random(seed: u64, n: usize) -> Vec<String> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        if out.len() % 2 == 0 {
            out.push(format!("{}", rng.f64()));
        } else {
            let x = f64::from_bits(rng.u64(..));
            if x.is_finite() {
                out.push(format!("{x:?}"));
            }
        }
    }
    out
}

/// The edge cases and `n` random doubles.
pub fn all(seed: u64, n: usize) -> Vec<String> {
    EDGE.iter()
        .map(|s| (*s).to_owned())
        .chain(random(seed, n))
        .collect()
}

/// The key of case `i` (unique enough not to occur elsewhere in a result document).
pub fn key(i: usize) -> String {
    format!("exact_{i}")
}

/// A JSON object text with case `i` under [`key`]`(i)`: `{"exact_0":91.57142857142857,...}`.
pub fn object(cases: &[String]) -> String {
    let fields: Vec<String> = cases
        .iter()
        .enumerate()
        .map(|(i, text)| format!("\"{}\":{text}", key(i)))
        .collect();
    format!("{{{}}}", fields.join(","))
}

/// `text` as inferflow writes it back: every digit kept; an exponent is spelled `e+N`/`e-N`
/// (serde_json's `arbitrary_precision` normalises `1E400` and `1e400` to `1e+400`).
pub fn as_written(text: &str) -> String {
    match text.find(['e', 'E']) {
        None => text.to_owned(),
        Some(at) => {
            let (mantissa, exponent) = (&text[..at], &text[at + 1..]);
            if exponent.starts_with(['+', '-']) {
                format!("{mantissa}e{exponent}")
            } else {
                format!("{mantissa}e+{exponent}")
            }
        }
    }
}

/// Checks, on the bytes as written (not through a parser), that `doc` carries every case
/// with its digits (its exact text, but for the spelling of an exponent: [`as_written`]) under
/// its key, wherever the key occurs (at least once). Panics with every case that changed.
pub fn assert_carried(doc: &str, cases: &[String], what: &str) {
    let mut changed = Vec::new();
    for (i, text) in cases.iter().enumerate() {
        let needle = format!("\"{}\":", key(i));
        let mut found = 0;
        for (at, _) in doc.match_indices(&needle) {
            found += 1;
            let rest = doc[at + needle.len()..].trim_start();
            let end = rest
                .find(|c: char| matches!(c, ',' | '}' | ']') || c.is_whitespace())
                .unwrap_or(rest.len());
            if rest[..end] != as_written(text) {
                changed.push(format!("{text} came back as {}", &rest[..end]));
            }
        }
        if found == 0 {
            changed.push(format!("{text} (key {}) is missing", key(i)));
        }
    }
    assert!(
        changed.is_empty(),
        "{what}: {} of {} numbers changed:\n  {}\nin {}",
        changed.len(),
        cases.len(),
        changed.join("\n  "),
        doc.chars().take(3000).collect::<String>()
    );
}
