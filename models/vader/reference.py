"""Records the reference VADER scores that inferflow's Rust implementation is tested against.

    python3 -m venv /tmp/vader-venv
    /tmp/vader-venv/bin/pip install -r models/vader/requirements.txt
    /tmp/vader-venv/bin/python models/vader/reference.py

Runs the reference implementation (the `vaderSentiment` package, version pinned in
requirements.txt) on the fixed sentences below and writes `reference.json` beside this file:
for each sentence, the `neg`, `neu`, `pos` and `compound` scores exactly as
`SentimentIntensityAnalyzer.polarity_scores` returns them (rounded by the package: three
decimals, four for compound). It also checks that the lexicon files shipped here are the
package's own, byte for byte.
"""

import hashlib
import json
import pathlib

import vaderSentiment
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

OUT = pathlib.Path(__file__).resolve().parent

# Each group exercises one rule; the comment names it.
SENTENCES = [
    # Plain lexicon words, neutral text, empty text.
    "The book was good.",
    "The food was terrible.",
    "The meeting is at noon in room four.",
    "",
    "   ",
    # Boosters and dampeners, one to three words before the sentiment word.
    "The book was very good.",
    "The book was extremely very good.",
    "The service was really incredibly awful.",
    "The book was only kind of good.",
    "The movie was sort of okay.",
    "It was slightly disappointing.",
    "The hotel was barely acceptable.",
    # Negation, including contractions and three-word reach.
    "The book was not good.",
    "The book isn't good.",
    "I don't think it was a good idea.",
    "The food was never very good.",
    "Not bad at all.",
    "Nothing about it was great.",
    "It was without a doubt an excellent idea.",
    "It has never been so good.",
    "No problems at all with the delivery.",
    "There was no love and no joy.",
    "It isn't horrible or awful.",
    # "least".
    "This is the least helpful answer.",
    "At least it isn't a horrible book.",
    "It is very least useful.",
    # Contrastive "but".
    "The plot was good, but the characters are uncompelling and the dialog is not great.",
    "The food was great but the service was terrible.",
    "I hate the rain but I love the smell afterwards.",
    # Capitals for emphasis (only when other words are not in capitals).
    "The book was GOOD.",
    "The food was TERRIBLE and the staff were RUDE.",
    "THE WHOLE SENTENCE IS IN CAPITALS AND IT IS GREAT.",
    "The service was VERY good.",
    # Exclamation and question marks.
    "The book was good!",
    "The book was good!!!",
    "The book was good!!!!!!!!",
    "Was the book good??",
    "Was the book good?????",
    "Is it bad?",
    # Idioms and special cases.
    "The new album is the bomb.",
    "This cake is to die for.",
    "Yeah right, that went well.",
    "He is such a badass.",
    "That was the kiss of death for the project.",
    # Emoticons, slang, emoji.
    "Make sure you :) or :D today!",
    "Today SUX!",
    "Today only kinda sux! But I'll get by, lol",
    "Catch utf-8 emoji such as 💘 and 💋 and 😁",
    "I am so happy 😁",
    # Longer, mixed text.
    "VADER is VERY SMART, uber handsome, and FRIGGIN FUNNY!!!",
    "VADER is not smart, handsome, nor funny.",
    "It was one of the worst movies I've seen, despite good reviews.",
    "Unbelievably bad acting!! Poor direction. VERY poor production.",
    "The delivery was late, the box was damaged, and support never answered, but the refund was quick and friendly.",
    "Great product, would definitely buy again.",
    "Absolutely love it, best purchase this year!",
    "Worst customer service ever, never again.",
    "It works as described.",
]


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main():
    package_dir = pathlib.Path(vaderSentiment.__file__).resolve().parent
    for name in ["vader_lexicon.txt", "emoji_utf8_lexicon.txt"]:
        ours, theirs = sha256(OUT / name), sha256(package_dir / name)
        assert ours == theirs, f"{name} differs from the package's copy"
    analyzer = SentimentIntensityAnalyzer()
    doc = {
        "comment": "Scores from vaderSentiment 3.3.2's SentimentIntensityAnalyzer.polarity_scores, "
        "as it rounds them. Regenerate with models/vader/reference.py.",
        "cases": [{"text": text, **analyzer.polarity_scores(text)} for text in SENTENCES],
    }
    (OUT / "reference.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(SENTENCES)} cases")


if __name__ == "__main__":
    main()
