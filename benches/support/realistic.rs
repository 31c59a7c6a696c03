//! The realistic workload of the end-to-end bench (`benches/e2e.rs`), which
//! `benches/realistic.rs` runs in process too: requests for the `realistic` pipeline (a
//! customer review by one of N users) and those users' `profile` features. Included with
//! `#[path = "support/realistic.rs"] mod realistic;`.

use inferflow::feature_store::FeatureUpdate;

/// A request for the `realistic` pipeline: a review by one of `entities` users, whose text is
/// as long as it takes to make the request about `bytes` bytes.
pub(crate) fn request(tag: &str, seq: usize, bytes: usize, entities: usize) -> String {
    let user = mix(seq as u64 ^ 0x5eed) % entities.max(1) as u64;
    let body = |text: &str| {
        format!(
            r#"{{"request_id":"{tag}-{seq}","pipeline":"realistic","entity":{{"type":"user","id":"u-{user}"}},"data":{{"text":"{text}"}}}}"#
        )
    };
    let text = review_text(seq, bytes.saturating_sub(body("").len()));
    body(&text)
}

/// The `profile` feature of users `u-0` … `u-{entities − 1}`, written at `version`: a
/// segment, a trust score and a review count, picked by a hash of the user's number.
pub(crate) fn profiles(entities: usize, version: u64) -> Vec<FeatureUpdate> {
    let segments = ["gold", "silver", "silver", "bronze", "bronze", "bronze"];
    (0..entities)
        .map(|user| {
            let h = mix(user as u64);
            let values = serde_json::json!({
                "segment": segments[(h % segments.len() as u64) as usize],
                "trust": ((h >> 8) % 1000) as f64 / 1000.0,
                "reviews": (h >> 20) % 200,
            });
            let serde_json::Value::Object(values) = values else {
                unreachable!("an object literal")
            };
            FeatureUpdate::new("user", format!("u-{user}"), "profile", values, version)
        })
        .collect()
}

/// Pieces of customer reviews: positive, negative and neutral, with the capitals, repeated
/// punctuation and emoticons VADER weighs. ASCII without quotes or backslashes (they go into
/// JSON as they are).
const REVIEW_PARTS: &[&str] = &[
    "The delivery was FAST and the packaging was great.",
    "Terrible support, nobody answered my emails for a week!!!",
    "It works as described.",
    "I love the colour but the battery life is awful.",
    "Not bad for the price :)",
    "Absolutely horrible experience, never again.",
    "Pretty good overall, a few scratches on the box.",
    "The app keeps crashing and I am very disappointed.",
    "Five stars, would buy again!",
    "meh",
    "The size was wrong so I sent it back.",
    "Excellent quality, highly recommended.",
    "Arrived late and damaged :(",
    "Does the job, nothing special.",
    "My kids LOVE it, thank you so much!!",
    "The instructions were confusing and one screw was missing.",
    "Cheap plastic, broke after two days.",
    "Friendly courier, quick refund, no complaints.",
];

/// A review text of `len` bytes (ASCII): a tab and messy spacing for the cleaning step, the
/// request's number (so no two texts are alike and the result cache never answers), then
/// review pieces picked by `seq`.
fn review_text(seq: usize, len: usize) -> String {
    let mut text = format!("  \\tOrder #{seq}:  ");
    let minimum = text.len();
    let mut state = seq as u64;
    while text.len() < len {
        state = mix(state);
        let part = REVIEW_PARTS[(state % REVIEW_PARTS.len() as u64) as usize];
        text.push_str(part);
        text.push_str(if state.is_multiple_of(5) { "   " } else { " " });
    }
    text.truncate(len.max(minimum));
    text
}

/// SplitMix64's finaliser: a well-spread hash of a counter.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
